"""Table-1 metrics for x16 SR outputs: FID, DISTS, LPIPS, CLIP-Score, MANIQA, MUSIQ (+ PSNR, SSIM).

``compute_metrics(sr_dir, hr_dir, ...)`` pairs SR and HR images by relative path (extension
ignored), checks sizes and weights *before* building any network, then streams batches through
every requested metric and returns a JSON-ready dict; :func:`xsr_core.eval.paper.format_table`
renders it beside the paper's rows.

Library per metric, and why
---------------------------
- PSNR, SSIM — torchmetrics (functional). No weights. RGB in 0..1, data_range 1, per-image values
  averaged over images; SSIM with the standard 11x11 Gaussian window, sigma 1.5, averaged over the
  three channels (no Y-channel conversion). Per-image PSNR is capped at 100 dB so identical images
  give a finite, JSON-safe number.
- FID — torchmetrics ``FrechetInceptionDistance`` with torch-fidelity's InceptionV3
  (``inception-v3-compat``, the TF-ported 2015-12-05 weights every FID implementation shares),
  2048-d pool features, torch-fidelity's TF-compatible bilinear resize to 299 (``antialias=False``,
  the original FID's resize). HR images are the real set, SR images the generated set.
  torchmetrics is already a dependency; torch-fidelity is small (pure Python).
- LPIPS — torchmetrics' LPIPS (a copy of the official ``lpips`` v0.1: the linear-layer weights ship
  inside the torchmetrics wheel; the AlexNet backbone is torchvision's IMAGENET1K_V1, as in the
  official package). Only the torchvision AlexNet file is needed.
- DISTS, MANIQA, MUSIQ — pyiqa (IQA-PyTorch), the maintained reference port used by SeeSR and most
  diffusion-SR papers; no other maintained package has MANIQA or MUSIQ. Only pyiqa's network
  classes are used: every network is built with random weights (no pyiqa download path), then the
  checkpoint is loaded by this module with ``torch.load(weights_only=True)`` (pyiqa's own loader
  unpickles). pyiqa's import needs OpenCV (``opencv-python-headless``).
- CLIP-I and CLIP-T — transformers ``CLIPModel`` (OpenAI ViT-L/14, the encoder XSR already uses),
  loaded with ``local_files_only=True``. CLIP-I = cosine(CLIP(SR), CLIP(HR)) image embeddings;
  CLIP-T = cosine(CLIP(SR), CLIP(caption)) with the SR image's text condition (``--captions``, or
  the ``captions.jsonl`` ``eval run`` writes: the caption each SR image was generated with); both are
  raw cosines (no 100x or 2.5x scaling, no clamp). **The table's CLIP-Score column is CLIP-T**, the
  paper's sense ("agreement of the SR image with its text condition"; key ``clip_t``, alias
  ``clip_score``); the SR↔HR image cosine is the extra column **CLIP-I** (key ``clip_i``, alias
  ``clip_image``). (Hessel et al.'s CLIP-S = 2.5·max(cos, 0) with ViT-B/32 is a different number.)

Weights are never downloaded. Each metric lists the files it needs (:class:`WeightFile`); they are
looked up in ``weights_dir`` and then in the library's own cache (torch hub ``checkpoints/`` for
torchvision and torch-fidelity files, torch hub ``pyiqa/`` for pyiqa files: ``$TORCH_HOME/hub``; the
Hugging Face cache for CLIP). Missing files raise :class:`MissingWeightsError` naming the metric, the
file, the folder to put it in and the public URL, before any network is built (the pre-flight check).
No builder then has a reason to fetch: CLIP loads with ``local_files_only=True`` (and ``xsr eval``
sets ``HF_HUB_OFFLINE=1`` unless the environment says otherwise); every other network is built
without weights and gets the state dict this module read with ``torch.load(weights_only=True)``.
Four library constructors fetch (and unpickle) weights on their own: torch-fidelity's InceptionV3,
torchmetrics' LPIPS and pyiqa's DISTS asking torchvision for AlexNet / VGG16, pyiqa's MANIQA asking
timm for a ViT; for those the fetch is replaced, for the constructor call only, by our already-loaded
weights (:func:`_patched`). The tests refuse every socket connection while these networks are built.

Tests (and users) can replace any metric's construction through ``factories``: a mapping from
metric key to ``factory(ctx: MetricContext) -> Metric``; a replaced metric skips the weight check.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..image_io import IMAGE_EXTENSIONS  # the one extension list
from .paper import DECIMALS, format_table

logger = logging.getLogger(__name__)

PSNR_CAP_DB = 100.0
RESULTS_FORMAT = "xsr-eval-metrics/1"


class MissingWeightsError(FileNotFoundError):
    """Weights a requested metric needs are not on disk (XSR never downloads them)."""


class MetricInputError(ValueError):
    """The SR/HR folders or captions cannot be evaluated as given (pairing, sizes, captions)."""


# --------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------


def torch_hub_dir() -> Path:
    """torch hub's folder (``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``)."""
    return Path(torch.hub.get_dir())


@dataclass(frozen=True)
class WeightFile:
    """One weight file (or, with ``hf_repo``, one Hugging Face repo snapshot) a metric needs."""

    name: str  # file name as published (for an HF repo: the folder name looked up in weights_dir)
    url: str  # public URL users can get it from
    cache: str  # "torch_hub" (hub/checkpoints), "pyiqa" (hub/pyiqa) or "hf" (Hugging Face cache)
    hf_repo: str | None = None  # HF repo id when cache == "hf"
    hf_files: tuple[tuple[str, ...], ...] = ()  # HF files that must exist; each entry = alternatives

    def cache_dir(self) -> Path:
        if self.cache == "torch_hub":
            return torch_hub_dir() / "checkpoints"
        if self.cache == "pyiqa":
            return torch_hub_dir() / "pyiqa"
        if self.cache == "hf":
            from huggingface_hub import constants

            return Path(constants.HF_HUB_CACHE)
        raise ValueError(f"unknown cache kind {self.cache!r}")

    def resolve(self, weights_dir: str | Path | None) -> Path | None:
        """Path of the file (or HF snapshot folder) if present, else None. Never downloads."""
        if self.cache == "hf":
            return self._resolve_hf(weights_dir)
        candidates = []
        if weights_dir is not None:
            candidates.append(Path(weights_dir) / self.name)
        candidates.append(self.cache_dir() / self.name)
        for path in candidates:
            if path.is_file():
                return path
        return None

    def _resolve_hf(self, weights_dir: str | Path | None) -> Path | None:
        folders = []
        if weights_dir is not None:
            folders.append(Path(weights_dir) / self.name)
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(self.hf_repo, "config.json")
            if isinstance(found, str):
                folders.append(Path(found).parent)
        except ImportError:  # pragma: no cover - huggingface_hub is a core dependency
            pass
        for folder in folders:
            if all(any((folder / alt).is_file() for alt in alts) for alts in self.hf_files):
                return folder
        return None

    def describe_missing(self, weights_dir: str | Path | None) -> str:
        if self.cache == "hf":
            need = ", ".join(" or ".join(alts) for alts in self.hf_files)
            where = f"the Hugging Face cache ({self.cache_dir()})"
            if weights_dir is not None:
                where += f" or {Path(weights_dir) / self.name}/"
            else:
                where += f" or <--weights-dir>/{self.name}/"
            return (
                f"Hugging Face repo {self.hf_repo} (files: {need}); looked in {where}. Get it with "
                f"`huggingface-cli download {self.hf_repo}` on a machine with internet (then copy the "
                f"cache), or put the repo files in <weights-dir>/{self.name}/. URL: {self.url}"
            )
        put = Path(weights_dir) if weights_dir is not None else self.cache_dir()
        return f"{self.name}; put it in {put}/ (or pass --weights-dir DIR holding it). URL: {self.url}"


_HF_IQA = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
W_INCEPTION = WeightFile(
    "weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "torch_hub",
)
W_ALEXNET = WeightFile(
    "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "torch_hub"
)
W_VGG16 = WeightFile("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth", "torch_hub")
W_DISTS = WeightFile("DISTS_weights-f5e65c96.pth", _HF_IQA + "DISTS_weights-f5e65c96.pth", "pyiqa")
W_MANIQA = {
    "koniq": WeightFile("ckpt_koniq10k.pt", _HF_IQA + "ckpt_koniq10k.pt", "pyiqa"),
    "pipal": WeightFile("MANIQA_PIPAL-ae6d356b.pth", _HF_IQA + "MANIQA_PIPAL-ae6d356b.pth", "pyiqa"),
    "kadid": WeightFile("ckpt_kadid10k.pt", _HF_IQA + "ckpt_kadid10k.pt", "pyiqa"),
}
W_MUSIQ = WeightFile("musiq_koniq_ckpt-e95806b9.pth", _HF_IQA + "musiq_koniq_ckpt-e95806b9.pth", "pyiqa")
CLIP_REPO = "openai/clip-vit-large-patch14"
_CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
W_CLIP_IMAGE = WeightFile(
    "clip-vit-large-patch14", f"https://huggingface.co/{CLIP_REPO}", "hf", CLIP_REPO, (("config.json",), _CLIP_WEIGHTS)
)
W_CLIP_TEXT = WeightFile(
    "clip-vit-large-patch14",
    f"https://huggingface.co/{CLIP_REPO}",
    "hf",
    CLIP_REPO,
    (("config.json",), _CLIP_WEIGHTS, ("tokenizer.json", "vocab.json")),
)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a tensor state dict without unpickling code (safetensors, or ``torch.load(weights_only=True)``).

    Unwraps ``{"params": ...}`` / ``{"state_dict": ...}`` / ``{"model": ...}`` containers and strips a
    ``module.`` prefix (DataParallel checkpoints, as pyiqa's own loader does).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError and friends
            raise MissingWeightsError(
                f"{path}: cannot be read as a plain tensor checkpoint with torch.load(weights_only=True) "
                f"({type(exc).__name__}: {exc}). Re-download the official file, or convert it to "
                f".safetensors (same name stem) with a trusted script."
            ) from exc
    for wrapper in ("params", "state_dict", "model"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise MissingWeightsError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return {(k.removeprefix("module.")): v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# Handing our weights_only-loaded state dicts to library constructors
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _patched(obj: Any, attr: str, value: Any) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def _torchvision_features_from_file(arch: str, path: Path) -> Callable[..., torch.nn.Module]:
    """A replacement for ``torchvision.models.<arch>`` that loads ``features.*`` from ``path``.

    LPIPS and DISTS use only ``model.features``, so features-only files are accepted and the
    classifier is left on the meta device (never allocated nor initialised: VGG16's is 124M params).
    """
    import torchvision

    builder = getattr(torchvision.models, arch)
    sd = {k[len("features.") :]: v for k, v in load_state_dict_file(path).items() if k.startswith("features.")}

    def build(*args: Any, **kwargs: Any) -> torch.nn.Module:
        with torch.device("meta"):
            model = builder(weights=None)
        model.features = model.features.to_empty(device="cpu")
        missing = sorted(set(model.features.state_dict()) - set(sd))
        if missing:
            raise MissingWeightsError(
                f"{path}: not a torchvision {arch} checkpoint (missing features.{missing[0]} ...)"
            )
        model.features.load_state_dict(sd, strict=True)
        return model

    return build


# --------------------------------------------------------------------------------------------
# Metric objects
# --------------------------------------------------------------------------------------------


@dataclass
class MetricContext:
    """What a metric factory gets: where it runs and the weight files resolved for it."""

    device: torch.device  # device the metric's network runs on
    weights: dict[str, Path] = field(default_factory=dict)  # WeightFile.name -> resolved path
    spec: MetricSpec | None = None  # the metric being built


class Metric:
    """Accumulates over batches; ``update`` gets SR and HR as (B, 3, H, W) float 0..1 on the device."""

    per_image: bool = True

    def update(self, sr: torch.Tensor, hr: torch.Tensor, names: Sequence[str], captions: Sequence[str] | None) -> None:
        raise NotImplementedError

    def compute(self) -> tuple[float, int, dict[str, float] | None]:
        """(value, number of images, per-image values or None)."""
        raise NotImplementedError


class PerImageMetric(Metric):
    """Mean of a per-image score given by ``score_fn(sr, hr, captions) -> (B,)``."""

    def __init__(self, score_fn: Callable[[torch.Tensor, torch.Tensor, Sequence[str] | None], torch.Tensor]):
        self.score_fn = score_fn
        self.values: dict[str, float] = {}

    def update(self, sr, hr, names, captions):
        with torch.no_grad():
            scores = self.score_fn(sr, hr, captions).reshape(-1).double().cpu().tolist()
        if len(scores) != len(names):
            raise RuntimeError(f"metric returned {len(scores)} scores for a batch of {len(names)} images")
        self.values.update(zip(names, scores))

    def compute(self):
        if not self.values:
            raise MetricInputError("no images were evaluated")
        return float(np.mean(list(self.values.values()))), len(self.values), dict(self.values)


class FIDMetric(Metric):
    """FID between the HR set (real) and the SR set (generated) via a torchmetrics FID object."""

    per_image = False

    def __init__(self, fid: Any):
        self.fid = fid
        self.n = 0

    def update(self, sr, hr, names, captions):
        with torch.no_grad():
            self.fid.update(hr, real=True)
            self.fid.update(sr, real=False)
        self.n += sr.shape[0]

    def compute(self):
        return float(self.fid.compute()), self.n, None


def _psnr(sr: torch.Tensor, hr: torch.Tensor, captions: Any = None) -> torch.Tensor:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    value = peak_signal_noise_ratio(sr, hr, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return torch.nan_to_num(value, posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB)


def _ssim(sr: torch.Tensor, hr: torch.Tensor, captions: Any = None) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(sr, hr, data_range=1.0, reduction="none")


def build_psnr(ctx: MetricContext) -> Metric:
    return PerImageMetric(_psnr)


def build_ssim(ctx: MetricContext) -> Metric:
    return PerImageMetric(_ssim)


def build_fid(ctx: MetricContext) -> Metric:
    """torchmetrics FID with torch-fidelity's InceptionV3; the Inception state dict is loaded here
    (weights_only) and handed to torch-fidelity in place of its downloader."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from torchmetrics.image.fid import FrechetInceptionDistance

    sd = load_state_dict_file(ctx.weights[W_INCEPTION.name])
    with _patched(fe, "load_state_dict_from_url", lambda *a, **k: sd):
        fid = FrechetInceptionDistance(feature=2048, normalize=True, antialias=False)
    return FIDMetric(fid.to(ctx.device))


def build_lpips(ctx: MetricContext) -> Metric:
    """torchmetrics' LPIPS v0.1 (AlexNet); linear layers from the torchmetrics wheel."""
    import torchvision
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    alex = _torchvision_features_from_file("alexnet", ctx.weights[W_ALEXNET.name])
    with _patched(torchvision.models, "alexnet", alex):
        net = _NoTrainLpips(net="alex", pretrained=True, pnet_rand=False)
    net = net.to(ctx.device).eval()
    return PerImageMetric(lambda sr, hr, _c: net(sr, hr, normalize=True))


def build_dists(ctx: MetricContext) -> Metric:
    """pyiqa's DISTS (the official architecture) on torchvision VGG16 + the DISTS alpha/beta file."""
    import torchvision
    from pyiqa.archs.dists_arch import DISTS

    vgg = _torchvision_features_from_file("vgg16", ctx.weights[W_VGG16.name])
    with _patched(torchvision.models, "vgg16", vgg):
        net = DISTS(pretrained=False)
    sd = load_state_dict_file(ctx.weights[W_DISTS.name])
    if not {"alpha", "beta"} <= set(sd):
        raise MissingWeightsError(f"{ctx.weights[W_DISTS.name]}: not a DISTS weight file (no alpha/beta tensors)")
    result = net.load_state_dict(sd, strict=False)
    if result.unexpected_keys:
        raise MissingWeightsError(f"{ctx.weights[W_DISTS.name]}: unexpected keys {result.unexpected_keys[:4]}")
    net = net.to(ctx.device).eval()
    return PerImageMetric(lambda sr, hr, _c: net(sr, hr))


# pyiqa DEFAULT_CONFIGS options per MANIQA checkpoint (the swin "scale" differs per variant).
_MANIQA_OPTS = {"koniq": {"scale": 0.8}, "pipal": {}, "kadid": {"scale": 0.8}}


def _build_maniqa(ctx: MetricContext, dataset: str) -> Metric:
    import timm
    from pyiqa.archs.maniqa_arch import MANIQA

    create = timm.create_model
    # MANIQA asks timm for an ImageNet ViT-B/8 (a download); the MANIQA checkpoint holds the whole
    # network including that ViT, so it is built randomly and overwritten by the strict load below.
    with _patched(timm, "create_model", lambda name, *a, **k: create(name, *a, **{**k, "pretrained": False})):
        net = MANIQA(pretrained=False, train_dataset=dataset, **_MANIQA_OPTS[dataset])
    net.load_state_dict(load_state_dict_file(ctx.weights[W_MANIQA[dataset].name]), strict=True)
    net = net.to(ctx.device).eval()
    return PerImageMetric(lambda sr, hr, _c: net(sr))


def build_musiq(ctx: MetricContext) -> Metric:
    """pyiqa's MUSIQ with the KonIQ-10k checkpoint (pyiqa metric ``musiq``)."""
    from pyiqa.archs.musiq_arch import MUSIQ

    net = MUSIQ(pretrained=False, num_class=1)
    net.load_state_dict(load_state_dict_file(ctx.weights[W_MUSIQ.name]), strict=True)
    net = net.to(ctx.device).eval()
    return PerImageMetric(lambda sr, hr, _c: net(sr))


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """CLIPImageProcessor's transform on tensors: bicubic resize of the short side to ``size``
    (antialiased), centre crop, OpenAI mean/std. (B, 3, H, W) 0..1 -> (B, 3, size, size)."""
    _, _, h, w = x.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPScorer:
    """Cosine similarities with a transformers ``CLIPModel`` (any size; tests pass a tiny one)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[..., Any] | None = None, image_size: int = 224):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = image_size

    def image_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        pixels = clip_pixels(x, self.image_size).to(next(self.model.parameters()).dtype)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def text_embeddings(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("CLIP-T needs a tokenizer")
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        tok = {k: v.to(device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(_features(self.model.get_text_features(**tok)).float(), dim=-1)

    def image_image(self, sr: torch.Tensor, hr: torch.Tensor, captions: Any = None) -> torch.Tensor:
        return (self.image_embeddings(sr) * self.image_embeddings(hr)).sum(-1)

    def image_text(self, sr: torch.Tensor, hr: torch.Tensor, captions: Sequence[str] | None) -> torch.Tensor:
        if captions is None:
            raise MetricInputError("CLIP-T needs captions (--captions FILE)")
        return (self.image_embeddings(sr) * self.text_embeddings(captions, sr.device)).sum(-1)


def _load_clip(ctx: MetricContext, with_tokenizer: bool) -> CLIPScorer:
    from transformers import CLIPModel

    folder = ctx.weights[W_CLIP_IMAGE.name]
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(ctx.device)
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return CLIPScorer(model, tokenizer, image_size=model.config.vision_config.image_size)


def build_clip_i(ctx: MetricContext) -> Metric:
    return PerImageMetric(_load_clip(ctx, with_tokenizer=False).image_image)


def build_clip_t(ctx: MetricContext) -> Metric:
    return PerImageMetric(_load_clip(ctx, with_tokenizer=True).image_text)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """A metric the CLI knows: how it is named, where it goes in the table, what it needs."""

    key: str  # --metrics key and JSON key
    column: str  # table column (a paper column name, or an extra column name)
    label: str  # human name shown in extra tables
    variant: str  # the exact metric variant (library, network, checkpoint, preprocessing)
    lower_better: bool  # direction
    weights: tuple[WeightFile, ...]  # files the default factory needs
    factory: Callable[[MetricContext], Metric]  # default builder
    needs_captions: bool = False  # CLIP-T
    min_images: int = 1  # FID needs 2
    decimals: int = 4  # printed decimals


METRICS: dict[str, MetricSpec] = {
    s.key: s
    for s in (
        MetricSpec(
            "fid",
            "FID",
            "FID",
            "FID (torchmetrics FrechetInceptionDistance, torch-fidelity InceptionV3 `inception-v3-compat` "
            "2015-12-05 weights, 2048-d pool3, TF-compatible bilinear resize to 299; real = HR, fake = SR)",
            True,
            (W_INCEPTION,),
            build_fid,
            min_images=2,
            decimals=DECIMALS["FID"],
        ),
        MetricSpec(
            "dists",
            "DISTS",
            "DISTS",
            "DISTS (pyiqa `dists` architecture = official DISTS; torchvision VGG16 IMAGENET1K_V1 + "
            "DISTS_weights-f5e65c96 alpha/beta; full-resolution input)",
            True,
            (W_VGG16, W_DISTS),
            build_dists,
        ),
        MetricSpec(
            "lpips",
            "LPIPS",
            "LPIPS",
            "LPIPS (AlexNet, v0.1; torchmetrics copy of the official lpips linear weights, torchvision "
            "AlexNet IMAGENET1K_V1; inputs scaled 0..1 -> -1..1, full resolution)",
            True,
            (W_ALEXNET,),
            build_lpips,
        ),
        MetricSpec(
            "clip_i",
            "CLIP-I",
            "CLIP-I (SR↔HR image cosine)",
            "CLIP-I: SR image–HR image cosine with OpenAI CLIP ViT-L/14 (transformers CLIPModel "
            "openai/clip-vit-large-patch14, projected embeddings; bicubic short side 224 + centre crop)",
            False,
            (W_CLIP_IMAGE,),
            build_clip_i,
        ),
        MetricSpec(
            "clip_t",
            "CLIP-Score",
            "CLIP-Score = CLIP-T (SR↔text condition)",
            "CLIP-Score in the paper's sense = CLIP-T: SR image–its text condition cosine with OpenAI ViT-L/14 "
            "(openai/clip-vit-large-patch14), captions from --captions or the eval-run folder's captions.jsonl, "
            "raw cosine (no 2.5x / 100x scaling, no clamp)",
            False,
            (W_CLIP_TEXT,),
            build_clip_t,
            needs_captions=True,
        ),
        MetricSpec(
            "maniqa",
            "MANIQA",
            "MANIQA (KonIQ-10k)",
            "MANIQA (pyiqa `maniqa` = KonIQ-10k checkpoint ckpt_koniq10k.pt; 20 uniform 224 crops)",
            False,
            (W_MANIQA["koniq"],),
            lambda ctx: _build_maniqa(ctx, "koniq"),
        ),
        MetricSpec(
            "maniqa_pipal",
            "MANIQA",
            "MANIQA (PIPAL)",
            "MANIQA (pyiqa `maniqa-pipal` = PIPAL checkpoint MANIQA_PIPAL-ae6d356b.pth; 20 uniform 224 crops)",
            False,
            (W_MANIQA["pipal"],),
            lambda ctx: _build_maniqa(ctx, "pipal"),
        ),
        MetricSpec(
            "maniqa_kadid",
            "MANIQA",
            "MANIQA (KADID-10k)",
            "MANIQA (pyiqa `maniqa-kadid` = KADID-10k checkpoint ckpt_kadid10k.pt; 20 uniform 224 crops)",
            False,
            (W_MANIQA["kadid"],),
            lambda ctx: _build_maniqa(ctx, "kadid"),
        ),
        MetricSpec(
            "musiq",
            "MUSIQ",
            "MUSIQ (KonIQ-10k)",
            "MUSIQ (pyiqa `musiq` = KonIQ-10k checkpoint musiq_koniq_ckpt-e95806b9.pth; multiscale 224/384 + full)",
            False,
            (W_MUSIQ,),
            build_musiq,
            decimals=DECIMALS["MUSIQ"],
        ),
        MetricSpec(
            "psnr",
            "PSNR",
            "PSNR (dB)",
            f"PSNR (torchmetrics; RGB, 0..1, data_range 1, per-image mean; capped at {PSNR_CAP_DB:g} dB per image)",
            False,
            (),
            build_psnr,
            decimals=2,
        ),
        MetricSpec(
            "ssim",
            "SSIM",
            "SSIM",
            "SSIM (torchmetrics; RGB mean over channels, 11x11 Gaussian sigma 1.5, data_range 1, per-image mean)",
            False,
            (),
            build_ssim,
        ),
    )
}

# Distinct names for the two CLIP variants (#11.7).
METRIC_ALIASES = {"clip_score": "clip_t", "clip_image": "clip_i"}

# The default set: the paper's six columns, then PSNR and SSIM (+ CLIP-T when captions are given).
DEFAULT_METRICS: tuple[str, ...] = ("fid", "dists", "lpips", "clip_i", "maniqa", "musiq", "psnr", "ssim")


def parse_metric_list(metrics: str | Sequence[str] | None, *, have_captions: bool = False) -> list[str]:
    """Normalise a metric list ("fid,dists" or a sequence; hyphens = underscores) in registry order."""
    if metrics is None:
        keys = list(DEFAULT_METRICS) + (["clip_t"] if have_captions else [])
    else:
        items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
        keys = [m.strip().lower().replace("-", "_") for m in items if m.strip()]
        keys = [METRIC_ALIASES.get(k, k) for k in keys]
        unknown = [k for k in keys if k not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
        if not keys:
            raise ValueError("empty metric list; choose from " + ", ".join(METRICS))
    return [k for k in METRICS if k in set(keys)]


def check_weights(
    keys: Sequence[str], weights_dir: str | Path | None = None, skip: Sequence[str] = ()
) -> dict[str, dict[str, Path]]:
    """Resolve every weight file the metrics ``keys`` need (except those in ``skip``).

    Returns {metric key: {file name: path}}. Raises :class:`MissingWeightsError` listing every
    missing file (metric, file name, folder to put it in, public URL). Never downloads.
    """
    if weights_dir is not None and not Path(weights_dir).is_dir():
        raise MissingWeightsError(f"--weights-dir {weights_dir} is not a folder")
    resolved: dict[str, dict[str, Path]] = {}
    problems: list[str] = []
    for key in keys:
        if key in skip:
            continue
        spec = METRICS[key]
        resolved[key] = {}
        for wf in spec.weights:
            path = wf.resolve(weights_dir)
            if path is None:
                problems.append(f"  - {spec.label} [{key}]: {wf.describe_missing(weights_dir)}")
            else:
                resolved[key][wf.name] = path
    if problems:
        raise MissingWeightsError(
            "Weights missing for the requested metrics (XSR evaluation never downloads; nothing was "
            "computed):\n" + "\n".join(problems) + "\nOr leave those metrics out with --metrics."
        )
    return resolved


# --------------------------------------------------------------------------------------------
# Inputs: pairing, captions, loading
# --------------------------------------------------------------------------------------------


RUN_SIDE_DIRS = ("hr_crop", "lr")  # what `eval run` writes beside its SR outputs (xsr_core.eval.run)
RUN_CAPTIONS = "captions.jsonl"  # eval run: {"image", "caption"} = the XSR_Enhance text of each SR image


def read_run_manifest(sr_dir: str | Path) -> dict[str, Any] | None:
    """``run.json`` of an ``eval run`` output folder, or None."""
    p = Path(sr_dir) / "run.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MetricInputError(f"{p}: corrupt eval-run manifest ({e})") from None


def _list_images(folder: Path, skip: Sequence[str] = ()) -> dict[str, Path]:
    if not folder.is_dir():
        raise MetricInputError(f"{folder} is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if skip and path.relative_to(folder).parts[0] in skip:
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            key = path.relative_to(folder).with_suffix("").as_posix()
            if key in found:
                raise MetricInputError(
                    f"{folder}: {found[key].name} and {path.name} have the same name apart from the "
                    f"extension; keep one image per name"
                )
            found[key] = path
    if not found:
        raise MetricInputError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def pair_images(
    sr_dir: str | Path, hr_dir: str | Path, *, skip_unmatched: bool = False
) -> list[tuple[str, Path, Path]]:
    """Pair SR and HR images by relative path without extension (``a/b.png`` pairs ``a/b.JPEG``).

    Returns sorted (name, sr_path, hr_path). Unmatched files raise :class:`MetricInputError` listing
    them, unless ``skip_unmatched`` (then they are logged and left out).
    """
    skip = RUN_SIDE_DIRS if read_run_manifest(sr_dir) is not None else ()
    sr, hr = _list_images(Path(sr_dir), skip), _list_images(Path(hr_dir))
    only_sr, only_hr = sorted(set(sr) - set(hr)), sorted(set(hr) - set(sr))
    if only_sr or only_hr:
        msg = (
            f"SR/HR images do not pair by name: {len(only_sr)} only in {sr_dir} "
            f"{only_sr[:10]}{' ...' if len(only_sr) > 10 else ''}, {len(only_hr)} only in {hr_dir} "
            f"{only_hr[:10]}{' ...' if len(only_hr) > 10 else ''}."
        )
        if not skip_unmatched:
            raise MetricInputError(msg + " Give SR files the HR names (any extension), or pass --skip-unmatched.")
        logger.warning("%s Left out.", msg)
    names = sorted(set(sr) & set(hr))
    if not names:
        raise MetricInputError(f"no SR image in {sr_dir} has a same-named HR image in {hr_dir}")
    return [(n, sr[n], hr[n]) for n in names]


def read_captions(path: str | Path) -> dict[str, str]:
    """Captions keyed by image name (relative path or file name, extension optional), in any format of
    :mod:`xsr_core.captions` (``.json`` {name: caption}, ``.jsonl``, ``.csv``, ``name<TAB>caption`` lines)."""
    from ..captions import CaptionFileError
    from ..captions import read_captions as _read

    try:
        return _read(path)
    except CaptionFileError as e:
        raise MetricInputError(str(e)) from None


def match_captions(names: Sequence[str], captions: Mapping[str, str], source: str = "captions") -> dict[str, str]:
    """Caption per image name; keys may carry an extension or be bare file names."""
    index: dict[str, str] = {}
    for key, cap in captions.items():
        k = key.replace("\\", "/")
        stem = k.rsplit(".", 1)[0] if Path(k).suffix.lower() in IMAGE_EXTENSIONS else k
        index.setdefault(stem, cap)
        index.setdefault(stem.rsplit("/", 1)[-1], cap)
    out, missing = {}, []
    for name in names:
        cap = index.get(name, index.get(name.rsplit("/", 1)[-1]))
        if cap is None:
            missing.append(name)
        else:
            out[name] = cap
    if missing:
        raise MetricInputError(f"{source}: no caption for {len(missing)} image(s): {missing[:10]}")
    return out


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size  # (W, H)


def load_image(path: Path) -> torch.Tensor:
    """RGB image as (3, H, W) float32 in 0..1."""
    from ..image_io import load_rgb_float

    arr = load_rgb_float(path, what=f"image {path}")  # any mode (16-bit, alpha over black, EXIF)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def check_sizes(pairs: Sequence[tuple[str, Path, Path]]) -> int:
    """Check SR/HR sizes; return how many HR images will get the x16 crop (never a squash).

    Equal sizes are used as they are. An HR image of another size next to a square SR image gets
    :func:`xsr_core.imaging.crop_hr` at the SR side (shortest side resized, centre crop: exactly the
    crop ``eval run`` and ``train prepare`` degrade). Anything else is a :class:`MetricInputError`.
    """
    cropped, bad = 0, []
    for name, sp, hp in pairs:
        s, h = _image_size(sp), _image_size(hp)
        if s == h:
            continue
        if s[0] != s[1]:
            bad.append(f"{name}: SR {s[0]}x{s[1]} vs HR {h[0]}x{h[1]}")
        else:
            cropped += 1
    if bad:
        raise MetricInputError(
            f"{len(bad)} SR/HR pair(s) differ in size and the SR is not square, so the x16 crop cannot "
            f"explain them: {bad[:10]}. Score against the HR crops `eval run` saved (--hr SR_DIR/hr_crop, "
            f"or leave --hr out) or give same-size pairs."
        )
    if cropped:
        logger.info("%d HR image(s) centre-cropped to the SR side (xsr_core.imaging.crop_hr)", cropped)
    return cropped


def _hr_for(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """HR (3,H,W) matched to SR (3,S,S) by the x16 geometry (a no-op when the sizes agree)."""
    if hr.shape == sr.shape:
        return hr
    from ..imaging import crop_hr

    return crop_hr(hr.permute(1, 2, 0)[None], sr.shape[-1])[0].permute(2, 0, 1).contiguous()


def iter_batches(
    pairs: Sequence[tuple[str, Path, Path]], batch_size: int, *, saved_crops: Mapping[str, Path] | None = None
) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """Yield (names, SR (B,3,H,W), HR (B,3,H,W)); a batch holds consecutive pairs of one SR size.

    ``saved_crops`` {name: the HR crop ``eval run`` saved}: the HR given for that name must give
    exactly that crop (else :class:`MetricInputError`: the HR folder is not the one the run degraded).
    """
    names: list[str] = []
    srs: list[torch.Tensor] = []
    hrs: list[torch.Tensor] = []
    for name, sp, hp in pairs:
        sr = load_image(sp)
        hr = _hr_for(sr, load_image(hp))
        saved = (saved_crops or {}).get(name)
        if saved is not None:
            ref = load_image(saved)
            if ref.shape != hr.shape or (ref - hr).abs().max() > 0.5 / 255:
                raise MetricInputError(
                    f"{name}: HR {hp} does not give the HR crop `eval run` degraded ({saved}); the HR folder is "
                    f"not the run's input (or another --hr-side was used). Leave --hr out to score against the "
                    f"saved crops."
                )
        if srs and (sr.shape != srs[0].shape or len(srs) == batch_size):
            yield names, torch.stack(srs), torch.stack(hrs)
            names, srs, hrs = [], [], []
        names.append(name)
        srs.append(sr)
        hrs.append(hr)
    if srs:
        yield names, torch.stack(srs), torch.stack(hrs)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "torchvision", "torchmetrics", "torch-fidelity", "pyiqa", "transformers", "timm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def compute_metrics(
    sr_dir: str | Path,
    hr_dir: str | Path | None = None,
    metrics: str | Sequence[str] | None = None,
    captions: str | Path | Mapping[str, str] | None = None,
    device: str | torch.device = "cpu",
    weights_dir: str | Path | None = None,
    factories: Mapping[str, Callable[[MetricContext], Metric]] | None = None,
    *,
    batch_size: int = 8,
    resize_hr: bool = False,
    skip_unmatched: bool = False,
    allow_unexcluded_db: bool = False,
) -> dict[str, Any]:
    """Compute the Table-1 metrics of SR images against same-named HR images.

    Args:
        sr_dir: folder of SR outputs (searched recursively).
        hr_dir: folder of HR ground truth; pairs by relative path without extension. None: the HR
            crops ``eval run`` saved in ``sr_dir/hr_crop``. HR images of another size than their
            (square) SR get the x16 crop (:func:`xsr_core.imaging.crop_hr`), never a squash.
        metrics: keys (list or comma string) from :data:`METRICS`; default :data:`DEFAULT_METRICS`
            (+ ``clip_t`` when captions are given).
        captions: a captions file (see :func:`read_captions`) or a {name: caption} mapping; needed by
            ``clip_t``.
        device: torch device for the networks.
        weights_dir: a folder searched first for every weight file (flat: file names as published;
            CLIP as a sub-folder ``clip-vit-large-patch14/``).
        factories: {metric key: factory(ctx) -> Metric} overriding the default builders (those
            metrics skip the weight check); for tests and custom networks.
        batch_size: images per forward pass.
        resize_hr: removed (it squashed non-square HR images); True raises a MetricInputError.
        skip_unmatched: leave out images present in only one folder instead of raising.
        allow_unexcluded_db: score an ``eval run`` folder whose reference DB was not deduplicated
            against its test images (run with ``--allow-unexcluded-db``) instead of raising.

    Returns:
        A JSON-ready dict: ``metrics`` {key: {value, variant, n, column, label, lower_better,
        decimals}} in registry order, ``per_image`` {key: {name: value}}, ``n_images``, inputs,
        device, date and library versions.

    Raises:
        MetricInputError: pairing, size, caption or image-count problems.
        MissingWeightsError: weight files absent (raised before any network is built).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    factories = dict(factories or {})
    unknown = sorted(set(factories) - set(METRICS))
    if unknown:
        raise ValueError(f"factories for unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    if resize_hr:
        raise MetricInputError(
            "--resize-hr was removed: it squashed each HR image to the SR size, so a perfect SR of a non-square "
            "image scored ~10 dB. HR images are now centre-cropped by the x16 geometry (xsr_core.imaging.crop_hr) "
            "automatically; drop the flag (or leave --hr out to use the crops `eval run` saved)."
        )
    manifest = read_run_manifest(sr_dir)
    excl = (manifest or {}).get("refdb_exclusion") or {}
    leaks = {db: r["not_excluded"] for db, r in (excl.get("dbs") or {}).items() if r.get("not_excluded")}
    if leaks and not allow_unexcluded_db:
        raise MetricInputError(
            f"{sr_dir} was produced with a reference DB not deduplicated against its test images ({leaks} images "
            "not excluded; `eval run --allow-unexcluded-db`): its scores are not comparable. Pass "
            "--allow-unexcluded-db to score it anyway."
        )
    if captions is None and manifest is not None and (Path(sr_dir) / RUN_CAPTIONS).is_file():
        captions = Path(sr_dir) / RUN_CAPTIONS  # the text condition each SR image was generated with
    keys = parse_metric_list(metrics, have_captions=captions is not None)
    device = torch.device(device)
    if hr_dir is None:
        if manifest is None or not (Path(sr_dir) / manifest.get("hr_crop_dir", "hr_crop")).is_dir():
            raise MetricInputError(f"--hr is needed: {sr_dir} is not an `eval run` folder with saved HR crops")
        hr_dir = Path(sr_dir) / manifest.get("hr_crop_dir", "hr_crop")
    saved_crops: dict[str, Path] = {}
    if (
        manifest is not None
        and Path(hr_dir).resolve() != (Path(sr_dir) / manifest.get("hr_crop_dir", "hr_crop")).resolve()
    ):
        for rel, m in manifest.get("images", {}).items():
            if m.get("hr_crop") and (Path(sr_dir) / m["hr_crop"]).is_file():
                saved_crops[Path(rel).with_suffix("").as_posix()] = Path(sr_dir) / m["hr_crop"]

    pairs = pair_images(sr_dir, hr_dir, skip_unmatched=skip_unmatched)
    names = [p[0] for p in pairs]
    caption_map: dict[str, str] | None = None
    if any(METRICS[k].needs_captions for k in keys):
        if captions is None:
            raise MetricInputError(
                "clip_t (CLIP-Score, SR image vs its text condition) needs --captions FILE (an "
                "`eval run` folder has them in captions.jsonl)"
            )
        raw = captions if isinstance(captions, Mapping) else read_captions(captions)
        caption_map = match_captions(
            names, raw, source=str(captions) if not isinstance(captions, Mapping) else "captions"
        )
    for k in keys:
        if len(pairs) < METRICS[k].min_images:
            raise MetricInputError(
                f"{METRICS[k].label} needs at least {METRICS[k].min_images} images, got {len(pairs)}"
            )
    cropped = check_sizes(pairs)
    resolved = check_weights(keys, weights_dir, skip=tuple(factories))

    built: dict[str, Metric] = {}
    for k in keys:
        ctx = MetricContext(device=device, weights=resolved.get(k, {}), spec=METRICS[k])
        logger.info("building %s", METRICS[k].label)
        built[k] = factories.get(k, METRICS[k].factory)(ctx)

    done = 0
    for batch_names, sr, hr in iter_batches(pairs, batch_size, saved_crops=saved_crops):
        sr, hr = sr.to(device), hr.to(device)
        caps = [caption_map[n] for n in batch_names] if caption_map is not None else None
        for k, metric in built.items():
            metric.update(sr, hr, batch_names, caps)
        done += len(batch_names)
        logger.info("%d/%d images", done, len(pairs))

    out_metrics: dict[str, Any] = {}
    per_image: dict[str, Any] = {}
    for k, metric in built.items():
        spec = METRICS[k]
        value, n, values = metric.compute()
        out_metrics[k] = {
            "value": value if math.isfinite(value) else str(value),
            "variant": spec.variant,
            "n": n,
            "column": spec.column,
            "label": spec.label,
            "lower_better": spec.lower_better,
            "decimals": spec.decimals,
            "custom_factory": k in factories,
        }
        if values is not None:
            per_image[k] = {name: (v if math.isfinite(v) else str(v)) for name, v in values.items()}
    return {
        "format": RESULTS_FORMAT,
        "sr_dir": str(sr_dir),
        "hr_dir": str(hr_dir),
        "n_images": len(pairs),
        "hr_cropped": cropped,
        "refdb_exclusion": excl or None,
        "hr_geometry": "xsr_core.imaging.crop_hr (shortest side -> SR side, centre crop) where sizes differ",
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "metrics": out_metrics,
        "per_image": per_image,
    }


def write_results(results: Mapping[str, Any], out_dir: str | Path, *, label: str | None = None) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.md`` (the table) into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "metrics.json", out / "metrics.md"
    json_path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    md_path.write_text(format_table(results, label=label), encoding="utf-8")
    return json_path, md_path
