"""The tiny model zoo: small random-weight models in the real file formats, for tests and demos.

``python -m xsr_core zoo --out DIR`` writes a ComfyUI ``models/`` layout::

    DIR/checkpoints/xsr_tiny_sd15.safetensors   SD1.x single-file checkpoint (LDM keys):
                                                U-Net + CLIP-L-family text encoder + TAESD-format VAE
    DIR/controlnet/xsr_tiny_control_sd15.safetensors   SD1.x ControlNet (LDM keys, as the original
                                                       ControlNet releases ship)
    DIR/clip_vision/xsr_tiny_clip_vision.safetensors   CLIP ViT-family vision encoder (HF keys, as
                                                       ComfyUI's clip_vision files)
    DIR/xsr/distilgpt2/                         distilgpt2-family GPT-2 (HF folder + tokenizer)
    DIR/xsr/rfa.safetensors, i2t.safetensors, adain_adapter.safetensors   random-init XSR weights
    DIR/diffusers/xsr_tiny_sd15/                the same SD weights as a diffusers folder (training)

All weights are drawn from a seeded generator: the same seed gives byte-identical files.

The models keep SD1.5's *structure* (4 levels, 2 res blocks per level, 16 transformer blocks,
ControlNet with 7) with tiny widths (32..128 channels, text width 32), so that the suite runs on 2
CPU cores. ComfyUI's format detection only knows stock widths, so the tiny checkpoint and ControlNet
load through the stock loaders only once the test-support node pack (``tests/comfy/support``)
registers a model class for these widths, and the tiny CLIP vision encoder (ComfyUI picks its config
by layer count) likewise; real SD1.5 / ViT-L/14 files need none of that.

The U-Net/ControlNet/text encoder are built with diffusers/transformers from configs and converted to
the LDM single-file layout here (the inverse of diffusers' ``convert_ldm_unet_checkpoint``), so the
same weights exist in both worlds and cross-framework parity can be tested through the real loaders.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ..ldm_keys import unet_diffusers_to_ldm  # noqa: F401  (lives in a production module; re-exported)

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "xsr_tiny_sd15.safetensors"
CONTROLNET_NAME = "xsr_tiny_control_sd15.safetensors"
CLIP_VISION_NAME = "xsr_tiny_clip_vision.safetensors"
ADAPTER_NAME = "adain_adapter.safetensors"
DEMO_REFDB = "xsr_demo"
DIFFUSERS_DIR = "xsr_tiny_sd15"
# the zoo's files by role: the model-name arguments of xsr_core.demo.xsr_graph (keys of demo.SHIPPED_NAMES)
ZOO_NAMES = {
    "ckpt": CHECKPOINT_NAME,
    "controlnet": CONTROLNET_NAME,
    "clip_vision": CLIP_VISION_NAME,
    "refdb": DEMO_REFDB,
}

# Tiny SD1.x-structured U-Net (diffusers config). attention_head_dim is the *head count* for SD1.x
# in diffusers' naming (8 heads, like SD1.5).
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 128, 128],
    "layers_per_block": 2,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# CLIP-L-family text encoder: CLIP's 49408-token vocabulary and 77 positions, tiny width.
TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
TINY_CLIP_VISION = {"hidden": 32, "layers": 2, "heads": 2}
SD15_SCALING_FACTOR = 0.18215
# The random tiny TAESD encoder's latents have std ~0.2 on natural-looking images (measured on the synthetic sets of
# xsr_core.train.synthetic): this factor makes the latents the U-Net sees unit-variance, as SD's 0.18215 does for
# its VAE, so the noise schedule has the meaning it has for real SD (at 1.0 every timestep's noise buries the
# image detail). Diffusers multiplies by it (AutoencoderTiny.config.scaling_factor); ComfyUI gives the U-Net
# ``latent / vae_scale * 0.18215`` (SD1.x latent format), so the checkpoint's TAESD ``vae_scale`` is
# SD15_SCALING_FACTOR / TINY_VAE_SCALING_FACTOR and both frameworks feed the U-Net the same latents.
TINY_VAE_SCALING_FACTOR = 5.0


# --------------------------------------------------------------------------------------------
# Seeded random initialisation
# --------------------------------------------------------------------------------------------
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with seeded values: norms (weight 1, bias 0), others ~N(0, 1/fan_in).

    Zero-initialised output layers (diffusers' conv_out, ControlNet zero convs) get random values too,
    so that every weight influences the outputs tests compare.
    """
    g = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    norm_params = set()
    for m in module.modules():
        if isinstance(m, norm_types):
            for p in m.parameters(recurse=False):
                norm_params.add(id(p))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if id(p) in norm_params:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def build_tiny_sd(seed: int = 0):
    """(unet, text_encoder, vae, controlnet) diffusers/transformers modules with seeded weights."""
    from diffusers import AutoencoderTiny, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = randomize_(UNet2DConditionModel(**TINY_UNET_CONFIG), seed)
    text = randomize_(CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)), seed + 1)
    vae = randomize_(
        AutoencoderTiny(
            encoder_block_out_channels=(64, 64, 64, 64),
            decoder_block_out_channels=(64, 64, 64, 64),
            latent_channels=4,
            scaling_factor=TINY_VAE_SCALING_FACTOR,
        ),
        seed + 2,
    )
    controlnet = randomize_(ControlNetModel.from_unet(unet, conditioning_channels=3), seed + 3)
    return unet, text, vae, controlnet


def vae_tiny_to_taesd(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderTiny -> TAESD keys as ComfyUI's ``comfy.taesd.taesd.TAESD`` names them.

    The TAESD decoder starts with a Clamp module (index 0) that diffusers does in forward(), so
    decoder indices shift by one.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("encoder.layers."):
            out["taesd_encoder." + k[len("encoder.layers.") :]] = v
        elif k.startswith("decoder.layers."):
            idx, rest = k[len("decoder.layers.") :].split(".", 1)
            out[f"taesd_decoder.{int(idx) + 1}.{rest}"] = v
        else:
            raise KeyError(f"unexpected AutoencoderTiny key {k}")
    # ComfyUI's TAESD returns encoder(x) / vae_scale + vae_shift and the SD1.x latent format multiplies by 0.18215:
    # the U-Net then sees encoder(x) * TINY_VAE_SCALING_FACTOR, as in diffusers (see TINY_VAE_SCALING_FACTOR)
    out["vae_scale"] = torch.tensor(SD15_SCALING_FACTOR / TINY_VAE_SCALING_FACTOR)
    out["vae_shift"] = torch.tensor(0.0)
    return out


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def write_sd_checkpoint(unet, text, vae, path: Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write an SD1.x single-file checkpoint (LDM key layout) from diffusers modules."""
    sd: dict[str, torch.Tensor] = {}
    for k, v in unet_diffusers_to_ldm(unet.state_dict(), dict(unet.config)).items():
        sd["model.diffusion_model." + k] = v.to(dtype)
    for k, v in text.state_dict().items():
        # SD1.5's own layout; transformers 5 drops the "text_model." level from CLIPTextModel keys
        k = k if k.startswith("text_model.") else "text_model." + k
        sd["cond_stage_model.transformer." + k] = v.to(dtype) if v.is_floating_point() else v
    for k, v in vae_tiny_to_taesd(vae.state_dict()).items():
        sd["first_stage_model." + k] = v.to(dtype)
    return _save_safetensors(sd, path, {"format": "pt", "xsr.zoo": "tiny-sd15"})


def write_controlnet(controlnet, path: Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write an SD1.x ControlNet in the original LDM layout (``control_model.`` prefix)."""
    sd = unet_diffusers_to_ldm(controlnet.state_dict(), dict(controlnet.config), controlnet=True)
    return _save_safetensors({"control_model." + k: v.to(dtype) for k, v in sd.items()}, path, {"format": "pt"})


def write_diffusers_folder(unet, text, vae, controlnet, folder: Path, clip_tokenizer_dir: Path | None) -> Path:
    """The same tiny SD as a diffusers folder (unet/, text_encoder/, vae/, scheduler/, tokenizer/, controlnet/)."""
    from diffusers import DDPMScheduler

    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
    DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    if clip_tokenizer_dir is not None and (clip_tokenizer_dir / "vocab.json").is_file():
        dst = folder / "tokenizer"
        dst.mkdir(exist_ok=True)
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
            if (clip_tokenizer_dir / name).is_file():
                shutil.copy(clip_tokenizer_dir / name, dst / name)
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "vae": ["diffusers", "AutoencoderTiny"],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
            },
            indent=2,
        )
    )
    return folder


def write_zoo(
    out: str | Path,
    *,
    seed: int = 0,
    clip_tokenizer_dir: str | Path | None = None,
    xsr: bool = True,
    diffusers_folder: bool = True,
) -> dict[str, Path]:
    """Write the whole tiny zoo under ``out`` (a ComfyUI ``models/`` folder); returns name -> path.

    ``clip_tokenizer_dir``: a folder with CLIP's ``vocab.json``/``merges.txt`` (e.g. ComfyUI's
    ``comfy/sd1_tokenizer``) copied into the diffusers folder so training can tokenize offline.
    """
    out = Path(out)
    paths: dict[str, Path] = {}
    torch.manual_seed(seed)
    unet, text, vae, controlnet = build_tiny_sd(seed)
    paths["checkpoint"] = write_sd_checkpoint(unet, text, vae, out / "checkpoints" / CHECKPOINT_NAME)
    paths["controlnet"] = write_controlnet(controlnet, out / "controlnet" / CONTROLNET_NAME)
    if diffusers_folder:
        paths["diffusers"] = write_diffusers_folder(
            unet,
            text,
            vae,
            controlnet,
            out / "diffusers" / DIFFUSERS_DIR,
            Path(clip_tokenizer_dir) if clip_tokenizer_dir else None,
        )
    paths.update(_write_optional_parts(out, seed, xsr=xsr))
    if "clip_vision" in paths:
        paths["refdb"] = write_demo_refdb(out / "xsr_refdb" / DEMO_REFDB, paths["clip_vision"], seed=seed)
    logger.info("tiny zoo written to %s", out)
    return paths


def _write_optional_parts(out: Path, seed: int, *, xsr: bool) -> dict[str, Path]:
    """CLIP vision, distilgpt2 and XSR weights: provided by their own modules once they exist."""
    paths: dict[str, Path] = {}
    try:
        from .tiny_clip import make_tiny_clip_vision
    except ImportError:
        make_tiny_clip_vision = None
    if make_tiny_clip_vision is not None:
        paths["clip_vision"] = Path(
            make_tiny_clip_vision(out / "clip_vision" / CLIP_VISION_NAME, seed=seed + 10, **TINY_CLIP_VISION)
            or out / "clip_vision" / CLIP_VISION_NAME
        )
    try:
        from .tiny_models import make_random_xsr_models, make_tiny_distilgpt2_dir
    except ImportError:
        return paths
    paths["distilgpt2"] = Path(
        make_tiny_distilgpt2_dir(out / "xsr" / "distilgpt2", seed=seed + 11) or out / "xsr" / "distilgpt2"
    )
    if xsr:
        paths.update(
            make_random_xsr_models(
                out / "xsr",
                clip_dim=TINY_CLIP_VISION["hidden"],
                seed=seed + 12,
                clip_text_dim=TINY_TEXT_CONFIG["hidden_size"],
            )
        )
        paths["adapter"] = write_random_adapter(
            out / "xsr" / ADAPTER_NAME, embed_dim=TINY_CLIP_VISION["hidden"], seed=seed + 13
        )
    return paths


def write_random_adapter(path: Path, *, embed_dim: int, seed: int = 0, unet_config: dict | None = None) -> Path:
    """A random AdaIN adapter for the tiny U-Net (+ControlNet).

    Unlike a freshly initialised adapter (zero gates = identity), its gates and projector are random
    and non-zero, so graphs on the tiny zoo exercise every adapter site.
    """
    from ..adapter import AdaINAdapter, AdaINAdapterConfig
    from ..weights import save_model

    torch.manual_seed(seed)
    cfg = AdaINAdapterConfig.from_unet_config(
        unet_config or TINY_UNET_CONFIG, embed_dim=embed_dim, include_controlnet=True
    )
    adapter = AdaINAdapter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.head.weight.normal_(0.0, 0.2, generator=g)
        adapter.gates.uniform_(0.2, 0.8, generator=g)
    return save_model(adapter, path)


def write_demo_refdb(db_dir: Path, encoder: Path, *, seed: int = 0, n: int = 24) -> Path:
    """A small packed reference DB of procedural HR images (shippable), built with ``encoder``."""
    import tempfile

    from ..refdb import BuildConfig, build_db
    from .synthetic import write_synthetic_images

    if (db_dir / "info.json").is_file():
        return db_dir
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_images(tmp, n, size=256, seed=seed)
        build_db(
            db_dir,
            encoder,
            images=tmp,
            config=BuildConfig(mode="packed", workers=0, device="cpu", progress=False, batch_size=8),
        )
    return db_dir


SUPPORT_NODE_NOTE = (
    "Note: ComfyUI's stock loaders only recognise stock model widths. To load the tiny checkpoint and "
    "ControlNet with CheckpointLoaderSimple / ControlNetLoader, the ComfyUI serving these files also needs "
    "the test-support node of this repository: copy or symlink tests/comfy/support/xsr_test_support into "
    "ComfyUI/custom_nodes/ (never ship it: it is not part of the pack; the tests, the demo and bench/ add it "
    "themselves). The XSR weights and the reference DB load without it."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xsr zoo", description=__doc__.split("\n\n")[0], epilog=SUPPORT_NODE_NOTE)
    parser.add_argument("--out", required=True, help="ComfyUI models/ folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip-tokenizer-dir", default=None, help="folder with CLIP vocab.json/merges.txt")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers-format copy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = write_zoo(
        args.out, seed=args.seed, clip_tokenizer_dir=args.clip_tokenizer_dir, diffusers_folder=not args.no_diffusers
    )
    for name, p in paths.items():
        print(f"{name:12s} {p}")
    print("\n" + SUPPORT_NODE_NOTE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
