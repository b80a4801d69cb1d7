"""In-process ComfyUI checks of XSR_CUDAGraph (nodes/cudagraph.py), run in a subprocess by test_cudagraph.py.

Usage: python cudagraph_worker.py COMFY_DIR REPO ZOO_MODELS_DIR OUT_JSON {cpu|cuda}

Samples the tiny zoo (checkpoint + ControlNet, CFG, euler) through ``comfy.sample.sample`` eagerly and
through the CUDA-graph wrappers, and records the differences and the wrappers' decisions.
``cpu`` uses a replay backend that re-runs the captured closure on the static buffers (the decision
logic, the per-plan conditioning and the static-buffer protocol are all real; only the CUDA graph is
replaced); ``cuda`` uses torch.cuda.CUDAGraph.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path

from worker_boot import boot

COMFY_DIR, REPO, MODELS, OUT = (Path(a) for a in sys.argv[1:5])
MODE = sys.argv[5]
boot(COMFY_DIR, REPO, cpu=MODE == "cpu", stub_av=True)
import comfy.controlnet  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402
from comfy.patcher_extension import WrappersMP  # noqa: E402

cg = importlib.import_module("comfyui_xsr.nodes.cudagraph")
binding = importlib.import_module("comfyui_xsr.nodes.comfy_binding")
core_adapter = importlib.import_module("comfyui_xsr.xsr_core.adapter")
zoo = importlib.import_module("comfyui_xsr.xsr_core.testing.zoo")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


log = Records()
logging.getLogger(cg.__name__).addHandler(log)
logging.getLogger(cg.__name__).setLevel(logging.INFO)


class RerunBackend:
    """CPU stand-in for CudaGraphBackend: 'replay' re-runs the captured closure and writes into the outputs."""

    device_type = "cpu"
    captures = 0
    warm_ups = 0

    def warm_up(self, fn):
        RerunBackend.warm_ups += 1
        fn()

    def capture(self, fn):
        RerunBackend.captures += 1
        outputs = fn()

        def replay():
            for dst, src in zip(outputs, fn()):
                dst.copy_(src)

        return replay, outputs


backend = RerunBackend if MODE == "cpu" else None
device = comfy.model_management.get_torch_device()
model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
    str(MODELS / "checkpoints" / zoo.CHECKPOINT_NAME), output_vae=True, output_clip=True
)
control = comfy.controlnet.load_controlnet(str(MODELS / "controlnet" / zoo.CONTROLNET_NAME))
g = torch.Generator().manual_seed(3)
ctx_dim = model.model.model_config.unet_config["context_dim"]
pos_ctx = torch.randn(1, 77, ctx_dim, generator=g)
neg_ctx = torch.randn(1, 77, ctx_dim, generator=g)
hint = torch.rand(1, 64, 64, 3, generator=g)


def conditioning(window=(0.0, 1.0), cnet=True):
    pos, neg = [[pos_ctx, {}]], [[neg_ctx, {}]]
    if cnet:
        c = control.copy().set_cond_hint(hint.movedim(-1, 1), 1.0, window)
        pos = [[pos_ctx, {"control": c, "control_apply_to_uncond": False}]]
        neg = [[neg_ctx, {"control": c, "control_apply_to_uncond": False}]]
    return pos, neg


def sample(m, steps=6, size=8, window=(0.0, 1.0), cnet=True, callback=None):
    pos, neg = conditioning(window, cnet)
    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        out = comfy.sample.sample(
            m, noise, steps, 5.0, "euler", "normal", pos, neg, latent, seed=7, callback=callback, disable_pbar=True
        )
    return out.float().cpu()


def graph_model(m):
    """``m`` under XSR_CUDAGraph's wrappers, its sampling object, and the list its finished sampling runs' counters
    are appended to."""
    gm = cg.apply_cudagraph(m, backend_factory=backend)
    sampling = gm.get_wrappers(WrappersMP.CALC_COND_BATCH, cg.WRAPPER_KEY)[0].__self__
    runs: list = []
    orig_outer = sampling.outer_sample

    def spy_outer(executor, *a, **k):  # keep the finished run's counters for the report
        def inner(*aa, **kk):
            try:
                return executor(*aa, **kk)
            finally:
                runs.append(sampling.run)

        return orig_outer(inner, *a, **k)

    gm.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, cg.WRAPPER_KEY)
    gm.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, cg.WRAPPER_KEY, spy_outer)
    return gm, sampling, runs


def diff(a, b):
    return float((a - b).abs().max())


res: dict = {"mode": MODE}
steps_seen = []

# 1. plain SD + ControlNet: same result, one warm-up, then replays; progress callback every step
eager = sample(model)
gm, sampling, runs = graph_model(model)
graphed = sample(gm, callback=lambda i, *a: steps_seen.append(i))
r = runs[-1]
res["plain"] = {
    "maxdiff": diff(eager, graphed),
    "scale": float(eager.abs().max()),
    "replays": r.replays,
    "eager_steps": r.eager_steps,
    "graphs": len(r.graphs),
    "refused": r.refused,
    "callback_steps": steps_seen,
}


# 1b. interrupt from the progress callback while replaying: the run stops at the next step, the next run works
def interrupt_at_3(i, *a):
    if i == 3:
        comfy.model_management.interrupt_current_processing(True)


try:
    sample(gm, callback=interrupt_at_3)
    res["interrupt"] = {"raised": False}
except comfy.model_management.InterruptProcessingException:
    res["interrupt"] = {"raised": True, "replays_before": runs[-1].replays}
comfy.model_management.interrupt_current_processing(False)

# 2. a second run (new conditioning objects): graphs are per run and re-made
graphed2 = sample(gm)
res["second_run"] = {"maxdiff": diff(eager, graphed2), "replays": runs[-1].replays, "graphs": len(runs[-1].graphs)}

# 3. a ControlNet window (0..0.5): steps outside it run eagerly, the rest replay, same result
eager_w = sample(model, steps=8, window=(0.0, 0.5))
log.lines.clear()
graphed_w = sample(gm, steps=8, window=(0.0, 0.5))
r = runs[-1]
res["window"] = {
    "maxdiff": diff(eager_w, graphed_w),
    "replays": r.replays,
    "eager_steps": r.eager_steps,
    "graphs": len(r.graphs),
    "log": list(log.lines),
    "refused": r.refused,
}

# 4. an unknown wrapper key and an unknown patch: the run is eager (same result), one log line each
foreign = gm.clone()
foreign.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "someone_else", lambda executor, *a, **k: executor(*a, **k))
log.lines.clear()
res["unknown_wrapper"] = {"maxdiff": diff(eager, sample(foreign)), "refused": runs[-1].refused, "log": list(log.lines)}
patched_foreign = gm.clone()
patched_foreign.set_model_attn2_patch(lambda n, c, v, extra: (n, c, v))
log.lines.clear()
res["unknown_patch"] = {
    "maxdiff": diff(eager, sample(patched_foreign)),
    "refused": runs[-1].refused,
    "log": list(log.lines),
}

# 5. the XSR AdaIN patches (XSR's own wrappers and patches) are captured
embed_dim = 24
ad_cfg = core_adapter.AdaINAdapterConfig.from_unet_config(
    zoo.TINY_UNET_CONFIG, embed_dim=embed_dim, include_controlnet=True
)
adapter = core_adapter.AdaINAdapter(ad_cfg).eval()
with torch.no_grad():
    adapter.gates.uniform_(0.3, 0.9, generator=torch.Generator().manual_seed(1))
ap = binding.make_adapter_patcher(adapter)  # what XSR_LoadAdaINAdapter makes
runtime = binding.AdaINRuntime(ap, strength=1.0)
xsr_model = binding.patch_unet(model, runtime)
xsr_cn = binding.patch_controlnet(control, runtime)
E = torch.randn(1, 257, embed_dim, generator=g)


def sample_xsr(m, steps=6):
    c = xsr_cn.copy().set_cond_hint(hint.movedim(-1, 1), 1.0, (0.0, 1.0))
    pos = [
        [
            pos_ctx,
            {"control": c, "control_apply_to_uncond": False, "model_conds": {binding.XSR_KEY: binding.CONDXSR(E)}},
        ]
    ]
    neg = [[neg_ctx, {"control": c, "control_apply_to_uncond": False}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        return (
            comfy.sample.sample(m, noise, steps, 5.0, "euler", "normal", pos, neg, latent, seed=7, disable_pbar=True)
            .float()
            .cpu()
        )


eager_x = sample_xsr(xsr_model)
gx, sx, sx_runs = graph_model(xsr_model)
graphed_x = sample_xsr(gx)
res["xsr"] = {
    "maxdiff": diff(eager_x, graphed_x),
    "adapter_effect": diff(eager_x, eager),
    "replays": sx_runs[-1].replays,
    "refused": sx_runs[-1].refused,
    "outermost": next(iter(gx.wrappers[WrappersMP.CALC_COND_BATCH])),
}

# 5b. ComfyUI's TorchCompileModel wrapper under XSR_CUDAGraph (aot_eager on the CPU: dynamo + AOTAutograd without
# a C++ toolchain; inductor on CUDA): captured, not refused; equal to the compiled eager run; no recompilation at
# capture or replay (the CPU backend re-runs the compiled code at every replay, guards included); static_refusal
# refuses the settings that record CUDA graphs themselves
from comfy_api.torch_helpers import set_torch_compile_wrapper  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

compile_backend = "aot_eager" if MODE == "cpu" else "inductor"


def compiled(m, backend=compile_backend, **kw):
    cm = m.clone()
    set_torch_compile_wrapper(model=cm, backend=backend, **kw)
    return cm


def frames():
    return int(counters["stats"]["unique_graphs"])


torch._dynamo.reset()
counters.clear()
warm_ups_before = res["warm_ups_uncompiled"] = RerunBackend.warm_ups  # sections 1-5 captured uncompiled models
eager_cx = sample_xsr(compiled(xsr_model))
frames_eager = frames()
gcx, scx, scx_runs = graph_model(compiled(xsr_model))
log.lines.clear()
graphed_cx = sample_xsr(gcx)
first = scx_runs[-1]
frames_after_graph = frames()
graphed_cx2 = sample_xsr(gcx)  # a second run: the kept graph, new static-buffer values
res["compile"] = {
    "backend": compile_backend,
    "maxdiff": diff(eager_cx, graphed_cx),
    "maxdiff_second": diff(eager_cx, graphed_cx2),
    "vs_uncompiled": diff(eager_cx, eager_x),
    "scale": float(eager_x.abs().max()),
    "refused": first.refused,
    "replays": first.replays,
    "captures": first.captures,
    "second_reused": scx_runs[-1].reused,
    "frames_eager": frames_eager,
    "frames_added_by_graph_runs": frames() - frames_eager,
    "frames_added_by_first_graph_run": frames_after_graph - frames_eager,  # its warm-up pass may compile (CUDA)
    "frames_added_by_second_graph_run": frames() - frames_after_graph,
    "warm_ups": RerunBackend.warm_ups - warm_ups_before,  # CPU backend: eager passes before a capture
    "log": list(log.lines),
}


def compile_options(cm):
    """The model options calc_cond_batch sees for ``cm`` (ComfyUI merges the patcher's wrappers in at sampling)."""
    return {**cm.model_options, "transformer_options": {"wrappers": cm.wrappers}}


res["compile_refusals"] = {
    name: cg.static_refusal(compile_options(compiled(model, **kw)), [[], None])
    for name, kw in {
        "cudagraphs_backend": {"backend": "cudagraphs"},
        "reduce_overhead": {"backend": "inductor", "mode": "reduce-overhead"},
        "inductor_cudagraphs_option": {"backend": "inductor", "options": {"triton.cudagraphs": True}},
        "inductor": {"backend": "inductor"},
        "max_autotune_no_cudagraphs": {"backend": "inductor", "mode": "max-autotune-no-cudagraphs"},
    }.items()
}
impostor = model.clone()
impostor.add_wrapper_with_key(WrappersMP.APPLY_MODEL, cg.COMPILE_KEY, lambda executor, *a, **k: executor(*a, **k))
impostor.model_options[cg.COMPILE_KWARGS_KEY] = {"backend": "inductor"}
res["compile_refusals"]["not_comfyui_wrapper"] = cg.static_refusal(compile_options(impostor), [[], None])
torch._dynamo.reset()

# 6. recapture on a shape change inside one run, and the lowvram refusal (direct calls)
calls = []


def fake_executor(m, conds, x, t, mo):
    calls.append(tuple(x.shape))
    return [x * 2 + t.view(-1, 1, 1, 1), x * 3]


s = cg.CudaGraphSampling(backend_factory=RerunBackend if MODE == "cpu" else None)
s.run = cg._Run()
dev = torch.device("cpu") if MODE == "cpu" else device
mo = {"transformer_options": {}}
log.lines.clear()
outs = []
for shape in [(2, 4, 8, 8)] * 3 + [(2, 4, 16, 16)] * 3 + [(2, 4, 8, 8)]:
    x = torch.randn(shape, device=dev)
    t = torch.full((shape[0],), 5.0, device=dev)
    got = s.calc_cond_batch(fake_executor, None, [[], None], x, t, mo)
    outs.append(max(diff(got[0].cpu(), (x * 2 + 5.0).cpu()), diff(got[1].cpu(), (x * 3).cpu())))
res["shapes"] = {
    "graphs": len(s.run.graphs),
    "replays": s.run.replays,
    "eager": s.run.eager_steps,
    "maxdiff": max(outs),
    "log": list(log.lines),
}


class FakeModel:
    model_lowvram = True


class FakePatcher:
    model = FakeModel()
    load_device = device

    def loaded_size(self):
        return 1

    def model_size(self):
        return 1

    def get_additional_models(self):
        return []


class Holder:
    current_patcher = FakePatcher()


res["lowvram_reason"] = cg.residency_refusal(Holder(), [[], None])
res["static_none_for_plain"] = cg.static_refusal({"transformer_options": {}}, [[], None])

# 7. the node on this device
node_out = cg.XSRCUDAGraph.execute(model)
res["node_passthrough"] = node_out.result[0] is model


# 8. graphs kept across prompts: a second prompt with a new LR (hint), caption (text context), seed and image
# embedding replays the first prompt's graph (no capture) and matches eager
def prompt(m, seed, ctx, hnt, embed=None, cn=control, steps=6, strength=1.0):
    c = cn.copy().set_cond_hint(hnt.movedim(-1, 1), strength, (0.0, 1.0))
    pos_opts = {"control": c, "control_apply_to_uncond": False}
    if embed is not None:
        pos_opts[binding.XSR_KEY] = binding.CONDXSR(embed)  # as XSR_Enhance attaches it (attach_embedding)
    pos, neg = [[ctx, pos_opts]], [[neg_ctx, {"control": c, "control_apply_to_uncond": False}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        out = comfy.sample.sample(
            m, noise, steps, 5.0, "euler", "normal", pos, neg, latent, seed=seed, disable_pbar=True
        )
    return out.float().cpu()


g2 = torch.Generator().manual_seed(11)
prompts = [
    (7, pos_ctx, hint, E),
    (
        21,
        torch.randn(1, 77, ctx_dim, generator=g2),
        torch.rand(1, 64, 64, 3, generator=g2),
        torch.randn(1, 257, 24, generator=g2),
    ),
    (
        33,
        torch.randn(1, 77, ctx_dim, generator=g2),
        torch.rand(1, 64, 64, 3, generator=g2),
        torch.randn(1, 257, 24, generator=g2),
    ),
]
for name, eager_m, graph_m, samp, spy, cnet in (
    ("reuse_plain", model, gm, sampling, runs, control),
    ("reuse_xsr", xsr_model, gx, sx, sx_runs, xsr_cn),
):
    samp.drop_graphs("test: start afresh")
    per = []
    for seed, ctx, hnt, embed in prompts:
        emb = embed if name == "reuse_xsr" else None
        ref = prompt(eager_m, seed, ctx, hnt, emb, cnet)
        got = prompt(graph_m, seed, ctx, hnt, emb, cnet)
        r = spy[-1]
        per.append(
            {
                "maxdiff": diff(ref, got),
                "scale": float(ref.abs().max()),
                "captures": r.captures,
                "reused": r.reused,
                "replays": r.replays,
                "eager_steps": r.eager_steps,
                "refused": r.refused,
            }
        )
    per_seed_differs = diff(
        prompt(eager_m, 21, *prompts[1][1:3], prompts[1][3] if name == "reuse_xsr" else None, cnet), ref
    )
    res[name] = {
        "runs": per,
        "kept": len(samp.kept),
        "captures_total": samp.captures,
        "prompts_differ": per_seed_differs,
    }

# 8b. a setting baked into the graph (the ControlNet strength) is part of the key: a new capture, eager result
ref = prompt(model, 21, *prompts[1][1:3], strength=0.5)
got = prompt(gm, 21, *prompts[1][1:3], strength=0.5)
res["reuse_other_strength"] = {"maxdiff": diff(ref, got), "captures": runs[-1].captures, "reused": runs[-1].reused}

# 9. invalidation: weights moved (fingerprint), the detach callback, the bound on kept graphs; freed with the MODEL
import gc  # noqa: E402
import weakref  # noqa: E402

log.lines.clear()
sampling.fingerprint = (0,)  # as if the weights had moved since the last run
prompt(gm, 5, pos_ctx, hint)
res["moved"] = {"captures": runs[-1].captures, "reused": runs[-1].reused, "log": list(log.lines)}
log.lines.clear()
for cb in gm.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_DETACH):
    cb(gm, True)
res["detach"] = {"kept": len(sampling.kept), "log": list(log.lines)}

bound = cg.CudaGraphSampling(backend_factory=RerunBackend if MODE == "cpu" else None)
for size in (8, 12, 16, 20, 24, 28):
    bound.run = cg._Run()
    for _ in range(3):
        xx = torch.randn(2, 4, size, size, device=dev)
        bound.calc_cond_batch(fake_executor, None, [[], None], xx, torch.full((2,), 5.0, device=dev), mo)
res["bound"] = {"kept": len(bound.kept), "limit": cg.keep_limit(), "captures": bound.captures}

holder = cg.apply_cudagraph(model, backend_factory=backend)
hs = holder.get_wrappers(WrappersMP.CALC_COND_BATCH, cg.WRAPPER_KEY)[0].__self__
prompt(holder, 5, pos_ctx, hint)
ref_s = weakref.ref(hs)
had = len(hs.kept)
del holder, hs
gc.collect()
res["freed_with_model"] = {"had_graphs": had, "alive_after_del": ref_s() is not None}

# 9b. the ViT graphs' per-model state must not keep the model alive (a reloaded encoder would leak its weights)
retrieval = importlib.import_module("comfyui_xsr.nodes.retrieval")
vg_weak = retrieval.VisionGraphs()
tower = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.LayerNorm(4)))
st_weak = vg_weak._state(tower)
ref_tower = weakref.ref(tower)
res["vision_state"] = {"submodules": len(st_weak["modules"])}
del tower, st_weak
gc.collect()
res["vision_state"].update(alive_after_del=ref_tower() is not None, states=len(vg_weak._per_model))

# 9c. XSR_Enhance's text-encoder hook (every device): for the time of the block the CLIPEncoder's forward goes
# through the graphs' run() (here a recording pass-through), same result, restored after (also on an error);
# on-the-fly weight patches keep it eager
enhance = importlib.import_module("comfyui_xsr.nodes.enhance")
clip_model = importlib.import_module("comfy.clip_model")


class RecordingText(enhance.TextGraphs):
    def __init__(self):
        super().__init__()
        self.calls: list = []

    @staticmethod
    def usable(clip) -> bool:
        return True

    def run(self, module, call, inputs, extra=()):
        self.calls.append((type(module).__name__, [list(t.shape) for t in inputs], [str(e) for e in extra]))
        return call(*inputs)


try:
    rec = RecordingText()
    toks = clip.tokenize("a red brick house, photo")
    with torch.inference_mode():
        ref_c, ref_p = clip.encode_from_tokens(toks, return_pooled=True)
        with rec.hooked(clip):
            encs = [m for m in clip.cond_stage_model.modules() if type(m) is clip_model.CLIPEncoder]
            hooked_inside = all("forward" in e.__dict__ for e in encs)
            got_c, got_p = clip.encode_from_tokens(toks, return_pooled=True)
        left_after = [e for e in encs if "forward" in e.__dict__]
        try:
            with rec.hooked(clip):
                raise KeyError("boom")
        except KeyError:
            pass
        left_after_error = [e for e in encs if "forward" in e.__dict__]
        n_calls = len(rec.calls)
        lin = next(m for m in encs[0].modules() if hasattr(m, "weight_function"))
        lin.weight_function = [lambda w: w]  # what a lowvram LoRA patch installs
        try:
            with rec.hooked(clip):
                clip.encode_from_tokens(toks, return_pooled=True)
        finally:
            lin.weight_function = []
    res["text_hook"] = {
        "encoders": len(encs),
        "hooked_inside": hooked_inside,
        "calls": rec.calls[:n_calls],
        "calls_when_patched": len(rec.calls) - n_calls,
        "left_after": len(left_after),
        "left_after_error": len(left_after_error),
        "maxdiff": max(diff(got_c.float().cpu(), ref_c.float().cpu()), diff(got_p.float().cpu(), ref_p.float().cpu())),
        "real_usable": enhance.TextGraphs.usable(clip),
    }
except Exception as e:  # noqa: BLE001
    res["text_hook"] = {"error": f"{type(e).__name__}: {e}"}

# 10b. XSR_Enhance's CLIP text-encoder CUDA graphs (CUDA only): new captions replay the graph, equal eager
if MODE == "cuda":
    try:
        tg = enhance.TextGraphs()
        comfy.model_management.load_model_gpu(clip.patcher)
        worst, n = 0.0, 0
        texts = ["a red brick house", "two dogs on a beach at sunset", "macro photo of a leaf", "a city street"]
        with torch.inference_mode():
            for t in texts:
                toks = clip.tokenize(t)
                ref_c, ref_p = clip.encode_from_tokens(toks, return_pooled=True)
                with tg.hooked(clip):
                    got_c, got_p = clip.encode_from_tokens(toks, return_pooled=True)
                worst = max(
                    worst,
                    diff(got_c.float().cpu(), ref_c.float().cpu()),
                    diff(got_p.float().cpu(), ref_p.float().cpu()),
                )
            memo = enhance._encode_text(clip, "a wired-in caption, not seen before")
        res["text_graphs"] = {
            "usable": enhance.TextGraphs.usable(clip),
            "captures": tg.captures,
            "replays": tg.replays,
            "maxdiff": worst,
            "scale": float(ref_c.abs().max()),
            "off": [st["off"] for st in tg._per_model.values()],
            "node_states": len(enhance.TEXT_GRAPHS._per_model),
            "memo_shape": list(memo[0].shape),
        }
    except Exception as e:  # noqa: BLE001
        res["text_graphs"] = {"error": f"{type(e).__name__}: {e}"}

# 10. XSR_Retrieve's CLIP vision CUDA graphs (CUDA only): warm-up, capture, replays equal eager for new pixels
if MODE == "cuda":
    try:  # recorded, not raised: the sections above must still reach the report
        import comfy.clip_vision  # noqa: E402

        retrieval = importlib.import_module("comfyui_xsr.nodes.retrieval")
        cv = comfy.clip_vision.load(str(MODELS / "clip_vision" / zoo.CLIP_VISION_NAME))
        comfy.model_management.load_model_gpu(cv.patcher)
        vg = retrieval.VisionGraphs()
        worst = 0.0
        with torch.inference_mode():
            for i in range(4):
                pix = torch.randn(4, 3, 224, 224, device=device, generator=None)
                got = vg(cv.model.vision_model, pix)
                ref = cv.model.vision_model(pixel_values=pix)
                worst = max(
                    worst,
                    diff(got[0].float().cpu(), ref[0].float().cpu()),
                    diff(got[2].float().cpu(), ref[2].float().cpu()),
                )
        res["vision_graphs"] = {
            "captures": vg.captures,
            "replays": vg.replays,
            "maxdiff": worst,
            "off": [st["off"] for st in vg._per_model.values()],
        }
        ref_cv = weakref.ref(cv.model.vision_model)
        comfy.model_management.unload_all_models()
        del cv, got, ref
        gc.collect()
        res["vision_graphs"].update(alive_after_del=ref_cv() is not None, states_after_del=len(vg._per_model))

    except Exception as e:  # noqa: BLE001
        res["vision_graphs"] = {"error": f"{type(e).__name__}: {e}"}

# 11. XSR's CLIP vision compute dtype on CUDA: fp16 weights run in fp16 (ComfyUI's own CLIPVisionEncode feeds
# float32 pixels: every weight cast up and float32 GEMMs); the features agree with that float32 run
if MODE == "cuda":
    try:
        import comfy.clip_vision  # noqa: E402

        common = importlib.import_module("comfyui_xsr.nodes.common")
        cv = comfy.clip_vision.load(str(MODELS / "clip_vision" / zoo.CLIP_VISION_NAME))
        imgs = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(11))
        with torch.inference_mode():
            half = common.encode_clip(cv, imgs, lr=True, to_intermediate=False)
            pix = common.preprocess_lr(imgs.to(cv.load_device)).float()
            x32, _, pooled32 = cv.model.vision_model(pixel_values=pix)

        def cos(a, b):
            return float(torch.nn.functional.cosine_similarity(a.float().flatten(1), b.float().flatten(1)).min())

        res["vision_dtype"] = {
            "weights": str(common.vision_weight_dtype(cv)),
            "compute": str(common.vision_compute_dtype(cv)),
            "tokens_cos_min": cos(half.tokens, x32),
            "cls_cos_min": cos(half.cls, pooled32),
        }
    except Exception as e:  # noqa: BLE001
        res["vision_dtype"] = {"error": f"{type(e).__name__}: {e}"}

OUT.write_text(json.dumps(res, indent=1))
