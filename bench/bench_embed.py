"""Reference-DB embedding throughput: the real build data loader feeding a ViT-L/14 on the GPU.

Writes ``--n`` JPEGs (``--size`` px, random shapes) to a temp folder, then runs exactly what
``refdb build`` runs per batch (:func:`xsr_core.refdb.build.make_loader` workers: read + sha256 +
PIL decode (libjpeg draft scale) + CLIP crop; then fp16 ViT-L/14 CLS on the device) and reports
images/s for (a) the full pipeline, (b) the encoder alone on resident batches (upper bound), (c) the
loader alone, with and without draft decoding. The encoder is a random-weight
``CLIPVisionModelWithProjection`` built from ``CLIPVisionConfig`` literally (hidden 1024, 24 layers,
16 heads, patch 14, image 224, intermediate 4096, projection 768): same cost as OpenAI's ViT-L/14. No faiss needed.

    python bench/bench_embed.py                       # GPU: 4096 images at 512 px
    python bench/bench_embed.py --tiny --n 64         # CPU smoke test with the tiny encoder

Writes bench/results/bench_embed.{json,md} with device, date and command. Target: >= 1500 img/s per H100.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _write_jpeg(args: tuple[str, int, int]) -> None:
    from PIL import Image, ImageFilter

    path, size, seed = args
    rng = np.random.default_rng(seed)
    short = size
    long = int(size * rng.uniform(1.0, 1.5))
    w, h = (long, short) if rng.random() < 0.5 else (short, long)
    small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)  # photo-like smooth content
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.integers(0, 24, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise - 12, 0, 255).astype(np.uint8))
    img.filter(ImageFilter.SMOOTH).save(path, quality=90)


def make_images(folder: Path, n: int, size: int, procs: int) -> list[str]:
    paths = [str(folder / f"img_{i:06d}.jpg") for i in range(n)]
    with mp.get_context("fork" if sys.platform != "win32" else "spawn").Pool(procs) as pool:
        pool.map(_write_jpeg, [(p, size, i) for i, p in enumerate(paths)], chunksize=32)
    return paths


def make_encoder(tiny: bool, device, dtype):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from xsr_core.clip_vision import ClipVisionEncoder
    from xsr_core.testing.sd15 import CLIP_L14_VISION_CONFIG
    from xsr_core.testing.tiny_clip import tiny_clip_config

    cfg = tiny_clip_config() if tiny else dict(CLIP_L14_VISION_CONFIG)  # ViT-L/14 (num_channels, eps: defaults)
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)).eval().requires_grad_(False)
    model.config._attn_implementation = "sdpa"
    fp = {"arch": "bench-random", "weights_sha256": "-", "preprocess": "-"}  # not needed for speed
    return ClipVisionEncoder(model, fingerprint=fp, config=cfg, source="random").to(device=device, dtype=dtype)


def _gpu_decode_img_s(paths: list[str], batch_size: int, threads: int, device) -> float | None:
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from xsr_core.clip_preprocess import resize_crop_u8

    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        return None

    def read(path: str) -> torch.Tensor:
        data = Path(path).read_bytes()
        hashlib.sha256(data).digest()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        t, n = time.time(), 0
        for s in range(0, len(paths), batch_size):
            images = decode_jpeg(list(pool.map(read, paths[s : s + batch_size])), device=device)
            torch.stack([resize_crop_u8(im.permute(1, 2, 0)[None], 224)[0] for im in images])
            n += len(images)
        torch.cuda.synchronize(device)
    return n / (time.time() - t)


def main(argv: list[str] | None = None) -> int:
    import torch

    from xsr_core.refdb.build import RAW_MAX_PIXELS, _encode, batch_pixels, encode_batches, make_loader

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--size", type=int, default=512, help="shortest side of the generated JPEGs")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="loader processes (default: one per core, one core left to the main process)",
    )
    p.add_argument(
        "--pipeline-rounds", type=int, default=3, help="full-pipeline runs of each loop, alternating (median reported)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--tiny", action="store_true", help="tiny encoder (CPU smoke test)")
    p.add_argument("--crop-in-workers", action="store_true", help="CLIP crop on the CPU workers even on a GPU")
    p.add_argument("--images", default=None, help="use this folder of existing JPEGs instead of generating")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--name", default=None, help="result file stem (default bench_embed[_tiny])")
    args = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        if args.images:
            paths = sorted(str(x) for x in Path(args.images).glob("*.jpg"))[: args.n]
        else:
            paths = make_images(Path(tmp), args.n, args.size, max(1, args.workers))
        res["gen_s"] = time.time() - t
        mean_kb = float(np.mean([os.path.getsize(x) for x in paths[:256]]) / 1024)
        enc = make_encoder(args.tiny, device, dtype)
        items = list(enumerate(paths))
        batches = [list(range(s, min(s + args.batch_size, len(items)))) for s in range(0, len(items), args.batch_size)]

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        # (b) encoder alone on a resident uint8 batch (warm-up included first)
        x = torch.randint(0, 255, (min(args.batch_size, len(items)), 3, 224, 224), dtype=torch.uint8)
        x = x.pin_memory() if device.type == "cuda" else x
        for _ in range(2):
            _encode(enc, x)
        sync()
        reps = 3 if args.tiny else max(3, 2048 // x.shape[0])
        t = time.time()
        for _ in range(reps):
            _encode(enc, x)
        sync()
        res["encoder_only_img_s"] = reps * x.shape[0] / (time.time() - t)

        raw = RAW_MAX_PIXELS if device.type == "cuda" and not args.crop_in_workers else None
        res["crop_on"] = "device" if raw else "workers"

        def new_loader(**extra):
            """A fresh loader as `refdb build` makes it (its workers start when it is first iterated)."""
            return make_loader(
                items,
                batches,
                workers=args.workers,
                min_side=1,
                pack=None,
                pin_memory=device.type == "cuda",
                raw_max_pixels=raw,
                **extra,
            )

        def loader_img_s(**extra) -> float:
            loader = new_loader(**extra)
            t = time.time()
            n_seen = 0
            for b in loader:
                batch_pixels(b, device)
                n_seen += len(b.samples)
            sync()
            return n_seen / (time.time() - t)

        # (c) loader alone (with the crop on the device when that is where `refdb build` does it)
        res["loader_only_img_s"] = loader_img_s()
        # (c') the same loader with full-size JPEG decoding (no libjpeg draft), side by side
        res["loader_only_full_decode_img_s"] = loader_img_s(draft=False)

        # (a) full pipeline, as in `refdb build` (loader workers started fresh, timed end to end): the build's
        # encode_batches, side by side with the loop it replaced (in_flight=0: encode, read back, next batch),
        # alternating, `--pipeline-rounds` runs each
        def pipeline(in_flight: int) -> dict:
            loader = new_loader()
            t = time.time()
            first = None
            n_done = 0
            for b, _ in encode_batches(loader, enc, in_flight=in_flight):
                n_done += len(b.samples)
                if first is None:
                    first = (time.time(), n_done)
            total = time.time() - t  # encode_batches has read back every vector: nothing left to wait for
            steady = (n_done - first[1]) / max(1e-9, time.time() - first[0]) if n_done > first[1] else None
            return dict(img_s=n_done / total, steady_img_s=steady, s=total, first_batch_s=first[0] - t)

        # worker start-up alone: the DataLoader forks its workers one after another when first iterated
        starts = []
        for _ in range(3):
            loader = new_loader()
            t = time.time()
            it = iter(loader.loader) if hasattr(loader, "loader") else iter(loader)
            starts.append(time.time() - t)
            del it, loader
        res["worker_start_s"] = float(np.median(starts))

        runs: dict[int, list[dict]] = {1: [], 0: []}
        for _ in range(args.pipeline_rounds):
            for k in runs:
                runs[k].append(pipeline(k))

        def med(k: int, key: str):
            vals = [r[key] for r in runs[k] if r[key] is not None]
            return float(np.median(vals)) if vals else None

        res["pipeline_runs"] = {f"in_flight_{k}": v for k, v in runs.items()}
        res["pipeline_img_s"] = med(1, "img_s")
        res["pipeline_steady_img_s"] = med(1, "steady_img_s")
        res["pipeline_s"] = med(1, "s")
        res["pipeline_first_batch_s"] = med(1, "first_batch_s")
        res["pipeline_sync_img_s"] = med(0, "img_s")
        res["pipeline_sync_steady_img_s"] = med(0, "steady_img_s")
        # (d) GPU JPEG decode (nvJPEG through torchvision.io.decode_jpeg on CUDA) instead of the PIL workers:
        # file reads + sha256 on a thread pool, batched decode on the device, the same CLIP crop
        res["gpu_decode_img_s"] = _gpu_decode_img_s(paths, args.batch_size, args.workers, device) if raw else None

    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}"
    )
    meta = dict(
        device=f"{dev_name}, {os.cpu_count()} CPU cores",
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        torch=torch.__version__,
        encoder="tiny" if args.tiny else "ViT-L/14 (random weights)",
        precision=str(dtype).replace("torch.", ""),
        n=len(paths),
        image_short_side=args.size,
        mean_jpeg_kb=mean_kb,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("bench_embed_tiny" if args.tiny else "bench_embed")
    (out / f"{name}.json").write_text(json.dumps(dict(meta=meta, results=res), indent=1))
    md = [
        f"# Reference-DB embedding throughput ({meta['date']})",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "| measure | img/s |",
        "|---|---|",
        f"| full pipeline (loader workers + encoder, `encode_batches`), end to end | {res['pipeline_img_s']:.0f} |",
        f"| full pipeline, after the first batch | {res['pipeline_steady_img_s'] or float('nan'):.0f} |",
        f"| full pipeline, the loop before (encode, read back, then the next batch), end to end | "
        f"{res['pipeline_sync_img_s']:.0f} |",
        f"| the loop before, after the first batch | {res['pipeline_sync_steady_img_s'] or float('nan'):.0f} |",
        f"| encoder alone (resident batch) | {res['encoder_only_img_s']:.0f} |",
        f"| loader alone (draft JPEG decode + hash + CLIP crop on {res['crop_on']}) | {res['loader_only_img_s']:.0f} |",
        f"| loader alone, full-size JPEG decode (before) | {res['loader_only_full_decode_img_s']:.0f} |",
        "| GPU JPEG decode (torchvision nvJPEG, reads + sha256 on threads) + CLIP crop | "
        + (f"{res['gpu_decode_img_s']:.0f} |" if res["gpu_decode_img_s"] else "not measured (CPU run) |"),
    ]
    md += [
        "",
        f"Full pipeline: median of {args.pipeline_rounds} runs of each loop, alternating; first batch after "
        f"{res['pipeline_first_batch_s']:.2f} s (median; of which starting the {args.workers} workers "
        f"{res['worker_start_s']:.2f} s, median of 3). Per run (img/s, "
        "end to end / after the first batch):",
        "",
        *(
            f"- {k}: " + ", ".join(f"{r['img_s']:.0f} / {r['steady_img_s'] or float('nan'):.0f}" for r in v)
            for k, v in res["pipeline_runs"].items()
        ),
    ]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
