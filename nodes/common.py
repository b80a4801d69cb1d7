"""Shared pieces of the XSR nodes: model folders, custom socket types, ComfyUI-side CLIP features."""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

import comfy.model_management
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from ..xsr_core.clip_preprocess import preprocess_hr, preprocess_lr
from ..xsr_core.clip_vision import fingerprint_state_dict

logger = logging.getLogger(__name__)

XSR_FOLDER = "xsr"  # models/xsr: rfa / i2t / adapter .safetensors (+ distilgpt2/ for training)
REFDB_FOLDER = "xsr_refdb"  # models/xsr_refdb/<name>/: reference databases (folders)


def register_folders() -> None:
    """Register models/xsr and models/xsr_refdb with folder_paths (extra_model_paths.yaml keys work too)."""
    for name, exts in ((XSR_FOLDER, {".safetensors"}), (REFDB_FOLDER, {""})):
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], exts)


register_folders()


class PinnedHostCopy:
    """A host copy of a model's weights kept across offloads, in one page-locked buffer.

    ComfyUI unloads a model by ``model.to(offload_device)``: a device-to-host copy into new pageable memory,
    and the next load copies from pageable memory again. XSR's models never change their weights (no ComfyUI
    weight patches), so the host copy made at the first offload stays valid: later offloads only point the
    weights back at it (no copy) and loads copy from page-locked memory (DMA, several times faster). A weight
    that changed on the device since its load (another tensor, or an in-place op that bumped its version;
    ComfyUI loads under ``torch.inference_mode``, whose tensors keep no version, so there only another
    tensor) is copied again. One buffer for the whole model (the caching host allocator would round each tensor
    up to a power of two).
    """

    ALIGN = 64  # bytes: every view starts aligned for any dtype and vector loads

    def __init__(self, pin: bool = True):
        self.pin = pin
        self.layout: list = []  # (key, shape, dtype) of every tensor, in module order
        self.views: dict = {}  # key -> host tensor (a view of the buffer)
        self.loaded: dict = {}  # key -> (data_ptr, version) of the device tensor it mirrors
        self.buffer: torch.Tensor | None = None

    @staticmethod
    def tensors(model: torch.nn.Module):
        """``(key, module, tensor)`` of every parameter and buffer, each tensor once (tied weights stay tied)."""
        seen = set()
        for mname, m in model.named_modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(m, kind).items():
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        yield (mname, kind, name), m, t

    @staticmethod
    def stamp(t: torch.Tensor) -> tuple:
        return t.data_ptr(), None if t.is_inference() else t._version

    def note_loaded(self, model: torch.nn.Module) -> None:
        """Record the device tensors a load made (what a later offload may skip copying)."""
        self.loaded = {key: self.stamp(t) for key, _, t in self.tensors(model)}

    def _build(self, items: list) -> None:
        offsets, total = [], 0
        for _, _, t in items:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // self.ALIGN) * self.ALIGN
        self.buffer = torch.empty(total, dtype=torch.uint8, pin_memory=self.pin)
        self.layout = [(key, tuple(t.shape), t.dtype) for key, _, t in items]
        self.views = {
            key: self.buffer[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for (key, _, t), o in zip(items, offsets)
        }
        self.loaded = {}

    def offload(self, model: torch.nn.Module) -> int:
        """Point every weight of ``model`` at its host copy, copying only what is new; returns the bytes copied."""
        items = list(self.tensors(model))
        if [(key, tuple(t.shape), t.dtype) for key, _, t in items] != self.layout:
            self._build(items)
        copied = 0
        for key, m, t in items:
            host = self.views[key]
            if t.data_ptr() == host.data_ptr():
                continue  # already there
            if self.loaded.get(key) != self.stamp(t):
                host.copy_(t, non_blocking=self.pin)
                copied += host.numel() * host.element_size()
            if key[1] == "_parameters":
                t.data = host
            else:
                m._buffers[key[2]] = host
        if copied and self.pin:
            torch.cuda.synchronize()  # the host copy is read on the CPU side from now on
        self.loaded = {}
        return copied

    def stage(self, model: torch.nn.Module, device: torch.device) -> int:
        """Load ``model`` from its host copy in ONE asynchronous transfer: the whole buffer goes to ``device`` and
        every weight is pointed at its slice there (the layout of the host buffer, so alignment and tied weights
        carry over). Only when every weight is on its host view (offloaded by :meth:`offload`); returns the bytes
        moved, 0 when it did nothing (ComfyUI's per-module ``.to()`` then loads, as for any model: on CUDA one
        blocking copy per tensor, each waited for)."""
        items = list(self.tensors(model))
        if self.buffer is None or [(key, tuple(t.shape), t.dtype) for key, _, t in items] != self.layout:
            return 0
        base = self.buffer.data_ptr()
        offsets = []
        for key, _, t in items:
            host = self.views[key]
            if t.data_ptr() != host.data_ptr() or t.device != host.device or not host.numel():
                return 0
            offsets.append(host.data_ptr() - base)
        dev = torch.empty(self.buffer.numel(), dtype=torch.uint8, device=device)
        dev.copy_(self.buffer, non_blocking=self.pin)  # stream-ordered before any kernel that reads the weights
        for (key, m, t), o in zip(items, offsets):
            host = self.views[key]
            view = dev[o : o + host.numel() * host.element_size()].view(host.dtype).view(host.shape)
            if key[1] == "_parameters":
                t.data = view
            else:
                m._buffers[key[2]] = view
        return dev.numel()


def _pinning_allowed() -> bool:
    """ComfyUI's own switch for page-locked memory (``--disable-pinned-memory`` sets no budget)."""
    return getattr(comfy.model_management, "MAX_PINNED_MEMORY", 0) > 0


class WholeModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher for XSR's own models (RFA, I2T, AdaIN adapter) that always loads them whole.

    ComfyUI's lowvram / novram loading streams a model layer by layer only through its castable
    ``comfy.ops`` layers; a layer without them that does not fit the budget stays on the offload device
    and would run there (a silent CPU fallback: seen under ``--novram`` on ComfyUI 0.33). XSR's models
    are plain PyTorch (raw parameters, the GPT-2 decoder, the fused AdaIN path) and small, so they are
    loaded whole in every VRAM mode: ``load_models_gpu`` still frees memory for their full size first,
    and when ComfyUI needs the memory back they are unloaded whole instead of partially.

    Unloading from a CUDA device keeps a page-locked host copy of the weights (:class:`PinnedHostCopy`,
    shared by the clones of a patcher), so an offload and reload cycle (``XSR_OFFLOAD``, or ComfyUI
    evicting the model) costs one fast host-to-device copy, made asynchronously in one piece
    (:meth:`PinnedHostCopy.stage`). Not with ComfyUI weight patches (the copy would
    hold patched weights), under ``--disable-pinned-memory``, or when no page-locked memory can be had (one
    warning): then ComfyUI's own pageable move runs.
    """

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kw):
        host = getattr(self.model, "_xsr_host_copy", None)
        to_cuda = device_to is not None and torch.device(device_to).type == "cuda"
        if host is not None and to_cuda and not self.patches and not self.backup:
            # weights on their pinned host copy: one transfer, then ComfyUI's load finds them in place
            host.stage(self.model, torch.device(device_to))
        out = super().load(device_to, 0, force_patch_weights, True, **kw)
        if host is not None:
            host.note_loaded(self.model)
        return out

    def partially_unload(self, device_to, memory_to_free=0, *args, **kwargs):
        return 0  # nothing can be streamed: ComfyUI's model_unload then unloads the whole model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        to_host = (
            unpatch_weights
            and device_to is not None
            and torch.device(device_to).type == "cpu"
            and self.load_device.type == "cuda"
            and not self.patches
            and not self.backup
            and not getattr(self.model, "model_lowvram", False)
            and _pinning_allowed()
        )
        if not to_host:
            return super().unpatch_model(device_to, unpatch_weights)
        super().unpatch_model(None, unpatch_weights)  # all of ComfyUI's unpatching but the move
        host = getattr(self.model, "_xsr_host_copy", None)
        if host is None:
            host = self.model._xsr_host_copy = PinnedHostCopy()
        try:
            copied = host.offload(self.model)
        except RuntimeError as e:  # no page-locked memory to be had: unload the way ComfyUI does
            logger.warning("%s: no pinned host copy (%s); unloading to pageable memory", type(self.model).__name__, e)
            self.model._xsr_host_copy = None
            copied = 0
            self.model.to(device_to)
        self.model.device = torch.device(device_to)
        if copied:
            logger.debug("%s: %.1f MiB copied to its pinned host copy", type(self.model).__name__, copied / 2**20)


def _fully_loaded_entry(patcher: Any, models: list) -> Any:
    """The entry of ComfyUI's ``current_loaded_models`` holding ``patcher`` whole on its load device (and no other
    clone of it), or None."""
    found = None
    for lm in models:
        other = lm.model
        if other is patcher:
            found = lm
        elif other is not None and patcher.is_clone(other):
            return None  # load_models_gpu would swap the clones
    if found is None or found.is_dead() or getattr(patcher, "is_dynamic", lambda: False)():
        return None
    if patcher.current_loaded_device() != patcher.load_device or patcher.loaded_size() < patcher.model_size():
        return None
    return found


def load_models(patchers: list) -> None:
    """``comfy.model_management.load_models_gpu(patchers)``, without its host work where it has none to do.

    A patcher already loaded whole on its CUDA device (model patches too, the only clone loaded, the device
    with the inference headroom ``load_models_gpu`` frees memory for) needs nothing but its rank: it is moved to
    the front of ComfyUI's list (most recently used, as that call does) and marked in use, without the call's
    re-injection and allocator statistics (milliseconds per prompt). The others (not or partially loaded,
    lowvram, Dynamic VRAM, CPU) go through ComfyUI's own call; if that call unloaded one of the first ones to
    make room, all are loaded by ComfyUI."""
    mm = comfy.model_management
    models = mm.current_loaded_models
    ready, rest = [], []
    for p in patchers:
        group = list(dict.fromkeys((p, *p.model_patches_models())))
        entries = [_fully_loaded_entry(m, models) if m.load_device.type == "cuda" else None for m in group]
        if all(e is not None for e in entries):
            ready.extend(entries)
        else:
            rest.append(p)
    need = max(mm.minimum_inference_memory(), mm.extra_reserved_memory())
    if any(torch.cuda.mem_get_info(d)[0] < need for d in {e.device for e in ready}):  # driver's free: a lower bound
        ready, rest = [], list(patchers)
    if rest:
        mm.load_models_gpu(rest)
        if any(e not in models or e.model.loaded_size() < e.model.model_size() for e in ready):
            mm.load_models_gpu(patchers)
            return
    for e in reversed(ready):
        models.remove(e)
        models.insert(0, e)
        e.currently_used = True


XSRModels = io.Custom("XSR_MODELS")
XSRRefDB = io.Custom("XSR_REFDB")
XSRRefs = io.Custom("XSR_REFS")
CATEGORY = "xsr"  # the node menu's folder of every XSR node


def xsr_schema(node_id: str, display_name: str, description: str, inputs: list, outputs: list, **extra) -> io.Schema:
    """The ``io.Schema`` of an XSR node: XSR's category; ``extra``: further Schema fields (``is_output_node``...)."""
    names = dict(node_id=node_id, display_name=display_name, category=CATEGORY, description=description)
    return io.Schema(**names, inputs=inputs, outputs=outputs, **extra)


def choice_input(name: str, options, default: str | None, tooltip: str, **extra) -> io.Combo.Input:
    """A combo widget of ``options`` (any iterable of strings) starting at ``default``."""
    return io.Combo.Input(name, options=list(options), default=default, tooltip=tooltip, **extra)


def int_input(name: str, default: int, lo: int, hi: int, tooltip: str, **extra) -> io.Int.Input:
    """An INT widget from ``lo`` to ``hi`` (both included) starting at ``default``."""
    return io.Int.Input(name, default=default, min=lo, max=hi, tooltip=tooltip, **extra)


def xsr_files() -> list[str]:
    return sorted(folder_paths.get_filename_list(XSR_FOLDER))


def xsr_file_input(name: str, preferred: str, tooltip: str, files: list[str] | None = None) -> io.Combo.Input:
    """A combo of the weights files in models/xsr (``files``: that listing, when the caller has it), starting at
    ``preferred`` when it is there."""
    files = xsr_files() if files is None else files
    return choice_input(name, files, preferred if preferred in files else None, tooltip)


def refdb_names() -> list[str]:
    """Folders under any models/xsr_refdb root that hold a built DB (info.json)."""
    names = set()
    for root in folder_paths.get_folder_paths(REFDB_FOLDER):
        try:
            for entry in os.scandir(root):
                if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "info.json")):
                    names.add(entry.name)
        except OSError:
            continue
    return sorted(names)


def xsr_file_path(node: str, input_name: str, name: str) -> str:
    """The resolved path of weights file ``name`` in models/xsr (confined there, symlinks followed)."""
    path = folder_paths.get_full_path(XSR_FOLDER, name) if name else None
    if path is not None:
        from .validation import confined_model_file

        return confined_model_file(node, input_name, XSR_FOLDER, name)
    if path is None:
        roots = ", ".join(folder_paths.get_folder_paths(XSR_FOLDER))
        raise ValueError(
            f"{node}: {input_name} '{name}' was not found in models/{XSR_FOLDER} ({roots}). Expected the XSR weight "
            "files rfa.safetensors, i2t.safetensors and adain_adapter.safetensors there (train them with "
            "`python -m xsr_core.train`, see README)."
        )
    return path


@dataclass(eq=False)
class ClipFeaturesC:
    tokens: torch.Tensor  # (B, 257, D) last hidden state, before post-LayerNorm
    cls: torch.Tensor  # (B, D) post-LayerNorm CLS


_FINGERPRINTS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def clip_vision_fingerprint(clip_vision: Any) -> dict[str, str]:
    """Encoder fingerprint of a ComfyUI CLIP_VISION (cached per loaded model)."""
    model = clip_vision.model
    fp = _FINGERPRINTS.get(model)
    if fp is None:
        fp = fingerprint_state_dict(model.state_dict())
        _FINGERPRINTS[model] = fp
    return fp


def clip_vision_width(clip_vision: Any) -> int:
    return int(clip_vision.model.vision_model.post_layernorm.weight.shape[0])


def vision_compute_dtype(clip_vision: Any) -> torch.dtype:
    """The dtype XSR runs a ComfyUI CLIP_VISION in: its weights' half dtype on CUDA, else float32.

    ComfyUI's own CLIPVisionEncode feeds float32 pixels, so its manual-cast layers cast every fp16 weight
    up to float32 on every call and run float32 GEMMs. XSR feeds pixels in the weights' dtype instead: no
    casts and tensor-core GEMMs, the precision of the reference-DB build and the training caches (the CLI
    encoder runs fp16 autocast on CUDA). On the CPU (and for fp32 / fp8 weights) float32, as ComfyUI.
    """
    if clip_vision.load_device.type != "cuda":
        return torch.float32
    dtype = vision_weight_dtype(clip_vision)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


_WEIGHT_DTYPES: "weakref.WeakKeyDictionary[Any, torch.dtype]" = weakref.WeakKeyDictionary()


def vision_weight_dtype(clip_vision: Any) -> torch.dtype:
    """The dtype holding most of a CLIP_VISION's weights (ComfyUI builds its LayerNorms in float32 beside
    fp16 linear layers); cached per loaded model."""
    vm = clip_vision.model.vision_model
    dtype = _WEIGHT_DTYPES.get(vm)
    if dtype is None:
        count: dict[torch.dtype, int] = {}
        for p in vm.parameters():
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
        dtype = _WEIGHT_DTYPES[vm] = max(count, key=count.get)
    return dtype


def encode_clip(
    clip_vision: Any,
    images_bhwc: torch.Tensor,
    *,
    lr: bool,
    batch: int = 32,
    to_intermediate: bool = True,
    vision: Any = None,
    load: bool = True,
) -> ClipFeaturesC:
    """CLIP features of ComfyUI images with XSR's one preprocessing (the same as the DB build).

    ``to_intermediate=False`` leaves the features on the encoder's device (no round trip to the CPU).
    ``vision(model, pixel_values)``: runs the vision tower instead of calling it (e.g. a CUDA-graph replay).
    ``load=False``: the caller has loaded the encoder through ComfyUI's model management already.
    """
    if load:
        load_models([clip_vision.patcher])
    device = clip_vision.load_device
    dtype = vision_compute_dtype(clip_vision)
    prep = preprocess_lr if lr else preprocess_hr
    toks, clss = [], []
    for s in range(0, images_bhwc.shape[0], batch):
        pix = prep(images_bhwc[s : s + batch].to(device)).to(dtype)
        vm = clip_vision.model.vision_model
        x, _, pooled = vision(vm, pix) if vision is not None else vm(pixel_values=pix)
        toks.append(x.float())
        clss.append(pooled.float())
    inter = comfy.model_management.intermediate_device() if to_intermediate else device
    return ClipFeaturesC(torch.cat(toks).to(inter), torch.cat(clss).to(inter))


def controls_of(conds: list) -> list:
    """Every ControlNet object reachable from the conditionings (chains included), each once."""
    out, seen = [], set()
    for group in conds:
        for c in group or []:
            ctrl = c.get("control")
            while ctrl is not None and id(ctrl) not in seen:
                seen.add(id(ctrl))
                out.append(ctrl)
                ctrl = getattr(ctrl, "previous_controlnet", None)
    return out


def throw_if_interrupted() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


@dataclass(eq=False)
class LoadedXSR:
    """What XSR_LoadModels hands to the other nodes (weights managed by ComfyUI through ModelPatchers)."""

    rfa: Any  # ModelPatcher of xsr_core.models.RFA
    i2t: Any  # ModelPatcher of xsr_core.models.I2T
    tokenizer: Any
    names: dict[str, str] = field(default_factory=dict)

    @property
    def clip_dim(self) -> int:
        return int(self.rfa.model.config.clip_dim)


class ComfyClipEncoder:
    """A ComfyUI CLIP_VISION as the reference-DB build encoder (same features as XSR_Retrieve's queries)."""

    def __init__(self, clip_vision: Any):
        self.cv = clip_vision
        self.fingerprint = clip_vision_fingerprint(clip_vision)
        self.dim = clip_vision_width(clip_vision)
        self.device = clip_vision.load_device
        self.source = "ComfyUI CLIP_VISION"

    def encode_cls_u8(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        from ..xsr_core.clip_preprocess import normalize_u8

        comfy.model_management.load_model_gpu(self.cv.patcher)
        pix = normalize_u8(pixels_u8.to(self.device), vision_compute_dtype(self.cv))
        _, _, pooled = self.cv.model.vision_model(pixel_values=pix)
        return pooled.float()
