"""ComfyUI 0.33's VRAM modes with the XSR x16 graph: the REAL main.py, over HTTP, one server per mode.

Starts ``main.py`` of a ComfyUI 0.33 folder once per mode (default flags = Dynamic VRAM on a GPU,
``--disable-dynamic-vram``, ``--lowvram``, ``--lowvram --disable-dynamic-vram``, ``--novram``) with
real-shape random weights (bench/bench_e2e.py's models: SD1.5 U-Net, ControlNet, VAE, CLIP-L, ViT-L/14,
XSR RFA / I2T / AdaIN adapter, a 256-image reference DB), queues the full xsr_x16 graph, and records
per mode: median seconds per image (new LR each run), peak VRAM (torch's peak allocated, and the
device-wide peak used that also sees comfy-aimdo's mappings), which models ComfyUI holds where after
each ``load_models_gpu`` (class, patcher, dynamic, loaded/total MiB), and on which device the XSR
modules' weights and inputs were at each call (bench/support/xsr_vram_probe). A check fails the mode
when an XSR module ran with weights or inputs on the CPU on a GPU run (silent CPU fallback), when an
XSR model is not among ComfyUI's loaded models after its node ran, or when the prompt fails.
Writes bench/results/vram_modes_<device>.{json,md} (device, date, command).

    python bench/bench_vram_modes.py --comfy /path/to/ComfyUI-0.33.0              # GPU
    python bench/bench_vram_modes.py --comfy .comfyui/ComfyUI-0.33.0 --tiny       # CPU smoke test (--cpu)
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench.support.bench_cli import bench_parser, result_tag, results_dir  # noqa: E402
from xsr_core.comfy_server import ComfyError, ComfyServer, comfyui_version, prepare_base_dir  # noqa: E402

PROBE = REPO / "bench" / "support" / "xsr_vram_probe"
SUPPORT = REPO / "tests" / "comfy" / "support" / "xsr_test_support"
MODES = {
    "default": [],
    "disable-dynamic-vram": ["--disable-dynamic-vram"],
    "novram": ["--novram"],
    "lowvram": ["--lowvram"],
    "lowvram+disable-dynamic-vram": ["--lowvram", "--disable-dynamic-vram"],
    # default flags, but outputs of nodes outside the current prompt are kept while 16 GB of RAM stay free
    # (0.33's default inactive headroom is all of RAM: switching workflows re-runs their loaders)
    "cache-ram-16": ["--cache-ram", "10", "16"],
}
XSR_MODELS = ("RFA", "I2T", "AdaINAdapter")


def stub_frontend(path: Path) -> Path:
    """A front-end root with a bare index.html: no browser is used, so the 1.49.6 package is not needed."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "index.html").write_text("<!doctype html><title>xsr bench</title>")
    return path


def checks(state: dict, gpu: bool) -> list[str]:
    """Problems in one mode's probe state (empty = handled correctly)."""
    problems = []
    calls = state.get("calls", {})
    for name in ("RFA.query_embedding", "I2T", "AdaINAdapter.compute_stats", "AdapterForward.apply"):
        if not any(k.split("|")[0] == name for k in calls):
            problems.append(f"{name}: never called (probe saw no call)")
    if gpu:
        for key, n in calls.items():
            cls, w, x = key.split("|")
            w, x = w.split("=")[1], x.split("=")[1]
            top = cls.split(".")[0] in ("RFA", "I2T", "AdaINAdapter", "AdapterForward")
            if w == "cpu" or (top and x == "cpu"):
                problems.append(f"{cls}: ran with weights on {w}, input on {x} ({n} calls): CPU fallback")
    seen = {m["model"] for load in state.get("loads", []) for m in load["loaded"]}
    for name in XSR_MODELS:
        if not any(s == name for s in seen):
            problems.append(f"{name}: never among ComfyUI's loaded models (not budgeted by load_models_gpu)")
    return problems


def run_mode(
    mode: str,
    flags: list[str],
    *,
    comfy: Path,
    base: Path,
    fe: Path,
    names: dict,
    steps: int,
    runs: int,
    gpu: bool,
    pythonpath: tuple[str, ...],
    lr_side: int = 32,
    pil_loader: bool = False,
    baseline: bool = False,
) -> dict:
    from bench_e2e import graphs
    from PIL import Image

    from xsr_core.testing.synthetic import synthetic_image

    extra = [*flags, "--front-end-root", str(fe), "--preview-method", "none"]
    server = ComfyServer(
        comfy_dir=comfy, base_dir=base, extra_args=extra, cpu=not gpu, pythonpath=pythonpath, startup_timeout=300
    )
    row = {"mode": mode, "flags": flags, "ok": False}
    t_start = time.perf_counter()
    try:
        server.start()
        row["startup_s"] = round(time.perf_counter() - t_start, 2)
        log = server.log_text()
        row["log_dynamic_vram"] = [
            ln.strip()
            for ln in log.splitlines()
            if any(s in ln.lower() for s in ("dynamic", "aimdo", "vram state", "set vram"))
        ][:8]
        failed = [ln.strip() for ln in log.splitlines() if "(IMPORT FAILED)" in ln]  # custom nodes (ours, the probe)
        if failed:
            raise ComfyError("a custom node failed to import: " + "; ".join(failed) + "\n" + server.log_tail(60))
        times, states, plain, mixed = [], [], [], []
        nodes: dict[str, list] = {}

        def prompt(i: int, which: str, probe: bool = False) -> float:
            lr = base / "input" / f"lr_{mode}_{i}.png"
            synthetic_image(2000 + i, 256).resize((lr_side, lr_side), Image.BICUBIC).save(lr)
            g = graphs(lr.name, names, steps, seed=i, mode="eager")[which]
            if pil_loader:
                g["lr"] = {"class_type": "XSRBench_LoadImagePIL", "inputs": {"image": lr.name}}
            for node in ("up", "lat"):  # the plain graph's fixed 512 px: follow --lr-side like the XSR graph
                if node in g and which == "baseline":
                    g[node]["inputs"].update(width=16 * lr_side, height=16 * lr_side)
            server.post_json("/xsr_bench/reset", {"probe": probe})
            t = time.perf_counter()
            server.run(g, timeout=600)
            dt = time.perf_counter() - t
            st = server.get_json("/xsr_bench/state")
            nodes[f"{which} #{i}"] = [n for n in st.get("nodes", []) if n[2] >= 0.005]
            if which == "xsr":
                states.append(st)
            return dt

        # XSR alone: one warm-up with the probes on (first loads), then timed runs with them off
        for i in range(runs + 1):
            dt = prompt(i, "xsr", probe=i == 0)
            if i > 0:
                times.append(dt)
        # then, when asked, the graph without XSR's nodes alternating with the XSR graph in the same server: the
        # per-node times show what each switch re-executes (a node absent from a prompt's list was cached)
        if baseline:
            try:
                prompt(100, "baseline")  # its warm-up (first loads of the plain graph's own models)
                for i in range(101, 101 + runs):
                    plain.append(prompt(i, "baseline"))
                    mixed.append(prompt(i, "xsr"))
            except ComfyError as e:  # recorded; the XSR-alone rows are still reported
                row["baseline_error"] = str(e)[-1000:]
        row.update(
            {
                "median_s": round(statistics.median(times), 3) if times else None,
                "baseline_median_s": round(statistics.median(plain), 3) if plain else None,
                "alternating_median_s": round(statistics.median(mixed), 3) if mixed else None,
                "alternating_runs_s": [round(t, 3) for t in mixed],
                "nodes": nodes,
                "runs_s": [round(t, 3) for t in times],
                "torch_peak_allocated_mib": max((s["torch_peak_allocated_mib"] or 0) for s in states[1:] or states)
                if gpu
                else None,
                "device_peak_used_mib": max((s["device_peak_used_mib"] or 0) for s in states[1:] or states)
                if gpu
                else None,
                "device_base_used_mib": states[-1]["device_base_used_mib"] if gpu else None,
                "vram_state": states[0]["vram_state"],
                "aimdo_enabled": states[0]["aimdo_enabled"],
                "calls": states[0]["calls"],
                "loads": states[0]["loads"],
                "loaded_after": states[-1]["loaded"],
            }
        )
        row["problems"] = checks(states[0], gpu)
        row["ok"] = not row["problems"]
    except ComfyError as e:
        row["error"] = str(e)[-3000:]
    finally:
        server.stop()
        row["log_tail"] = server.log_tail(15)
    return row


def write_report(results: dict, out: Path, tag: str) -> None:
    lines = [
        f"# XSR x16 in ComfyUI {results['comfyui']} per VRAM mode (real main.py, HTTP) — {results['device']}, "
        f"{results['date']}, torch {results['torch']}",
        "",
        f"`{results['command']}`",
        "",
        f"{results['steps']} steps, CFG 7, euler, {16 * results['lr_side']} px; "
        f"median of {results['runs']} runs with a new LR each, after one "
        "warm-up. Peak VRAM: torch's peak allocated in the server process / device-wide peak used (mem_get_info, "
        "includes comfy-aimdo's mappings and the CUDA context) during the timed runs. " + results.get("note", ""),
        "",
        "| mode | flags | ok | s / image | plain graph s / image | XSR s / image alternating with plain "
        "| torch peak GiB | device peak GiB | XSR models as ComfyUI holds them | problems |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        held = sorted(
            {
                f"{m['model']} ({m['patcher']}{', dynamic' if m['dynamic'] else ''}, {m['load_device']}, "
                f"{m['loaded_mib']:.0f}/{m['total_mib']:.0f} MiB)"
                for load in r.get("loads", [])
                for m in load["loaded"]
                if m["model"] in XSR_MODELS
            }
        )
        gib = lambda v: f"{v / 1024:.2f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        probs = "; ".join(r.get("problems", [])) or (r.get("error", "").splitlines() or [""])[0][:200] or "none"
        lines.append(
            f"| {r['mode']} | `{' '.join(r['flags']) or '(none)'}` | {'✔' if r['ok'] else '✘'} | "
            f"{r.get('median_s') if r.get('median_s') is not None else '-'} | "
            f"{r.get('baseline_median_s') if r.get('baseline_median_s') is not None else 'not measured'} | "
            f"{r.get('alternating_median_s') if r.get('alternating_median_s') is not None else 'not measured'} | "
            f"{gib(r.get('torch_peak_allocated_mib'))} | "
            f"{gib(r.get('device_peak_used_mib'))} | {'<br>'.join(held) or '-'} | {probs} |"
        )
    for r in results["rows"]:
        if r.get("nodes"):
            lines += ["", f"Executed nodes ≥ 5 ms per prompt, mode {r['mode']} (seconds; absent = cached):", ""]
            lines += [f"- {k}: " + ", ".join(f"{n[0]} {n[1]} {n[2]:.3f}" for n in v) for k, v in r["nodes"].items()]
    (out / f"vram_modes_{tag}.json").write_text(json.dumps(results, indent=1))
    (out / f"vram_modes_{tag}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(
        __doc__,
        comfy_help="ComfyUI 0.33 folder (its main.py is started)",
        tiny_help="tiny widths, --cpu (smoke test of this script; modes other than default conflict with --cpu)",
    )
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=2, help="timed runs per mode (after one warm-up with the probes on)")
    ap.add_argument("--lr-side", type=int, default=32, help="LR side (x16 output); 8 for a quick CPU smoke test")
    ap.add_argument("--pythonpath", default="", help="extra import folders for the server (os.pathsep-separated)")
    ap.add_argument(
        "--pil-loader",
        action="store_true",
        help="load the LR with the probe pack's PIL loader instead of LoadImage (0.33's LoadImage needs PyAV)",
    )
    ap.add_argument("--baseline", action="store_true", help="also time the same graph without XSR's nodes in each mode")
    ap.add_argument("--note", default="", help="a sentence for the report (e.g. which packages were stubbed)")
    args = ap.parse_args(argv)
    import torch

    from bench_e2e import make_models

    gpu = torch.cuda.is_available() and not args.tiny
    comfy = Path(args.comfy).resolve()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="xsr_vram_"))
    base = prepare_base_dir(work / "base", REPO, extra_nodes=[PROBE] + ([SUPPORT] if args.tiny else []))
    t0 = time.time()
    names = make_models(base / "models", args.tiny, "cuda" if gpu else "cpu")
    print(f"models written in {time.time() - t0:.0f} s", flush=True)
    if gpu:
        torch.cuda.empty_cache()
    fe = stub_frontend(work / "frontend")
    pythonpath = tuple(p for p in args.pythonpath.split(os.pathsep) if p)
    results = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "date": datetime.date.today().isoformat(),
        "comfyui": comfyui_version(comfy),
        "torch": torch.__version__,
        "command": " ".join(["python", "bench/bench_vram_modes.py", *(argv if argv is not None else sys.argv[1:])]),
        "tiny": args.tiny,
        "steps": args.steps,
        "runs": args.runs,
        "lr_side": args.lr_side,
        "pil_loader": args.pil_loader,
        "note": args.note,
        "rows": [],
    }
    out = results_dir(args)
    tag = result_tag(args.tiny, results["device"])
    for mode in args.modes.split(","):
        flags = MODES[mode]
        row = run_mode(
            mode,
            flags,
            comfy=comfy,
            base=base,
            fe=fe,
            names=names,
            steps=args.steps,
            runs=args.runs,
            gpu=gpu,
            pythonpath=pythonpath,
            lr_side=args.lr_side,
            pil_loader=args.pil_loader,
            baseline=args.baseline,
        )
        results["rows"].append(row)
        print(
            json.dumps(
                {
                    k: row.get(k)
                    for k in (
                        "mode",
                        "ok",
                        "median_s",
                        "baseline_median_s",
                        "torch_peak_allocated_mib",
                        "device_peak_used_mib",
                        "problems",
                        "error",
                    )
                }
            )[:3000],
            flush=True,
        )
        write_report(results, out, tag)  # after every mode: a run cut short keeps what it measured
    print((out / f"vram_modes_{tag}.md").read_text())
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["ok"] for r in results["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
