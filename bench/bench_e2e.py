"""End-to-end x16 (32 -> 512) through ComfyUI in-process: XSR graph vs the same graph without XSR nodes.

Real-size models with random weights (timing does not depend on weight values): SD1.5 U-Net,
SD1.5 ControlNet, SD VAE (AutoencoderKL), CLIP-L text encoder, CLIP ViT-L/14 vision encoder, XSR
RFA / I2T (distilgpt2-size decoder) / AdaIN adapter, and a reference DB of 256 procedural images built
with that ViT-L/14. fp16 on CUDA. For each step count (20, 50; CFG 7, euler) it times, per image, the
whole prompt with a new LR image each run (so PrepareLR, Retrieve, Enhance, sampling, decode and the
colour fix all run; model loaders stay cached as in real use):

- ``baseline``: LR -> bicubic x16 hint -> SD1.5 + ControlNet (fixed prompt) -> VAE decode
- ``xsr``: the full xsr_x16 graph (retrieval, I2T caption + embedding, AdaIN-patched U-Net/ControlNet)

in each mode of ``--modes``: ``eager``; ``cudagraph`` (the XSR_CUDAGraph node before the KSampler, both
graphs); ``compile`` (ComfyUI's TorchCompileModel node, inductor, on the U-Net; ``--compile`` adds it);
``compile_cudagraph`` (TorchCompileModel, then XSR_CUDAGraph: the inductor-compiled U-Net inside the graph).
Reports median seconds, the XSR overhead ratio, peak VRAM, per-node median times (CUDA synchronised
around each node), what is resident on the GPU after each node (ComfyUI's loaded models and their
loaded MiB, plus allocated memory and the node's own peak), and the max abs difference of the sampled
latent between eager and cudagraph for the same LR and seed. Writes bench/results/e2e_<device>.{json,md}.

    python bench/bench_e2e.py --comfy /path/to/ComfyUI [--modes eager,cudagraph] [--compile] [--runs 3]
    python bench/bench_e2e.py --comfy .comfyui/ComfyUI --tiny      # CPU smoke test with tiny widths
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xsr_core.testing.sd15 import (  # noqa: E402
    CLIP_L14_VISION_CONFIG as CLIP_L_VISION,
    CLIP_L_TEXT_CONFIG as CLIP_L_TEXT,
    SD15_UNET_CONFIG as SD15_UNET,
    SD15_VAE_CONFIG as SD_VAE,
)
from bench.support import memory_report  # noqa: E402
from bench.support.bench_cli import bench_parser, result_tag, results_dir  # noqa: E402
from bench.support.comfy_inprocess import start_comfy  # noqa: E402


def make_models(models: Path, tiny: bool, device: str, sd: bool = True, ref_side: int = 256) -> dict[str, str]:
    """Write the benchmark's models under ``models``; ``sd=False`` skips the real-size U-Net, ControlNet and
    VAE (the fixed-cost bench only needs the CLIP text / vision encoders, the XSR models and the DB).
    ``ref_side``: side of the DB's procedural images (a real packed DB stores 512 px references)."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from xsr_core.adapter import AdaINAdapter, AdaINAdapterConfig
    from xsr_core.models.i2t import I2T, I2TConfig, save_i2t
    from xsr_core.models.rfa import RFA, RFAConfig
    from xsr_core.refdb import BuildConfig, build_db
    from xsr_core.testing import zoo
    from xsr_core.testing.synthetic import write_synthetic_images
    from xsr_core.testing.tiny_models import train_tiny_gpt2_tokenizer
    from xsr_core.weights import save_model

    torch.manual_seed(0)
    half = torch.float16 if device == "cuda" else torch.float32
    unet_cfg = dict(zoo.TINY_UNET_CONFIG) if tiny else SD15_UNET
    text_cfg = dict(zoo.TINY_TEXT_CONFIG) if tiny else CLIP_L_TEXT
    vis_cfg = (
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 14,
            "projection_dim": 32,
        }
        if tiny
        else CLIP_L_VISION
    )
    names = {
        "unet": "sd15_unet.safetensors",
        "cn": "sd15_controlnet.safetensors",
        "vae": "sd_vae.safetensors",
        "clip": "clip_l.safetensors",
        "cv": "clip_vit_l14.safetensors",
    }
    for sub in ("diffusion_models", "controlnet", "vae", "text_encoders", "clip_vision", "xsr", "xsr_refdb"):
        (models / sub).mkdir(parents=True, exist_ok=True)

    def save(module, path, prefix_fix=None):
        sd = {k: v.to(half).contiguous() for k, v in module.state_dict().items() if v.is_floating_point()}
        if prefix_fix:
            sd = {(k if k.startswith(prefix_fix) else prefix_fix + k): v for k, v in sd.items()}
        save_file(sd, str(path))

    if tiny:
        # ComfyUI's separate loaders only detect stock widths: the tiny run uses the zoo's single-file
        # checkpoint (registered by the test-support pack) through CheckpointLoaderSimple instead
        unet, text, vae, cn = zoo.build_tiny_sd(0)
        (models / "checkpoints").mkdir(exist_ok=True)
        zoo.write_sd_checkpoint(unet, text, vae, models / "checkpoints" / "tiny.safetensors")
        zoo.write_controlnet(cn, models / "controlnet" / names["cn"])
        names["ckpt"] = "tiny.safetensors"
    else:
        unet = None
        if sd:
            unet = zoo.randomize_(UNet2DConditionModel(**unet_cfg), 0)
            save(unet, models / "diffusion_models" / names["unet"])
            save(zoo.randomize_(ControlNetModel.from_unet(unet), 1), models / "controlnet" / names["cn"])
            save(zoo.randomize_(AutoencoderKL(**SD_VAE), 2), models / "vae" / names["vae"])
        save(
            zoo.randomize_(CLIPTextModel(CLIPTextConfig(**text_cfg)), 3),
            models / "text_encoders" / names["clip"],
            "text_model.",
        )
    del unet
    cv = zoo.randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**vis_cfg)), 4)
    sd = {k: v.to(half).contiguous() for k, v in cv.state_dict().items() if v.is_floating_point()}
    sd = {
        (k if k.startswith(("vision_model.", "visual_projection.")) else "vision_model." + k): v for k, v in sd.items()
    }
    meta = {"xsr.clip_vision_config": json.dumps(vis_cfg)} if tiny else None
    save_file(sd, str(models / "clip_vision" / names["cv"]), metadata=meta)
    del cv

    d = vis_cfg["hidden_size"]
    tok = train_tiny_gpt2_tokenizer()
    rfa_cfg = RFAConfig(clip_dim=d, width=32, depth=1, heads=2, out_dim=d) if tiny else RFAConfig()
    save_model(RFA(rfa_cfg), models / "xsr" / "rfa.safetensors")
    dec = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id}
    if tiny:
        dec.update(n_embd=32, n_layer=2, n_head=2)
    i2t_cfg = I2TConfig(
        clip_dim=d,
        width=32 if tiny else 1024,
        depth=1 if tiny else 4,
        heads=2 if tiny else 16,
        decoder=dec,
        clip_text_dim=text_cfg["hidden_size"],
    )
    save_i2t(I2T(i2t_cfg), models / "xsr" / "i2t.safetensors", tok)
    ad = AdaINAdapter(AdaINAdapterConfig.from_unet_config(unet_cfg, embed_dim=d, include_controlnet=True))
    with torch.no_grad():
        ad.gates.uniform_(0.05, 0.2)  # every site active, as a trained adapter
    save_model(ad, models / "xsr" / "adain_adapter.safetensors")
    shutil.rmtree(models / "xsr_refdb" / "bench", ignore_errors=True)  # a reused --workdir: build afresh
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_images(tmp, 64 if tiny else 256, size=ref_side)
        build_db(
            models / "xsr_refdb" / "bench",
            models / "clip_vision" / names["cv"],
            images=tmp,
            config=BuildConfig(mode="packed", workers=0, device=device, progress=False),
        )
    return names


def graph_args(names: dict[str, str], steps: int, seed: int) -> dict:
    """The keyword arguments of xsr_core.demo's graph builders for the model files make_models wrote."""
    return dict(
        ckpt=names.get("ckpt", "unused"),
        controlnet=names["cn"],
        clip_vision=names["cv"],
        refdb="bench",
        steps=steps,
        seed=seed,
    )


def separate_loaders(g: dict, names: dict[str, str]) -> dict:
    """``g`` with its checkpoint loader replaced by the U-Net / CLIP-L / VAE loaders of the real-size files
    (tiny: the zoo's single-file checkpoint stays)."""
    if "ckpt" in names:
        return g
    del g["ckpt"]
    remap = {0: ["unet", 0], 1: ["clipl", 0], 2: ["vae", 0]}
    for node in g.values():
        for k, v in node["inputs"].items():
            if isinstance(v, list) and v[0] == "ckpt":
                node["inputs"][k] = list(remap[v[1]])
    g["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": names["unet"], "weight_dtype": "default"}}
    g["clipl"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": names["clip"], "type": "stable_diffusion"}}
    g["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": names["vae"]}}
    return g


def graphs(lr_name: str, names: dict[str, str], steps: int, seed: int, mode: str) -> dict[str, dict]:
    from xsr_core.demo import xsr_graph

    xsr = xsr_graph(lr_name, **graph_args(names, steps, seed))

    def add_mode(g):
        if mode in COMPILED_MODES:
            g["compile"] = {
                "class_type": "TorchCompileModel",
                "inputs": {"model": g["sample"]["inputs"]["model"], "backend": "inductor"},
            }
            g["sample"]["inputs"]["model"] = ["compile", 0]
        if mode in ("cudagraph", "compile_cudagraph"):
            g["cudagraph"] = {"class_type": "XSR_CUDAGraph", "inputs": {"model": g["sample"]["inputs"]["model"]}}
            g["sample"]["inputs"]["model"] = ["cudagraph", 0]
        if mode not in ("eager", "cudagraph", *COMPILED_MODES):
            raise ValueError(f"unknown mode {mode!r}")
        return g

    def relink(g):
        if "ckpt" in names:  # tiny: keep the single-file checkpoint loader
            g["ckpt"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names["ckpt"]}}
        return add_mode(separate_loaders(g, names))

    base = {
        "lr": xsr["lr"],
        "up": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["lr", 0],
                "upscale_method": "bicubic",
                "width": 512,
                "height": 512,
                "crop": "disabled",
            },
        },
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "ckpt": {"class_type": "none", "inputs": {}},
        "cn": xsr["cn"],
        "pos": {
            "class_type": "CLIPTextEncode",
            "inputs": {"clip": ["ckpt", 1], "text": "a high quality, detailed photo"},
        },
        "neg": xsr["neg"],
        "apply": {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {**xsr["apply"]["inputs"], "positive": ["pos", 0], "control_net": ["cn", 0], "image": ["up", 0]},
        },
        "sample": {
            "class_type": "KSampler",
            "inputs": {**xsr["sample"]["inputs"], "model": ["ckpt", 0], "latent_image": ["lat", 0]},
        },
        "decode": xsr["decode"],
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "bench_base"}},
    }
    return {"baseline": relink(base), "xsr": relink(xsr)}


COMPILED_MODES = ("compile", "compile_cudagraph")  # modes with ComfyUI's TorchCompileModel on the U-Net
NODE_COLUMNS = [
    "XSR_PrepareLR",
    "XSR_Retrieve",
    "XSR_Enhance",
    "XSR_AdaINPatch",
    "XSR_CUDAGraph",
    "CLIPTextEncode",
    "ControlNetApplyAdvanced",
    "KSampler",
    "VAEDecode",
    "XSR_ColorFix",
    "SaveImage",
]


def comfy_version() -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except Exception:  # noqa: BLE001 - older trees have no version module
        return "unknown"


def session(comfy: str, tiny: bool, workdir: str | None, sd: bool = True, ref_side: int = 256) -> types.SimpleNamespace:
    """Models written, ComfyUI imported in-process with the XSR pack, and a prompt runner that records per-node
    times (CUDA synchronised around each node) and what is resident after each node."""
    c = start_comfy(
        comfy, workdir, "xsr_e2e_", tiny, lambda models, t, dev: make_models(models, t, dev, sd=sd, ref_side=ref_side)
    )
    device, names, execution, executor, work = c.device, c.names, c.execution, c.executor, c.work
    import torch

    import folder_paths
    from PIL import Image

    import comfy.model_management as mm

    from xsr_core.testing.synthetic import synthetic_image

    inp = Path(folder_paths.get_input_directory())
    inp.mkdir(parents=True, exist_ok=True)
    counter = [0]

    def new_lr() -> str:
        counter[0] += 1
        name = f"lr_{counter[0]:04d}.png"
        synthetic_image(1000 + counter[0], 256).resize((32, 32), Image.BICUBIC).save(inp / name)
        return name

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # per-node timing and residency: wrap the function ComfyUI calls for every executed node; inside each node, the
    # time Python's garbage collector ran (gc callbacks) and the time ComfyUI's load_models_gpu took
    trace: list[dict] = []
    captured: dict[str, object] = {}
    original_get_output_data = execution.get_output_data
    inside = {"gc_s": 0.0, "load_s": 0.0, "gc_full": 0, "t": 0.0}

    def on_gc(phase, info):
        if phase == "start":
            inside["t"] = time.perf_counter()
        else:
            inside["gc_s"] += time.perf_counter() - inside["t"]
            inside["gc_full"] += info["generation"] == 2

    gc.callbacks.append(on_gc)
    original_load = mm.load_models_gpu

    def timed_load_models_gpu(*a, **k):
        t0 = time.perf_counter()
        try:
            return original_load(*a, **k)
        finally:
            inside["load_s"] += time.perf_counter() - t0

    mm.load_models_gpu = timed_load_models_gpu  # the nodes call it as comfy.model_management.load_models_gpu

    async def timed_get_output_data(prompt_id, unique_id, obj, input_data_all, *a, **k):
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        inside.update(gc_s=0.0, load_s=0.0, gc_full=0)
        # a profiler around one node (--profile-sampler, --profile-node)
        around = captured.get("around_sample") if unique_id == captured.get("profile_node", "sample") else None
        t = time.perf_counter()
        if around is None:
            out = await original_get_output_data(prompt_id, unique_id, obj, input_data_all, *a, **k)
        else:
            with around():
                out = await original_get_output_data(prompt_id, unique_id, obj, input_data_all, *a, **k)
                sync()
        sync()
        dt = time.perf_counter() - t
        resident = sorted(
            (type(lm.model.model).__name__, round(lm.model.loaded_size() / 2**20))
            for lm in mm.current_loaded_models
            if lm.model is not None and lm.model.loaded_size() > 0
        )
        row = {
            "node": unique_id,
            "s": dt,
            "gc_s": inside["gc_s"],
            "gc_full": inside["gc_full"],
            "load_models_s": inside["load_s"],
            "resident_mib": resident,
        }
        if device == "cuda":
            row["allocated_gib"] = torch.cuda.memory_allocated() / 2**30
            row["node_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        trace.append(row)
        if unique_id == "sample" and out and out[0]:
            captured["latent"] = out[0][0][0]["samples"].detach().float().cpu()
        return out

    execution.get_output_data = timed_get_output_data

    def run(prompt) -> tuple[float, list[dict]]:
        pid = uuid.uuid4().hex
        ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
        if not ok:
            raise RuntimeError(f"invalid prompt: {err} {node_errors}")
        trace.clear()
        sync()
        t = time.perf_counter()
        executor.execute(prompt, pid, {}, outputs)
        sync()
        if not executor.success:
            raise RuntimeError(f"execution failed: {executor.status_messages[-3:]}")
        return time.perf_counter() - t, [dict(r, **{"class": prompt[r["node"]]["class_type"]}) for r in trace]

    return types.SimpleNamespace(
        run=run, new_lr=new_lr, names=names, device=device, captured=captured, torch=torch, mm=mm, work=work
    )


def profile_sampler(
    run, new_lr, names: dict, kinds: list[str], steps: int, results: dict, captured: dict, node: str = "sample"
) -> str:
    """cProfile + torch.profiler around the KSampler node (or the node with id ``node``) of one eager run of each
    graph that has it (after one unprofiled run of it): the host work of a sampling run, by function and by aten
    op."""
    import contextlib
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    buf = io.StringIO()
    buf.write(f"{results['command']}\n{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n")
    buf.write(f"{results['device']}, torch {results['torch']}, ComfyUI {results['comfyui']}; eager, {steps} steps; ")
    buf.write(f"only the node {node!r} is profiled\n")
    captured["profile_node"] = node
    shapes = graphs("unused.png", names, steps, seed=7, mode="eager")  # which graphs hold the node (no image)
    kinds = [k for k in kinds if node in shapes[k]]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for kind in kinds:
        run(graphs(new_lr(), names, steps, seed=7, mode="eager")[kind])  # warm: loaders and caches as when timed
        prof = cProfile.Profile()

        @contextlib.contextmanager
        def with_cprofile():
            prof.enable()
            try:
                yield
            finally:
                prof.disable()

        holder = {}

        @contextlib.contextmanager
        def with_torch_profiler():
            with profile(activities=acts) as tp:
                yield
            holder["tp"] = tp

        try:
            captured["around_sample"] = with_cprofile
            _, tr = run(graphs(new_lr(), names, steps, seed=8, mode="eager")[kind])
            sample_ms = sum(r["s"] for r in tr if r["node"] == node) * 1e3
            st = pstats.Stats(prof, stream=buf)
            buf.write(f"\n## {kind}: cProfile, {node} {sample_ms:.1f} ms under the profiler, ")
            buf.write(f"{st.total_calls} function calls ({st.total_calls / steps:.0f} a step)\n")
            st.sort_stats("tottime").print_stats(40)
            if node != "sample":  # a node's own structure: where its time goes, by cumulative time
                st.sort_stats("cumulative").print_stats(40)
            captured["around_sample"] = with_torch_profiler
            _, tr = run(graphs(new_lr(), names, steps, seed=9, mode="eager")[kind])
        finally:
            captured.pop("around_sample", None)
        sample_ms = sum(r["s"] for r in tr if r["node"] == node) * 1e3
        ka = holder["tp"].key_averages()
        n_ops = sum(e.count for e in ka if e.key.startswith("aten::"))
        buf.write(f"\n## {kind}: torch.profiler, {node} {sample_ms:.1f} ms under the profiler; {n_ops} aten ops ")
        buf.write(f"({n_ops / steps:.0f} a step)\n")
        buf.write(ka.table(sort_by="count", row_limit=30) + "\n")
    return buf.getvalue()


def main(argv=None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--steps", default="20,50")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per configuration (after its warm-ups)")
    ap.add_argument(
        "--switch-warmups",
        type=int,
        default=2,
        help="untimed runs of a graph after every switch of graph, before its timed run (default 2: the first reruns "
        "the loaders the other graph dropped, the second captures the reloaded CLIP vision encoder's CUDA graph)",
    )
    ap.add_argument(
        "--modes", default="eager,cudagraph", help="comma list of eager, cudagraph, compile, compile_cudagraph"
    )
    ap.add_argument("--compile", action="store_true", help="also time with TorchCompileModel (inductor)")
    ap.add_argument(
        "--compile-steps",
        default="20",
        help="step counts of the compile mode (each graph compiles in its warm-up run: keep it short)",
    )
    ap.add_argument("--compile-runs", type=int, default=1, help="timed runs of the compile mode (after 1 warm-up)")
    ap.add_argument(
        "--offload-check",
        action="store_true",
        help="after the eager rows, time the XSR eager graph alone (no baseline prompt in between) at the first "
        "step count under every XSR_OFFLOAD setting (none, rfa, stage1), each from an empty reference cache: peak "
        "VRAM and time side by side",
    )
    ap.add_argument(
        "--graphs", default="baseline,xsr", help="which graphs to time (comma list of baseline, xsr), in this order"
    )
    ap.add_argument(
        "--memory-history",
        action="store_true",
        help="record every CUDA allocation's Python stack from the start and write e2e_memory_<device>[_tag].txt: "
        "the live allocations at the end by the code that made them (recording slows allocation: time nothing "
        "with it)",
    )
    ap.add_argument(
        "--profile-node",
        default="sample",
        help="with --profile-sampler: the id of the node to profile instead of the KSampler's (e.g. retrieve)",
    )
    ap.add_argument(
        "--profile-sampler",
        action="store_true",
        help="last: per graph, after one unprofiled eager run at the first step count, its KSampler node under "
        "cProfile (functions by own time) in a second run and under torch.profiler (aten ops by count) in a third; "
        "writes e2e_profile_<device>[_tag].txt: where the host time of the XSR graph's extra per-step work goes "
        "(profiling slows both graphs: time nothing with it)",
    )
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    args = ap.parse_args(argv)

    s = session(args.comfy, args.tiny, args.workdir)
    run, new_lr, names, device, captured = s.run, s.new_lr, s.names, s.device, s.captured
    import torch

    if args.memory_history and device == "cuda":
        memory_report.start(torch)
    loaders = next(m for n, m in sys.modules.items() if n.endswith("nodes.loaders"))
    default_offload = loaders.DEFAULT_OFFLOAD  # the pack's default XSR_OFFLOAD policy (and its others below)

    steps_list = [int(s) for s in args.steps.split(",")]
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "comfyui": comfy_version(),
        "command": " ".join(["python", "bench/bench_e2e.py", *(argv or sys.argv[1:])]),
        "tiny": args.tiny,
        "rows": [],
        "checks": [],
    }
    modes = [m for m in args.modes.split(",") if m]
    if args.compile and "compile" not in modes:
        modes.append("compile")
    if device != "cuda" and "cudagraph" in modes:
        print("cudagraph mode: no CUDA here, XSR_CUDAGraph passes the model through (timed anyway)", flush=True)
    out = results_dir(args)
    tag = result_tag(args.tiny, results["device"], args.tag)

    def save_partial():  # a later mode that hangs (compile) must not lose the rows already measured
        (out / f"e2e_{tag}.json").write_text(json.dumps(results, indent=1))

    kinds = [k for k in args.graphs.split(",") if k]
    compile_steps = [int(x) for x in args.compile_steps.split(",") if x]
    if any(m in COMPILED_MODES for m in modes):
        print(
            f"compile mode: steps {compile_steps}, {args.compile_runs} timed run(s) after one warm-up "
            "(the warm-up compiles)",
            flush=True,
        )

    def time_mode(
        mode: str, only_steps: list[int] | None = None, only_kinds: list[str] | None = None, alone: bool = False
    ) -> None:
        """The graphs take turns (A A' A" B B' B" ...: ``--switch-warmups`` untimed runs after every switch, then a
        timed one), so the device's drift over minutes falls on both graphs alike and their ratio is measured side
        by side. The untimed runs absorb what a switch of workflow costs by itself: ComfyUI 0.3.75's default cache
        keeps only the outputs of the last prompt's nodes, so the other graph's loaders run again, and a reloaded
        CLIP vision encoder's CUDA graph is captured at its second call. ``compile`` keeps one block per graph (one
        warm-up that compiles, then its timed runs): a switch could recompile. ``alone``: rows of one graph run on
        its own (``--offload-check``)."""
        compiled = mode in COMPILED_MODES
        for steps in only_steps or (compile_steps if compiled else steps_list):
            order = list(only_kinds or kinds)
            runs = args.compile_runs if compiled else args.runs
            acc = {k: {"times": [], "traces": [], "err": None} for k in order}
            plan = (
                [(k, i) for k in order for i in range(runs + 1)]
                if compiled or len(order) == 1
                else [(k, i) for r in range(runs) for k in order for i in (0,) * args.switch_warmups + (r + 1,)]
            )
            for kind, i in plan:
                a = acc[kind]
                if a["err"] is not None:
                    continue
                try:
                    g = graphs(new_lr(), names, steps, seed=i, mode=mode)[kind]
                    dt, tr = run(g)
                except Exception as e:  # noqa: BLE001 - a failing mode is a result too (e.g. compile)
                    a["err"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"{kind} {mode} {steps}: FAILED {a['err']}", flush=True)
                    continue
                if i > 0:
                    a["times"].append(dt)
                    a["traces"].append(tr)
            for kind in order:
                times, traces, err = acc[kind]["times"], acc[kind]["traces"], acc[kind]["err"]
                peak = (
                    max((r.get("node_peak_gib") or 0) for tr in traces for r in tr)
                    if device == "cuda" and traces
                    else None
                )
                nodes, gc_ms, load_ms = {}, {}, {}
                for tr in traces:
                    for r in tr:
                        nodes.setdefault(r["class"], []).append(r["s"])
                        gc_ms.setdefault(r["class"], []).append(r["gc_s"])
                        load_ms.setdefault(r["class"], []).append(r["load_models_s"])
                row = {
                    "graph": kind,
                    "steps": steps,
                    "compile": compiled,
                    "mode": mode,
                    "offload": os.environ.get("XSR_OFFLOAD") or default_offload,
                    "alone": alone,
                    "median_s": statistics.median(times) if times else None,
                    "runs": times,
                    "peak_vram_gib": peak,
                    "nodes_ms": {c: round(statistics.median(v) * 1000, 2) for c, v in nodes.items()},
                    # inside each node, over its timed runs: Python GC time (sum) and load_models_gpu time (median)
                    "gc_ms_total": {c: round(sum(v) * 1000, 2) for c, v in gc_ms.items() if sum(v)},
                    "load_models_ms": {c: round(statistics.median(v) * 1000, 2) for c, v in load_ms.items() if sum(v)},
                    "gc_full_collections": sum(r["gc_full"] for tr in traces for r in tr),
                    "resident": traces[-1] if traces else None,
                    "executed": [[r["class"] for r in tr] for tr in traces],  # per timed run (cached nodes absent)
                    "error": err,
                }
                results["rows"].append(row)
                save_partial()
                print(json.dumps({k: v for k, v in row.items() if k not in ("resident", "executed")}), flush=True)

    def clear_ref_cache() -> None:
        """Empty XSR_Retrieve's reference cache: rows compared side by side start from the same (cold) cache,
        not from the one the earlier rows warmed (its hits skip the references' decode and ViT pass)."""
        for name, mod in list(sys.modules.items()):
            cache = getattr(mod, "REF_CACHE", None) if name.endswith("nodes.retrieval") else None
            if cache is not None:
                cache.clear()

    for mode in modes:
        if mode not in COMPILED_MODES:
            time_mode(mode)
        if mode == "eager" and args.offload_check and "xsr" in kinds:
            # the XSR eager graph alone (no baseline prompt in between) under every XSR_OFFLOAD setting, the run's
            # own included, each from an empty reference cache: VRAM vs per-image reload, side by side
            before = os.environ.get("XSR_OFFLOAD")
            for policy in loaders.OFFLOAD_POLICIES:
                os.environ["XSR_OFFLOAD"] = policy
                clear_ref_cache()
                time_mode("eager", only_steps=steps_list[:1], only_kinds=["xsr"], alone=True)
            if before is None:
                del os.environ["XSR_OFFLOAD"]
            else:
                os.environ["XSR_OFFLOAD"] = before
    for steps in steps_list:
        if "cudagraph" in modes and "eager" in modes:
            # same LR, same seed: eager vs cudagraph latent after sampling (fp16 noise expected)
            lr = new_lr()
            for kind in ("baseline", "xsr"):
                lat = {}
                for mode in ("eager", "cudagraph"):
                    run(graphs(lr, names, steps, seed=123, mode=mode)[kind])
                    lat[mode] = captured["latent"]
                d = float((lat["eager"] - lat["cudagraph"]).abs().max())
                chk = {
                    "graph": kind,
                    "steps": steps,
                    "check": "latent max abs diff eager vs cudagraph",
                    "value": d,
                    "latent_max_abs": float(lat["eager"].abs().max()),
                }
                results["checks"].append(chk)
                save_partial()
                print(json.dumps(chk), flush=True)
    for mode in modes:  # last: their warm-ups compile, the slowest part of a run
        if mode in COMPILED_MODES:
            time_mode(mode)
    if "compile" in modes and "compile_cudagraph" in modes:
        for steps in compile_steps:  # same LR, same seed: the compiled U-Net eager vs inside XSR_CUDAGraph
            lr = new_lr()
            for kind in kinds:
                lat = {}
                for mode in ("compile", "compile_cudagraph"):
                    run(graphs(lr, names, steps, seed=123, mode=mode)[kind])
                    lat[mode] = captured["latent"]
                chk = {
                    "graph": kind,
                    "steps": steps,
                    "check": "latent max abs diff compile vs compile_cudagraph",
                    "value": float((lat["compile"] - lat["compile_cudagraph"]).abs().max()),
                    "latent_max_abs": float(lat["compile"].abs().max()),
                }
                results["checks"].append(chk)
                save_partial()
                print(json.dumps(chk), flush=True)
    if args.profile_sampler:
        (out / f"e2e_profile_{tag}.txt").write_text(
            profile_sampler(run, new_lr, names, kinds, steps_list[0], results, captured, args.profile_node)
        )
    for name, mod in list(sys.modules.items()):
        cache = getattr(mod, "REF_CACHE", None) if name.endswith("nodes.retrieval") else None
        if cache is not None:
            results["ref_cache"] = {"hits": cache.hits, "misses": cache.misses, "capacity": cache.capacity}
    save_partial()
    lines = [
        f"# End-to-end x16 (32->512), ComfyUI {results['comfyui']} in-process — {results['device']}, "
        f"{results['date']}, torch {results['torch']}",
        "",
        f"`{results['command']}`",
        "",
        "| mode | steps | baseline s | XSR s | overhead | peak VRAM (XSR) GiB |",
        "|---|---|---|---|---|---|",
    ]

    def fmt(v, f="{:.3f}"):
        return "-" if v is None else f.format(v)

    none = {"median_s": None, "peak_vram_gib": None}
    own = os.environ.get("XSR_OFFLOAD") or default_offload
    for steps in sorted(set(steps_list) | set(compile_steps if set(modes) & set(COMPILED_MODES) else [])):
        for mode in modes:
            sel = [
                r
                for r in results["rows"]
                if r["steps"] == steps and r["mode"] == mode and r["offload"] == own and not r.get("alone")
            ]
            if not sel:
                continue
            b = next((r for r in sel if r["graph"] == "baseline"), none)
            x = next((r for r in sel if r["graph"] == "xsr"), none)
            ov = x["median_s"] / b["median_s"] - 1 if x["median_s"] and b["median_s"] else None
            if x is not none:
                x["overhead"] = ov
            lines.append(
                f"| {mode} | {steps} | {fmt(b['median_s'])} | {fmt(x['median_s'])} | "
                f"{fmt(None if ov is None else ov * 100, '{:+.1f} %')} | {fmt(x['peak_vram_gib'], '{:.2f}')} |"
            )
    alone = [r for r in results["rows"] if r.get("alone")]
    if alone:
        lines += [
            "",
            f"XSR_OFFLOAD side by side (this run: {own}; the XSR eager graph alone, no baseline prompt in between, "
            "each setting from an empty reference cache):",
            "",
        ]
        lines += [
            "| XSR_OFFLOAD | steps | XSR s | peak VRAM GiB | Retrieve ms | Enhance ms |",
            "|---|---|---|---|---|---|",
        ]
        for r in alone:
            lines.append(
                f"| {r['offload']} | {r['steps']} | {fmt(r['median_s'])} | {fmt(r['peak_vram_gib'])} | "
                f"{fmt(r['nodes_ms'].get('XSR_Retrieve'), '{:.1f}')} | "
                f"{fmt(r['nodes_ms'].get('XSR_Enhance'), '{:.1f}')} |"
            )
    if set(modes) & set(COMPILED_MODES):
        lines.append(
            f"\ncompile modes (TorchCompileModel, inductor): steps {compile_steps} only, median of "
            f"{args.compile_runs} run(s) after one warm-up run that compiles (other modes: {args.runs} runs)."
        )
    for r in results["rows"]:
        if r["error"]:
            lines.append(f"\n{r['graph']} {r['mode']} {r['steps']} steps failed: `{r['error']}`")
    lines += [
        "",
        "Per node, median ms (CUDA synchronised around each node):",
        "",
        "| graph | mode | steps | " + " | ".join(NODE_COLUMNS) + " | fixed XSR cost |",
        "|---" * (4 + len(NODE_COLUMNS)) + "|",
    ]
    fixed = ("XSR_PrepareLR", "XSR_Retrieve", "XSR_Enhance", "XSR_ColorFix")
    for r in results["rows"]:
        mode_s = f"{r['mode']} (alone, XSR_OFFLOAD={r['offload']})" if r.get("alone") else r["mode"]
        cost = sum(r["nodes_ms"].get(c, 0.0) for c in fixed) if r["graph"] == "xsr" and r["nodes_ms"] else None
        lines.append(
            f"| {r['graph']} | {mode_s} | {r['steps']} | "
            + " | ".join(fmt(r["nodes_ms"].get(c), "{:.1f}") for c in NODE_COLUMNS)
            + f" | {fmt(cost, '{:.1f}')} |"
        )
    lines += [
        "",
        "Inside the nodes, over each row's timed runs: ComfyUI's `load_models_gpu` (median ms per run) and Python's "
        "garbage collector (total ms, full collections):",
        "",
        "| graph | mode | steps | load_models_gpu ms by node | GC ms by node | full GCs |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        mode_s = f"{r['mode']} (alone, XSR_OFFLOAD={r['offload']})" if r.get("alone") else r["mode"]
        loads = ", ".join(f"{c} {v:.1f}" for c, v in r.get("load_models_ms", {}).items()) or "-"
        gcs = ", ".join(f"{c} {v:.1f}" for c, v in r.get("gc_ms_total", {}).items()) or "-"
        full = r.get("gc_full_collections", 0)
        lines.append(f"| {r['graph']} | {mode_s} | {r['steps']} | {loads} | {gcs} | {full} |")
    if results["checks"]:
        lines += ["", "| check | graph | steps | value | latent scale |", "|---|---|---|---|---|"]
        for c in results["checks"]:
            lines.append(
                f"| {c['check']} | {c['graph']} | {c['steps']} | {c['value']:.3g} | {c['latent_max_abs']:.3g} |"
            )
    if "ref_cache" in results:
        rc = results["ref_cache"]
        lines += [
            "",
            f"XSR_Retrieve reference cache over the whole run: {rc['hits']} hits, {rc['misses']} misses "
            f"(capacity {rc['capacity']}; the bench DB holds 256 images, so references repeat across prompts).",
        ]
    xr = next((r for r in results["rows"] if r["graph"] == "xsr" and r["resident"]), None)
    if xr:
        lines += [
            "",
            f"Resident on the GPU after each node (XSR graph, {xr['mode']}, {xr['steps']} steps, last run; "
            "ComfyUI loaded models in MiB, allocated and the node's own peak in GiB):",
            "",
            "| node | resident models | allocated | node peak |",
            "|---|---|---|---|",
        ]
        for r in xr["resident"]:
            res_s = ", ".join(f"{n} {m}" for n, m in r["resident_mib"]) or "-"
            lines.append(
                f"| {r['class']} | {res_s} | {fmt(r.get('allocated_gib'), '{:.2f}')} | "
                f"{fmt(r.get('node_peak_gib'), '{:.2f}')} |"
            )
    md = "\n".join(lines) + "\n"
    print(md)
    (out / f"e2e_{tag}.json").write_text(json.dumps(results, indent=1))
    (out / f"e2e_{tag}.md").write_text(md)
    if args.memory_history and device == "cuda":  # last: it clears cuBLAS's workspaces
        text = f"{results['command']}\n{results['date']}\n\n{memory_report.report(torch, s.mm)}\n"
        print(text)
        (out / f"e2e_memory_{tag}.txt").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
