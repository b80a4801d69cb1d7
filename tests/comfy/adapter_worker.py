"""In-process ComfyUI checks of the AdaIN adapter binding, run in a subprocess by test_adapter_comfy.py.

Usage: python adapter_worker.py COMFY_DIR REPO ZOO_MODELS_DIR OUT_JSON

Loads the tiny zoo through ComfyUI's real loaders (checkpoint + ControlNet) and through diffusers'
single-file loaders, attaches the same non-zero adapter in both, and records max-abs differences.
Runs in its own process because ComfyUI's modules keep global state and a top-level ``nodes``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

from worker_boot import boot

COMFY_DIR, REPO, MODELS, OUT = (Path(a) for a in sys.argv[1:5])
boot(COMFY_DIR, REPO, cpu=True)
import comfy.controlnet  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402

binding = importlib.import_module("comfyui_xsr.nodes.comfy_binding")
core_adapter = importlib.import_module("comfyui_xsr.xsr_core.adapter")
diff_binding = importlib.import_module("comfyui_xsr.xsr_core.adapter.diffusers_binding")
zoo = importlib.import_module("comfyui_xsr.xsr_core.testing.zoo")
from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: E402

ckpt = MODELS / "checkpoints" / zoo.CHECKPOINT_NAME
cn_path = MODELS / "controlnet" / zoo.CONTROLNET_NAME
dfolder = MODELS / "diffusers" / zoo.DIFFUSERS_DIR

model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)
control = comfy.controlnet.load_controlnet(str(cn_path))
unet_d = UNet2DConditionModel.from_single_file(
    str(ckpt), config=str(dfolder), subfolder="unet", local_files_only=True
).eval()
cn_d = ControlNetModel.from_single_file(str(cn_path), config=str(dfolder / "controlnet"), local_files_only=True).eval()

embed_dim = 24
cfg = core_adapter.AdaINAdapterConfig.from_unet_config(
    dict(unet_d.config), embed_dim=embed_dim, include_controlnet=True
)
adapter = core_adapter.AdaINAdapter(cfg).eval()
with torch.no_grad():
    g = torch.Generator().manual_seed(1)
    adapter.head.weight.normal_(0, 0.3, generator=g)
    adapter.gates.uniform_(0.3, 0.9, generator=g)
adapter_patcher = binding.make_adapter_patcher(adapter)  # what XSR_LoadAdaINAdapter makes (CPU here)

ms = model.get_model_object("model_sampling")
ctx = torch.randn(2, 77, 32)
E = torch.randn(2, 257, embed_dim)
x = torch.randn(2, 4, 8, 8)
hint = torch.rand(2, 3, 64, 64)


def comfy_eps(patcher, sigma, active, control_obj=None, embed=E):
    """eps prediction of a (patched) ComfyUI model at ``sigma`` for rows with ``active`` flags.

    Goes through ``BaseModel.apply_model`` with the patcher's wrappers, as the sampler does."""
    comfy.model_management.load_models_gpu([patcher] + ([control_obj.control_model_wrapped] if control_obj else []))
    base = patcher.model
    to = comfy.model_patcher.create_model_options_clone(patcher.model_options)["transformer_options"]
    comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    s = torch.full((x.shape[0],), sigma)
    to["sigmas"] = s
    t = base.model_sampling.timestep(s).float()
    kwargs = {}
    if embed is not None:
        parts = [binding.CONDXSR(embed[i : i + 1], bool(active[i, 0] > 0.5)) for i in range(embed.shape[0])]
        kwargs = {binding.XSR_KEY: parts[0].concat(parts[1:])}
    ctrl = None
    if control_obj is not None:
        c = control_obj.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
        c.pre_run(base, lambda p: base.model_sampling.percent_to_sigma(p))
        cond = {"c_crossattn": ctx, **kwargs}
        ctrl = c.get_control(x, s, cond, 1, to)
    with torch.no_grad():
        denoised = base.apply_model(x, s, c_crossattn=ctx, control=ctrl, transformer_options=to, **kwargs)
    return (x - denoised) / s[:, None, None, None], t


def diffusers_eps(sigma, t, rows, with_adapter, with_control):
    s = torch.full((x.shape[0],), sigma)
    xc = x / (s[:, None, None, None] ** 2 + 1) ** 0.5
    b = diff_binding.DiffusersAdapterBinding(adapter, unet=unet_d, controlnet=cn_d if with_control else None)
    try:
        with torch.no_grad():
            ctx_mgr = b.embedding(E, rows=rows) if with_adapter else _null()
            with ctx_mgr:
                kw = {}
                if with_control:
                    down, mid = cn_d(xc, t, ctx, controlnet_cond=hint, return_dict=False)
                    kw = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
                return unet_d(xc, t, ctx, **kw).sample
    finally:
        b.detach()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


results: dict = {"parity": [], "gate0": {}, "stack": {}}
runtime = binding.AdaINRuntime(adapter_patcher, strength=1.0)
patched = binding.patch_unet(model, runtime)
patched_cn = binding.patch_controlnet(control, runtime)
active = torch.tensor([[1.0], [0.0]])  # row 0 cond (adapter), row 1 uncond (untouched)
rows = [True, False]

for sigma in (
    float(ms.sigma(torch.tensor(999.0))),
    float(ms.sigma(torch.tensor(500.0))),
    float(ms.sigma(torch.tensor(20.0))),
):
    for with_control in (False, True):
        out_c, t = comfy_eps(patched, sigma, active, patched_cn if with_control else None)
        ref_adapted = diffusers_eps(sigma, t, rows, True, with_control)
        ref_plain = diffusers_eps(sigma, t, rows, False, with_control)
        results["parity"].append(
            {
                "sigma": sigma,
                "control": with_control,
                "cond_maxdiff": float((out_c[0] - ref_adapted[0]).abs().max()),
                "uncond_maxdiff": float((out_c[1] - ref_plain[1]).abs().max()),
                "adapter_effect": float((ref_adapted[0] - ref_plain[0]).abs().max()),
                "ref_scale": float(ref_plain.abs().max()),
            }
        )

# gate 0 / strength 0: bit-identical to the unpatched model (U-Net and ControlNet)
sigma = float(ms.sigma(torch.tensor(500.0)))
plain, _ = comfy_eps(model, sigma, active, control, embed=None)
plain_again, _ = comfy_eps(model, sigma, active, control, embed=None)
results["gate0"]["plain_deterministic"] = bool(torch.equal(plain, plain_again))
zero_rt = binding.AdaINRuntime(adapter_patcher, strength=0.0)
out0, _ = comfy_eps(
    binding.patch_unet(model, zero_rt), sigma, torch.ones(2, 1), binding.patch_controlnet(control, zero_rt)
)
results["gate0"]["strength0_equal"] = bool(torch.equal(out0, plain))
saved_gates = adapter.gates.detach().clone()
with torch.no_grad():
    adapter.gates.zero_()
outg, _ = comfy_eps(patched, sigma, torch.ones(2, 1), patched_cn)
results["gate0"]["gates0_equal"] = bool(torch.equal(outg, plain))
with torch.no_grad():
    adapter.gates.copy_(saved_gates)
outa, _ = comfy_eps(patched, sigma, torch.ones(2, 1), patched_cn)
results["gate0"]["nonzero_changes"] = bool(not torch.equal(outa, plain))


# clone() and stacking with an IPAdapter-style attn2 replace, in both orders. The replace below has the
# shape of ComfyUI_IPAdapter_plus's Attn2Replace (a list of callbacks; a second application on the same
# key calls .add() on the entry already there) and is registered under IPAdapter's SD1.5 keys: 2-tuples
# ("input", i), ("output", i) and ("middle", 1) (the last matches no block in ComfyUI, whose middle block
# reports ("middle", 0), so 15 of IPAdapter's 16 keys are live).
import comfy.ldm.modules.attention  # noqa: E402

IPA_KEYS = [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)] + [("middle", 1)]


class IPAStyleAttn2Replace:
    calls = 0

    def __init__(self, callback, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        out = comfy.ldm.modules.attention.optimized_attention(q, k, v, extra_options["n_heads"])
        for cb, kw in zip(self.callback, self.kwargs):
            out = out + cb(out, q, k, v, extra_options, **kw)
        return out.to(q.dtype)


def ip_attention(out, q, k, v, extra_options, weight=1.0):
    """An image-prompt attention term that depends on Q (so it sees whether XSR adapted Q first)."""
    IPAStyleAttn2Replace.calls += 1
    ip_k, ip_v = k.flip(1) * 0.5, v.roll(1, dims=1)
    return comfy.ldm.modules.attention.optimized_attention(q, ip_k, ip_v, extra_options["n_heads"]) * weight


def apply_ipa_style(patcher, weight):
    """Registers ip_attention the way IPAdapter does: copy the option dicts, new entry or .add() onto it."""
    m = patcher.clone()
    options = m.model_options["transformer_options"].copy()
    patches = options.get("patches_replace", {}).copy()
    attn2 = patches.get("attn2", {}).copy()
    for key in IPA_KEYS:
        if key in attn2:
            attn2[key].add(ip_attention, weight=weight)
        else:
            attn2[key] = IPAStyleAttn2Replace(ip_attention, weight=weight)
    patches["attn2"] = attn2
    options["patches_replace"] = patches
    m.model_options["transformer_options"] = options
    return m


def eps_calls(patcher):
    IPAStyleAttn2Replace.calls = 0
    out, _ = comfy_eps(patcher, sigma, torch.ones(2, 1))
    return out, IPAStyleAttn2Replace.calls


xsr_only, _ = eps_calls(patched.clone())
ipa_only, n_ipa = eps_calls(apply_ipa_style(model, 0.7))
xsr_then_ipa, n1 = eps_calls(apply_ipa_style(binding.patch_unet(model, runtime), 0.7))
ipa_then_xsr, n2 = eps_calls(binding.patch_unet(apply_ipa_style(model, 0.7), runtime).clone())
added, n3 = eps_calls(apply_ipa_style(apply_ipa_style(binding.patch_unet(model, runtime), 0.7), 0.3))
results["stack"] = {
    "ipa_calls": [n_ipa, n1, n2],
    "ipa_calls_after_add": n3,
    "orders_equal": bool(torch.equal(xsr_then_ipa, ipa_then_xsr)),
    "differs_from_ipa_only": float((xsr_then_ipa - ipa_only).abs().max()),
    "differs_from_xsr_only": float((xsr_then_ipa - xsr_only).abs().max()),
    "add_changes": float((added - xsr_then_ipa).abs().max()),
    "clone_keeps_patch": bool(not torch.equal(xsr_only, plain)),
}

# CFG through the real sampler (comfy.sample.sample, euler, CFG 5): the batch sizes reaching the diffusion
# model. The positive carries E the way XSR_Enhance makes it (attach_embedding); the negative is plain text.
adapter_nodes = importlib.import_module("comfyui_xsr.nodes.adapter")
import comfy.sample  # noqa: E402


def sampler_batches(m, cn, positive_opts, steps=2):
    seen = []

    def count(executor, *args, **kwargs):
        seen.append(int(args[0].shape[0]))
        return executor(*args, **kwargs)

    m = m.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_count", count)
    cnet = cn.copy().set_cond_hint(hint[:1], 1.0, (0.0, 1.0))
    pos = [[ctx[:1], {**positive_opts, "control": cnet, "control_apply_to_uncond": False}]]
    neg = [[ctx[1:], {"control": cnet, "control_apply_to_uncond": False}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = comfy.sample.sample(m, noise, steps, 5.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=3)
    return seen, out


E1 = E[:1]
with_e = binding.attach_embedding([[ctx[:1], {}]], E1)[0][1]
full_m, full_cn = binding.patch_unet(model, runtime), binding.patch_controlnet(control, runtime)
zero_m, zero_cn = adapter_nodes.apply_adapter("test", model, control, None, 0.0, 0.0, 1.0, "cond")
both_rt = binding.AdaINRuntime(adapter_patcher, apply_to="both")
cases = {
    "text_only": (model, control, with_e),
    "strength0": (zero_m, zero_cn, with_e),
    "xsr": (full_m, full_cn, with_e),
    "xsr_both": (binding.patch_unet(model, both_rt), binding.patch_controlnet(control, both_rt), with_e),
    # negative control: E in model_conds (the earlier contract) with an unpatched model splits CFG
    "old_contract_text_only": (model, control, {"model_conds": {binding.XSR_KEY: binding.CONDXSR(E1)}}),
}
cfg = {}
for name, (m, cn, opts) in cases.items():
    seen, out = sampler_batches(m, cn, opts)
    cfg[name] = {"batches": seen, "out": out}
plain_seen, plain_out = sampler_batches(model, control, {})
results["cfg"] = {k: v["batches"] for k, v in cfg.items()}
results["cfg"]["plain"] = plain_seen
results["cfg_outputs"] = {
    "text_only_equals_plain": bool(torch.equal(cfg["text_only"]["out"], plain_out)),
    "strength0_equals_text_only": bool(torch.equal(cfg["strength0"]["out"], cfg["text_only"]["out"])),
    "xsr_differs": float((cfg["xsr"]["out"] - cfg["text_only"]["out"]).abs().max()),
}

# torch.compile through ComfyUI's own TorchCompileModel helper (comfy_api.torch_helpers), on CPU with the
# aot_eager backend (traces the XSR site modules with dynamo + AOTAutograd, no C++ toolchain needed)
from comfy_api.torch_helpers import set_torch_compile_wrapper  # noqa: E402

import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


def compiled_run(m, cn, opts, backend="aot_eager"):
    """Sampler run with the model under TorchCompileModel's wrapper; (out, batches, graphs, graph breaks)."""
    torch._dynamo.reset()
    counters.clear()
    m = m.clone()
    set_torch_compile_wrapper(model=m, backend=backend)
    seen, out = sampler_batches(m, cn, opts)
    return out, seen, int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def against_eager(out, seen, graphs):
    """A compiled XSR run beside the eager one (cfg["xsr"]): max abs difference, output scale, batches, frames."""
    eager = cfg["xsr"]["out"]
    return {
        "ok": True,
        "maxdiff": float((out - eager).abs().max()),
        "scale": float(eager.abs().max()),
        "batches": seen,
        "frames_compiled": graphs,
    }


# the inductor backend TorchCompileModel uses by default (a C++ compiler on CPU, minutes of code generation);
# XSR_TEST_INDUCTOR=0 leaves it out of a quick local run
if os.environ.get("XSR_TEST_INDUCTOR", "1") != "0":
    try:
        t0 = time.time()
        i_out, i_seen, i_graphs, _ = compiled_run(full_m, full_cn, with_e, backend="inductor")
        results["compile_inductor"] = {**against_eager(i_out, i_seen, i_graphs), "seconds": time.time() - t0}
    except Exception as e:  # recorded for the test's message
        results["compile_inductor"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}

try:
    c_out, c_seen, c_graphs, c_breaks = compiled_run(full_m, full_cn, with_e)
    p_out, _, p_graphs, p_breaks = compiled_run(model, control, {})
    results["compile"] = {
        **against_eager(c_out, c_seen, c_graphs),
        "graph_breaks": c_breaks,
        "plain_frames_compiled": p_graphs,
        "plain_graph_breaks": p_breaks,
        "plain_maxdiff": float((p_out - plain_out).abs().max()),
    }
except Exception as e:  # recorded for the test's message
    results["compile"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}

# multi-GPU deep clones (ComfyUI >= 0.33): refused with XSR's message, never silently unpatched
mgpu = {"available": hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu")}
if mgpu["available"]:
    for name, fn in (
        ("unet", lambda: full_m.deepclone_multigpu(new_load_device=torch.device("cpu"))),
        ("controlnet", lambda: full_cn.deepclone_multigpu(torch.device("cpu"), autoregister=True)),
    ):
        try:
            fn()
            mgpu[name] = "cloned"
        except Exception as e:
            mgpu[name] = f"{type(e).__name__}: {e}"
    mgpu["message"] = binding.MULTIGPU_MESSAGE
results["multigpu"] = mgpu
# the XSR ControlNet survives ComfyUI's own copy() (ControlNetApplyAdvanced copies it) with its patches
cn_copy = full_cn.copy()
results["multigpu"]["copy_keeps_xsr"] = bool(
    isinstance(cn_copy, binding.XSRControlNet)
    and cn_copy.xsr_runtime is runtime
    and cn_copy.control_model_wrapped is full_cn.control_model_wrapped
)

# encoder contract: the CLI's CLIP vision path and ComfyUI's CLIP_VISION (stock CLIPVisionLoader path on the
# same file) give the same features and the same fingerprint
import comfy.clip_vision  # noqa: E402

common = importlib.import_module("comfyui_xsr.nodes.common")
clip_vision_mod = importlib.import_module("comfyui_xsr.xsr_core.clip_vision")
synthetic = importlib.import_module("comfyui_xsr.xsr_core.testing.synthetic")
cv_path = MODELS / "clip_vision" / zoo.CLIP_VISION_NAME
cv = comfy.clip_vision.load(str(cv_path))
enc = clip_vision_mod.ClipVisionEncoder.from_file(cv_path)
import numpy as np  # noqa: E402

imgs = torch.stack(
    [torch.from_numpy(np.asarray(synthetic.synthetic_image(s, 96), dtype=np.float32) / 255) for s in range(6)]
)
lr = (
    torch.nn.functional.interpolate(imgs.movedim(-1, 1), size=(8, 8), mode="bicubic", antialias=True)
    .clamp(0, 1)
    .movedim(1, -1)
)
cos = []
for batch, is_lr in ((imgs, False), (lr, True)):
    a = common.encode_clip(cv, batch, lr=is_lr).cls
    b = enc.encode_images(batch, lr=is_lr).cls.float()
    cos += torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
results["encoder"] = {"cosines": cos, "fingerprint_equal": common.clip_vision_fingerprint(cv) == enc.fingerprint}
OUT.write_text(json.dumps(results, indent=1))
print(json.dumps(results, indent=1))
