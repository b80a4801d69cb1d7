"""Tiled x16 through ComfyUI in-process: 64->1024, 128->2048, 256->4096 with the xsr_x16_tiled graph.

Real-size models with random weights, as bench_e2e.py (SD1.5 U-Net + ControlNet, SD VAE, CLIP-L text,
CLIP ViT-L/14 vision, XSR RFA / I2T / AdaIN adapter, a 256-image reference DB); fp16 on CUDA. For each
LR size it times the whole prompt (a new LR each run, so tiling, per-tile retrieval, I2T, the tiled
sampling run over all tiles, tiled VAE decode and colour fix all run; loaders stay cached) at the given
steps (CFG 7, euler), and the peak VRAM. Writes <results>/tiled_<device>.{json,md}.

    python bench/bench_tiled.py --comfy /path/to/ComfyUI [--sizes 64,128,256] [--steps 20] [--runs 2] [--tile-batch 0,4]
    python bench/bench_tiled.py --comfy .comfyui/ComfyUI --tiny     # CPU smoke test with tiny widths
"""

from __future__ import annotations

import asyncio
import datetime
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench.support.bench_cli import bench_parser, result_tag, results_dir  # noqa: E402
from bench.support.comfy_inprocess import start_comfy  # noqa: E402
from bench_e2e import graph_args, make_models, separate_loaders  # noqa: E402


def tiled_graph(lr_name: str, names: dict[str, str], steps: int, seed: int, tile_batch: int) -> dict:
    """The xsr_x16_tiled prompt on the benchmark's model files (separate loaders for the real sizes)."""
    from xsr_core.demo import xsr_tiled_graph

    g = xsr_tiled_graph(lr_name, **graph_args(names, steps, seed), tile_batch=tile_batch)
    return separate_loaders(g, names)


def timed_runner(c):
    """run(prompt) -> seconds for one whole prompt on the in-process ComfyUI ``c`` (after validation)."""
    import torch

    execution, executor = c.execution, c.executor
    cuda = torch.cuda.is_available()

    def run(prompt) -> float:
        pid = uuid.uuid4().hex
        ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
        if not ok:
            raise RuntimeError(f"invalid prompt: {err} {node_errors}")
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        executor.execute(prompt, pid, {}, outputs)
        if cuda:
            torch.cuda.synchronize()
        if not executor.success:
            raise RuntimeError(f"execution failed: {executor.status_messages[-3:]}")
        return time.perf_counter() - t

    return run


def main(argv=None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--sizes", default=None, help="LR sizes, N (square) or WxH; default 64,128,256 (tiny: 64x8,96x8)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default 20; tiny: 2)")
    ap.add_argument("--runs", type=int, default=2, help="timed runs per size after one warm-up (the largest size: 1)")
    ap.add_argument(
        "--tile-batch",
        default=None,
        help="XSR_TiledModel tile_batch values to compare, e.g. 0,4 (default 0,4: auto from free VRAM, and "
        "4 tiles per call for a bounded VRAM peak; tiny: 2)",
    )
    args = ap.parse_args(argv)
    sizes = []
    for item in (args.sizes or ("64x8,96x8" if args.tiny else "64,128,256")).split(","):
        w, _, h = item.partition("x")
        sizes.append((int(w), int(h or w)))
    steps = args.steps or (2 if args.tiny else 20)
    tile_batches = [int(b) for b in (args.tile_batch or ("2" if args.tiny else "0,4")).split(",")]

    c = start_comfy(args.comfy, args.workdir, "xsr_tiled_", args.tiny, make_models)
    device, names = c.device, c.names
    run = timed_runner(c)
    import torch

    from PIL import Image

    from xsr_core.testing.synthetic import synthetic_image
    from xsr_core.tiling import Tiling

    import folder_paths

    inp = Path(folder_paths.get_input_directory())
    inp.mkdir(parents=True, exist_ok=True)
    counter = [0]

    def new_lr(w: int, h: int) -> str:
        counter[0] += 1
        name = f"lr_{w}x{h}_{counter[0]:04d}.png"
        synthetic_image(2000 + counter[0], 512).resize((w, h), Image.BICUBIC).save(inp / name)
        return name

    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "command": " ".join(["python", "bench/bench_tiled.py", *(argv if argv is not None else sys.argv[1:])]),
        "tiny": args.tiny,
        "steps": steps,
        "cfg": 7.0,
        "sampler": "euler",
        "tile_batches": tile_batches,
        "rows": [],
    }
    largest = max(w * h for w, h in sizes)
    first = True
    for tile_batch in tile_batches:
        for w, h in sizes:
            runs = 1 if (w * h == largest and len(sizes) > 1) else args.runs
            times = []
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            warm = 1 if first else 0  # the first configuration also warms up loaders and kernels
            first = False
            for i in range(runs + warm):
                dt = run(tiled_graph(new_lr(w, h), names, steps, seed=i, tile_batch=tile_batch))
                if i >= warm:
                    times.append(dt)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            row = {
                "lr": f"{w}x{h}",
                "out": f"{w * 16}x{h * 16}",
                "tiles": len(Tiling.make(h, w)),
                "tile_batch": tile_batch,
                "median_s": statistics.median(times),
                "runs": times,
                "peak_vram_gib": peak,
            }
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    lines = [
        f"# Tiled x16, ComfyUI in-process — {results['device']}, {results['date']}, torch {results['torch']}",
        "",
        f"`{results['command']}`",
        "",
        f"{steps} steps, CFG 7, euler, overlap 8 LR px; whole prompt per image; tile_batch 0 = auto from free VRAM.",
        "",
        "| LR | output | tiles | tile_batch | median s | peak VRAM GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        pk = f"{r['peak_vram_gib']:.2f}" if r["peak_vram_gib"] is not None else "-"
        lines.append(f"| {r['lr']} | {r['out']} | {r['tiles']} | {r['tile_batch']} | {r['median_s']:.2f} | {pk} |")
    md = "\n".join(lines) + "\n"
    print(md)
    out = results_dir(args)
    tag = result_tag(args.tiny, results["device"])
    (out / f"tiled_{tag}.json").write_text(json.dumps(results, indent=1))
    (out / f"tiled_{tag}.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
