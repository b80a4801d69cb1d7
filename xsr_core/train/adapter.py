"""``train adapter`` (Stage 2, DESIGN §2.4): AdaIN adapter + ControlNet on a frozen SD1.x base.

Base models: a diffusers SD1.x folder, or a single-file ``.safetensors`` checkpoint loaded with
``UNet2DConditionModel.from_single_file(ckpt, config=<diffusers folder>, subfolder="unet")`` (the
VAE and text encoder then come from the config folder; AutoencoderKL VAEs are read from the
checkpoint). The VAE may be ``AutoencoderKL`` (``latent_dist.sample()``) or ``AutoencoderTiny``
(``.latents``); latents are multiplied by ``vae.config.scaling_factor``. The ControlNet starts from
a user ControlNet (LDM single file or diffusers folder, checked against the U-Net first) or from the
U-Net (``ControlNetModel.from_unet``). U-Net, VAE and text encoder are frozen (and kept in the
mixed-precision dtype); the adapter and the chosen ControlNet parameters train with the
noise-prediction loss (epsilon, or v for ``prediction_type: v_prediction`` schedulers).
Classifier-free dropout: per row, the caption is replaced by the empty prompt with ``p_drop_text``
and the adapter is switched off (``rows``) with ``p_drop_image``. E for every image comes from the
trained I2T over the RFA-retrieved references and is cached (``DATA/cache/E-*``). Validation
(:func:`make_evaluator`): the noise-prediction loss on fixed test images, noise and timesteps, over the
whole schedule (``val_mse``) and its low-noise part (``val_mse_low_t``), each also with E shuffled
across the images (``..._shuffled_e``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import AdaINAdapter, AdaINAdapterConfig
from ..imaging import bicubic_resize, resize_center_crop
from ..models.i2t import load_i2t
from ..weights import save_model
from .config import AdapterTrainConfig
from .data import load_items, load_png, read_prepare_info
from .engine import make_accelerator, seed_everything, train_loop
from .i2t import _file_sha, build_ref_cache, clip_tokenize, refs_dir

logger = logging.getLogger(__name__)

LDM_UNET_PROBE = "model.diffusion_model.input_blocks.0.0.weight"
LDM_CONTEXT_PROBE = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
SDXL_MARKERS = ("conditioner.embedders.", "model.diffusion_model.label_emb.")


class BaseModelError(ValueError):
    """A base checkpoint / ControlNet that does not fit XSR stage 2 (named, with what to do)."""


# ------------------------------------------------------------------------------ base models


def _header_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises several types
        raise BaseModelError(f"{path}: not a readable .safetensors file ({e})") from e


def check_sd1_checkpoint(path: str | os.PathLike, unet_config: dict[str, Any]) -> None:
    """Refuse a single-file checkpoint that is not an SD1.x-family U-Net matching ``unet_config``."""
    shapes = _header_shapes(path)
    if any(k.startswith(SDXL_MARKERS) for k in shapes):
        raise BaseModelError(
            f"{path} is an SDXL checkpoint; XSR stage 2 needs an SD1.x (or SD2.x with its config) checkpoint"
        )
    if LDM_UNET_PROBE not in shapes:
        raise BaseModelError(
            f"{path} holds no Stable Diffusion U-Net ({LDM_UNET_PROBE} missing); give an SD1.x "
            "single-file checkpoint or a diffusers folder"
        )
    ctx = shapes.get(LDM_CONTEXT_PROBE)
    want = unet_config["cross_attention_dim"]
    if ctx is None or ctx[1] != want:
        raise BaseModelError(
            f"{path}: cross-attention context width {ctx[1] if ctx else '?'} != {want} of the config "
            "folder's U-Net (SD1.x: 768, SD2.x: 1024); use the config folder of the checkpoint's family"
        )
    if shapes[LDM_UNET_PROBE][0] != unet_config["block_out_channels"][0]:
        raise BaseModelError(
            f"{path}: U-Net width {shapes[LDM_UNET_PROBE][0]} differs from the config folder's "
            f"{unet_config['block_out_channels'][0]}; use a matching --pretrained_config"
        )


def _check_unet_config(cfg: dict[str, Any], text_dim: int, where: str) -> None:
    if cfg.get("addition_embed_type") or cfg.get("in_channels") != 4:
        raise BaseModelError(f"{where}: not an SD1.x-family U-Net (SDXL / inpainting / other); XSR stage 2 needs SD1.x")
    if cfg.get("cross_attention_dim") != text_dim:
        raise BaseModelError(
            f"{where}: U-Net context width {cfg.get('cross_attention_dim')} != text encoder width {text_dim}"
        )


def load_base(cfg: AdapterTrainConfig) -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer, scheduler, config_dir of the SD1.x base (all frozen)."""
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        DDPMScheduler,
        UNet2DConditionModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel

    src = Path(cfg.pretrained)
    if not src.exists():
        raise FileNotFoundError(f"--pretrained {src} does not exist")
    folder = src if src.is_dir() else Path(cfg.pretrained_config or "")
    if not (folder / "unet" / "config.json").is_file():
        raise BaseModelError(
            f"{folder}: no diffusers unet/config.json; a single-file checkpoint needs "
            "--pretrained_config <diffusers SD1.x folder>"
        )
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    text = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
    _check_unet_config(unet_config, text.config.hidden_size, str(folder))
    vae_cls = json.loads((folder / "vae" / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    if src.is_file():
        check_sd1_checkpoint(src, unet_config)
        unet = UNet2DConditionModel.from_single_file(
            str(src), config=str(folder), subfolder="unet", local_files_only=True
        )
        if vae_cls == "AutoencoderKL":
            vae = AutoencoderKL.from_single_file(str(src), config=str(folder), subfolder="vae", local_files_only=True)
        else:
            vae = AutoencoderTiny.from_pretrained(str(folder / "vae"), local_files_only=True)
    else:
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
        vae_type = AutoencoderTiny if vae_cls == "AutoencoderTiny" else AutoencoderKL
        vae = vae_type.from_pretrained(str(folder / "vae"), local_files_only=True)
    tok_dir = Path(cfg.clip_tokenizer) if cfg.clip_tokenizer else folder / "tokenizer"
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"no CLIP tokenizer at {tok_dir}: pass --clip_tokenizer DIR")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True)
    for m in (unet, vae, text):
        m.requires_grad_(False).eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "config_dir": folder,
    }


def load_controlnet(spec: str, unet: nn.Module) -> nn.Module:
    """ControlNet from ``spec`` (LDM .safetensors / diffusers folder / "" = from the U-Net), checked first."""
    from diffusers import ControlNetModel

    fresh = ControlNetModel.from_unet(unet, conditioning_channels=3)
    if not spec:
        return fresh
    p = Path(spec)
    if p.is_dir():
        cn = ControlNetModel.from_pretrained(str(p), local_files_only=True)
        for key in (
            "block_out_channels",
            "cross_attention_dim",
            "layers_per_block",
            "attention_head_dim",
            "down_block_types",
        ):
            a, b = cn.config.get(key), fresh.config.get(key)
            if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
                raise BaseModelError(
                    f"ControlNet {p}: {key} {a} does not match the U-Net's {b}; it was made for another base model"
                )
        return cn
    if not p.is_file():
        raise FileNotFoundError(f"--controlnet {p} does not exist")
    from ..ldm_keys import unet_diffusers_to_ldm

    expected = unet_diffusers_to_ldm(fresh.state_dict(), dict(fresh.config), controlnet=True)
    shapes = {k.removeprefix("control_model."): v for k, v in _header_shapes(p).items()}
    missing = [k for k in expected if k not in shapes]
    wrong = [
        f"{k} {shapes[k]} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in shapes and shapes[k] != tuple(v.shape)
    ]
    if missing or wrong:
        detail = "; ".join(
            ([f"missing {len(missing)} tensors, e.g. {missing[:3]}"] if missing else [])
            + ([f"{len(wrong)} shape mismatches, e.g. {wrong[:3]}"] if wrong else [])
        )
        raise BaseModelError(
            f"ControlNet {p} does not match the U-Net of the base checkpoint ({detail}); use a ControlNet "
            "trained for this base family (SD1.x) or leave --controlnet empty to start from the U-Net"
        )
    with tempfile.TemporaryDirectory() as tmp:
        fresh.save_config(tmp)
        cn = ControlNetModel.from_single_file(str(p), config=tmp, local_files_only=True)
    return cn


# ------------------------------------------------------------------------------ E cache


@torch.no_grad()
def build_embedding_cache(cfg: AdapterTrainConfig, device: torch.device, splits=("train", "test")) -> Path:
    """E (n, T, D) fp16 of every item of ``splits`` from the trained I2T (over RFA-retrieved refs)."""
    from safetensors.torch import save_file

    from .data import TokenCache

    folder = Path(cfg.data) / "cache" / f"E-{_file_sha(cfg.i2t)[:16]}-{refs_dir(cfg.data, cfg.rfa, cfg.num_refs).name}"
    if all((folder / f"{s}.safetensors").is_file() for s in splits):
        return folder
    refs = build_ref_cache(cfg.data, cfg.rfa, cfg.num_refs, splits=splits, device=device)
    i2t, _ = load_i2t(cfg.i2t, device=device)
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        cache = TokenCache(cfg.data, split)
        out = []
        for s in range(0, len(cache), 32):
            rows = range(s, min(len(cache), s + 32))
            lr = torch.stack([cache.row(i, "lr_tokens") for i in rows]).float().to(device)
            rt = torch.stack([refs.refs(split, i)[: cfg.num_refs] for i in rows]).to(device)
            out.append(i2t(lr, rt if rt.shape[1] else None).half().cpu())
        tmp = folder / f"{split}.safetensors.tmp"
        save_file({"E": torch.cat(out).contiguous()}, str(tmp))
        os.replace(tmp, folder / f"{split}.safetensors")
    return folder


@torch.no_grad()
def build_i2t_caption_cache(
    cfg: AdapterTrainConfig, e_folder: Path, device: torch.device, splits=("train", "test"), max_new_tokens: int = 32
) -> dict[str, list[str]]:
    """The trained I2T's greedy captions of every item (``--caption_source i2t``), cached beside E.

    They are decoded from the cached E exactly as XSR_Enhance decodes at inference (greedy), so stage 2
    then trains on the text condition it will see in ComfyUI. Cached as ``captions-i2t-<split>.json``.
    """
    from safetensors.torch import load_file

    out: dict[str, list[str]] = {}
    i2t = tok = None
    for split in splits:
        path = e_folder / f"captions-i2t-{split}.json"
        if path.is_file():
            out[split] = json.loads(path.read_text())
            continue
        if i2t is None:
            i2t, tok = load_i2t(cfg.i2t, device=device)
        E = load_file(str(e_folder / f"{split}.safetensors"))["E"]
        caps: list[str] = []
        for s in range(0, len(E), 32):
            caps += i2t.generate_caption(
                E[s : s + 32].float().to(device), tok, max_new_tokens=max_new_tokens, use_cuda_graph=False
            )
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(caps))
        os.replace(tmp, path)
        out[split] = caps
    return out


# ------------------------------------------------------------------------------ data


class AdapterDataset(torch.utils.data.Dataset):
    """(HR pixels, LR hint, E, caption) rows of one split; ``e_folder`` None = no E (the text-only variant);
    ``captions`` replaces the prepared (BLIP-2 / user) captions (``--caption_source i2t``)."""

    def __init__(
        self,
        data: str | os.PathLike,
        split: str,
        e_folder: Path | None,
        resolution: int,
        captions: list[str] | None = None,
    ):
        from safetensors.torch import load_file

        self.data = Path(data)
        self.items = load_items(data, split)
        self.E = load_file(str(e_folder / f"{split}.safetensors"))["E"] if e_folder is not None else None
        if self.E is not None and len(self.E) != len(self.items):
            raise ValueError(
                f"{e_folder}: {len(self.E)} embeddings for {len(self.items)} {split} items; delete it and rerun"
            )
        if captions is not None and len(captions) != len(self.items):
            raise ValueError(
                f"{len(captions)} I2T captions for {len(self.items)} {split} items; delete the caption cache"
            )
        self.captions = captions
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        it = self.items[i]
        hr = load_png(self.data / it["hr"])[None]  # (1, H, W, 3)
        lr = load_png(self.data / it["lr"])[None]
        r = self.resolution
        if hr.shape[1:3] != (r, r):  # a --resolution below the prepared 512: the same x16 geometry, never a squash
            hr = resize_center_crop(hr, r)
        hint = bicubic_resize(lr, (r, r), antialias=False)  # the ControlNet structure hint (LR bicubic-upsampled)
        row = {
            "pixels": hr[0].permute(2, 0, 1) * 2 - 1,
            "hint": hint[0].permute(2, 0, 1),
            "index": torch.tensor(i),
            "caption": self.captions[i] if self.captions is not None else (it.get("caption") or ""),
        }
        if self.E is not None:
            row["E"] = self.E[i].float()
        return row


class AdapterCollate:
    def __init__(self, clip_tok: Any):
        self.clip_tok = clip_tok

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = {k: torch.stack([r[k] for r in rows]) for k in ("pixels", "hint", "E", "index") if k in rows[0]}
        out["clip_ids"], out["clip_mask"] = clip_tokenize(self.clip_tok, [r["caption"] for r in rows])
        return out


# ------------------------------------------------------------------------------ stage

# Named ControlNet fine-tuning scopes (--controlnet_train). "attention" is the default "part of the ControlNet"
# (DESIGN §2.4; why in xsr_core/train/README.md): the attention projections of every ControlNet transformer
# block (self- and cross-attention: where the AdaIN adapter moves Q/K and the norm statistics, so these
# weights co-adapt with it) plus the zero convolutions (how much of the control signal reaches the U-Net).
# The ResNet blocks and the hint encoder keep the tile ControlNet's LR-structure features.
CONTROLNET_SCOPES: dict[str, tuple[str, ...]] = {
    "attention": (".attn1.", ".attn2.", "controlnet_down_blocks.", "controlnet_mid_block."),
    "zero_convs": ("controlnet_down_blocks.", "controlnet_mid_block."),
}


def select_controlnet_params(controlnet: nn.Module, spec: str) -> int:
    """Set requires_grad on the ControlNet per ``spec``; returns the number of trainable parameters.

    ``spec``: "all", "none", a named scope of :data:`CONTROLNET_SCOPES` ("attention" = the default),
    or comma-separated name substrings of the parameters to train.
    """
    controlnet.requires_grad_(spec == "all")
    if spec not in ("all", "none"):
        pats = CONTROLNET_SCOPES.get(spec) or tuple(s.strip() for s in spec.split(",") if s.strip())
        for name, p in controlnet.named_parameters():
            p.requires_grad_(any(s in name for s in pats))
    n = sum(p.numel() for p in controlnet.parameters() if p.requires_grad)
    if spec not in ("all", "none") and n == 0:
        raise ValueError(f"--controlnet_train {spec!r} matches no ControlNet parameter")
    return n


def controlnet_scope_counts(controlnet: nn.Module) -> dict[str, int]:
    """Trainable parameters of every named scope ("all", "none", :data:`CONTROLNET_SCOPES`); leaves all frozen.

    Works on a meta-device model, so the real SD1.5 ControlNet's numbers cost nothing to compute:
    ``ControlNetModel.from_config(SD15_CONTROLNET_CONFIG)`` under ``torch.device("meta")``.
    """
    counts = {spec: select_controlnet_params(controlnet, spec) for spec in ("all", *CONTROLNET_SCOPES, "none")}
    controlnet.requires_grad_(False)
    return counts


class AdapterStage(nn.Module):
    """Trainable: ``adapter`` (None for the text-only variant) + ``controlnet``. Frozen (plain attributes):
    unet, vae, text encoder."""

    def __init__(
        self, adapter: AdaINAdapter | None, controlnet: nn.Module, base: dict[str, Any], cfg: AdapterTrainConfig
    ):
        super().__init__()
        from ..adapter.diffusers_binding import DiffusersAdapterBinding

        self.adapter = adapter
        self.controlnet = controlnet
        self.cfg = cfg
        for k in ("unet", "vae", "text_encoder", "scheduler"):
            object.__setattr__(self, k, base[k])
        binding = (
            DiffusersAdapterBinding(adapter, unet=base["unet"], controlnet=controlnet) if adapter is not None else None
        )
        object.__setattr__(self, "binding", binding)
        self._ctx: contextlib.ExitStack | None = None
        self.register_buffer("empty_text", torch.zeros(0), persistent=False)

    def place_frozen(self, device: torch.device, dtype: torch.dtype) -> None:
        for k in ("unet", "vae", "text_encoder"):
            getattr(self, k).to(device=device, dtype=dtype)

    @torch.no_grad()
    def set_empty_prompt(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.empty_text = self.text_encoder(ids.to(self.unet.device), attention_mask=None)[0]

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        out = vae.encode(pixels.to(vae.dtype))
        lat = out.latent_dist.sample() if hasattr(out, "latent_dist") else out.latents
        return lat * vae.config.scaling_factor

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c, unet = self.cfg, self.unet
        B = batch["pixels"].shape[0]
        dtype = unet.dtype
        lat = self.latents(batch["pixels"]).to(dtype)
        with torch.no_grad():
            text = self.text_encoder(batch["clip_ids"])[0].to(dtype)
            drop_t = torch.rand(B, device=text.device) < c.p_drop_text
            text = torch.where(drop_t[:, None, None], self.empty_text.to(dtype).expand_as(text), text)
        noise = torch.randn_like(lat)
        if c.noise_offset:
            noise = noise + c.noise_offset * torch.randn(B, lat.shape[1], 1, 1, device=lat.device, dtype=lat.dtype)
        sched = self.scheduler
        t = batch.get("timesteps")  # fixed by the validation; training draws them uniformly
        if t is None:
            t = torch.randint(0, sched.config.num_train_timesteps, (B,), device=lat.device).long()
        noisy = sched.add_noise(lat, noise, t)
        if self.adapter is None:  # text-only base (Ours_Base): ControlNet + text, no image embedding
            return self._denoise_loss(lat, noise, noisy, t, text, batch["hint"], dtype)
        rows = (torch.rand(B) >= c.p_drop_image).tolist()
        stats = self.adapter.compute_stats(batch["E"])
        if any(rows):
            # Fold the per-site plans now, outside any checkpointed region: a plan built lazily inside the
            # first forward would be a cache hit during the recomputation (gradient checkpointing needs
            # the recomputed forward to save the same tensors).
            key = None if all(rows) else tuple(rows)
            for dt in {dtype, torch.float32, torch.bfloat16, torch.float16}:
                stats.plan(1.0, key, B, dt, lat.device)
        self._ctx = contextlib.ExitStack()
        self._ctx.enter_context(
            self.binding.embedding(stats=stats, rows=rows)
        )  # left open for backward (checkpointing)
        out = self._denoise_loss(lat, noise, noisy, t, text, batch["hint"], dtype)
        # zero-weight touch: every adapter parameter is part of the graph even when all rows dropped E (DDP)
        touch = 0.0 * (stats.mu.sum() + stats.sigma.sum() + self.adapter.gates.sum())
        return {"loss": out["loss"] + touch, "mse": out["mse"]}

    def _denoise_loss(self, lat, noise, noisy, t, text, hint, dtype) -> dict[str, torch.Tensor]:
        unet, sched = self.unet, self.scheduler
        down, mid = self.controlnet(
            noisy, t, encoder_hidden_states=text, controlnet_cond=hint.to(noisy.dtype), return_dict=False
        )
        pred = unet(
            noisy,
            t,
            encoder_hidden_states=text,
            down_block_additional_residuals=[d.to(dtype) for d in down],
            mid_block_additional_residual=mid.to(dtype),
        ).sample
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(lat, noise, t)
        elif sched.config.prediction_type == "epsilon":
            target = noise
        else:
            raise ValueError(f"unsupported scheduler prediction_type {sched.config.prediction_type!r}")
        mse = F.mse_loss(pred.float(), target.float())
        return {"loss": mse, "mse": mse.detach()}

    def end_step(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None


LOW_T_FRACTION = 0.2  # val_mse_low_t: timesteps in the lowest 20 % of the training schedule


def _spread_timesteps(n: int, lo: int, hi: int) -> torch.Tensor:
    """``n`` timesteps stratified over [lo, hi): the midpoints of ``n`` equal bins (deterministic)."""
    return (lo + (torch.arange(n, dtype=torch.float64) + 0.5) * (hi - lo) / n).long().clamp(lo, hi - 1)


def make_evaluator(
    stage_cfg: AdapterTrainConfig,
    dataset: AdapterDataset,
    collate: AdapterCollate,
    n: int = 16,
    repeats: int = 2,
    low_t_fraction: float = LOW_T_FRACTION,
):
    """Deterministic validation losses: fixed images, noise and timesteps.

    Each of the first ``n`` images is scored at ``repeats`` timesteps; the ``n * repeats`` timesteps are
    stratified over the range and dealt out round-robin, so every image is scored once in each of
    ``repeats`` equal parts of it. The rows run in chunks of the training batch size (``batch_size``).

    - ``val_mse``: the noise-prediction loss over the whole schedule (the training objective).
    - ``val_mse_low_t``: the same images and noise at timesteps stratified over the lowest
      ``low_t_fraction`` of the schedule (``low_t_max`` = the excluded upper bound). Low noise is where
      the HR detail the LR does not show (texture) decides the loss; at high noise the error is dominated
      by what no condition can tell, so a condition that carries HR detail shows here first.

    With E (the adain variant) both come with a ``..._shuffled_e`` twin: the same batch, noise and
    timesteps with each image's E replaced by another image's (rolled by one). A lower true-E loss than
    that shows the adapter uses what the image embedding says about *this* image, not just its presence.
    """
    n = min(n, len(dataset))
    base = collate([dataset[i] for i in range(n)])
    chunk = max(1, int(stage_cfg.batch_size))

    def _rows(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # image i at rows i, i + n, i + 2n, ...; row r gets the r-th timestep stratum
        return {k: v.repeat(repeats, *([1] * (v.dim() - 1))) for k, v in b.items()}

    def _loss(stage: AdapterStage, b: dict[str, torch.Tensor]) -> float:
        c = stage.cfg
        saved = (c.p_drop_text, c.p_drop_image)
        c.p_drop_text = c.p_drop_image = 0.0
        total, rows = 0.0, len(b["timesteps"])
        try:
            for j, s in enumerate(range(0, rows, chunk)):
                part = {k: v[s : s + chunk] for k, v in b.items()}
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    torch.manual_seed(1234 + j)  # the same noise for the same rows in every call
                    try:
                        total += stage(part)["mse"].item() * len(part["timesteps"])
                    finally:
                        stage.end_step()
        finally:
            c.p_drop_text, c.p_drop_image = saved
        return total / rows

    def evaluate(stage: AdapterStage, step: int) -> dict[str, float]:
        dev = next(stage.parameters()).device
        T = stage.scheduler.config.num_train_timesteps
        low_max = max(1, round(low_t_fraction * T))
        b = {k: v.to(dev) for k, v in base.items()}
        shuffled = "E" in b and stage.adapter is not None and n > 1
        res: dict[str, float] = {"low_t_max": low_max}
        for name, (lo, hi) in (("val_mse", (0, T)), ("val_mse_low_t", (0, low_max))):
            t = _spread_timesteps(n * repeats, lo, hi).to(dev)
            res[name] = _loss(stage, {**_rows(b), "timesteps": t})
            if shuffled:
                res[name + "_shuffled_e"] = _loss(stage, {**_rows({**b, "E": b["E"].roll(1, dims=0)}), "timesteps": t})
        return res

    return evaluate


STAGE2_INFO = "xsr_stage2.json"  # final/: variant, ControlNet scope, base U-Net fingerprint (read by export)


def train_adapter(cfg: AdapterTrainConfig) -> dict[str, Any]:
    """Train stage 2; writes ``final/controlnet/`` (diffusers), ``final/xsr_stage2.json`` and, for the adain
    variant, ``final/adain_adapter.safetensors`` (the text-only variant, Ours_Base, has no adapter)."""
    from .. import fingerprint as wfp

    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    base = load_base(cfg)
    controlnet = load_controlnet(cfg.controlnet, base["unet"])
    n_cn = select_controlnet_params(controlnet, cfg.controlnet_train)
    info = read_prepare_info(cfg.data)
    adapter = None
    if cfg.variant == "adain":
        adapter = AdaINAdapter(
            AdaINAdapterConfig.from_unet_config(
                dict(base["unet"].config), embed_dim=info["clip_dim"], proj_hidden=cfg.adapter_proj_hidden
            )
        )
    e_folder, captions = None, {}
    if cfg.variant == "adain" or cfg.caption_source == "i2t":
        if accelerator.is_main_process:
            build_embedding_cache(cfg, accelerator.device)
        accelerator.wait_for_everyone()
        e_folder = build_embedding_cache(cfg, accelerator.device)
        if cfg.caption_source == "i2t":
            if accelerator.is_main_process:
                build_i2t_caption_cache(cfg, e_folder, accelerator.device)
            accelerator.wait_for_everyone()
            captions = build_i2t_caption_cache(cfg, e_folder, accelerator.device)
    if cfg.gradient_checkpointing:
        base["unet"].enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    stage = AdapterStage(adapter, controlnet, base, cfg)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
    stage.place_frozen(accelerator.device, weight_dtype)
    ids, mask = clip_tokenize(base["tokenizer"], [""])
    stage.set_empty_prompt(ids, mask)
    n_total = sum(p.numel() for p in controlnet.parameters())
    logger.info(
        "stage 2 (%s, captions: %s): adapter %d params; ControlNet scope %r trains %d of %d params (%.1f%%)",
        cfg.variant,
        cfg.caption_source,
        sum(p.numel() for p in adapter.parameters()) if adapter else 0,
        cfg.controlnet_train,
        n_cn,
        n_total,
        100.0 * n_cn / max(1, n_total),
    )
    collate = AdapterCollate(base["tokenizer"])
    e_used = e_folder if cfg.variant == "adain" else None
    dataset = AdapterDataset(cfg.data, "train", e_used, cfg.resolution, captions.get("train"))
    evaluate = None
    if accelerator.is_main_process and load_items(cfg.data, "test"):
        evaluate = make_evaluator(
            cfg, AdapterDataset(cfg.data, "test", e_used, cfg.resolution, captions.get("test")), collate
        )
    result = train_loop(cfg, accelerator, stage, dataset, collate, evaluate=evaluate, ema_decay=cfg.ema_decay)
    if accelerator.is_main_process:
        final = Path(cfg.output_dir) / "final"
        mod = result["module"]
        unet_fp = wfp.dumps(wfp.fingerprint_diffusers(base["unet"], controlnet=False))
        if mod.adapter is not None:
            result["path"] = save_model(
                mod.adapter.eval(),
                final / "adain_adapter.safetensors",
                extra_metadata={"xsr.base_unet_fingerprint": unet_fp, "xsr.variant": cfg.variant},
            )
        mod.controlnet.save_pretrained(str(final / "controlnet"), safe_serialization=True)
        (final / STAGE2_INFO).write_text(
            json.dumps(
                {
                    "variant": cfg.variant,
                    "caption_source": cfg.caption_source,
                    "controlnet_train": cfg.controlnet_train,
                    "controlnet_trainable_params": n_cn,
                    "controlnet_params": n_total,
                    "base_unet_fingerprint": unet_fp,
                },
                indent=1,
            )
        )
    if stage.binding is not None:
        stage.binding.detach()
    return result
