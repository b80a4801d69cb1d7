"""diffusers binding: parity with unpatched U-Net/ControlNet, rows, gradients, save/load, detach."""

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from xsr_core.adapter import AdaINAdapter, AdaINAdapterConfig
from xsr_core.adapter.diffusers_binding import DiffusersAdapterBinding
from xsr_core.testing.zoo import TINY_UNET_CONFIG
from xsr_core.weights import load_model, save_model

TINY = {**TINY_UNET_CONFIG, "sample_size": 8}  # the tiny zoo U-Net: SD1.5 structure, tiny widths
EMBED = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(one_torch_thread):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY).eval()
    controlnet = ControlNetModel.from_unet(unet).eval()
    # from_unet zero-initialises the ControlNet's output convs: give them weights so its blocks matter
    with torch.no_grad():
        for m in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            m.weight.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        x=torch.randn(2, 4, 8, 8, generator=g),
        t=torch.tensor([500, 500]),
        ctx=torch.randn(2, 7, 32, generator=g),
        hint=torch.rand(2, 3, 64, 64, generator=g),
    )
    E = torch.randn(2, 9, EMBED, generator=g)
    ref = forward(unet, controlnet, inputs, grad=False)
    return unet, controlnet, inputs, E, ref


def forward(unet, controlnet, inp, grad=False):
    with torch.set_grad_enabled(grad):
        down, mid = controlnet(inp["x"], inp["t"], inp["ctx"], controlnet_cond=inp["hint"], return_dict=False)
        out = unet(
            inp["x"], inp["t"], inp["ctx"], down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
    return list(down) + [mid, out]


def make_adapter(unet, gates=0.0, seed=0):
    torch.manual_seed(seed)
    ad = AdaINAdapter(AdaINAdapterConfig.from_unet_config(unet.config, embed_dim=EMBED, proj_hidden=32))
    with torch.no_grad():
        ad.head.weight.normal_(0, 0.3)  # random statistics: parity must not depend on μ≈0, σ≈1
        ad.gates.fill_(gates)
    return ad


def all_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_zero_gates_and_zero_strength_are_bit_identical(setup):
    unet, controlnet, inp, E, ref = setup
    ad = make_adapter(unet, gates=0.0)
    binding = DiffusersAdapterBinding(ad, unet=unet, controlnet=controlnet)
    try:
        assert len(binding.patched_blocks) == 23
        assert all_equal(forward(unet, controlnet, inp), ref)  # attached, no context
        with binding.embedding(E):
            assert all_equal(forward(unet, controlnet, inp), ref)  # zero gates, inference (short-circuit)
            assert all_equal(forward(unet, controlnet, inp, grad=True), ref)  # zero gates, every site computed
        with torch.no_grad():
            ad.gates.fill_(0.5)
        with binding.embedding(E, strength=0.0):
            assert all_equal(forward(unet, controlnet, inp), ref)
        with binding.embedding(E):
            out = forward(unet, controlnet, inp)
        # non-zero gates change the ControlNet residuals and the U-Net output
        assert not torch.equal(out[1], ref[1]) and not torch.equal(out[-2], ref[-2])
        assert not torch.equal(out[-1], ref[-1])
    finally:
        binding.detach()


def test_rows_leave_unselected_rows_bit_identical(setup):
    unet, controlnet, inp, E, ref = setup
    ad = make_adapter(unet, gates=0.5)
    binding = DiffusersAdapterBinding(ad, unet=unet, controlnet=controlnet)
    try:
        with binding.embedding(E):
            full = forward(unet, controlnet, inp)
        with binding.embedding(E[:1], rows=[True, False]):  # one embedding, for the selected row
            part = forward(unet, controlnet, inp)
    finally:
        binding.detach()
    for p, r, f in zip(part, ref, full):
        assert torch.equal(p[1], r[1])
        torch.testing.assert_close(p[0], f[0], rtol=1e-4, atol=1e-5)
    assert not torch.equal(full[-1][1], ref[-1][1]) and not torch.equal(part[-1][0], ref[-1][0])


def test_gradients_reach_adapter_and_controlnet_not_frozen_unet(setup):
    unet, controlnet, inp, E, ref = setup
    unet.requires_grad_(False)
    ad = make_adapter(unet, gates=0.0)  # the real init: zero gates
    binding = DiffusersAdapterBinding(ad, unet=unet, controlnet=controlnet)
    try:
        with binding.embedding(E):
            out = forward(unet, controlnet, inp, grad=True)
            out[-1].square().mean().backward()
        assert torch.count_nonzero(ad.gates.grad) > 0.9 * ad.gates.numel()
        assert all(p.grad is None for p in unet.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in controlnet.parameters())
        ad.zero_grad()
        with torch.no_grad():
            ad.gates.fill_(0.3)
        with binding.embedding(E):
            forward(unet, controlnet, inp, grad=True)[-1].square().mean().backward()
        for name, p in ad.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    finally:
        binding.detach()
        controlnet.zero_grad(set_to_none=True)
        unet.requires_grad_(True)


def test_save_load_round_trip_gives_identical_outputs(setup, tmp_path):
    unet, controlnet, inp, E, ref = setup
    ad = make_adapter(unet, gates=0.4)
    with torch.no_grad():
        ad.gates.add_(torch.rand(ad.gates.shape) * 0.2)
    binding = DiffusersAdapterBinding(ad, unet=unet, controlnet=controlnet)
    with binding.embedding(E):
        a = forward(unet, controlnet, inp)
    binding.detach()
    loaded = load_model(save_model(ad, tmp_path / "ad.safetensors"), expected=AdaINAdapter)
    binding = DiffusersAdapterBinding(loaded, unet=unet, controlnet=controlnet)
    with binding.embedding(E):
        b = forward(unet, controlnet, inp)
    binding.detach()
    assert all_equal(a, b) and not all_equal(a, ref)


def _hook_count(*models):
    return sum(len(m._forward_hooks) for model in models for m in model.modules())


def test_hooks_leave_processors_alone_and_detach_removes_them(setup):
    unet, controlnet, inp, E, ref = setup
    originals = {n: p for n, p in unet.attn_processors.items()}
    ad = make_adapter(unet, gates=0.5)
    binding = DiffusersAdapterBinding(ad, unet=unet, controlnet=controlnet)
    assert all(unet.attn_processors[n] is p for n, p in originals.items())  # no processor of ours
    patched = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0")
    for m in (patched.norm2, patched.attn2.to_q, patched.attn2.to_k, patched.norm3):
        assert len(m._forward_hooks) == 1
    assert len(patched.attn1.to_q._forward_hooks) == 0 and len(patched.norm1._forward_hooks) == 0
    assert _hook_count(unet, controlnet) == 4 * 23
    binding.detach()
    binding.detach()  # idempotent
    assert _hook_count(unet, controlnet) == 0
    assert all_equal(forward(unet, controlnet, inp), ref)


def test_q_k_sites_work_with_any_attention_processor(setup):
    """The q/k hooks sit on to_q/to_k, so the classic AttnProcessor gives what AttnProcessor2_0 gives."""
    unet, controlnet, inp, E, ref = setup
    ad = make_adapter(unet, gates=0.5)
    binding = DiffusersAdapterBinding(ad, unet=unet, controlnet=controlnet)
    try:
        with torch.no_grad(), binding.embedding(E):
            sdpa = forward(unet, controlnet, inp)
            unet.set_attn_processor(AttnProcessor())
            controlnet.set_attn_processor(AttnProcessor())
            classic = forward(unet, controlnet, inp)
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
        controlnet.set_attn_processor(AttnProcessor2_0())
        binding.detach()
    assert not all_equal(sdpa, ref)
    for a, b in zip(sdpa, classic, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unet_only_binding_and_mismatched_adapter(setup):
    unet, controlnet, inp, E, ref = setup
    ad = make_adapter(unet, gates=0.5)
    binding = DiffusersAdapterBinding(ad, unet=unet)
    try:
        assert len(binding.patched_blocks) == 16
        with binding.embedding(E):
            out = forward(unet, controlnet, inp)
        assert all_equal(out[:-1], ref[:-1]) and not torch.equal(out[-1], ref[-1])  # ControlNet untouched
    finally:
        binding.detach()
    other = AdaINAdapter(
        AdaINAdapterConfig.from_unet_config(
            dict(TINY, block_out_channels=(32, 64, 64, 64)), embed_dim=EMBED, proj_hidden=8
        )
    )
    with pytest.raises(ValueError, match="widths"):
        DiffusersAdapterBinding(other, unet=unet)
    assert _hook_count(unet) == 0  # rolled back
    binding = DiffusersAdapterBinding(ad, unet=unet)
    with pytest.raises(ValueError, match="exactly one"):
        with binding.embedding():
            pass
    binding.detach()


def test_sites_adapted_in_place_on_cuda_match_new_tensors(setup, monkeypatch):
    """On CUDA (fused kernel) the binding writes each site's result into the module's fresh output; the model's
    outputs are those of the out-of-place kernel, bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (the fused Triton kernel); run on the GPU machine")
    import copy
    import importlib

    A = importlib.import_module("xsr_core.adapter.adain")
    if not A._triton_kernel():
        pytest.skip("Triton not available")
    unet, controlnet, inp, E, _ = setup
    dev = torch.device("cuda")
    unet16, cn16 = (copy.deepcopy(m).to(dev, torch.float16) for m in (unet, controlnet))  # the fixture's stay fp32
    inp16 = {k: (v.to(dev, torch.float16) if v.is_floating_point() else v.to(dev)) for k, v in inp.items()}
    ad = make_adapter(unet, gates=0.5).to(dev, torch.float16)
    binding = DiffusersAdapterBinding(ad, unet=unet16, controlnet=cn16)
    calls = []
    real = A._adain_triton

    def spy(h, *args):
        out = real(h, *args)
        calls.append((args[5], out.data_ptr() == h.data_ptr()))  # (inplace asked for, done)
        return out

    try:
        with torch.inference_mode():
            for _ in range(2):  # the first launches compile and check (out of place); the second runs in place
                with binding.embedding(E.to(dev, torch.float16)):
                    monkeypatch.setattr(A, "_adain_triton", spy)
                    inplace = forward(unet16, cn16, inp16)
                    monkeypatch.setattr(A, "_adain_triton", lambda *a: real(*a[:6]))  # every result a new tensor
                    fresh = forward(unet16, cn16, inp16)
                    monkeypatch.setattr(A, "_adain_triton", real)
    finally:
        binding.detach()
    assert all_equal(inplace, fresh)
    sites = 4 * len(ad.block_ids)
    assert len(calls) == 2 * sites and all(asked for asked, _ in calls)  # every site offered its output
    assert sum(done for _, done in calls[sites:]) == sites  # and, once compiled, every one was adapted in place
