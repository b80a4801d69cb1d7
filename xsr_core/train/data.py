"""``train prepare``: a user's HR images → splits, 512/32 pairs, captions, CLIP caches, reference DB.

Layout written under ``DATA``::

    prepare.json          options, split sizes, encoder fingerprint, skipped files
    items.jsonl           one row per image: id, split, sha256, source, hr, lr, caption
    hr/<split>/<id>.png   512x512 centre crops (shortest side resized to 512 first, antialiased bicubic)
    lr/<split>/<id>.png   32x32 LR made by the degradation (default xsr_core.imaging.make_lr:
                          antialiased bicubic /16, PyTorch's a = -0.75 kernel, PIL-like antialiasing)
    reference.txt         list file of the reference split's HR crops (input of the DB build)
    refdb/                the reference DB (xsr_core.refdb.build_db over reference.txt)
    cache/clip/<split>/shard-NNNNN.safetensors
                          frozen CLIP outputs for the train and test splits, fp16:
                          lr_tokens / hr_tokens (n, 257, D), lr_cls / hr_cls (n, D), index (n,)

The split is deterministic: unique images (by SHA-256 of the file bytes; exact duplicates are kept
once) are ordered by hash and cut into train / reference / test, so the DB never contains a test
image. Every step is resumable: existing crops and complete cache shards are kept, the DB build
resumes by itself, BLIP-2 captioning appends to ``captions_blip2.jsonl``.

Real-scale cost of the token cache: 2 x 257 x 1024 x 2 bytes ≈ 1.05 MB per image (ViT-L/14), i.e.
~105 GB for the paper's 100k training images.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..image_io import load_rgb8
from ..imaging import crop_hr, make_lr

logger = logging.getLogger(__name__)

SPLITS = ("train", "reference", "test")
HR_SIZE = 512
CACHE_SPLITS = ("train", "test")
CAPTION_SPLITS = ("train", "test")


class PrepareError(ValueError):
    """Unusable inputs to ``train prepare`` (the message names them and says what to do)."""


@dataclass
class PrepareConfig:
    split: str = "0.2,0.7,0.1"  # train,reference,test as counts ("100000,800000,2000") or fractions
    hr_size: int = HR_SIZE  # HR crop side (the x16 output size)
    scale: int = 16  # LR = HR / scale
    min_side: int = 256  # images whose shortest side is below this are rejected (upscaling limit)
    skip_bad: bool = False  # skip unreadable / too small images instead of failing
    degradation: str = ""  # "module:function" taking (hr [B,H,W,C] 0..1, scale) → LR; "" = make_lr
    shard_size: int = 1024  # images per CLIP cache shard (unit of resume)
    batch_size: int = 32  # CLIP encoder batch
    device: str = "auto"  # encoder device
    workers: int = 0  # image decoding processes
    blip2_batch_size: int = 8  # BLIP-2 captioning batch
    refdb_mode: str = "paths"  # reference DB mode ("paths" or "packed")
    dedup_threshold: float = 0.95  # reference images whose CLIP CLS cosine to a test image is >= this are left out
    # of the DB (near-duplicates: re-encodes, resizes, crops of a test photo); the same default as
    # `refdb build --exclude`. 1.0 keeps all but exact duplicates.

    def __post_init__(self) -> None:
        parse_split(self.split)
        if self.hr_size % self.scale or self.scale < 1:
            raise ValueError(f"hr_size {self.hr_size} must be a multiple of scale {self.scale}")
        if min(self.shard_size, self.batch_size, self.blip2_batch_size) < 1 or self.workers < 0:
            raise ValueError("shard_size, batch_size, blip2_batch_size must be >= 1 and workers >= 0")
        if self.min_side < 1:
            raise ValueError("min_side must be >= 1")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ValueError(f"dedup_threshold must be in (0, 1], got {self.dedup_threshold}")


def parse_split(text: str) -> tuple[float, float, float]:
    """ "a,b,c" → three numbers (all ints = counts, otherwise fractions summing to <= 1)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3:
        raise ValueError(f"--split needs three values train,reference,test, got {text!r}")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--split values must be numbers, got {text!r}") from None
    if min(vals) < 0:
        raise ValueError(f"--split values must be >= 0, got {text!r}")
    if all(v.is_integer() and v >= 1 or v == 0 for v in vals) and any(v >= 1 for v in vals):
        return vals  # counts
    if sum(vals) > 1.0 + 1e-9:
        raise ValueError(f"--split fractions must sum to <= 1, got {text!r}")
    return vals


def split_sizes(spec: str, n: int) -> tuple[int, int, int]:
    """Number of train / reference / test images out of ``n`` unique ones."""
    vals = parse_split(spec)
    if any(v >= 1 for v in vals):
        counts = tuple(int(v) for v in vals)
        if sum(counts) > n:
            raise PrepareError(
                f"--split {spec} asks for {sum(counts)} images, only {n} unique usable images were "
                "found; lower the counts or give fractions (e.g. 0.1,0.8,0.1)"
            )
        return counts  # type: ignore[return-value]
    counts = [int(v * n + 1e-9) for v in vals]
    for i, v in enumerate(vals):  # a non-zero fraction gets at least one image, taken from the largest share
        if v > 0 and counts[i] == 0:
            counts[i] = 1
            if sum(counts) > n:
                big = max(range(3), key=lambda j: counts[j])
                counts[big] -= 1
    if abs(sum(vals) - 1.0) < 1e-9 and sum(counts) < n:  # fractions summing to 1 use every image
        counts[1 if vals[1] > 0 else 0] += n - sum(counts)
    if sum(counts) > n or any(v > 0 and c == 0 for v, c in zip(vals, counts)):
        raise PrepareError(f"{n} usable images are too few for --split {spec}")
    return counts[0], counts[1], counts[2]


# ------------------------------------------------------------------------------ images


def _sources(images: str | None, list_file: str | None) -> tuple[list[str], dict[str, str], Path | None]:
    from ..refdb.images import discover_images, read_list_file

    if bool(images) == bool(list_file):
        raise PrepareError("give exactly one of --images DIR or --list FILE")
    if images:
        try:
            paths = discover_images(images)
        except FileNotFoundError as e:
            raise PrepareError(str(e)) from None
        if not paths:
            raise PrepareError(
                f"no image files found in {images} (extensions: jpg, jpeg, png, webp, bmp, gif, tif, tiff)"
            )
        return paths, {}, Path(images).resolve()
    try:
        rows = read_list_file(list_file)
    except FileNotFoundError as e:
        raise PrepareError(str(e)) from None
    if not rows:
        raise PrepareError(f"image list {list_file} names no images")
    return [p for p, _ in rows], {p: c for p, c in rows if c}, None


def load_degradation(spec: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The degradation callable named ``module:function`` (default: :func:`xsr_core.imaging.make_lr`)."""
    if not spec:
        return make_lr
    mod, _, fn = spec.partition(":")
    if not fn:
        raise ValueError(f"--degradation must be 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--degradation {spec}: cannot import ({e})") from e


def center_crop_hr(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image → [1, size, size, 3] float 0..1: :func:`xsr_core.imaging.crop_hr` (the x16 geometry)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float().div(255.0)[None]  # (1, H, W, 3)
    return crop_hr(x, size)


def _to_png(x: torch.Tensor, path: Path) -> None:
    arr = (x[0].clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


def load_png(path: str | os.PathLike) -> torch.Tensor:
    """A prepared PNG as [H, W, 3] float 0..1."""
    return torch.from_numpy(np.array(load_rgb8(path, what=f"image {path}"), dtype=np.uint8)).float().div(255.0)


class _HashDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], min_side: int):
        self.paths, self.min_side = paths, min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, str | None, str | None]:
        from ..refdb.images import ImageSkip, decode_image

        p = self.paths[i]
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            return i, None, f"cannot read ({e.strerror or e})"
        try:
            decode_image(data, min_side=self.min_side, what=p)
        except ImageSkip as e:
            return i, None, str(e)
        return i, hashlib.sha256(data).hexdigest(), None


def scan_images(paths: list[str], cfg: PrepareConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(usable (path, sha256) unique by content, bad (path, reason)); bad files fail unless skip_bad."""
    loader = torch.utils.data.DataLoader(_HashDataset(paths, cfg.min_side), batch_size=None, num_workers=cfg.workers)
    good: dict[str, str] = {}
    bad: list[tuple[str, str]] = []
    for i, sha, reason in loader:
        if sha is None:
            bad.append((paths[i], reason))
        else:
            good.setdefault(sha, paths[i])
    if bad and not cfg.skip_bad:
        listing = "\n".join(f"  {p}: {r}" for p, r in bad[:20]) + (
            f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        )
        raise PrepareError(
            f"{len(bad)} of {len(paths)} images are unusable (unreadable, or shortest side < "
            f"{cfg.min_side}px):\n{listing}\nfix or remove them, or pass --skip_bad to leave them out"
        )
    if not good:
        raise PrepareError("no usable images (all unreadable or too small)")
    if len(good) < len(paths) - len(bad):
        logger.info("%d exact duplicate files kept once", len(paths) - len(bad) - len(good))
    return sorted(((p, s) for s, p in good.items()), key=lambda t: t[1]), bad


# ------------------------------------------------------------------------------ captions


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """Captions of ``--captions`` (JSONL, CSV, JSON or TSV: :mod:`xsr_core.captions`), as {image key: caption}.

    The image key may be an absolute path, a path relative to the image folder, or a file name.
    """
    from ..captions import CaptionFileError
    from ..captions import read_captions as _read

    try:
        return _read(path)
    except CaptionFileError as e:
        raise PrepareError(str(e)) from None


def match_captions(items: list[dict[str, Any]], captions: dict[str, str], root: Path | None) -> list[str]:
    """Fill ``item["caption"]`` from ``captions``; returns the sources of items still without one."""
    missing = []
    for it in items:
        src = Path(it["source"])
        cands = [src.as_posix(), src.name, src.stem]
        if root is not None:
            try:
                cands.insert(1, src.relative_to(root).as_posix())
            except ValueError:
                pass
        cap = next((captions[c] for c in cands if c in captions), None)
        if cap:
            it["caption"] = cap
        elif not it.get("caption"):
            missing.append(it["source"])
    return missing


def caption_with_blip2(
    model_dir: str | os.PathLike,
    items: list[dict[str, Any]],
    out_jsonl: Path,
    batch_size: int = 8,
    device: str = "auto",
) -> None:
    """Caption ``items`` (their HR crops) with a local BLIP-2 folder; resumable (appends to ``out_jsonl``).

    Uses ``transformers.Blip2ForConditionalGeneration`` + ``Blip2Processor`` from ``model_dir``
    (local files only). Sets ``item["caption"]``.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PrepareError(
            f"--blip2 {model_dir}: not a BLIP-2 model folder (no config.json); download e.g. "
            "Salesforce/blip2-opt-2.7b to a local folder and point --blip2 at it"
        )
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    done: dict[str, str] = {}
    if out_jsonl.is_file():
        for line in out_jsonl.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["sha256"]] = row["caption"]
    todo = [it for it in items if it["sha256"] not in done]
    if todo:
        dev = torch.device(
            "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        )
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        processor = Blip2Processor.from_pretrained(str(model_dir), local_files_only=True)
        model = (
            Blip2ForConditionalGeneration.from_pretrained(str(model_dir), local_files_only=True, torch_dtype=dtype)
            .to(dev)
            .eval()
        )
        from tqdm.auto import tqdm

        with open(out_jsonl, "a", encoding="utf-8") as f:
            for s in tqdm(range(0, len(todo), batch_size), desc="BLIP-2 captions"):
                chunk = todo[s : s + batch_size]
                imgs = [load_rgb8(it["hr_path"]) for it in chunk]
                inputs = processor(images=imgs, return_tensors="pt").to(dev, dtype)
                with torch.no_grad():
                    ids = model.generate(**inputs, max_new_tokens=40)
                for it, text in zip(chunk, processor.batch_decode(ids, skip_special_tokens=True)):
                    done[it["sha256"]] = text.strip()
                    f.write(json.dumps({"sha256": it["sha256"], "image": it["source"], "caption": text.strip()}) + "\n")
                f.flush()
    for it in items:
        it["caption"] = done[it["sha256"]]


# ------------------------------------------------------------------------------ CLIP cache


def cache_dir(data: str | os.PathLike, split: str) -> Path:
    return Path(data) / "cache" / "clip" / split


def _shard_ok(path: Path, ids: list[int]) -> bool:
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata().get("ids", "[]")) == ids
    except Exception:  # a torn file from an interrupted run: rebuild it
        return False


def build_clip_cache(data: Path, split: str, items: list[dict[str, Any]], encoder: Any, cfg: PrepareConfig) -> int:
    """Encode LR/HR crops of ``items`` into fp16 shards (skipping complete ones); returns shards written."""
    from safetensors.torch import save_file

    out = cache_dir(data, split)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for k, s in enumerate(range(0, len(items), cfg.shard_size)):
        chunk = items[s : s + cfg.shard_size]
        ids = [it["id"] for it in chunk]
        path = out / f"shard-{k:05d}.safetensors"
        if _shard_ok(path, ids):
            continue
        parts: dict[str, list[torch.Tensor]] = {"lr_tokens": [], "hr_tokens": [], "lr_cls": [], "hr_cls": []}
        for b in range(0, len(chunk), cfg.batch_size):
            sub = chunk[b : b + cfg.batch_size]
            hr = torch.stack([load_png(data / it["hr"]) for it in sub])
            lr = torch.stack([load_png(data / it["lr"]) for it in sub])
            fh, fl = encoder.encode_images(hr), encoder.encode_images(lr, lr=True)
            parts["hr_tokens"].append(fh.tokens.half().cpu())
            parts["hr_cls"].append(fh.cls.half().cpu())
            parts["lr_tokens"].append(fl.tokens.half().cpu())
            parts["lr_cls"].append(fl.cls.half().cpu())
        tensors = {k2: torch.cat(v).contiguous() for k2, v in parts.items()}
        tensors["index"] = torch.tensor([s + i for i in range(len(chunk))], dtype=torch.int64)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"ids": json.dumps(ids), "split": split})
        os.replace(tmp, path)
        written += 1
    return written


class TokenCache:
    """Read access to one split's CLIP cache (memory-mapped shards; rows read on demand)."""

    KEYS = ("lr_tokens", "hr_tokens", "lr_cls", "hr_cls")

    def __init__(self, data: str | os.PathLike, split: str, preload_gb: float = 2.0):
        from safetensors import safe_open

        self.dir = cache_dir(data, split)
        shards = sorted(self.dir.glob("shard-*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"{self.dir}: no CLIP cache; run `python -m xsr_core.train prepare` first")
        self._files = [safe_open(str(p), framework="pt") for p in shards]
        self._where: list[tuple[int, int]] = []
        for k, f in enumerate(self._files):
            n = f.get_slice("index").get_shape()[0]
            self._where.extend((k, r) for r in range(n))
        self._mem: dict[str, torch.Tensor] | None = None
        if sum(p.stat().st_size for p in shards) < preload_gb * 2**30:  # small split: keep it in memory
            self._mem = {key: self.stack_raw(key) for key in self.KEYS}

    def __len__(self) -> int:
        return len(self._where)

    def row(self, i: int, key: str) -> torch.Tensor:
        if self._mem is not None:
            return self._mem[key][i]
        k, r = self._where[i]
        return self._files[k].get_slice(key)[r : r + 1][0]

    def get(self, i: int, keys: Sequence[str] = KEYS) -> dict[str, torch.Tensor]:
        return {key: self.row(i, key).float() for key in keys}

    def stack_raw(self, key: str) -> torch.Tensor:
        return torch.cat([f.get_tensor(key) for f in self._files])

    def stack(self, key: str) -> torch.Tensor:
        """Every row of ``key`` stacked (float32); for the small CLS tensors."""
        return self.stack_raw(key).float()

    def __getstate__(self):  # DataLoader workers reopen the files
        return {"dir": self.dir}

    def __setstate__(self, state):
        data, split = state["dir"].parents[2], state["dir"].name
        self.__init__(data, split)


# ------------------------------------------------------------------------------ items


def load_items(data: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of ``items.jsonl`` (optionally one split), in split order."""
    p = Path(data) / "items.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"{data}: no items.jsonl; run `python -m xsr_core.train prepare --out {data}` first")
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


def prepare(
    out: str | os.PathLike,
    encoder_path: str | os.PathLike,
    *,
    images: str | None = None,
    list_file: str | None = None,
    captions: str | None = None,
    blip2: str | None = None,
    config: PrepareConfig | None = None,
) -> dict[str, Any]:
    """Run the whole preparation (see the module docstring); returns the ``prepare.json`` content.

    All input checks (sources, unreadable images, split sizes, caption coverage) happen before any
    crop is written or the encoder is loaded.
    """
    cfg = config or PrepareConfig()
    out = Path(out)
    paths, list_caps, root = _sources(images, list_file)
    if not (captions or blip2 or list_caps):
        raise PrepareError(
            "captions are needed for the I2T and adapter stages: give --captions FILE.jsonl|.csv, "
            "a list file with PATH<TAB>CAPTION lines, or --blip2 MODEL_DIR to generate them"
        )
    if blip2 and not (Path(blip2) / "config.json").is_file():
        raise PrepareError(
            f"--blip2 {blip2}: not a BLIP-2 model folder (no config.json); download e.g. "
            "Salesforce/blip2-opt-2.7b to a local folder and point --blip2 at it"
        )
    if not Path(encoder_path).is_file():
        raise PrepareError(f"--encoder {encoder_path}: no such CLIP vision .safetensors file")
    load_degradation(cfg.degradation)  # fail early on a bad --degradation
    usable, bad = scan_images(paths, cfg)
    n_tr, n_ref, n_te = split_sizes(cfg.split, len(usable))
    items: list[dict[str, Any]] = []
    bounds = {"train": (0, n_tr), "reference": (n_tr, n_tr + n_ref), "test": (n_tr + n_ref, n_tr + n_ref + n_te)}
    for split, (a, b) in bounds.items():
        for k, (p, sha) in enumerate(usable[a:b]):
            items.append(
                {
                    "id": len(items),
                    "split": split,
                    "index": k,
                    "sha256": sha,
                    "source": p,
                    "hr": f"hr/{split}/{k:07d}.png",
                    "lr": f"lr/{split}/{k:07d}.png",
                    "caption": list_caps.get(p),
                }
            )
    need = [it for it in items if it["split"] in CAPTION_SPLITS]
    if captions:
        missing = match_captions(need, read_captions(captions), root)
        if missing and not blip2:
            listing = "\n".join(f"  {m}" for m in missing[:20]) + (
                f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
            )
            raise PrepareError(
                f"caption file {captions} has no caption for {len(missing)} of the {len(need)} train/test "
                f"images:\n{listing}\nadd them (key = file name, relative or absolute path) or pass --blip2 "
                "to caption the rest"
            )
    elif list_caps:
        missing = [it["source"] for it in need if not it.get("caption")]
        if missing and not blip2:
            raise PrepareError(
                f"list file {list_file} has no caption for {len(missing)} train/test images, e.g. "
                f"{missing[:5]}; add PATH<TAB>CAPTION lines or pass --blip2"
            )
    out.mkdir(parents=True, exist_ok=True)
    _write_crops(out, items, cfg)
    if blip2:
        todo = [it for it in need if not it.get("caption")]
        for it in todo:
            it["hr_path"] = str(out / it["hr"])
        caption_with_blip2(blip2, todo, out / "captions_blip2.jsonl", cfg.blip2_batch_size, cfg.device)
        for it in todo:
            it.pop("hr_path", None)
    with open(out / "items.jsonl.tmp", "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    os.replace(out / "items.jsonl.tmp", out / "items.jsonl")
    return _encode_and_index(out, items, encoder_path, cfg, bad, (n_tr, n_ref, n_te))


class _CropDataset(torch.utils.data.Dataset):
    """Decode → 512 crop → degradation → PNGs, one item per call (runs in DataLoader workers)."""

    def __init__(self, out: Path, items: list[dict[str, Any]], cfg: PrepareConfig):
        self.out, self.items, self.cfg = out, items, cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> str | None:
        from ..refdb.images import decode_image

        it, cfg = self.items[i], self.cfg
        hr_p, lr_p = self.out / it["hr"], self.out / it["lr"]
        if hr_p.is_file() and lr_p.is_file():
            return None
        img = decode_image(Path(it["source"]).read_bytes(), min_side=1, what=it["source"])
        hr = center_crop_hr(img, cfg.hr_size)  # 8-bit rounded: the LR is made from exactly the stored HR
        lr = load_degradation(cfg.degradation)(hr, cfg.scale)
        side = cfg.hr_size // cfg.scale
        if tuple(lr.shape) != (1, side, side, 3):
            return (
                f"degradation {cfg.degradation or 'make_lr'} returned shape {tuple(lr.shape)}, "
                f"expected (1, {side}, {side}, 3)"
            )
        _to_png(lr, lr_p)
        _to_png(hr, hr_p)  # written last: its presence marks a finished item
        return None


def _write_crops(out: Path, items: list[dict[str, Any]], cfg: PrepareConfig) -> None:
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(_CropDataset(out, items, cfg), batch_size=None, num_workers=cfg.workers)
    for err in tqdm(loader, total=len(items), desc="crops", disable=len(items) < 100):
        if err:
            raise PrepareError(err)


def _encode_and_index(
    out: Path,
    items: list[dict[str, Any]],
    encoder_path: str | os.PathLike,
    cfg: PrepareConfig,
    bad: list,
    sizes: tuple[int, int, int],
) -> dict[str, Any]:
    from ..clip_vision import ClipVisionEncoder
    from ..refdb import BuildConfig, build_db

    dev = (
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    encoder = ClipVisionEncoder.from_file(encoder_path, device=dev)
    for split in CACHE_SPLITS:
        split_items = [it for it in items if it["split"] == split]
        if split_items:
            build_clip_cache(out, split, split_items, encoder, cfg)
    refs = [it for it in items if it["split"] == "reference"]
    tests = [it for it in items if it["split"] == "test"]
    info_db, dedup = None, None
    if refs:
        (out / "reference.txt").write_text("".join(f"{it['hr']}\n" for it in refs))
        # dedup by content: every reference whose CLS cosine to a test image (its source file) is
        # >= dedup_threshold is left out of the DB (build_db's exclusion)
        info_db = build_db(
            out / "refdb",
            encoder_path,
            list_file=out / "reference.txt",
            exclude=[it["source"] for it in tests],
            config=BuildConfig(
                mode=cfg.refdb_mode,
                device=dev,
                workers=cfg.workers,
                batch_size=cfg.batch_size,
                progress=False,
                exclude_threshold=cfg.dedup_threshold,
            ),
        )
        dedup = {
            "threshold": cfg.dedup_threshold,
            "test_images": len(tests),
            "excluded_references": int(info_db["counts"]["excluded"]),
        }
        write_test_exclusion(
            out / "refdb", [it["sha256"] for it in tests], cfg.dedup_threshold, dedup["excluded_references"]
        )
        logger.info(
            "reference DB: %d of %d reference images left out as near-duplicates of test images (CLS cosine >= %g)",
            dedup["excluded_references"],
            len(refs),
            cfg.dedup_threshold,
        )
    info = {
        "config": asdict(cfg),
        "encoder": str(Path(encoder_path).resolve()),
        "fingerprint": encoder.fingerprint,
        "clip_dim": encoder.dim,
        "num_tokens": None,
        "splits": dict(zip(SPLITS, sizes)),
        "skipped": [{"path": p, "reason": r} for p, r in bad],
        "refdb": info_db is not None,
        "dedup": dedup,
    }
    first = next(iter(cache_dir(out, "train").glob("shard-*.safetensors")), None)
    if first is not None:
        from safetensors import safe_open

        with safe_open(str(first), framework="pt") as f:
            info["num_tokens"] = f.get_slice("lr_tokens").get_shape()[1]
    (out / "prepare.json").write_text(json.dumps(info, indent=2))
    logger.info("prepared %s: %s", out, info["splits"])
    return info


TEST_EXCLUSION = "test_exclusion.json"  # in a reference DB folder: the test images it was deduplicated against


def write_test_exclusion(db_dir: Path, test_sha256: list[str], threshold: float, excluded: int) -> Path:
    """Record in the DB folder which test images (SHA-256 of their files) it excludes (read by the eval commands)."""
    p = Path(db_dir) / TEST_EXCLUSION
    p.write_text(
        json.dumps(
            {
                "format": "xsr-test-exclusion/1",
                "threshold": threshold,
                "excluded_references": excluded,
                "test_sha256": sorted(test_sha256),
            },
            indent=1,
        )
    )
    return p


def read_prepare_info(data: str | os.PathLike) -> dict[str, Any]:
    p = Path(data) / "prepare.json"
    if not p.is_file():
        raise FileNotFoundError(f"{data}: no prepare.json; run `python -m xsr_core.train prepare --out {data}` first")
    return json.loads(p.read_text())
