"""BENCH-ONLY ComfyUI custom node pack for bench/bench_vram_modes.py (never shipped).

Adds one loader node (XSRBench_LoadImagePIL, see its docstring) and HTTP routes to the running server
so the benchmark can see, from outside, how ComfyUI's model management treats the XSR models in each VRAM mode:

- ``GET /xsr_bench/state``: ``comfy.model_management.current_loaded_models`` (class, patcher type,
  dynamic or not, load device, loaded/total bytes), the VRAM state, torch's peak allocated bytes, the
  device-wide peak used bytes (``torch.cuda.mem_get_info`` sampled every 10 ms: it also sees memory
  that comfy-aimdo maps outside PyTorch's allocator), and the probe log;
- ``POST /xsr_bench/reset``: reset the peaks and the log; ``{"probe": true|false}`` switches the
  forward probes (off for timed runs: they add a Python call per module);
- the probe log records, per XSR module class (RFA, I2T and its parts, the AdaIN adapter's
  ``compute_stats``, and ``AdapterForward.apply``), the devices of its weights and inputs at each call, and after every
  ``load_models_gpu`` which models are loaded where and how much of each;
- always (probes on or off), the nodes that executed in each prompt and their seconds (CUDA synchronised
  around each node): a node missing from the list came from ComfyUI's output cache.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import torch

import comfy.model_management as mm
import execution
from server import PromptServer
from aiohttp import web

logger = logging.getLogger(__name__)
STATE = {"probe": True, "calls": {}, "loads": [], "nodes": [], "device_peak": 0, "device_base": 0}
_LOCK = threading.Lock()


def _dev(t) -> str:
    return str(t.device) if isinstance(t, torch.Tensor) else "-"


def _first_tensor(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _record(kind: str, module, args, kwargs) -> None:
    if isinstance(module, torch.nn.Module):
        p = next(iter(module.parameters()), None)
    else:  # AdapterForward: its "weights" are the adapter statistics it applies
        p = getattr(getattr(module, "stats", None), "mu", None)
    x = _first_tensor(args, kwargs)
    key = f"{kind}|weights={_dev(p)}|input={_dev(x)}"
    with _LOCK:
        STATE["calls"][key] = STATE["calls"].get(key, 0) + 1


def _forward_pre_hook(module, args):
    if STATE["probe"] and type(module).__module__.rpartition(".")[0].endswith(("xsr_core.models", "xsr_core.adapter")):
        _record(type(module).__name__, module, args, {})
    return None


torch.nn.modules.module.register_module_forward_pre_hook(_forward_pre_hook)


WRAP = [  # (module suffix, class, methods the nodes call directly, not through forward)
    ("xsr_core.adapter.adain", "AdaINAdapter", ("compute_stats",)),
    ("xsr_core.adapter.adain", "AdapterForward", ("apply",)),  # the per-site hot path of both bindings
    ("xsr_core.models.rfa", "RFA", ("query_embedding",)),
    ("xsr_core.models.i2t", "I2T", ("generate_caption", "generate_tokens", "summary", "prefix")),
]


def _wrap_adapter_methods() -> None:
    """Record calls of the XSR models' entry methods, whichever module path the pack was loaded under."""
    for name, mod in list(sys.modules.items()):
        for suffix, cls_name, methods in WRAP:
            cls = getattr(mod, cls_name, None) if name.endswith(suffix) else None
            if cls is None or cls.__dict__.get("_xsr_probe", False):
                continue
            for meth in methods:
                orig = cls.__dict__.get(meth)
                if orig is None:
                    continue

                def wrapped(self, *a, __orig=orig, __label=f"{cls_name}.{meth}", **k):
                    if STATE["probe"]:
                        _record(__label, self, a, k)
                    return __orig(self, *a, **k)

                setattr(cls, meth, wrapped)
            cls._xsr_probe = True


def _loaded() -> list[dict]:
    out = []
    for lm in list(mm.current_loaded_models):
        patcher = lm.model
        if patcher is None:
            continue
        inner = patcher.model
        p = next(iter(inner.parameters()), None) if isinstance(inner, torch.nn.Module) else None
        out.append(
            {
                "model": type(inner).__name__,
                "patcher": type(patcher).__name__,
                "dynamic": bool(getattr(patcher, "is_dynamic", lambda: False)()),
                "load_device": str(lm.device),
                "param_device": _dev(p),
                "loaded_mib": round(patcher.loaded_size() / 2**20, 1),
                "total_mib": round(patcher.model_size() / 2**20, 1),
                "currently_used": bool(getattr(lm, "currently_used", False)),
            }
        )
    return out


_orig_load = mm.load_models_gpu


def _load_models_gpu(models, *a, **k):
    r = _orig_load(models, *a, **k)
    if STATE["probe"]:
        with _LOCK:
            STATE["loads"].append({"requested": [type(m.model).__name__ for m in models], "loaded": _loaded()})
    return r


mm.load_models_gpu = _load_models_gpu
for _name in (
    "comfy.sample",
    "comfy.sampler_helpers",
    "comfy.samplers",
    "comfy.sd",
    "comfy.clip_vision",
    "comfy.controlnet",
):
    _m = sys.modules.get(_name)
    if _m is not None and getattr(_m, "load_models_gpu", None) is _orig_load:
        _m.load_models_gpu = _load_models_gpu


_orig_get_output_data = execution.get_output_data


async def _timed_get_output_data(prompt_id, unique_id, obj, input_data_all, *a, **k):
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    try:
        return await _orig_get_output_data(prompt_id, unique_id, obj, input_data_all, *a, **k)
    finally:
        if cuda:
            torch.cuda.synchronize()
        with _LOCK:
            STATE["nodes"].append([str(unique_id), type(obj).__name__, round(time.perf_counter() - t, 4)])


execution.get_output_data = _timed_get_output_data


def _sampler() -> None:
    while True:
        try:
            free, total = torch.cuda.mem_get_info()
            used = total - free
            if used > STATE["device_peak"]:
                STATE["device_peak"] = used
        except Exception:  # noqa: BLE001 - the sampler must never take the server down
            return
        time.sleep(0.01)


if torch.cuda.is_available():
    threading.Thread(target=_sampler, daemon=True, name="xsr-vram-sampler").start()

routes = PromptServer.instance.routes


@routes.get("/xsr_bench/state")
async def _state(request):
    _wrap_adapter_methods()
    cuda = torch.cuda.is_available()
    with _LOCK:
        body = {
            "vram_state": str(getattr(mm, "vram_state", "?")),
            "loaded": _loaded(),
            "torch_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "torch_peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1) if cuda else None,
            "device_peak_used_mib": round(STATE["device_peak"] / 2**20, 1) if cuda else None,
            "device_base_used_mib": round(STATE["device_base"] / 2**20, 1) if cuda else None,
            "calls": dict(STATE["calls"]),
            "loads": list(STATE["loads"]),
            "nodes": list(STATE["nodes"]),
            "aimdo_enabled": getattr(sys.modules.get("comfy.memory_management"), "aimdo_enabled", None),
        }
    return web.json_response(body)


@routes.post("/xsr_bench/reset")
async def _reset(request):
    _wrap_adapter_methods()
    data = await request.json() if request.can_read_body else {}
    with _LOCK:
        STATE["calls"].clear()
        STATE["loads"].clear()
        STATE["nodes"].clear()
        STATE["probe"] = bool(data.get("probe", STATE["probe"]))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()
            STATE["device_peak"] = STATE["device_base"] = total - free
    return web.json_response({"ok": True, "probe": STATE["probe"]})


class XSRBenchLoadImagePIL:
    """LoadImage through PIL, as ComfyUI 0.3.75's LoadImage did: 0.33's LoadImage decodes every image with
    PyAV, which the GPU image lacks (bench_vram_modes.py --pil-loader). Same IMAGE/MASK outputs."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load"
    CATEGORY = "xsr_bench"

    def load(self, image):
        import numpy as np
        from PIL import Image, ImageOps

        import folder_paths

        img = ImageOps.exif_transpose(Image.open(folder_paths.get_annotated_filepath(image)))
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        t = torch.from_numpy(rgba)[None]
        return (t[..., :3].contiguous(), 1.0 - t[..., 3])


NODE_CLASS_MAPPINGS: dict = {"XSRBench_LoadImagePIL": XSRBenchLoadImagePIL}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
