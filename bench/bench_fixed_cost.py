"""Fixed per-image XSR cost: XSR_PrepareLR + XSR_Retrieve + XSR_Enhance + XSR_ColorFix through ComfyUI in-process.

Only the XSR nodes that run once per image (no sampling, no VAE): the LR is loaded, prepared, its references
retrieved from the DB, the I2T embedding and caption made and encoded with the CLIP text encoder, and the
colour fix applied to the x16 hint (the same 512 px shape as a decoded image). A new LR image every run, so
the per-image work really runs. Each XSR_OFFLOAD setting is timed with the reference cache ``warm`` (kept
between prompts as in use: repeated references are hits) and ``cold`` (cleared before every prompt, so every
reference is a miss: decode, ViT pass, previews — the case of a large DB, where references rarely repeat);
each row reports its cache hits and misses; ``cold`` also clears XSR_Enhance's caption-encode memo, so every
caption goes through the CLIP text encoder. ``--clip-cudagraph on,vision,off`` times the CLIP passes on their
CUDA graphs (``on``: XSR_Retrieve's vision pass and XSR_Enhance's text encoder), the vision graph only
(``vision``: ``XSR_TEXT_CUDAGRAPH=0``) and both eager (``off``: ``XSR_CLIP_CUDAGRAPH=0`` too) side by side.
``--load xsr,comfy`` times the nodes' ``load_models`` (no ``load_models_gpu`` call for models ComfyUI has loaded
whole) beside ComfyUI's plain ``load_models_gpu`` in every node. Uses the models and the DB of ``bench_e2e.py``
(real-shape random weights on CUDA, fp16; ``--tiny``: the tiny zoo on CPU; DB images of ``--ref-side`` px, as a
packed DB stores them) without the U-Net, ControlNet and VAE. Prints the median ms per node and of their sum, the
peak VRAM and what is resident after the last node, and writes bench/results/fixed_cost_<device>.{json,md}.

    python bench/bench_fixed_cost.py --comfy /path/to/ComfyUI --runs 20          # real shapes (GPU)
    python bench/bench_fixed_cost.py --comfy .comfyui/ComfyUI --tiny --runs 10   # CPU, tiny zoo
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_e2e  # noqa: E402
from bench.support.bench_cli import bench_parser, result_tag, results_dir  # noqa: E402

FIXED = ["XSR_PrepareLR", "XSR_Retrieve", "XSR_Enhance", "XSR_ColorFix"]


def graph(lr_name: str, names: dict[str, str]) -> dict:
    """The per-image XSR nodes of the shipped x16 graph (xsr_core.demo.xsr_graph), without sampling and decoding:
    ColorFix takes the 512 px hint, PreviewAny nodes are the outputs."""
    from xsr_core.demo import xsr_graph

    full = xsr_graph(lr_name, ckpt=names.get("ckpt", ""), controlnet="", clip_vision=names["cv"], refdb="bench")
    g = {k: full[k] for k in ("lr", "prep", "cv", "models", "db", "retrieve", "enhance", "fix")}
    if "ckpt" in names:  # tiny zoo: one checkpoint file
        g["ckpt"] = full["ckpt"]
    else:  # real shapes: only the text encoder (no U-Net / ControlNet / VAE written)
        g["clipl"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": names["clip"], "type": "stable_diffusion"}}
        g["enhance"]["inputs"]["clip"] = ["clipl", 0]
    g["fix"]["inputs"]["image"] = ["prep", 0]
    g["show_caption"] = {"class_type": "PreviewAny", "inputs": {"source": ["enhance", 1]}}
    g["show_fix"] = {"class_type": "PreviewAny", "inputs": {"source": ["fix", 0]}}
    return g


def _label(r: dict) -> str:
    vit = {
        "on": "",
        "vision": ", text encoder eager (XSR_TEXT_CUDAGRAPH=0)",
        "off": ", ViT + text encoder eager (XSR_CLIP_CUDAGRAPH=0, XSR_TEXT_CUDAGRAPH=0)",
    }[r.get("clip_cudagraph", "on")]
    load = ", load_models_gpu every node" if r.get("load", "xsr") == "comfy" else ""
    return f"XSR_OFFLOAD={r['offload']}, cache {r['ref_cache']}{vit}{load}"


_XSR_LOAD: dict = {}


def _use_load(kind: str) -> None:
    """Point the nodes' ``load_models`` at XSR's (``xsr``) or at ComfyUI's plain ``load_models_gpu`` (``comfy``)."""
    mods = [m for n, m in sys.modules.items() if n.endswith(("nodes.common", "nodes.retrieval", "nodes.enhance"))]
    for m in mods:
        if hasattr(m, "load_models"):
            orig = _XSR_LOAD.setdefault(m.__name__, m.load_models)
            m.load_models = (
                orig if kind == "xsr" else (lambda ps: sys.modules["comfy.model_management"].load_models_gpu(ps))
            )


def _clear_text_memo() -> None:
    """Forget XSR_Enhance's encoded captions (a cold run: every caption is new to the text encoder)."""
    enhance = next(
        (m for n, m in sys.modules.items() if n.endswith("nodes.enhance") and hasattr(m, "_TEXT_CACHE")), None
    )
    if enhance is not None:
        with enhance._TEXT_LOCK:
            enhance._TEXT_CACHE.clear()


def _graph_memory(s) -> str:
    """What the kept CUDA graphs of the per-image nodes hold: allocated memory beyond the loaded models, then
    after dropping XSR_Retrieve's ViT graphs and the I2T's caption-decode graphs (they are re-captured on the
    next prompt)."""
    import gc

    torch, mm = s.torch, s.mm

    def beyond() -> float:
        gc.collect()
        torch.cuda.synchronize()
        models = sum(lm.model.loaded_size() for lm in mm.current_loaded_models if lm.model is not None)
        return (torch.cuda.memory_allocated() - models) / 2**20

    lines = [f"allocated beyond the loaded models: {beyond():.1f} MiB"]
    retrieval = next((m for n, m in sys.modules.items() if n.endswith("nodes.retrieval")), None)
    if retrieval is not None:
        retrieval.VISION_GRAPHS._per_model.clear()
        lines.append(f"after dropping the ViT graphs: {beyond():.1f} MiB")
    enhance = next((m for n, m in sys.modules.items() if n.endswith("nodes.enhance")), None)
    if enhance is not None and hasattr(enhance, "TEXT_GRAPHS"):
        enhance.TEXT_GRAPHS._per_model.clear()
        lines.append(f"after dropping the text-encoder graphs too: {beyond():.1f} MiB")
    for lm in mm.current_loaded_models:
        fast = getattr(getattr(lm.model, "model", None), "_fast", None)
        if fast is not None:
            fast.clear_graphs()
    lines.append(f"after dropping the caption-decode graphs too: {beyond():.1f} MiB")
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:  # no graph is kept now that could read a workspace
        clear()
        lines.append(f"after clearing cuBLAS's per-stream workspaces: {beyond():.1f} MiB")
    return "\n".join(lines)


def _profile(s, n: int, cache, policy: str) -> str:
    """cProfile of ``n`` prompts with a cold reference cache (every reference a miss): where the host time of
    the per-image nodes goes, cumulative and own time (CUDA waits show up in the call that synchronises)."""
    import cProfile
    import io
    import pstats

    os.environ["XSR_OFFLOAD"] = policy
    os.environ["XSR_CLIP_CUDAGRAPH"] = os.environ["XSR_TEXT_CUDAGRAPH"] = "1"
    prof = cProfile.Profile()
    for _ in range(n):
        if cache is not None:
            cache.clear()
        _clear_text_memo()
        prompt = graph(s.new_lr(), s.names)
        prof.enable()
        s.run(prompt)
        prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf).strip_dirs()
    buf.write(f"{n} prompts, XSR_OFFLOAD={policy}, reference cache cold, ViT and text encoder on CUDA graphs\n")
    st.sort_stats("cumulative").print_stats(70)
    st.sort_stats("tottime").print_stats(40)
    for hot in (r"\(parameters\)", r"\(memory_stats\)", r"'cpu'", r"\(load_models_gpu\)"):
        st.print_callers(hot)
    if s.device == "cuda":  # the kernels while the kept graphs replay, then what those graphs hold (drops them)
        buf.write("\n" + _kernel_profile(s, graph, cache) + "\n\n" + _graph_memory(s) + "\n")
    return buf.getvalue()


def _kernel_profile(s, make_graph, cache, n: int = 3) -> str:
    """torch.profiler over ``n`` cold-cache prompts: the GPU kernels by their own CUDA time, and the wall time
    against the GPU-busy time (a launch- or host-bound node shows a large gap)."""
    from torch.profiler import ProfilerActivity, profile

    prompts = [make_graph(s.new_lr(), s.names) for _ in range(n)]
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for p in prompts:
                if cache is not None:
                    cache.clear()
                s.run(p)
            wall = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - the profile is an extra; the timings above stand
        return f"torch.profiler failed: {type(e).__name__}: {e}"
    ka = prof.key_averages()
    busy = sum(getattr(e, "self_device_time_total", 0) or 0 for e in ka) / 1e3
    head = f"torch.profiler, {n} prompts, cold cache: wall {wall * 1e3:.1f} ms, GPU kernels {busy:.1f} ms in total"
    return head + "\n" + ka.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)


def main(argv=None) -> int:
    ap = bench_parser(__doc__, tiny_help="tiny zoo on CPU")
    ap.add_argument("--runs", type=int, default=20, help="timed runs (after --warmup untimed ones)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--offload",
        default=None,
        help="comma list of XSR_OFFLOAD settings to time side by side (default: none,rfa,stage1 on CUDA, none on CPU)",
    )
    ap.add_argument("--tag", default="", help="suffix of the result file names (e.g. a setting being compared)")
    ap.add_argument(
        "--ref-cache",
        default="warm,cold",
        help="comma list of reference-cache states to time: warm (kept between prompts), cold (cleared before "
        "every prompt: every reference a miss, the large-DB case)",
    )
    ap.add_argument("--ref-side", type=int, default=512, help="side of the DB's images (packed DBs store 512 px)")
    ap.add_argument(
        "--clip-cudagraph",
        default="on",
        help="comma list of on (XSR_Retrieve's CLIP vision pass and XSR_Enhance's text encoder on CUDA graphs), "
        "vision (text encoder eager: XSR_TEXT_CUDAGRAPH=0), off (both eager), timed side by side",
    )
    ap.add_argument(
        "--load",
        default="xsr",
        help="comma list of xsr (the nodes' load_models: no load_models_gpu call for models loaded whole), comfy "
        "(every node calls comfy.model_management.load_models_gpu), timed side by side",
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        help="after the timed columns, run this many more prompts (reference cache cold, first XSR_OFFLOAD "
        "setting) under cProfile and write the hottest functions to fixed_cost_profile_<device>.txt",
    )
    args = ap.parse_args(argv)

    t0 = time.time()
    states = [c for c in args.ref_cache.split(",") if c]
    if not states or any(c not in ("warm", "cold") for c in states):
        ap.error(f"--ref-cache: a comma list of warm, cold (got {args.ref_cache!r})")
    s = bench_e2e.session(args.comfy, args.tiny, args.workdir, sd=False, ref_side=args.ref_side)
    torch = s.torch
    print(f"set up in {time.time() - t0:.0f} s", flush=True)
    policies = [p for p in (args.offload or ("none,rfa,stage1" if s.device == "cuda" else "none")).split(",") if p]
    device = torch.cuda.get_device_name() if s.device == "cuda" else "cpu"
    res = {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "comfyui": bench_e2e.comfy_version(),
        "command": " ".join(["python", "bench/bench_fixed_cost.py", *(argv if argv is not None else sys.argv[1:])]),
        "tiny": args.tiny,
        "runs": args.runs,
        "warmup": args.warmup,
        "ref_side": args.ref_side,
        "rows": [],
    }
    retrieval = next(
        (m for n, m in sys.modules.items() if n.endswith("nodes.retrieval") and hasattr(m, "REF_CACHE")), None
    )
    cache = retrieval.REF_CACHE if retrieval is not None else None
    if cache is None or cache.capacity == 0:
        print("the reference cache is off (XSR_REF_CACHE_SIZE=0) or not found: warm = cold", flush=True)
    graphs = [g for g in args.clip_cudagraph.split(",") if g]
    if not graphs or any(g not in ("on", "vision", "off") for g in graphs):
        ap.error(f"--clip-cudagraph: a comma list of on, vision, off (got {args.clip_cudagraph!r})")
    loads = [g for g in args.load.split(",") if g]
    if not loads or any(g not in ("xsr", "comfy") for g in loads):
        ap.error(f"--load: a comma list of xsr, comfy (got {args.load!r})")
    columns = [(p, c, g, ld) for p in policies for c in states for g in graphs for ld in loads]
    for policy, state, vit, load in columns:
        os.environ["XSR_OFFLOAD"] = policy  # read by the nodes at every call
        _use_load(load)
        os.environ["XSR_CLIP_CUDAGRAPH"] = "0" if vit == "off" else "1"
        os.environ["XSR_TEXT_CUDAGRAPH"] = "1" if vit == "on" else "0"
        per_node: dict[str, list[float]] = {}
        totals, last = [], None
        hits = misses = 0
        if s.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.runs):
            if state == "cold":
                if cache is not None:
                    cache.clear()
                _clear_text_memo()
            before = (cache.hits, cache.misses) if cache is not None else (0, 0)
            _, tr = s.run(graph(s.new_lr(), s.names))
            if i < args.warmup:
                continue
            if cache is not None:
                hits, misses = hits + cache.hits - before[0], misses + cache.misses - before[1]
            by = {r["class"]: r["s"] for r in tr}
            for c in FIXED:
                per_node.setdefault(c, []).append(by.get(c, float("nan")))
            totals.append(sum(by.get(c, 0.0) for c in FIXED))
            last = tr
        row = {
            "offload": policy,
            "ref_cache": state,
            "clip_cudagraph": vit,
            "load": load,
            "ref_hits": hits if cache is not None else None,
            "ref_misses": misses if cache is not None else None,
            "nodes_ms": {c: round(statistics.median(v) * 1000, 2) for c, v in per_node.items()},
            "nodes_ms_min": {c: round(min(v) * 1000, 2) for c, v in per_node.items()},
            "fixed_ms_median": round(statistics.median(totals) * 1000, 2),
            "fixed_ms_all": [round(t * 1000, 2) for t in totals],
            "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30 if s.device == "cuda" else None,
            "resident_after": last,
        }
        res["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "resident_after"}), flush=True)
    res["ref_cache"] = None if cache is None else {"hits": cache.hits, "misses": cache.misses, "cap": cache.capacity}
    profile_text = _profile(s, args.profile, cache, policies[0]) if args.profile > 0 else None

    out = results_dir(args)
    tag = result_tag(args.tiny, device, args.tag)
    lines = [
        f"# Fixed per-image XSR cost, ComfyUI {res['comfyui']} in-process — {device}, {res['date']}, "
        f"torch {res['torch']}",
        "",
        f"`{res['command']}`",
        "",
        f"Median of {args.runs} runs after {args.warmup} warm-up runs per column, a new LR image each "
        f"run ({'tiny zoo' if args.tiny else 'real-shape random weights'}, DB images {args.ref_side} px; CUDA "
        "synchronised around each node; min in brackets). Reference cache `warm`: kept between prompts; `cold`: "
        "cleared before every prompt with XSR_Enhance's caption-encode memo (every reference a miss, every "
        "caption encoded: the large-DB case).",
        "",
        "| node | " + " | ".join(_label(r) for r in res["rows"]) + " |",
        "|---" * (1 + len(res["rows"])) + "|",
        *(
            f"| {c} | " + " | ".join(f"{r['nodes_ms'][c]:.1f} ({r['nodes_ms_min'][c]:.1f})" for r in res["rows"]) + " |"
            for c in FIXED
        ),
        "| **sum** | " + " | ".join(f"**{r['fixed_ms_median']:.1f}**" for r in res["rows"]) + " |",
        "| peak VRAM GiB (these nodes only) | "
        + " | ".join("-" if r["peak_vram_gib"] is None else f"{r['peak_vram_gib']:.3f}" for r in res["rows"])
        + " |",
        "| reference cache hits / misses (timed runs) | "
        + " | ".join(f"{r['ref_hits']} / {r['ref_misses']}" for r in res["rows"])
        + " |",
        "",
        f"Reference cache over the whole run: {res['ref_cache']}.",
    ]
    for r in res["rows"]:
        if r["resident_after"]:
            lines += ["", f"Resident after each node, {_label(r)} (MiB):", ""]
            lines += ["| after node | resident models |", "|---|---|"]
            lines += [
                f"| {t['class']} | {', '.join(f'{n} {m}' for n, m in t['resident_mib']) or '-'} |"
                for t in r["resident_after"]
                if t["class"] in FIXED
            ]
    md = "\n".join(lines) + "\n"
    print(md)
    (out / f"fixed_cost_{tag}.json").write_text(json.dumps(res, indent=1))
    (out / f"fixed_cost_{tag}.md").write_text(md)
    if profile_text:
        (out / f"fixed_cost_profile_{tag}.txt").write_text(f"{res['command']}\n{res['date']}\n\n{profile_text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
