"""OpenCLIP vision encoders (e.g. ViT-H/14 of the SD2.x family) through the one CLIP-vision contract.

A tiny random OpenCLIP ViT built from a config by open_clip itself (no download), saved in OpenCLIP's
own key layout (``visual.*``), must: load with ClipVisionEncoder.from_file and run through open_clip;
give the features of the same weights converted to the Hugging Face layout (what ComfyUI's
CLIPVisionLoader converts such a file to) and run by transformers; carry that layout's fingerprint; and
build a reference DB that answers queries of the HF-layout encoder and refuses another encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from xsr_core.clip_vision import (
    META_CLIP_CONFIG,
    ClipVisionEncoder,
    ClipVisionError,
    OpenClipVisionTower,
    build_clip_vision_model,
    fingerprint_state_dict,
    is_open_clip_state_dict,
    open_clip_to_hf,
)
from xsr_core.testing.tiny_clip import tiny_clip_config

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is in the [openclip]/[train]/[test] extras")

VISION = dict(image_size=224, layers=2, width=64, head_width=32, patch_size=14, mlp_ratio=2.0)
# the same tower as a transformers CLIPVisionConfig (the layout ComfyUI's CLIPVisionLoader converts to):
# OpenCLIP's MLP ratio and exact GELU instead of the tiny zoo encoder's 4x quick_gelu
HF_CONFIG = {
    **tiny_clip_config(hidden=VISION["width"], layers=VISION["layers"], heads=VISION["width"] // VISION["head_width"]),
    "intermediate_size": int(VISION["width"] * VISION["mlp_ratio"]),
    "hidden_act": "gelu",
}


def _tiny_open_clip(seed: int):
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=32, vision_cfg=VISION, text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1)
    )
    with torch.no_grad():  # open_clip's init leaves LN at identity and the class token tiny: perturb all
        for p in model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("openclip")
    out = {}
    for seed in (0, 1):
        model = _tiny_open_clip(seed)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}  # visual.* and the text tower
        path = d / f"open_clip_{seed}.safetensors"
        save_file(sd, str(path), metadata={META_CLIP_CONFIG: json.dumps(HF_CONFIG)})
        out[seed] = (path, model, sd)
    return out


def _pixels(b=3, seed=0):
    return torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def test_open_clip_file_loads_and_runs_through_open_clip(files):
    path, model, _ = files[0]
    enc = ClipVisionEncoder.from_file(path)
    assert isinstance(enc.model, OpenClipVisionTower) and enc.dim == 64
    feats = enc.encode(_pixels())
    assert feats.tokens.shape == (3, 257, 64) and feats.cls.shape == (3, 64)
    # the contract: cls = ln_post(class token); open_clip's own image embedding = cls @ proj
    with torch.no_grad():
        want = model.visual(_pixels())
    assert torch.allclose(feats.cls @ model.visual.proj, want, atol=1e-5)


def test_same_features_and_fingerprint_as_the_hf_layout_comfyui_loads(files):
    path, _, sd = files[0]
    enc = ClipVisionEncoder.from_file(path)
    assert is_open_clip_state_dict(sd)
    hf = open_clip_to_hf(sd)
    ref = build_clip_vision_model(hf, HF_CONFIG, source="converted")
    with torch.no_grad():
        out = ref.vision_model(pixel_values=_pixels()) if hasattr(ref, "vision_model") else ref(pixel_values=_pixels())
    feats = enc.encode(_pixels())
    assert torch.allclose(feats.tokens, out.last_hidden_state, atol=1e-4)
    assert torch.allclose(feats.cls, out.pooler_output, atol=1e-4)
    assert enc.fingerprint == fingerprint_state_dict(hf)
    # and a file holding the converted (HF-layout) weights is the same encoder to a DB
    hf_file = path.with_name("hf_layout.safetensors")
    save_file(hf, str(hf_file), metadata={META_CLIP_CONFIG: json.dumps(HF_CONFIG)})
    assert ClipVisionEncoder.from_file(hf_file).fingerprint == enc.fingerprint
    assert ClipVisionEncoder.from_file(files[1][0]).fingerprint != enc.fingerprint


def test_reference_db_built_with_open_clip_answers_hf_layout_queries(files, tmp_path):
    from xsr_core.refdb import BuildConfig, ReferenceDB, RefDBError, build_db
    from xsr_core.testing.synthetic import write_synthetic_images

    path = files[0][0]
    write_synthetic_images(tmp_path / "hr", 6, size=96, seed=3)
    build_db(
        tmp_path / "db",
        path,
        images=tmp_path / "hr",
        config=BuildConfig(mode="packed", workers=0, device="cpu", progress=False, batch_size=4),
    )
    hf_file = tmp_path / "hf.safetensors"
    save_file(open_clip_to_hf(files[0][2]), str(hf_file), metadata={META_CLIP_CONFIG: json.dumps(HF_CONFIG)})
    db = ReferenceDB.open(tmp_path / "db")
    hf_enc = ClipVisionEncoder.from_file(hf_file)
    db.check_encoder(hf_enc.fingerprint)  # same weights, other layout: accepted
    # each HR image, encoded by the HF-layout encoder, finds itself first in the OpenCLIP-built DB
    import numpy as np
    from PIL import Image

    files_hr = sorted((tmp_path / "hr").iterdir())
    imgs = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255) for f in files_hr]
    )
    q = torch.nn.functional.normalize(hf_enc.encode_images(imgs).cls, dim=-1).numpy()
    scores, ids = db.search(q, k=1)
    assert [Path(r.path).name for r in db.records([int(i) for i in ids[:, 0]])] == [f.name for f in files_hr]
    assert np.all(scores[:, 0] > 0.999)
    with pytest.raises(RefDBError):
        db.check_encoder(ClipVisionEncoder.from_file(files[1][0]).fingerprint)


def test_unsupported_open_clip_variant_is_named():
    with pytest.raises(ClipVisionError, match="ls_1.gamma"):
        open_clip_to_hf(
            {
                "visual.conv1.weight": torch.zeros(8, 3, 14, 14),
                "visual.transformer.resblocks.0.ls_1.gamma": torch.zeros(8),
            }
        )
