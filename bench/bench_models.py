"""Benchmark the Stage-1 models (RFA, I2T enhancer, caption decoding) with random weights.

Real-size configs (CLIP ViT-L/14 tokens 257x1024, distilgpt2 decoder) in fp16 on CUDA; CPU runs in
fp32 with a note. Timings are CUDA events (or perf_counter on CPU) after warm-up, median of N.
Target (issue #3): I2T forward + 32-token caption <= 40 ms on an H100 (a naive HF generate: 234 ms).

    python bench/bench_models.py                 # real sizes, CUDA if available
    python bench/bench_models.py --tiny          # tiny configs, quick CPU smoke run

Writes bench/results/models_<device>.{json,md} (device name, date, torch version, command line).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xsr_core.models import I2T, I2TConfig, RFA, RFAConfig  # noqa: E402
from xsr_core.testing.tiny_models import tiny_i2t_config, tiny_rfa_config  # noqa: E402

TARGET_MS = 40.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"], help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 50 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 10 CUDA, 1 CPU)")
    p.add_argument("--new-tokens", type=int, default=32, help="caption tokens generated (forced with min_new_tokens)")
    p.add_argument("--skip-hf", action="store_true", help="skip the HF generate baseline")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    cuda = args.device.startswith("cuda")
    args.iters = args.iters or (50 if cuda else (5 if not args.tiny else 10))
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    return args


def timeit(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> dict[str, float]:
    """Median / p90 / min wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "min_ms": times[0],
        "iters": iters,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    if args.tiny:
        rfa_cfg, i2t_cfg = tiny_rfa_config(32, 256), tiny_i2t_config(400, clip_dim=32, num_tokens=257)
    else:
        rfa_cfg, i2t_cfg = RFAConfig(), I2TConfig()
    rfa = RFA(rfa_cfg).to(device, dtype).eval()
    i2t = I2T(i2t_cfg).to(device, dtype).eval()
    C, T, N = i2t_cfg.clip_dim, i2t_cfg.num_tokens, args.new_tokens
    g = torch.Generator(device="cpu").manual_seed(1)
    lr1 = torch.randn(1, T, C, generator=g).to(device, dtype)
    lr8 = torch.randn(8, T, C, generator=g).to(device, dtype)
    refs = torch.randn(1, 4, T, C, generator=g).to(device, dtype)
    cuda = device.type == "cuda"
    rows: list[dict] = []

    def bench(name: str, fn: Callable[[], object], iters: int | None = None, note: str = "") -> dict:
        r = timeit(fn, device, iters or args.iters, args.warmup)
        r.update(name=name, note=note)
        rows.append(r)
        print(f"  {name:<40} {r['median_ms']:9.3f} ms  (p90 {r['p90_ms']:.3f})", flush=True)
        return r

    with torch.inference_mode():
        bench("rfa_forward_b1", lambda: rfa(lr1))
        bench("rfa_forward_b8", lambda: rfa(lr8))
        bench("i2t_enhancer_k4_b1", lambda: i2t(lr1, refs))
        E = i2t(lr1, refs)
        bench("i2t_prefix_b1", lambda: i2t.prefix(E))

        def gen(graph: bool, beams: int = 1) -> torch.Tensor:
            return i2t.generate_tokens(E, max_new_tokens=N, min_new_tokens=N, num_beams=beams, use_cuda_graph=graph)

        eager_tokens = gen(False)
        bench(f"caption_{N}tok_eager_b1", lambda: gen(False), note="own KV-cache loop, eager")
        parity = None
        if cuda:
            graph_tokens = gen(True)
            parity = bool(torch.equal(graph_tokens, eager_tokens))
            bench(f"caption_{N}tok_cudagraph_b1", lambda: gen(True), note="CUDA-graph decode step")
            bench(f"caption_{N}tok_cudagraph_beam3_b1", lambda: gen(True, 3), iters=max(5, args.iters // 2))
        if not args.skip_hf:
            prefix = i2t.prefix(E)
            mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=device)
            eos = i2t_cfg.decoder["eos_token_id"]
            bench(
                f"caption_{N}tok_hf_generate_b1",
                lambda: i2t.decoder.generate(
                    inputs_embeds=prefix,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=N,
                    min_new_tokens=N,
                    eos_token_id=eos,
                    pad_token_id=eos,
                ),
                iters=max(3, args.iters // 5),
                note="baseline: transformers generate",
            )

        def total() -> torch.Tensor:
            e = i2t(lr1, refs)
            return i2t.generate_tokens(e, max_new_tokens=N, min_new_tokens=N, use_cuda_graph=cuda)

        tot = bench(
            f"i2t_total_k4_{N}tok_b1", total, note="enhancer + prefix + caption" + (" (CUDA graph)" if cuda else "")
        )

    result = {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": args.dtype,
        "tiny": args.tiny,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "target_ms": TARGET_MS,
        "total_ms": tot["median_ms"],
        "meets_target": bool(tot["median_ms"] <= TARGET_MS) if (cuda and not args.tiny) else None,
        "cudagraph_tokens_equal_eager": parity,
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "rows": rows,
    }
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    md = to_markdown(result)
    print()
    print(md)
    slug = re.sub(r"[^a-z0-9]+", "_", result["device"].lower()).strip("_") or device.type
    slug = f"{device.type}_{slug}" if device.type == "cpu" else slug
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"models_{slug}{'_tiny' if args.tiny else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return result


def to_markdown(r: dict) -> str:
    lines = [
        f"# XSR Stage-1 model benchmark ({'tiny' if r['tiny'] else 'real-size'} configs, random weights)",
        "",
        f"- device: {r['device']} ({r['device_type']}), dtype {r['dtype']}",
        f"- date: {r['date']}; torch {r['torch']}; transformers {r.get('transformers', '?')}; python {r['python']}",
        f"- command: `{r['command']}`",
    ]
    if r["device_type"] != "cuda":
        lines.append("- NOTE: CPU run; the 40 ms target and the CUDA-graph path apply to CUDA (H100) only.")
    if r["cudagraph_tokens_equal_eager"] is not None:
        lines.append(f"- CUDA-graph tokens identical to eager: {r['cudagraph_tokens_equal_eager']}")
    if r["peak_mem_mb"] is not None:
        lines.append(f"- peak CUDA memory: {r['peak_mem_mb']:.0f} MiB")
    verdict = "n/a" if r["meets_target"] is None else ("MET" if r["meets_target"] else "MISSED")
    lines.append(f"- I2T + caption total: {r['total_ms']:.2f} ms vs target {r['target_ms']:.0f} ms: **{verdict}**")
    lines += ["", "| measurement | median ms | p90 ms | min ms | iters | note |", "|---|---:|---:|---:|---:|---|"]
    for row in r["rows"]:
        lines.append(
            f"| {row['name']} | {row['median_ms']:.3f} | {row['p90_ms']:.3f} | {row['min_ms']:.3f} | "
            f"{row['iters']} | {row['note']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
