"""Build step 1, decoding: (seq, path) items → DataLoader workers → batches of CLIP crops.

Workers read, hash and decode each file (:mod:`xsr_core.image_io` through :func:`.images.decode_image`),
skip files that resolve outside the build's source folders, and die with the build process.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from ..clip_preprocess import resize_crop_u8
from ..paths import confined_or_none, real_roots
from .images import DecodedSample, ImageSkip, decode_image, pack_image, sha256_bytes

logger = logging.getLogger(__name__)


class _FileDataset(torch.utils.data.Dataset):
    """(seq, path) items → :class:`DecodedSample` (runs in DataLoader workers).

    With ``raw_max_pixels`` set, images up to that many pixels are returned decoded but uncropped
    (``raw``) so the CLIP crop runs on the GPU (:func:`batch_pixels`): decoding is then the only
    per-image CPU work. Larger images are cropped here, so batches never carry huge buffers.
    """

    def __init__(
        self,
        items: Sequence[tuple[int, str]],
        *,
        min_side: int,
        pack: tuple[int, int] | None,
        size: int = 224,
        raw_max_pixels: int | None = None,
        roots: Sequence[str] | None = None,
        draft: bool = True,
    ):
        self.items = list(items)
        self.draft = draft
        self.roots = real_roots(roots) if roots is not None else None  # None: read any path (a user's list file)
        self.min_side = min_side
        self.pack = pack
        self.size = size
        self.raw_max_pixels = raw_max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> DecodedSample:
        seq, path = self.items[i]
        sha = None
        try:
            if self.roots is not None and confined_or_none(path, self.roots) is None:
                raise ImageSkip(
                    f"resolves to {os.path.realpath(path)}, outside the source folder "
                    f"({', '.join(self.roots)}): a symlink pointing elsewhere is not read"
                )
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ImageSkip(f"cannot read ({e.strerror or e})") from None
            sha = sha256_bytes(data)
            # no draft when packing: the stored packed copy stays the full-decode one
            rgb = decode_image(
                data, min_side=self.min_side, what=path, draft_side=self.size if self.draft and not self.pack else None
            )
            w, h = rgb.info["xsr_source_size"]
            packed = pack_image(rgb, side=self.pack[0], quality=self.pack[1]) if self.pack else None
            arr = np.array(rgb, dtype=np.uint8)  # (H, W, 3), writable (torch shares it without a warning)
            if self.raw_max_pixels and w * h <= self.raw_max_pixels:
                return DecodedSample(seq, True, None, sha, w, h, None, packed, raw=arr)
            pixels = resize_crop_u8(torch.from_numpy(arr).unsqueeze(0), self.size)[0].numpy()
            return DecodedSample(seq, True, None, sha, w, h, pixels, packed)
        except ImageSkip as e:
            return DecodedSample(seq, False, str(e), sha, 0, 0, None, None)
        except Exception as e:  # noqa: BLE001 - any decoder bug must skip the file, not kill a long build
            return DecodedSample(
                seq, False, f"unexpected decoding error ({type(e).__name__}: {e})", sha, 0, 0, None, None
            )


def die_with_parent(parent_pid: int) -> None:
    """In a child process: get SIGKILL when the parent dies, even by kill -9 (Linux ``PR_SET_PDEATHSIG``).

    DataLoader workers otherwise outlive a killed build, each holding its decoded batches.
    A no-op where prctl does not exist; exits at once if the parent is already gone.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):  # pragma: no cover - non-glibc libc
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_init(parent_pid: int, _: int) -> None:
    die_with_parent(parent_pid)
    torch.set_num_threads(1)


@dataclass
class DecodedBatch:
    """A batch from the build loader: per-file results + the image data of its ok files.

    Crossing the worker → main process boundary costs one shared-memory tensor per kind of data
    (not one pickled array per image): ``crops`` stacks the worker-made CLIP crops, ``raw`` is the
    concatenation of the uncropped images, ``raw_shapes`` their (H, W) and ``order`` says, per ok
    file in file order, which of the two holds it (0 = crops, 1 = raw) and at which position.
    """

    samples: list[DecodedSample]  # in file order; image data moved to the tensors below
    crops: torch.Tensor | None  # uint8 (n_crops, 3, 224, 224)
    raw: torch.Tensor | None  # uint8 (sum of H*W*3,)
    raw_shapes: list[tuple[int, int]]
    order: list[tuple[int, int]]

    def pin_memory(self) -> "DecodedBatch":  # called by the DataLoader's pin-memory thread
        pin = lambda t: t.pin_memory() if t is not None else None  # noqa: E731
        return DecodedBatch(self.samples, pin(self.crops), pin(self.raw), self.raw_shapes, self.order)

    @property
    def n_ok(self) -> int:
        return len(self.order)


def _collate(samples: list[DecodedSample]) -> DecodedBatch:
    crops, raws, shapes, order = [], [], [], []
    for s in samples:
        if not s.ok:
            continue
        if s.raw is not None:
            order.append((1, len(raws)))
            raws.append(torch.from_numpy(s.raw).reshape(-1))
            shapes.append((s.raw.shape[0], s.raw.shape[1]))
        else:
            order.append((0, len(crops)))
            crops.append(torch.from_numpy(s.pixels))
        s.pixels = s.raw = None
    return DecodedBatch(
        samples, torch.stack(crops) if crops else None, torch.cat(raws) if raws else None, shapes, order
    )


@dataclass
class BatchGroup:
    """One batch of the caller's ``batches``, decoded as several worker sub-batches (see :func:`make_loader`).

    The parts keep their pinned tensors (no host-side concatenation); :func:`batch_pixels` crops each on
    the device and concatenates there.
    """

    parts: list[DecodedBatch]

    @property
    def samples(self) -> list[DecodedSample]:
        return [s for part in self.parts for s in part.samples]

    @property
    def n_ok(self) -> int:
        return sum(part.n_ok for part in self.parts)


def batch_pixels(batch: DecodedBatch | BatchGroup, device: torch.device, size: int = 224) -> torch.Tensor | None:
    """uint8 CLIP crops (n_ok, 3, size, size) of a batch's ok files on ``device`` (file order).

    Raw images are cropped on ``device`` with the same :func:`resize_crop_u8` the workers use.
    """
    if isinstance(batch, BatchGroup):
        crops = [c for c in (batch_pixels(part, device, size) for part in batch.parts) if c is not None]
        return torch.cat(crops) if crops else None
    if not batch.order:
        return None
    crops = batch.crops.to(device, non_blocking=True) if batch.crops is not None else None
    done = []
    if batch.raw is not None:
        flat = batch.raw.to(device, non_blocking=True)
        off = 0
        for h, w in batch.raw_shapes:
            img = flat[off : off + h * w * 3].view(1, h, w, 3)
            off += h * w * 3
            done.append(resize_crop_u8(img, size)[0])
    return torch.stack([crops[i] if kind == 0 else done[i] for kind, i in batch.order])


class _Regrouped:
    """Iterates a DataLoader over worker sub-batches and yields one :class:`BatchGroup` per caller batch."""

    def __init__(self, loader: torch.utils.data.DataLoader, parts_per_batch: list[int]):
        self.loader = loader
        self.parts_per_batch = parts_per_batch

    def __len__(self) -> int:
        return len(self.parts_per_batch)

    def __iter__(self):
        parts = iter(self.loader)  # the DataLoader yields in sampler order
        for want in self.parts_per_batch:  # an empty caller batch has no sub-batch: an empty group in its place
            yield BatchGroup([next(parts) for _ in range(want)])


def worker_batch_size(batch: int, workers: int) -> int:
    """Files per worker task: a caller batch is shared by all workers, so the first batch is ready after
    ~batch/workers decodes instead of a whole batch decoded by one worker (the build's start-up latency)."""
    return max(8, min(64, -(-batch // max(1, workers))))


def make_loader(
    items: Sequence[tuple[int, str]],
    batches: list[list[int]],
    *,
    workers: int,
    min_side: int,
    pack: tuple[int, int] | None,
    pin_memory: bool = False,
    raw_max_pixels: int | None = None,
    roots: Sequence[str] | None = None,
    draft: bool = True,
) -> Iterable[DecodedBatch | BatchGroup]:
    """The build data loader: decoding in ``workers`` processes, batches in the given order.

    ``raw_max_pixels``: leave the CLIP crop of images up to this size to :func:`batch_pixels` on
    the GPU (use :data:`RAW_MAX_PIXELS` when encoding on CUDA; None on CPU). ``roots``: files that
    resolve outside these folders are skipped (None: no check, for the user's own list files).
    Workers die with this process (:func:`die_with_parent`). ``draft``: decode JPEGs at the smallest
    libjpeg scale that keeps the shortest side >= the CLIP input (never when packing).

    With workers, each batch is split into sub-batches of :func:`worker_batch_size` files decoded in
    parallel and handed back regrouped (one :class:`BatchGroup` per batch, in the given order).
    """
    ds = _FileDataset(items, min_side=min_side, pack=pack, raw_max_pixels=raw_max_pixels, roots=roots, draft=draft)
    if workers <= 0:
        return torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=_collate, pin_memory=pin_memory)
    subs, parts_per_batch = [], []
    for b in batches:
        step = worker_batch_size(len(b), workers)
        pieces = [b[s : s + step] for s in range(0, len(b), step)]
        subs.extend(pieces)
        parts_per_batch.append(len(pieces))
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=subs,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_worker_init, os.getpid()),
        prefetch_factor=4,
        persistent_workers=False,
    )
    return _Regrouped(loader, parts_per_batch)


RAW_MAX_PIXELS = 2_100_000  # up to ~1920x1080 the crop runs on the GPU; larger images are cropped in workers


def source_roots(sources: Sequence[str], extra: Sequence[str] = ()) -> list[str] | None:
    """Folders the files of a build may resolve into: its ``images:`` folders (+ ``extra``).

    None (no check) when a source is a list file: the user named those files one by one.
    """
    roots = list(extra)
    for src in sources:
        kind, _, where = str(src).partition(":")
        if kind != "images":
            return None
        roots.append(where)
    return roots
