"""Weight fingerprints (xsr_core.fingerprint): dtype-invariant, file == live module, retraining detected."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from xsr_core import fingerprint as wfp


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_blocks.0.0.weight": torch.randn(32, 4, 3, 3, generator=g),
        "zero_convs.0.0.bias": torch.randn(32, generator=g),
        "time_embed.0.weight": torch.randn(128, 32, generator=g),
        "scalar": torch.tensor(0.5),
        "position_ids": torch.arange(7),
    }


def test_same_weights_any_dtype_prefix_or_source(tmp_path):
    sd = _sd(0)
    fp = wfp.fingerprint_state_dict(sd)
    assert fp["tensors"] == 4  # integer buffers are not weights
    for dtype in (torch.float16, torch.bfloat16):
        assert wfp.same_weights(
            fp, wfp.fingerprint_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()})
        )
    path = tmp_path / "cn.safetensors"
    save_file({"control_model." + k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}, str(path))
    from_file = wfp.fingerprint_file(path)
    assert wfp.same_weights(fp, from_file) and wfp.same_weights(from_file, wfp.loads(wfp.dumps(fp)))


def test_changed_weights_or_layout_differ():
    sd = _sd(0)
    fp = wfp.fingerprint_state_dict(sd)
    assert not wfp.same_weights(fp, wfp.fingerprint_state_dict(_sd(1)))
    trained = dict(sd)
    trained["zero_convs.0.0.bias"] = sd["zero_convs.0.0.bias"] + 0.05  # one fine-tuned tensor
    assert not wfp.same_weights(fp, wfp.fingerprint_state_dict(trained))
    renamed = {("x." + k): v for k, v in sd.items()}
    assert not wfp.same_weights(fp, wfp.fingerprint_state_dict(renamed))


def test_diffusers_controlnet_fingerprint_matches_its_ldm_export(tmp_path):
    from xsr_core.testing.zoo import build_tiny_sd, write_controlnet

    cn = build_tiny_sd(seed=3)[3]
    path = write_controlnet(cn, tmp_path / "cn.safetensors")
    assert wfp.same_weights(wfp.fingerprint_diffusers(cn, controlnet=True), wfp.fingerprint_file(path))
