"""ComfyUI binding of the AdaIN adapter (DESIGN §2.4): patches with ComfyUI's own signatures.

The adapter math lives in ``xsr_core.adapter`` (pure PyTorch); this module only routes ComfyUI's
activations through it. Shape of the design:

- The patched MODEL / CONTROL_NET are **image-independent** (patched once, cached across prompts).
  The per-image embedding E travels inside the positive CONDITIONING: its options dict carries a
  :class:`CONDXSR` under the key ``xsr`` (:func:`attach_embedding`). Only a patched model reads it: its
  ``CALC_COND_BATCH`` wrapper moves the entry into ``model_conds`` and gives every conditioning without E
  (the negative prompt) a matching null entry (with ``apply_to="both"``: the positive's E), so positive
  and negative keep equal keys and ComfyUI still batches CFG into one pass. An unpatched model (the
  text-only graph, strength 0) never sees the entry, so its CFG batching is untouched too.
  ``CONDXSR.concat`` returns a memoised :class:`XSRBatch` (passed through to the model untouched), so the
  adapter statistics of a batch are computed once per sampling run, on the adapter's device.
- ONE patching mechanism in both models: object patches (``ModelPatcher.add_object_patch``) of every
  covered block's ``norm2``, ``attn2.to_q``, ``attn2.to_k`` and ``norm3`` modules (:func:`_patch_sites`).
  They change the modules' outputs and nothing else, so any ``attn2`` patch/replace of another pack
  (e.g. IPAdapter's ``Attn2Replace`` with its ``.add()``) composes with them in either order: it sees the
  adapted Q and K exactly as the plain attention would.
- The per-forward state (plan of folded statistics) is published on a slot shared by the site modules
  of one :class:`AdaINRuntime`: by an ``APPLY_MODEL`` wrapper for the U-Net (outside a
  ``torch.compile``-d diffusion model) and by :meth:`XSRControlNet.get_control` for the ControlNet
  (ComfyUI's ControlNet never sees U-Net transformer_options).
- The adapter weights live in their own ModelPatcher registered with ``set_additional_models``, so
  ComfyUI loads/offloads them with the U-Net. Patch objects hold only references (light under clone()),
  and no cache outside a patcher holds the adapter module (statistics caches are weak-keyed).

Rows of null entries (unconditional branch, or conditioning without E) are returned
bit-identically, and so is everything at strength 0 or outside [start_percent, end_percent].
"""

from __future__ import annotations

import copy
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

import comfy.controlnet
import comfy.model_patcher
from comfy.patcher_extension import WrappersMP

from ..xsr_core.adapter import AdaINAdapter, AdapterForward, AdapterStats, comfy_block_path
from .common import WholeModelPatcher

logger = logging.getLogger(__name__)

XSR_KEY = "xsr"  # conditioning option / model_conds entry: CONDXSR (the enhanced image tokens E)
WRAPPER_KEY = "xsr_adain"
APPLY_TO = ("cond", "both")
SITE_MODULES = (("norm2", "norm2"), ("q", "attn2.to_q"), ("k", "attn2.to_k"), ("norm3", "norm3"))
MULTIGPU_MESSAGE = (
    "XSR: the AdaIN adapter patches cannot be carried into ComfyUI's multi-GPU clones (MultiGPU work units): "
    "the patched modules and the adapter weights belong to one device. Sample XSR graphs on one GPU (remove the "
    "MultiGPU node from this graph)."
)


# ---------------------------------------------------------------------------------------------
# The conditioning entry
# ---------------------------------------------------------------------------------------------
class CONDXSR:
    """One conditioning's image embedding E (B, N, D), or a null entry; ComfyUI's COND protocol.

    Follows process_cond / can_concat / concat / size. ``concat`` returns an :class:`XSRBatch`, memoised
    per set of parts, so ComfyUI's per-step ``cond_cat`` hands the model the same object at every step.
    """

    def __init__(self, embed: torch.Tensor | None, active: bool = True, batch: int | None = None):
        self.embed = embed  # (B, N, D) or None for a null entry
        self.active = bool(active and embed is not None)
        self.batch = batch if batch is not None else (embed.shape[0] if embed is not None else 1)
        self._memo: dict[tuple, XSRBatch] = {}
        self._stats: weakref.WeakKeyDictionary[AdaINAdapter, AdapterStats] = weakref.WeakKeyDictionary()
        self._processed: dict[int, CONDXSR] = {}

    def __deepcopy__(self, memo):
        return self

    def process_cond(self, batch_size: int, **kwargs) -> CONDXSR:
        # ComfyUI calls this at every sampling step: hand back the same object so that the concat
        # memo and the statistics computed for it live for the whole run
        hit = self._processed.get(batch_size)
        if hit is None:
            hit = self._processed[batch_size] = self._process(batch_size)
        return hit

    def _process(self, batch_size: int) -> CONDXSR:
        embed = self.embed
        if embed is not None and embed.shape[0] != batch_size:
            if batch_size % embed.shape[0]:
                raise ValueError(
                    f"XSR: {embed.shape[0]} image embeddings cannot be spread over a batch of {batch_size} "
                    "latents; use one LR image per latent (XSR_PrepareLR makes the matching latent)."
                )
            embed = embed.repeat(batch_size // embed.shape[0], 1, 1)
        return CONDXSR(embed, self.active, batch_size)

    def null(self) -> CONDXSR:
        hit = self._processed.get(-1)
        if hit is None:
            hit = self._processed[-1] = CONDXSR(None, False, self.batch)
        return hit

    def can_concat(self, other) -> bool:
        return isinstance(other, CONDXSR)

    def concat(self, others) -> XSRBatch:
        key = tuple(id(o) for o in others)
        hit = self._memo.get(key)
        if hit is None or any(a is not b for a, b in zip(hit.parts[1:], others)):
            if len(self._memo) > 16:
                self._memo.clear()
            hit = XSRBatch([self, *others])
            self._memo[key] = hit
        return hit

    def size(self) -> list[int]:
        return [self.batch, 1]

    def stats_for(self, adapter: AdaINAdapter) -> AdapterStats:
        """This entry's adapter statistics (computed once per adapter, on its device; weak-keyed)."""
        stats = self._stats.get(adapter)
        if stats is None:
            p = adapter.head.weight
            with torch.no_grad():
                stats = adapter.compute_stats(self.embed.to(device=p.device, dtype=p.dtype))
            self._stats[adapter] = stats
        return stats


class XSRBatch:
    """The XSR entries of one batched model call, in batch order (memoised across sampling steps)."""

    def __init__(self, parts: list[CONDXSR]):
        self.parts = parts
        self.rows = tuple(p.active for p in parts for _ in range(p.batch))
        self._stats: weakref.WeakKeyDictionary[AdaINAdapter, AdapterStats | None] = weakref.WeakKeyDictionary()

    def __deepcopy__(self, memo):
        return self

    def stats_for(self, adapter: AdaINAdapter) -> AdapterStats | None:
        """AdapterStats with one row per batch row (null rows: zeros, never applied); None if no row is active."""
        if adapter in self._stats:
            return self._stats[adapter]
        actives = [p for p in self.parts if p.active]
        if not actives:
            stats = None
        elif len(self.parts) == 1:
            stats = self.parts[0].stats_for(adapter)
        else:
            per = [p.stats_for(adapter) if p.active else None for p in self.parts]
            ref = next(s for s in per if s is not None)
            mu = torch.cat(
                [s.mu if s is not None else ref.mu.new_zeros(p.batch, ref.mu.shape[1]) for s, p in zip(per, self.parts)]
            )
            sigma = torch.cat(
                [
                    s.sigma if s is not None else ref.sigma.new_ones(p.batch, ref.sigma.shape[1])
                    for s, p in zip(per, self.parts)
                ]
            )
            stats = AdapterStats(ref.layout, mu, sigma, ref.gates, ref.active, ref.eps, ref._owners, ref._index_cache)
        self._stats[adapter] = stats
        return stats


def attach_embedding(conditioning: list, embed: torch.Tensor) -> list:
    """A copy of a CONDITIONING whose entries carry the image embedding E (B, N, D) for the adapter.

    The contract: each entry's options dict holds ``XSR_KEY: CONDXSR(E)`` with one E row per latent row of
    that conditioning (or one row, broadcast). Only a model patched by :func:`patch_unet` reads it.
    (A CONDXSR placed in ``model_conds`` under the same key is honoured too, but then an unpatched model
    splits CFG into two passes.)
    """
    entry = CONDXSR(embed)
    return [[c, {**opts, XSR_KEY: entry}] for c, opts in conditioning]


def embedding_of(cond: dict) -> CONDXSR | None:
    """The CONDXSR of one (converted) conditioning dict, from model_conds or the options, else None."""
    x = cond.get("model_conds", {}).get(XSR_KEY)
    if isinstance(x, CONDXSR):
        return x
    x = cond.get(XSR_KEY)
    return x if isinstance(x, CONDXSR) else None


# ---------------------------------------------------------------------------------------------
# Runtime state
# ---------------------------------------------------------------------------------------------
class _Slot:
    """Holds the state of the forward in progress; read by every site module of one runtime."""

    __slots__ = ("state",)

    def __init__(self):
        self.state: AdapterForward | None = None

    def __deepcopy__(self, memo):
        return self


@dataclass(eq=False)
class AdaINRuntime:
    """Shared, light state of one applied adapter: the adapter patcher and the user's settings."""

    adapter_patcher: comfy.model_patcher.ModelPatcher
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    apply_to: str = "cond"
    sigma_range: tuple[float, float] | None = field(default=None)  # (sigma_start, sigma_end) once known
    slot: _Slot = field(default_factory=_Slot)
    _last: tuple | None = field(default=None, repr=False)  # (weakref to XSRBatch, adapter ref, AdapterForward)

    def __deepcopy__(self, memo: dict) -> AdaINRuntime:
        return self  # shared by every clone of the patched model

    @property
    def adapter(self) -> AdaINAdapter:
        return self.adapter_patcher.model

    @property
    def full_window(self) -> bool:
        return self.start_percent <= 0.0 and self.end_percent >= 1.0

    def in_window(self, sigma: torch.Tensor | float | None) -> bool:
        if self.full_window or self.sigma_range is None or sigma is None:
            return True
        s = float(sigma.max()) if isinstance(sigma, torch.Tensor) else float(sigma)  # one sync, partial windows only
        hi, lo = self.sigma_range
        return lo <= s <= hi

    def activate(self, batch: Any, sigma: Any) -> AdapterForward | None:
        """The per-forward state, or None when nothing is to be applied (memoised per XSRBatch)."""
        if not isinstance(batch, XSRBatch) or self.strength == 0.0 or not self.in_window(sigma):
            return None
        adapter = self.adapter
        last = self._last
        if last is not None and last[0]() is batch and last[1]() is adapter:
            return last[2]
        stats = batch.stats_for(adapter)
        state = None
        if stats is not None:
            state = AdapterForward(stats, self.strength, batch.rows, fused=adapter.use_triton)
        self._last = (weakref.ref(batch), weakref.ref(adapter), state)
        return state

    def current_state(self) -> tuple | None:
        """(XSRBatch, adapter, AdapterForward) of the last activation, or None (XSR_CUDAGraph's static copies)."""
        last = self._last
        if last is None:
            return None
        batch, adapter = last[0](), last[1]()
        return None if batch is None or adapter is None else (batch, adapter, last[2])

    def pin_state(self, batch: Any, adapter: AdaINAdapter, state: AdapterForward | None) -> None:
        """Make :meth:`activate` return ``state`` for ``batch`` (XSR_CUDAGraph: the static copy a graph reads)."""
        self._last = (weakref.ref(batch), weakref.ref(adapter), state)


class XSRAdapterPatcher(WholeModelPatcher):
    """The adapter's ModelPatcher: ComfyUI budgets/offloads it (whole); multi-GPU deep clones are refused clearly."""

    def deepclone_multigpu(self, *args, **kwargs):
        raise RuntimeError(MULTIGPU_MESSAGE)


def make_adapter_patcher(adapter: AdaINAdapter) -> XSRAdapterPatcher:
    """The adapter's ModelPatcher, in fp16 where ComfyUI would run fp16 on the load device (as the RFA and
    I2T, nodes/loaders.py): it stays resident beside the U-Net, and its statistics are cast to the
    activations' dtype (fp16 there) anyway."""
    import comfy.model_management as mm

    device = mm.get_torch_device()
    if mm.should_use_fp16(device, prioritize_performance=False):
        adapter = adapter.half()
    return XSRAdapterPatcher(adapter, load_device=device, offload_device=mm.unet_offload_device())


# ---------------------------------------------------------------------------------------------
# Site modules (object patches)
# ---------------------------------------------------------------------------------------------
_TWIN_CLASSES: dict[type, type] = {}


def _site_module(original: torch.nn.Module, slot: _Slot, index: int, site: str) -> torch.nn.Module:
    """A shallow twin of ``original`` whose output goes through the adapter.

    The twin shares ``original``'s parameter dict, so weight patches (LoRA), casting and device moves
    of the original apply to it too; only ``forward`` differs. The adapter state comes from ``slot``.
    """
    cls = original.__class__
    twin_cls = _TWIN_CLASSES.get(cls)
    if twin_cls is None:
        base_forward = cls.forward

        def forward(self, *args, **kwargs):
            out = base_forward(self, *args, **kwargs)
            state = self._xsr_slot.state
            if state is None:
                return out
            # a LayerNorm's / Linear's output is a new tensor only this call holds: adapted in place
            fresh = out._base is None and not (args and out is args[0])
            return state.apply(self._xsr_index, self._xsr_site, out, fresh)

        twin_cls = type(f"XSR{cls.__name__}", (cls,), {"forward": forward, "__deepcopy__": lambda self, memo: self})
        _TWIN_CLASSES[cls] = twin_cls
    twin = copy.copy(original)
    twin.__class__ = twin_cls
    twin.__dict__["_xsr_original"] = original  # not a submodule: the twin shares original's _modules dict
    twin._xsr_slot = slot
    twin._xsr_index = index
    twin._xsr_site = site
    return twin


def _site_width(module: torch.nn.Module) -> int | None:
    if hasattr(module, "out_features"):
        return int(module.out_features)
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if shape else None


def _patch_sites(
    patcher: comfy.model_patcher.ModelPatcher, prefix: str, runtime: AdaINRuntime, block_ids: list[str], what: str
) -> None:
    """Object-patch norm2 / attn2.to_q / attn2.to_k / norm3 of every block in ``block_ids``.

    ``prefix``: the path of the model inside the patcher (``"diffusion_model."`` for the U-Net, ``""``
    for a ControlNet's control model). An XSR twin already there (a model patched twice) is replaced.
    """
    adapter = runtime.adapter
    for block_id in block_ids:
        i = adapter.layout.index[block_id]
        spec = adapter.config.blocks[i]
        path = comfy_block_path(block_id)
        try:
            patcher.get_model_object(f"{prefix}{path}")
        except AttributeError:
            raise ValueError(
                f"XSR AdaIN: the adapter covers {what} block {block_id}, which this {what} does not have (no {path}); "
                "the adapter was trained for another architecture (SD1.x U-Net + ControlNet expected)."
            ) from None
        for site, sub in SITE_MODULES:
            key = f"{prefix}{path}.{sub}"
            original = patcher.get_model_object(key)
            original = getattr(original, "_xsr_original", original)
            want = spec["inner_dim"] if site in ("q", "k") else spec["dim"]
            have = _site_width(original)
            if have is not None and have != want:
                raise ValueError(
                    f"XSR AdaIN: {what} block {block_id} has {have} channels at {sub}, the adapter expects {want}: "
                    "the adapter was trained for another base model."
                )
            patcher.add_object_patch(key, _site_module(original, runtime.slot, i, site))


# ---------------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------------
def _apply_model_wrapper(runtime: AdaINRuntime):
    slot = runtime.slot

    def wrapper(executor, x, t, *args, **kwargs):
        state = runtime.activate(kwargs.pop(XSR_KEY, None), t)
        prev = slot.state
        slot.state = state
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            slot.state = prev

    return wrapper


def _calc_cond_batch_wrapper(runtime: AdaINRuntime):
    def wrapper(executor, model, conds, x_in, timestep, model_options):
        if runtime.sigma_range is None:
            ms = model.model_sampling
            runtime.sigma_range = (
                float(ms.percent_to_sigma(runtime.start_percent)),
                float(ms.percent_to_sigma(runtime.end_percent)),
            )
        conds = _fill_embeddings(conds, runtime.apply_to)
        return executor(model, conds, x_in, timestep, model_options)

    wrapper.xsr_runtime = runtime  # found by XSR_CUDAGraph (nodes/cudagraph.py) in the model options
    return wrapper


def _fill_embeddings(conds: list, apply_to: str) -> list:
    """Put every conditioning's E into its model_conds; conditionings without E get a matching entry
    (null, or the positive's with "both"), so all keys stay equal and CFG stays one batched pass."""
    template = None
    for group in conds:
        for c in group or []:
            x = embedding_of(c)
            if x is not None and x.active:
                template = x
                break
        if template is not None:
            break
    if template is None:
        return conds
    filler = template if apply_to == "both" else template.null()
    out = []
    for group in conds:
        if group is None:
            out.append(group)
            continue
        new_group = []
        for c in group:
            mc = c.get("model_conds", {})
            entry = embedding_of(c) or filler
            if mc.get(XSR_KEY) is not entry:
                c = dict(c)
                c["model_conds"] = {**mc, XSR_KEY: entry}
            new_group.append(c)
        out.append(new_group)
    return out


def patch_unet(model: comfy.model_patcher.ModelPatcher, runtime: AdaINRuntime) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` carrying the adapter's object patches for every U-Net block it covers."""
    m = model.clone()
    m.set_additional_models(WRAPPER_KEY, [runtime.adapter_patcher])
    unet_ids = [b for b in runtime.adapter.block_ids if b.startswith("unet.")]
    _patch_sites(m, "diffusion_model.", runtime, unet_ids, "U-Net")
    for kind, factory in (
        (WrappersMP.APPLY_MODEL, _apply_model_wrapper),
        (WrappersMP.CALC_COND_BATCH, _calc_cond_batch_wrapper),
    ):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)  # a model patched twice: the last patch wins
        m.add_wrapper_with_key(kind, WRAPPER_KEY, factory(runtime))
    return m


# ---------------------------------------------------------------------------------------------
# ControlNet
# ---------------------------------------------------------------------------------------------
class XSRControlNet(comfy.controlnet.ControlNet):
    """A ComfyUI ControlNet whose transformer blocks go through the adapter.

    ``get_control`` publishes E from the batched conditioning (the same ``xsr`` entry the U-Net sees); its
    control model patcher is a clone with the same object patches as the U-Net's (:func:`_patch_sites`).
    """

    xsr_runtime: AdaINRuntime | None = None

    def copy(self):
        c = super().copy()  # whatever this ComfyUI's ControlNet.copy() carries over
        c.__class__ = XSRControlNet
        c.xsr_runtime = self.xsr_runtime
        return c

    def deepclone_multigpu(self, *args, **kwargs):
        raise RuntimeError(MULTIGPU_MESSAGE)

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        runtime = self.xsr_runtime
        if runtime is None:
            return super().get_control(x_noisy, t, cond, batched_number, transformer_options)
        slot = runtime.slot
        prev = slot.state
        slot.state = runtime.activate(cond.get(XSR_KEY), t)
        try:
            return super().get_control(x_noisy, t, cond, batched_number, transformer_options)
        finally:
            slot.state = prev


def patch_controlnet(control_net: Any, runtime: AdaINRuntime) -> XSRControlNet:
    """An XSRControlNet copy of ``control_net`` (never mutated) with the adapter's ControlNet blocks patched."""
    if type(control_net) not in (comfy.controlnet.ControlNet, XSRControlNet):
        raise ValueError(
            f"XSR AdaIN: control_net is a {type(control_net).__name__}; the AdaIN adapter needs a full SD1.x "
            "ControlNet (ControlNetLoader on e.g. control_v11f1e_sd15_tile), not a ControlLoRA/T2I-adapter."
        )
    c = control_net.copy()
    c.__class__ = XSRControlNet
    c.xsr_runtime = runtime
    c.control_model_wrapped = wrapped = control_net.control_model_wrapped.clone()
    wrapped.set_additional_models(WRAPPER_KEY, [runtime.adapter_patcher])
    control_ids = [b for b in runtime.adapter.block_ids if b.startswith("control.")]
    _patch_sites(wrapped, "", runtime, control_ids, "ControlNet")
    return c
