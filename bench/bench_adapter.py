#!/usr/bin/env python
"""Benchmark: cost of the AdaIN adapter (DESIGN §2.4) on one SD1.5 U-Net (+ ControlNet) denoising step.

Real-size SD1.5 U-Net and ControlNet (diffusers configs written below, random weights, no network),
fp16, latent 64x64 (512 px), batch 2 (a CFG pair), text context (2, 77, 768), hint (2, 3, 512, 512),
image tokens E (2 or 1, 257, 1024). Every gate is set non-zero so every site is computed.

Variants (median step time from CUDA events after warm-up, interleaved over several rounds; then ``--paired``
pairs of plain and adapter eager steps back to back, the per-pair ratio robust to the host's drift):
  unet                       U-Net alone, unpatched
  unet+adapter               U-Net with the adapter, stats cached (computed once, outside the loop)
  unet+cn                    ControlNet + U-Net, unpatched
  unet+cn attached-idle      patched models outside any embedding context (pass-through cost)
  unet+cn+adapter            ControlNet + U-Net with the adapter, stats cached
  unet+cn+adapter recompute  the same, recomputing the stats from E inside every step
  unet+cn+adapter rows       one embedding for the cond row only (rows=[True, False]), stats cached

The overhead of each adapter variant is reported against its unpatched base, with the 5 % target; the
"graph" rows replay the same step as a CUDA graph (device time only, launch gaps removed), so eager and
CUDA-graph figures of plain vs XSR stand side by side in one run.

``--host`` measures the host side of one adapter site instead (any device, tiny tensors, so the figure is
Python + dispatch overhead, not math): the hot path both bindings run (:class:`AdapterForward.apply`), the
checked :meth:`AdaINAdapter.apply`, and a plain LayerNorm call for scale; plus the aten ops one site
dispatches (counted with a TorchDispatchMode; on CUDA the fused path is one Triton launch instead).

    python bench/bench_adapter.py                 # on a GPU (writes bench/results/adapter_<device>.{json,md})
    python bench/bench_adapter.py --tiny          # tiny config on CPU, a smoke test of this script
    python bench/bench_adapter.py --host          # host cost per site (writes adapter_host_<device>.{json,md})
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from xsr_core.adapter import AdaINAdapter, AdaINAdapterConfig  # noqa: E402
from xsr_core.testing.sd15 import SD15_CONTROLNET_CONFIG, SD15_UNET_CONFIG  # noqa: E402

adain_mod = importlib.import_module("xsr_core.adapter.adain")  # the module (the package exports a function adain)

TINY_UNET_CONFIG = dict(SD15_UNET_CONFIG, block_out_channels=[32, 64, 128, 128], cross_attention_dim=32, sample_size=8)
TINY_CONTROLNET_CONFIG = dict(
    SD15_CONTROLNET_CONFIG,
    block_out_channels=[32, 64, 128, 128],
    cross_attention_dim=32,
    conditioning_embedding_out_channels=[16, 32, 32, 32],
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny U-Net/ControlNet (CPU smoke test)")
    p.add_argument("--host", action="store_true", help="host-side cost of one adapter site (tiny tensors)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"], help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--batch", type=int, default=2, help="U-Net batch (2 = one CFG pair)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant and round (default 20, tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 10, tiny 1)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all variants")
    p.add_argument(
        "--paired",
        type=int,
        default=None,
        help="groups of eager plain / attached-idle / adapter / decomposition steps (default 100, tiny 3)",
    )
    p.add_argument(
        "--profile", action="store_true", help="also cProfile + torch.profiler 10 plain and 10 adapter eager steps"
    )
    p.add_argument("--gate", type=float, default=0.1, help="value of every gate (non-zero: every site computed)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for adapter_<device>.{json,md}")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    args.steps = args.steps or (3 if args.tiny else 30)
    args.paired = args.paired if args.paired is not None else (3 if args.tiny else 100)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 10)
    if args.batch < 2:
        p.error("--batch must be >= 2 (the rows variant selects the first row of a CFG pair)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    return args


def build(args):
    from diffusers import ControlNetModel, UNet2DConditionModel

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    dev = torch.device(args.device)
    torch.manual_seed(0)
    ucfg, ccfg = (TINY_UNET_CONFIG, TINY_CONTROLNET_CONFIG) if args.tiny else (SD15_UNET_CONFIG, SD15_CONTROLNET_CONFIG)
    with dev:  # initialise on the device: CPU init of 1.2 B random weights takes minutes
        unet = UNet2DConditionModel(**ucfg).to(dtype).eval()
        controlnet = ControlNetModel(**ccfg).to(dtype).eval()
        adapter = AdaINAdapter(AdaINAdapterConfig.from_unet_config(unet.config)).to(dtype).eval()
    with torch.no_grad():
        adapter.gates.fill_(args.gate)
    latent = unet.config.sample_size
    g = torch.Generator(device=dev).manual_seed(1)
    B = args.batch
    inputs = dict(
        x=torch.randn(B, 4, latent, latent, generator=g, device=dev, dtype=dtype),
        t=torch.full((B,), 500, device=dev, dtype=torch.long),
        ctx=torch.randn(B, 77, unet.config.cross_attention_dim, generator=g, device=dev, dtype=dtype),
        hint=torch.rand(B, 3, latent * 8, latent * 8, generator=g, device=dev, dtype=dtype),
        E=torch.randn(B, 257, 1024, generator=g, device=dev, dtype=dtype),
    )
    return unet, controlnet, adapter, inputs


def unet_step(unet, inp):
    return unet(inp["x"], inp["t"], inp["ctx"]).sample


def full_step(unet, controlnet, inp):
    down, mid = controlnet(inp["x"], inp["t"], inp["ctx"], controlnet_cond=inp["hint"], return_dict=False)
    return unet(
        inp["x"], inp["t"], inp["ctx"], down_block_additional_residuals=down, mid_block_additional_residual=mid
    ).sample


def time_steps(fn, steps: int, warmup: int, cuda: bool) -> tuple[list[float], list[float]]:
    """Per-step milliseconds (device time from CUDA events, one sync at the end; perf_counter on CPU)
    and the host time each call took to return (enqueue cost; equals the step time when launch-bound)."""
    for _ in range(warmup):
        fn()
    host = []
    if cuda:
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for s, e in ev:
            t0 = time.perf_counter()
            s.record()
            fn()
            e.record()
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in ev], host
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out, out


def profile_steps(set_state, steps: int, cuda: bool) -> str:
    """cProfile (functions by own time) and torch.profiler (ops and CUDA runtime calls by count) over ``steps``
    eager steps of each state ("plain", "xsr"): where the adapter step's extra host time goes."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    buf = io.StringIO()
    for which in ("plain", "xsr"):
        fn = set_state(which)
        fn()
        if cuda:
            torch.cuda.synchronize()
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        pr.disable()
        buf.write(f"\n## {which}: cProfile, {steps} steps in {(time.perf_counter() - t0) * 1e3:.1f} ms\n")
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as tp:
            for _ in range(steps):
                fn()
            if cuda:
                torch.cuda.synchronize()
        buf.write(f"\n## {which}: torch.profiler, {steps} steps: calls per step, host µs per step, name\n")
        for e in sorted(tp.key_averages(), key=lambda e: -e.count)[:40]:
            buf.write(f"{e.count / steps:10.1f}  {e.cpu_time_total / steps:10.1f}  {e.key}\n")
    return buf.getvalue()


def cuda_graph(fn):
    """Capture ``fn`` in a CUDA graph (fails if it synchronises with the host) and return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def device_slug(args) -> str:
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or "cpu")
    if not args.device.startswith("cuda"):
        name = "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug + ("-tiny" if args.tiny else "")


def adain_residual(h, mu, sigma, gain, eps):
    """The unfused float reference: ``h + gain · (AdaIN(h) − h)``."""
    from xsr_core.adapter import adain

    return h + gain * (adain(h, mu, sigma, eps) - h)


def kernel_checks(adapter, stats, stats1, batch, latent, device, dtype) -> dict:
    """Fused (Triton) vs eager apply vs the float64 formula on real-size activations of every width."""

    worst = {"triton_rel_err": 0.0, "eager_rel_err": 0.0, "triton_vs_eager_rel": 0.0, "rows_bits_equal": True}
    g = torch.Generator(device=device).manual_seed(3)
    tokens = {320: latent**2, 640: (latent // 2) ** 2, 1280: (latent // 4) ** 2}
    rows = [True] + [False] * (batch - 1)
    for spec in adapter.config.blocks:
        for site in ("norm2", "q", "k", "norm3"):
            w = spec["inner_dim"] if site in ("q", "k") else spec["dim"]
            n = 77 if site == "k" else tokens.get(spec["dim"], latent**2)
            h = (torch.randn(batch, n, w, generator=g, device=device, dtype=torch.float32) * 2 + 0.5).to(dtype)
            mu, sigma = stats.get(spec["id"], site)
            gain = float(adapter.gate(spec["id"], site))
            ref = adain_residual(h.double(), mu.double(), sigma.double(), gain, adapter.config.eps)
            outs = {}
            for use in (True, False):
                adapter.use_triton = use
                outs[use] = adapter.apply(spec["id"], site, h, stats).double()
                if use:
                    part = adapter.apply(spec["id"], site, h, stats1, rows=rows)
                    same = torch.equal(
                        part[1:].view(torch.int16 if dtype != torch.float32 else torch.int32),
                        h[1:].view(torch.int16 if dtype != torch.float32 else torch.int32),
                    )
                    worst["rows_bits_equal"] &= bool(same)
            adapter.use_triton = True

            def rel(a, b):
                return float((a - b).norm() / b.norm())

            worst["triton_rel_err"] = max(worst["triton_rel_err"], rel(outs[True], ref))
            worst["eager_rel_err"] = max(worst["eager_rel_err"], rel(outs[False], ref))
            worst["triton_vs_eager_rel"] = max(worst["triton_vs_eager_rel"], rel(outs[True], outs[False]))

    worst["triton_available"] = bool(adain_mod._TRITON)
    return worst


PAIRED_VARIANTS = ("idle", "xsr", "out-of-place", "python-only")  # compared with "plain" in the paired groups
PAIRED_LABELS = ("attached-idle", "adapter", "out-of-place", "python-only")


def _identity(h, *args, **kwargs):
    return h


def with_attr(fn, obj, name: str, value):
    """``fn`` with ``obj.name`` set to ``value`` during each call (restored after it)."""

    def run(*a, **k):
        before = getattr(obj, name)
        setattr(obj, name, value)
        try:
            return fn(*a, **k)
        finally:
            setattr(obj, name, before)

    return run


def host_overhead(args) -> int:
    """Host-side cost of one adapter site: median microseconds per call over every site of the SD1.5 layout."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from xsr_core.adapter import AdapterForward

    dev = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only add wake-up latency to a host-cost figure
    torch.manual_seed(0)
    home = dev
    adapter = AdaINAdapter(AdaINAdapterConfig.from_unet_config(SD15_UNET_CONFIG)).to(home, dtype).eval()
    with torch.no_grad():
        adapter.gates.fill_(args.gate)
    sites = [(i, b["id"], site) for i, b in enumerate(adapter.config.blocks) for site in ("norm2", "q", "k", "norm3")]
    width = {
        (b["id"], s): (b["inner_dim"] if s in ("q", "k") else b["dim"])
        for b in adapter.config.blocks
        for s in ("norm2", "q", "k", "norm3")
    }
    acts = {k: torch.randn(args.batch, 4, w, device=dev, dtype=dtype) for k, w in width.items()}  # tiny: host cost
    norms = {w: torch.nn.LayerNorm(w, device=dev, dtype=dtype) for w in set(width.values())}
    rows = [True] + [False] * (args.batch - 1)
    results = {}
    with torch.inference_mode():
        stats = adapter.compute_stats(torch.randn(args.batch, 257, 1024, device=home, dtype=dtype))
        variants = {
            "layernorm (scale)": lambda i, bid, site: norms[acts[(bid, site)].shape[-1]](acts[(bid, site)]),
            "AdapterForward.apply": None,
            "AdapterForward.apply rows": None,
            "AdaINAdapter.apply (checked)": lambda i, bid, site: adapter.apply(bid, site, acts[(bid, site)], stats),
        }
        for name in variants:
            if name.startswith("AdapterForward"):
                st = AdapterForward(
                    stats, 1.0, rows if name.endswith("rows") else None, batch=args.batch, fused=adapter.use_triton
                )
                variants[name] = (lambda st: lambda i, bid, site: st.apply(i, site, acts[(bid, site)]))(st)
        for _ in range(3):  # warm-up (plans folded, kernels compiled)
            for fn in variants.values():
                for i, bid, site in sites:
                    fn(i, bid, site)

        # the binding's own Python per site, without the math: the same calls with adain_apply stubbed out
        def python_only(fn):
            return with_attr(fn, adain_mod, "adain_apply", _identity)

        def triton_launch(fn):  # the fused kernel through Triton's own launch (no direct launches)
            return with_attr(fn, adain_mod, "_FAST", False)

        if adain_mod._TRITON:
            variants["AdapterForward.apply, Triton's own launch"] = triton_launch(variants["AdapterForward.apply"])
        variants["AdapterForward.apply, Python only"] = python_only(variants["AdapterForward.apply"])
        variants["AdaINAdapter.apply (checked), Python only"] = python_only(variants["AdaINAdapter.apply (checked)"])
        for name, fn in variants.items():
            per_round = []
            for _ in range(args.rounds * 4):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.thread_time()  # CPU time of this thread: host work, robust to other processes' load
                for i, bid, site in sites:
                    fn(i, bid, site)
                per_round.append((time.thread_time() - t0) / len(sites) * 1e6)  # host cost per site
            if dev.type == "cuda":
                torch.cuda.synchronize()

            class Count(TorchDispatchMode):
                n = 0

                def __torch_dispatch__(self, func, types, a=(), kw=None):
                    Count.n += 1
                    return func(*a, **(kw or {}))

            with Count():
                for i, bid, site in sites:
                    fn(i, bid, site)
            results[name] = {
                "host_us_per_site": round(statistics.median(per_round), 2),
                "aten_ops_per_site": round(Count.n / len(sites), 2),
            }
    triton = bool(adain_mod._TRITON)
    res = {
        "benchmark": "adapter_host_overhead",
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else dev.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {
            "dtype": args.dtype,
            "batch": args.batch,
            "tokens": 4,
            "sites": len(sites),
            "gate": args.gate,
            "triton": triton,
            "direct_launch": adain_mod._FAST,
            "direct_launch_off": adain_mod._FAST_OFF,
            "torch_threads": 1,
        },
        "results": results,
        "note": "tiny tensors: the figure is host (Python + dispatch) cost per site; the SD1.5 U-Net + ControlNet "
        f"step runs {len(sites)} sites; aten ops counted with TorchDispatchMode (a Triton launch is not an "
        "aten op)",
    }
    lines = [
        f"# AdaIN adapter host cost per site — {res['device']}",
        "",
        f"{res['date']} · torch {res['torch']} · `{res['command']}`",
        "",
        f"{args.dtype}, batch {args.batch}, 4 tokens, {len(sites)} sites (SD1.5 U-Net + ControlNet), "
        f"Triton {'on' if triton else 'not available'}, direct launches {adain_mod._FAST}"
        + (f" ({adain_mod._FAST_OFF})" if adain_mod._FAST_OFF else ""),
        "",
        "host µs = CPU time of the calling thread per site (median over rounds)",
        "",
        "| variant | host µs / site | aten ops / site |",
        "|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['host_us_per_site']:.1f} | {r['aten_ops_per_site']:.1f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = dev.type if dev.type != "cuda" else re.sub(r"[^a-z0-9]+", "-", res["device"].lower()).strip("-")
    stem = out / f"adapter_host_{slug}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.host:
        return host_overhead(args)
    from xsr_core.adapter.diffusers_binding import DiffusersAdapterBinding  # needs diffusers (the --host mode does not)

    torch.backends.cuda.matmul.allow_tf32 = True
    unet, controlnet, adapter, inp = build(args)
    cuda = args.device.startswith("cuda")
    inp1 = dict(inp, E=inp["E"][:1])
    rows = [True] + [False] * (args.batch - 1)

    with torch.inference_mode():
        base_out = full_step(unet, controlnet, inp)
        binding = DiffusersAdapterBinding(adapter, unet=unet, controlnet=controlnet)
        stats = adapter.compute_stats(inp["E"])
        stats1 = adapter.compute_stats(inp1["E"])
        with binding.embedding(stats=stats):
            ad_out = full_step(unet, controlnet, inp)
        binding.detach()
        changed = float((ad_out.float() - base_out.float()).abs().max())
        if not changed > 0:
            raise RuntimeError("the adapter did not change the output: the benchmark would measure nothing")
        t0 = time.perf_counter()
        for _ in range(5):
            adapter.compute_stats(inp["E"])
        if cuda:
            torch.cuda.synchronize()
        stats_ms = (time.perf_counter() - t0) / 5 * 1e3
        # accuracy of the fused apply in the run dtype vs the float64 formula, on a real-size activation
        bid = adapter.block_ids[0]
        h = (
            torch.randn(
                args.batch,
                unet.config.sample_size**2,
                adapter.config.blocks[0]["dim"],
                device=inp["x"].device,
                dtype=inp["x"].dtype,
            )
            * 2
            + 0.5
        )
        mu, sigma = stats.get(bid, "norm2")
        ref = adain_residual(h.double(), mu.double(), sigma.double(), args.gate, adapter.config.eps)
        apply_rel_err = float((adapter.apply(bid, "norm2", h, stats).double() - ref).norm() / ref.norm())
        checks = kernel_checks(
            adapter, stats, stats1, args.batch, unet.config.sample_size, inp["x"].device, inp["x"].dtype
        )
        print(f"kernel checks: {checks}", file=sys.stderr)

        def with_binding(fn):
            def run():
                with binding.embedding(stats=stats):
                    fn()

            return run

        def recompute():
            with binding.embedding(inp["E"]):
                full_step(unet, controlnet, inp)

        def adapter_step():
            with binding.embedding(stats=stats):
                full_step(unet, controlnet, inp)

        eager_step = with_attr(adapter_step, adapter, "use_triton", False)
        triton_launch_step = with_attr(adapter_step, adain_mod, "_FAST", False)  # the kernel through Triton's launch

        def rows_step():
            with binding.embedding(stats=stats1, rows=rows):
                full_step(unet, controlnet, inp)

        plain = {
            "unet": lambda: unet_step(unet, inp),
            "unet+cn": lambda: full_step(unet, controlnet, inp),
        }
        patched = {
            "unet+adapter": with_binding(lambda: unet_step(unet, inp)),
            "unet+cn attached-idle": lambda: full_step(unet, controlnet, inp),
            "unet+cn+adapter": with_binding(lambda: full_step(unet, controlnet, inp)),
            "unet+cn+adapter recompute": recompute,
            "unet+cn+adapter eager-math": eager_step,
            "unet+cn+adapter Triton's own launch": triton_launch_step,
            "unet+cn+adapter rows": rows_step,
        }
        graphs: dict[str, object] = {}
        graph_error = None
        if cuda:  # device-only cost: launch gaps removed; capture also proves the adapter never syncs
            try:
                binding.detach()
                graphs["graph unet+cn"] = cuda_graph(plain["unet+cn"])
                binding = DiffusersAdapterBinding(adapter, unet=unet, controlnet=controlnet)
                graphs["graph unet+cn+adapter"] = cuda_graph(patched["unet+cn+adapter"])
            except Exception as e:  # report, do not hide: the eager numbers still stand
                graph_error = f"{type(e).__name__}: {e}"
                graphs = {}
                print(f"CUDA graph capture failed: {graph_error}", file=sys.stderr)
        times: dict[str, list[float]] = {k: [] for k in [*plain, *patched, *graphs]}
        host: dict[str, list[float]] = {k: [] for k in times}

        def measure(name, fn):
            dev_ms, host_ms = time_steps(fn, args.steps, args.warmup, cuda)
            times[name] += dev_ms
            host[name] += host_ms

        for r in range(args.rounds):
            binding.detach()
            for name, fn in plain.items():
                measure(name, fn)
            binding = DiffusersAdapterBinding(adapter, unet=unet, controlnet=controlnet)
            for name, fn in patched.items():
                measure(name, fn)
            for name, fn in graphs.items():
                measure(name, fn)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

        def one_step(fn) -> tuple[float, float]:
            """Wall and calling-thread CPU milliseconds of one step, synchronised on both sides."""
            if cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            if cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3

        # paired eager steps: the plain step, the attached-but-idle step (hooks only), the adapter step and its
        # decomposition back to back, order rotated every group, so the host's drift (2-3x over minutes on the
        # device machine) falls on all of a group alike
        orig_triton = adain_mod._adain_triton
        paired_steps = {
            "plain": plain["unet+cn"],
            "idle": patched["unet+cn attached-idle"],
            "xsr": patched["unet+cn+adapter"],
            # the adapter with every site's result in a new tensor (the fused kernel before in-place sites)
            "out-of-place": with_attr(
                patched["unet+cn+adapter"],
                adain_mod,
                "_adain_triton",
                lambda h, k, c, omg, mask, eps, inplace=False, record=None: orig_triton(
                    h, k, c, omg, mask, eps, False, record
                ),
            ),
            # the sites' Python without the math (adain_apply returns h): what the kernel launches add on top
            "python-only": with_attr(patched["unet+cn+adapter"], adain_mod, "adain_apply", _identity),
        }

        def set_state(which: str):
            nonlocal binding
            binding.detach()
            if which != "plain":
                binding = DiffusersAdapterBinding(adapter, unet=unet, controlnet=controlnet)
            return paired_steps[which]

        order = tuple(paired_steps)
        pairs: list[dict[str, tuple[float, float]]] = []
        for i in range(args.paired):
            group = {}
            r = i % len(order)
            for which in order[r:] + order[:r]:
                group[which] = one_step(set_state(which))
            pairs.append(group)
        profile_text = profile_steps(set_state, 10, cuda) if args.profile else None
        binding.detach()

    base_of = {"unet+adapter": "unet", "graph unet+cn+adapter": "graph unet+cn"}
    rows_out = []
    for name, ts in times.items():
        med = statistics.median(ts)
        base = None if name in plain or name == "graph unet+cn" else base_of.get(name, "unet+cn")
        over = None if base is None else 100.0 * (med / statistics.median(times[base]) - 1.0)
        rows_out.append(
            {
                "variant": name,
                "median_ms": round(med, 3),
                "p10_ms": round(sorted(ts)[len(ts) // 10], 3),
                "p90_ms": round(sorted(ts)[(9 * len(ts)) // 10], 3),
                "n": len(ts),
                "base": base,
                "host_median_ms": round(statistics.median(host[name]), 3),
                "overhead_pct": None if over is None else round(over, 2),
            }
        )

    paired = None
    if pairs:

        def q(vals: list[float], f: float) -> float:
            return sorted(vals)[min(len(vals) - 1, int(f * len(vals)))]

        paired = {
            "groups": len(pairs),
            "base": "unet+cn",
            "idle": "unet+cn attached-idle",
            "xsr": "unet+cn+adapter",
            "out-of-place": "unet+cn+adapter, every site's result in a new tensor",
            "python-only": "unet+cn+adapter with adain_apply returning h (the sites' Python, no kernel)",
        }
        for j, key in ((0, "wall"), (1, "cpu")):
            paired[key] = {"plain_median_ms": round(statistics.median(p["plain"][j] for p in pairs), 3)}
            for v in PAIRED_VARIANTS:
                ratio = [100.0 * (p[v][j] / p["plain"][j] - 1.0) for p in pairs]
                paired[key][v] = {
                    "median_ms": round(statistics.median(p[v][j] for p in pairs), 3),
                    "overhead_pct_median": round(statistics.median(ratio), 2),
                    "overhead_pct_p25": round(q(ratio, 0.25), 2),
                    "overhead_pct_p75": round(q(ratio, 0.75), 2),
                }

    import diffusers

    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    result = {
        "benchmark": "adapter_overhead",
        "device": dev_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {
            "model": "tiny" if args.tiny else "sd15",
            "dtype": args.dtype,
            "batch": args.batch,
            "latent": unet.config.sample_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "gate": args.gate,
            "adapter_blocks": len(adapter.block_ids),
            "apply_calls_per_full_step": 4 * len(adapter.block_ids),
            "adapter_params_M": round(sum(p.numel() for p in adapter.parameters()) / 1e6, 2),
        },
        "compute_stats_ms": round(stats_ms, 3),
        "apply_rel_err_vs_float64": apply_rel_err,
        "kernel_checks": checks,
        "cuda_graph_error": graph_error,
        "output_max_abs_change": changed,
        "target_overhead_pct": 5.0,
        "results": rows_out,
        "paired_eager": paired,
    }
    lines = [
        f"# AdaIN adapter overhead — {dev_name}",
        "",
        f"{result['date']} · torch {result['torch']} · diffusers {result['diffusers']} · `{result['command']}`",
        "",
        f"{result['config']['model']}, {args.dtype}, batch {args.batch}, latent {unet.config.sample_size}², "
        f"{len(adapter.block_ids)} blocks × 4 sites, compute_stats {stats_ms:.2f} ms, "
        f"fused apply rel. error vs float64 {apply_rel_err:.1e}"
        + (f", CUDA graph capture failed: {graph_error}" if graph_error else ""),
        "",
        f"kernel checks (worst over all blocks/sites, rel. L2 error vs float64): {checks}",
        "",
        "| variant | median ms | p10 | p90 | host ms | overhead vs base | ≤ 5 % |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows_out:
        ov = "" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.2f} % vs {r['base']}"
        ok = "" if r["overhead_pct"] is None else ("yes" if r["overhead_pct"] <= 5.0 else "no")
        lines.append(
            f"| {r['variant']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{r['host_median_ms']:.2f} | {ov} | {ok} |"
        )
    if paired:
        lines += [
            "",
            f"Eager steps in groups ({paired['groups']} groups of one step each: `unet+cn`, `attached-idle` (the "
            "hooks alone), `adapter` (`unet+cn+adapter`), `out-of-place` (the adapter with every site's result in a "
            "new tensor) and `python-only` (the sites' Python, adain_apply returning h), synchronised around each "
            "step, order rotated every group; overhead = median of the per-group ratios to the plain step, p25-p75 "
            "in brackets):",
            "",
            "| clock | plain ms | " + " | ".join(f"{v} ms | overhead" for v in PAIRED_LABELS) + " | adapter ≤ 5 % |",
            "|---|---|" + "---|---|" * len(PAIRED_LABELS) + "---|",
        ]
        for key, label in (("wall", "wall"), ("cpu", "calling thread CPU")):
            r = paired[key]
            cells = [
                f"{r[v]['median_ms']:.2f} | {r[v]['overhead_pct_median']:+.2f} % "
                f"({r[v]['overhead_pct_p25']:+.2f} … {r[v]['overhead_pct_p75']:+.2f})"
                for v in PAIRED_VARIANTS
            ]
            ok = "yes" if r["xsr"]["overhead_pct_median"] <= 5.0 else "no"
            lines.append(f"| {label} | {r['plain_median_ms']:.2f} | {' | '.join(cells)} | {ok} |")
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"adapter_{device_slug(args)}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    if profile_text is not None:
        prof = out / f"adapter_profile_{device_slug(args)}.txt"
        prof.write_text(f"{result['date']} · `{result['command']}`\n{profile_text}")
        print(f"wrote {prof}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
