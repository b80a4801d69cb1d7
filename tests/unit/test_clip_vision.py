"""CLIP preprocessing contract, CLIP vision file loading, features and encoder fingerprint."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from xsr_core.clip_preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PREPROCESS_VERSION,
    normalize_u8,
    preprocess_hr,
    preprocess_lr,
    resize_crop_u8,
)
from xsr_core.clip_vision import (
    META_CLIP_CONFIG,
    ClipVisionEncoder,
    ClipVisionError,
    fingerprint_state_dict,
    infer_config,
)
from xsr_core.testing.tiny_clip import make_tiny_clip_vision


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return make_tiny_clip_vision(tmp_path_factory.mktemp("clip") / "tiny.safetensors", seed=0)


def _images(b, h, w, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, c, generator=g)


# ------------------------------------------------------------------------------ preprocessing


def test_preprocess_shapes_and_dtype():
    assert preprocess_hr(_images(2, 300, 200)).shape == (2, 3, 224, 224)
    assert preprocess_lr(_images(3, 32, 32)).shape == (3, 3, 224, 224)
    assert preprocess_lr(_images(1, 24, 40)).shape == (1, 3, 224, 224)
    assert preprocess_hr(_images(1, 224, 224)).dtype == torch.float32
    assert isinstance(PREPROCESS_VERSION, str) and PREPROCESS_VERSION


def test_constant_image_normalises_to_clip_stats():
    img = torch.full((1, 317, 251, 3), 153 / 255.0)  # an 8-bit level: no rounding tie
    x = preprocess_hr(img)
    want = (torch.tensor(153 / 255.0) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(x[0, :, 100, 100], want, atol=1e-5)
    assert torch.allclose(x, x[:, :, :1, :1].expand_as(x), atol=1e-5)


def test_lr_square_is_direct_bicubic_upsample():
    lr = _images(2, 32, 32, seed=1)
    want = F.interpolate(lr.movedim(-1, 1), size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    want = (want * 255).clamp(0, 255).round() / 255
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(preprocess_lr(lr), (want - mean) / std, atol=1e-5)


def test_center_crop_takes_the_middle():
    # a tall image: left/right halves differ, top/bottom thirds are cropped away
    img = torch.zeros(1, 448, 224, 3)
    img[:, 112:336] = 1.0  # the middle 224 rows after a no-op resize (short side is already 224)
    u8 = resize_crop_u8(img)
    assert u8.shape == (1, 3, 224, 224)
    assert int(u8.min()) == 255  # only the white middle band survives the centre crop


def test_split_pipeline_equals_preprocess_and_channels():
    img = _images(2, 190, 260, seed=2)
    assert torch.equal(preprocess_hr(img), normalize_u8(resize_crop_u8(img)))
    # uint8 input, grayscale and RGBA inputs (ComfyUI IMAGE conventions)
    # uint8 input (decoded files) resamples on the 0..255 scale: equal up to float rounding at ties
    a = resize_crop_u8((img * 255).round().to(torch.uint8)).int()
    b = resize_crop_u8((img * 255).round() / 255).int()
    assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 1e-3
    gray = _images(1, 100, 120, c=1)
    assert torch.equal(preprocess_hr(gray), preprocess_hr(gray.expand(1, 100, 120, 3)))
    rgba = torch.cat([img[:1], torch.ones(1, 190, 260, 1)], dim=-1)
    assert torch.equal(preprocess_hr(rgba), preprocess_hr(img[:1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_preprocess_on_cuda():
    img = _images(1, 64, 48)
    assert torch.allclose(preprocess_lr(img.cuda()).cpu(), preprocess_lr(img), atol=2e-2)


# ------------------------------------------------------------------------------ file + encoder


def test_tiny_file_is_byte_deterministic(tmp_path, tiny_file):
    other = make_tiny_clip_vision(tmp_path / "again.safetensors", seed=0)
    assert hashlib.sha256(other.read_bytes()).digest() == hashlib.sha256(tiny_file.read_bytes()).digest()
    with safe_open(str(tiny_file), "pt") as f:
        cfg = json.loads(f.metadata()[META_CLIP_CONFIG])
        assert "vision_model.encoder.layers.1.mlp.fc1.weight" in f.keys()
        assert "visual_projection.weight" in f.keys()
    assert cfg["hidden_size"] == 32 and cfg["patch_size"] == 14 and cfg["image_size"] == 224


def test_encode_features(tiny_file):
    enc = ClipVisionEncoder.from_file(tiny_file)
    feats = enc.encode(preprocess_hr(_images(2, 240, 260)))
    assert feats.tokens.shape == (2, 257, 32) and feats.cls.shape == (2, 32)
    post_ln = enc.model.vision_model.post_layernorm
    assert torch.allclose(feats.cls, post_ln(feats.tokens[:, 0]), atol=1e-5)  # CLS = post-LN(token 0)
    assert not torch.allclose(feats.tokens[:, 0], feats.cls)  # tokens are *before* the post-LN
    again = enc.encode(preprocess_hr(_images(2, 240, 260)))
    assert torch.equal(feats.cls, again.cls)
    u8 = resize_crop_u8(_images(2, 240, 260))
    assert torch.allclose(enc.encode_cls_u8(u8), feats.cls, atol=1e-6)


def test_fingerprint_fp32_fp16_file_and_module(tmp_path, tiny_file):
    enc32 = ClipVisionEncoder.from_file(tiny_file)
    enc16 = ClipVisionEncoder.from_file(tiny_file, dtype=torch.float16)
    assert enc32.fingerprint == enc16.fingerprint
    assert fingerprint_state_dict(enc16.model.state_dict()) == enc32.fingerprint  # from a live module
    # an fp16 copy of the file, with an extra text tower and a position_ids buffer, fingerprints the same
    with safe_open(str(tiny_file), "pt") as f:
        sd = {k: f.get_tensor(k).half() for k in f.keys()}
        meta = f.metadata()
    sd["vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    sd["text_model.final_layer_norm.weight"] = torch.ones(8)
    save_file(sd, str(tmp_path / "fp16.safetensors"), metadata=meta)
    assert ClipVisionEncoder.from_file(tmp_path / "fp16.safetensors").fingerprint == enc32.fingerprint
    other = make_tiny_clip_vision(tmp_path / "seed1.safetensors", seed=1)
    fp_other = ClipVisionEncoder.from_file(other).fingerprint
    assert fp_other["weights_sha256"] != enc32.fingerprint["weights_sha256"]
    assert fp_other["preprocess"] == PREPROCESS_VERSION


def _shape_sd(hidden, layers, inter, proj, patch=14, grid=16):
    sd = {
        "vision_model.embeddings.patch_embedding.weight": torch.empty(hidden, 3, patch, patch, device="meta"),
        "vision_model.embeddings.position_embedding.weight": torch.empty(grid * grid + 1, hidden, device="meta"),
        "visual_projection.weight": torch.empty(proj, hidden, device="meta"),
    }
    for i in range(layers):
        sd[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"] = torch.empty(inter, hidden, device="meta")
    return sd


def test_infer_config_stock_shapes():
    cfg = infer_config(_shape_sd(1024, 24, 4096, 768))  # OpenAI ViT-L/14 (clip_vision_l)
    stock_l = {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "image_size": 224,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    }
    assert {k: cfg[k] for k in stock_l} == stock_l
    cfg_h = infer_config(_shape_sd(1280, 32, 5120, 1024))
    assert cfg_h["num_attention_heads"] == 16 and cfg_h["hidden_act"] == "gelu"
    assert infer_config(_shape_sd(1024, 24, 4096, 768, grid=24))["image_size"] == 336
    with pytest.raises(ClipVisionError, match=META_CLIP_CONFIG):
        infer_config(_shape_sd(768, 12, 3072, 512))


def test_bad_files(tmp_path):
    with pytest.raises(ClipVisionError, match="does not exist"):
        ClipVisionEncoder.from_file(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ClipVisionError, match="junk.safetensors"):
        ClipVisionEncoder.from_file(tmp_path / "junk.safetensors")
    save_file({"unet.weight": torch.zeros(2)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(ClipVisionError, match="no CLIP vision weights"):
        ClipVisionEncoder.from_file(tmp_path / "unet.safetensors")
