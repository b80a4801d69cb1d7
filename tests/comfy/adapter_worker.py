"""In-process ComfyUI checks of the AdaIN adapter binding, run in a subprocess by test_adapter_comfy.py.

Usage: python adapter_worker.py COMFY_DIR REPO ZOO_MODELS_DIR OUT_JSON

Loads the tiny zoo through ComfyUI's real loaders (checkpoint + ControlNet) and through diffusers'
single-file loaders, attaches the same non-zero adapter in both, and records max-abs differences.
Runs in its own process because ComfyUI's modules keep global state and a top-level ``nodes``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

COMFY_DIR, REPO, MODELS, OUT = (Path(a) for a in sys.argv[1:5])
sys.path.insert(0, str(COMFY_DIR))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import torch  # noqa: E402

torch.manual_seed(0)
import comfy.controlnet  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sd  # noqa: E402


def load_package(name: str, init: Path):
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


load_package("xsr_test_support", REPO / "tests/comfy/support/xsr_test_support/__init__.py")
load_package("comfyui_xsr", REPO / "__init__.py")
import importlib  # noqa: E402

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
unet_d = UNet2DConditionModel.from_single_file(str(ckpt), config=str(dfolder), subfolder="unet", local_files_only=True).eval()
cn_d = ControlNetModel.from_single_file(str(cn_path), config=str(dfolder / "controlnet"), local_files_only=True).eval()

embed_dim = 24
cfg = core_adapter.AdaINAdapterConfig.from_unet_config(dict(unet_d.config), embed_dim=embed_dim, include_controlnet=True)
adapter = core_adapter.AdaINAdapter(cfg).eval()
with torch.no_grad():
    g = torch.Generator().manual_seed(1)
    adapter.head.weight.normal_(0, 0.3, generator=g)
    adapter.gates.uniform_(0.3, 0.9, generator=g)
adapter_patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

ms = model.get_model_object("model_sampling")
ctx = torch.randn(2, 77, 32)
E = torch.randn(2, 257, embed_dim)
x = torch.randn(2, 4, 8, 8)
hint = torch.rand(2, 3, 64, 64)


def comfy_eps(patcher, sigma, active, control_obj=None, embed=E):
    """eps prediction of a (patched) ComfyUI model at ``sigma`` for rows with ``active`` flags."""
    comfy.model_management.load_models_gpu([patcher] + ([control_obj.control_model_wrapped] if control_obj else []))
    base = patcher.model
    to = comfy.model_patcher.create_model_options_clone(patcher.model_options)["transformer_options"]
    comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    s = torch.full((x.shape[0],), sigma)
    to["sigmas"] = s
    xc = base.model_sampling.calculate_input(s, x)
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
        out = base.diffusion_model(xc, t, context=ctx, control=ctrl, transformer_options=to, **kwargs)
    return out, t


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
rows = torch.tensor([True, False])

for sigma in (float(ms.sigma(torch.tensor(999.0))), float(ms.sigma(torch.tensor(500.0))), float(ms.sigma(torch.tensor(20.0)))):
    for with_control in (False, True):
        out_c, t = comfy_eps(patched, sigma, active, patched_cn if with_control else None)
        ref_adapted = diffusers_eps(sigma, t, rows, True, with_control)
        ref_plain = diffusers_eps(sigma, t, rows, False, with_control)
        results["parity"].append({
            "sigma": sigma, "control": with_control,
            "cond_maxdiff": float((out_c[0] - ref_adapted[0]).abs().max()),
            "uncond_maxdiff": float((out_c[1] - ref_plain[1]).abs().max()),
            "adapter_effect": float((ref_adapted[0] - ref_plain[0]).abs().max()),
            "ref_scale": float(ref_plain.abs().max()),
        })

# gate 0 / strength 0: bit-identical to the unpatched model (U-Net and ControlNet)
sigma = float(ms.sigma(torch.tensor(500.0)))
plain, _ = comfy_eps(model, sigma, active, control, embed=None)
plain_again, _ = comfy_eps(model, sigma, active, control, embed=None)
results["gate0"]["plain_deterministic"] = bool(torch.equal(plain, plain_again))
zero_rt = binding.AdaINRuntime(adapter_patcher, strength=0.0)
out0, _ = comfy_eps(binding.patch_unet(model, zero_rt), sigma, torch.ones(2, 1), binding.patch_controlnet(control, zero_rt))
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


# clone() and stacking with another attn2 replace (an IPAdapter-like patch that chains)
class DummyReplace:
    calls = 0

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, q, k, v, extra):
        DummyReplace.calls += 1
        out = self.previous(q, k, v, extra) if self.previous else comfy.ldm.modules.attention.optimized_attention(q, k, v, extra["n_heads"])
        return out * 1.0 + 0.0


import comfy.ldm.modules.attention  # noqa: E402

pre = model.clone()
for blk in [b for b in adapter.block_ids if b.startswith("unet.")]:
    _, stage, idx, tt = core_adapter.parse_block_id(blk)
    pre.set_model_attn2_replace(DummyReplace(), stage, idx, tt)
stacked = binding.patch_unet(pre, runtime).clone()
DummyReplace.calls = 0
out_s, _ = comfy_eps(stacked, sigma, torch.ones(2, 1))
out_ref, _ = comfy_eps(patched.clone(), sigma, torch.ones(2, 1))
results["stack"]["dummy_calls"] = DummyReplace.calls
results["stack"]["same_as_unstacked"] = float((out_s - out_ref).abs().max())
results["stack"]["clone_keeps_patch"] = bool(not torch.equal(out_ref, plain))

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

imgs = torch.stack([torch.from_numpy(np.asarray(synthetic.synthetic_image(s, 96), dtype=np.float32) / 255) for s in range(6)])
lr = torch.nn.functional.interpolate(imgs.movedim(-1, 1), size=(8, 8), mode="bicubic", antialias=True).clamp(0, 1).movedim(1, -1)
cos = []
for batch, is_lr in ((imgs, False), (lr, True)):
    a = common.encode_clip(cv, batch, lr=is_lr).cls
    b = enc.encode_images(batch, lr=is_lr).cls.float()
    cos += torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
results["encoder"] = {"cosines": cos, "fingerprint_equal": common.clip_vision_fingerprint(cv) == enc.fingerprint}
OUT.write_text(json.dumps(results, indent=1))
print(json.dumps(results, indent=1))
