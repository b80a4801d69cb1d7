"""ComfyUI binding of the AdaIN adapter (DESIGN §2.4): patches with ComfyUI's own signatures.

The adapter math lives in ``xsr_core.adapter`` (pure PyTorch); this module only routes ComfyUI's
activations through :meth:`AdaINAdapter.apply`. Shape of the design:

- The patched MODEL / CONTROL_NET are **image-independent** (patched once, cached across prompts).
  The per-image embedding E travels inside the positive CONDITIONING as a ``model_conds`` entry
  ``xsr`` (:class:`CONDXSR`), which ComfyUI batches with the text context. Its ``concat`` returns a
  memoised :class:`XSRBatch` (a plain object, passed through to the model untouched), so the
  adapter statistics of a batch are computed once per sampling run, on the adapter's device, and
  reused at every step: no per-step projector, host sync or host-to-device copy.
- Conditioning without E (the negative prompt) gets a matching null entry from a
  ``CALC_COND_BATCH`` wrapper, so positive and negative keep equal keys and are still batched
  together under CFG (a key on one side only would split CFG into two passes). With
  ``apply_to="both"`` the null entries carry the positive's E instead.
- U-Net: a keyed ``DIFFUSION_MODEL`` wrapper takes the batch's XSRBatch from the model kwargs and
  publishes its statistics (context variable) to
  ``set_model_attn2_patch`` (pre-cross-attention norm, α), ``set_model_attn2_replace`` (Q/K, β;
  chaining into any replace already present, e.g. IPAdapter's), and an object patch of each block's
  ``norm3`` (FFN-path norm, γ: ComfyUI has no hook there).
- ControlNet: U-Net transformer_options never reach ComfyUI's ControlNet blocks, so the cloned
  ControlNet gets object patches on its own modules (norm2, attn2.to_q, attn2.to_k, norm3) and a
  ``get_control`` that publishes E from the batched conditioning.
- The adapter weights live in their own ModelPatcher registered with ``set_additional_models``, so
  ComfyUI loads/offloads them with the U-Net. Patch objects hold only references (light under clone()).

Rows of null entries (unconditional branch, or conditioning without E) are returned
bit-identically, and so is everything at strength 0 or outside [start_percent, end_percent].
"""

from __future__ import annotations

import contextvars
import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

import comfy.controlnet
import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
from comfy.patcher_extension import WrappersMP

from ..xsr_core.adapter import AdaINAdapter, AdapterStats, parse_block_id

logger = logging.getLogger(__name__)

XSR_KEY = "xsr"  # model_conds entry: CONDXSR (the enhanced image tokens E of one conditioning)
WRAPPER_KEY = "xsr_adain"
APPLY_TO = ("cond", "both")


class CONDXSR:
    """``model_conds`` entry carrying one conditioning's image embedding E (B, N, D), or a null entry.

    Follows ComfyUI's COND protocol (process_cond / can_concat / concat / size). ``concat`` returns
    an :class:`XSRBatch`, memoised per set of parts, so ComfyUI's per-step ``cond_cat`` hands the model
    the same object at every step of a sampling run.
    """

    def __init__(self, embed: torch.Tensor | None, active: bool = True, batch: int | None = None):
        self.embed = embed  # (B, N, D) or None for a null entry
        self.active = bool(active and embed is not None)
        self.batch = batch if batch is not None else (embed.shape[0] if embed is not None else 1)
        self._memo: dict[tuple, XSRBatch] = {}
        self._stats: dict[int, tuple[Any, Any]] = {}
        self._processed: dict[int, CONDXSR] = {}

    def __deepcopy__(self, memo):
        return self

    def process_cond(self, batch_size: int, **kwargs) -> "CONDXSR":
        # ComfyUI calls this at every sampling step: hand back the same object so that the concat
        # memo and the statistics computed for it live for the whole run
        hit = self._processed.get(batch_size)
        if hit is None:
            hit = self._processed[batch_size] = self._process(batch_size)
        return hit

    def _process(self, batch_size: int) -> "CONDXSR":
        embed = self.embed
        if embed is not None and embed.shape[0] != batch_size:
            if batch_size % embed.shape[0]:
                raise ValueError(f"XSR: {embed.shape[0]} image embeddings cannot be spread over a batch of {batch_size} "
                                 "latents; use one LR image per latent (XSR_PrepareLR makes the matching latent).")
            embed = embed.repeat(batch_size // embed.shape[0], 1, 1)
        return CONDXSR(embed, self.active, batch_size)

    def null(self) -> "CONDXSR":
        hit = self._processed.get(-1)
        if hit is None:
            hit = self._processed[-1] = CONDXSR(None, False, self.batch)
        return hit

    def can_concat(self, other) -> bool:
        return isinstance(other, CONDXSR)

    def concat(self, others) -> "XSRBatch":
        key = tuple(id(o) for o in others)
        hit = self._memo.get(key)
        if hit is None or any(a is not b for a, b in zip(hit.parts[1:], others)):
            hit = XSRBatch([self, *others])
            self._memo[key] = hit
        return hit

    def size(self) -> list[int]:
        return [self.batch, 1]

    def stats_for(self, adapter: AdaINAdapter):
        """This entry's adapter statistics (computed once per adapter, on its device)."""
        hit = self._stats.get(id(adapter))
        if hit is None or hit[0] is not adapter:
            p = adapter.head.weight
            with torch.no_grad():
                stats = adapter.compute_stats(self.embed.to(device=p.device, dtype=p.dtype))
            hit = (adapter, stats)
            self._stats[id(adapter)] = hit
        return hit[1]


class XSRBatch:
    """The XSR entries of one batched model call, in batch order (memoised across sampling steps)."""

    def __init__(self, parts: list[CONDXSR]):
        self.parts = parts
        self.rows = tuple(p.active for p in parts for _ in range(p.batch))
        self._stats: dict[int, tuple[Any, Any]] = {}

    def __deepcopy__(self, memo):
        return self

    def stats_for(self, adapter: AdaINAdapter):
        """AdapterStats with one row per batch row (null rows: zeros, never applied); cached."""
        hit = self._stats.get(id(adapter))
        if hit is not None and hit[0] is adapter:
            return hit[1]
        actives = [p for p in self.parts if p.active]
        if not actives:
            stats = None
        elif len(self.parts) == 1:
            stats = self.parts[0].stats_for(adapter)
        else:
            per = [p.stats_for(adapter) if p.active else None for p in self.parts]
            ref = next(s for s in per if s is not None)
            mu = torch.cat([s.mu if s is not None else ref.mu.new_zeros(p.batch, ref.mu.shape[1])
                            for s, p in zip(per, self.parts)])
            sigma = torch.cat([s.sigma if s is not None else ref.sigma.new_ones(p.batch, ref.sigma.shape[1])
                               for s, p in zip(per, self.parts)])
            stats = AdapterStats(ref.layout, mu, sigma, ref.gates, ref.active, ref.eps)
        self._stats[id(adapter)] = (adapter, stats)
        return stats


@dataclass
class _Active:
    """What the patches need during one forward: the adapter, its stats, strength and rows."""

    runtime: "AdaINRuntime"
    stats: Any
    rows: tuple[bool, ...] | None  # which batch rows get the adapter (None: all)


_CURRENT: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("xsr_adain_current", default=None)


@dataclass(eq=False)
class AdaINRuntime:
    """Shared, light state of one XSR_AdaINPatch: the adapter patcher and the user's settings."""

    adapter_patcher: comfy.model_patcher.ModelPatcher
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    apply_to: str = "cond"
    sigma_range: tuple[float, float] | None = field(default=None)  # (sigma_start, sigma_end) once known

    def __deepcopy__(self, memo: dict) -> "AdaINRuntime":
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

    def activate(self, batch: Any, sigma: Any) -> _Active | None:
        """The per-forward state, or None when nothing is to be applied."""
        if not isinstance(batch, XSRBatch) or self.strength == 0.0 or not self.in_window(sigma):
            return None
        stats = batch.stats_for(self.adapter)
        if stats is None:
            return None
        rows = None if all(batch.rows) else batch.rows
        return _Active(self, stats, rows)


def _apply(block_id: str, site: str, h: torch.Tensor, state: _Active) -> torch.Tensor:
    adapter = state.runtime.adapter
    if block_id not in adapter.layout.index:
        return h
    rows = state.rows
    if state.stats.batch not in (1, h.shape[0]):
        # not the batch the conditioning described (should not happen): leave the activation alone
        logger.warning("XSR adapter: stats for %d rows, activation has %d; skipped", state.stats.batch, h.shape[0])
        return h
    return adapter.apply(block_id, site, h, state.stats, strength=state.runtime.strength, rows=rows)


# ---------------------------------------------------------------------------------------------
# U-Net patches
# ---------------------------------------------------------------------------------------------
def _unet_block_id(extra_options: dict) -> str | None:
    block = extra_options.get("block")
    if block is None:
        return None
    return f"unet.{block[0]}.{int(block[1])}.{int(extra_options.get('block_index', 0))}"


class Norm2Patch:
    """``attn2_patch``: AdaIN on the pre-cross-attention LayerNorm output (gate α)."""

    def __call__(self, n, context_attn2, value_attn2, extra_options):
        state = _CURRENT.get()
        if state is not None:
            block_id = _unet_block_id(extra_options)
            if block_id is not None:
                n = _apply(block_id, "norm2", n, state)
        return n, context_attn2, value_attn2

    def __deepcopy__(self, memo):
        return self


class QKReplace:
    """``attn2_replace`` for one block: AdaIN on Q and K (gate β), then the previous replace or attention."""

    def __init__(self, block_id: str, previous: Any = None):
        self.block_id = block_id
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        state = _CURRENT.get()
        if state is not None:
            q = _apply(self.block_id, "q", q, state)
            k = _apply(self.block_id, "k", k, state)
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return comfy_attention.optimized_attention(
            q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
            transformer_options=extra_options,
        )


def _site_module(original: torch.nn.Module, block_id: str, site: str) -> torch.nn.Module:
    """A shallow twin of ``original`` whose output goes through the adapter.

    The twin shares ``original``'s parameter dict, so weight patches (LoRA), casting and device moves
    of the original apply to it too; only ``forward`` differs. The adapter state comes from the
    context variable set by the U-Net wrapper or XSRControlNet.get_control.
    """
    cls = original.__class__
    twin_cls = _TWIN_CLASSES.get(cls)
    if twin_cls is None:
        def forward(self, *args, **kwargs):
            out = cls.forward(self, *args, **kwargs)
            state = _CURRENT.get()
            if state is None:
                return out
            return _apply(self._xsr_block_id, self._xsr_site, out, state)

        twin_cls = type(f"XSR{cls.__name__}", (cls,), {"forward": forward, "__deepcopy__": lambda self, memo: self})
        _TWIN_CLASSES[cls] = twin_cls
    twin = copy.copy(original)
    twin.__class__ = twin_cls
    twin._xsr_block_id = block_id
    twin._xsr_site = site
    return twin


_TWIN_CLASSES: dict[type, type] = {}


def _comfy_block_path(block_id: str) -> str:
    """Module path of a block's BasicTransformerBlock in ComfyUI's UNetModel / cldm.ControlNet."""
    _, stage, index, t = parse_block_id(block_id)
    if stage == "middle":
        return f"middle_block.1.transformer_blocks.{t}"
    return f"{stage}_blocks.{index}.1.transformer_blocks.{t}"


def _diffusion_model_wrapper(runtime: AdaINRuntime):
    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        state = runtime.activate(kwargs.pop(XSR_KEY, None), transformer_options.get("sigmas"))
        token = _CURRENT.set(state)
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            _CURRENT.reset(token)

    return wrapper


def _calc_cond_batch_wrapper(runtime: AdaINRuntime):
    def wrapper(executor, model, conds, x_in, timestep, model_options):
        if runtime.sigma_range is None:
            ms = model.model_sampling
            runtime.sigma_range = (float(ms.percent_to_sigma(runtime.start_percent)),
                                   float(ms.percent_to_sigma(runtime.end_percent)))
        conds = _fill_null_embeddings(conds, runtime.apply_to)
        return executor(model, conds, x_in, timestep, model_options)

    return wrapper


def _fill_null_embeddings(conds: list, apply_to: str) -> list:
    """Give every conditioning without E a matching entry (null, or the positive's with "both")."""
    template = None
    for group in conds:
        for c in group or []:
            x = c.get("model_conds", {}).get(XSR_KEY)
            if isinstance(x, CONDXSR) and x.active:
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
            if XSR_KEY not in mc:
                c = dict(c)
                c["model_conds"] = {**mc, XSR_KEY: filler}
            new_group.append(c)
        out.append(new_group)
    return out


def patch_unet(model: comfy.model_patcher.ModelPatcher, runtime: AdaINRuntime) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` carrying the adapter patches for every U-Net block the adapter covers."""
    m = model.clone()
    m.set_additional_models(WRAPPER_KEY, [runtime.adapter_patcher])
    adapter = runtime.adapter
    unet_ids = [b for b in adapter.block_ids if b.startswith("unet.")]
    if not unet_ids:
        return m
    diffusion_model = m.get_model_object("diffusion_model")
    replace = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    m.set_model_attn2_patch(Norm2Patch())
    for block_id in unet_ids:
        _, stage, index, t = parse_block_id(block_id)
        path = _comfy_block_path(block_id)
        try:
            diffusion_model.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"XSR_AdaINPatch: the adapter covers block {block_id}, which this model does not have "
                f"(no {path}); the adapter was trained for another U-Net architecture (SD1.x expected)."
            ) from None
        previous = replace.get((stage, index, t), replace.get((stage, index)))
        m.set_model_attn2_replace(QKReplace(block_id, previous), stage, index, t)
        key = f"diffusion_model.{path}.norm3"
        m.add_object_patch(key, _site_module(m.get_model_object(key), block_id, "norm3"))
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _diffusion_model_wrapper(runtime))
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, _calc_cond_batch_wrapper(runtime))
    return m


# ---------------------------------------------------------------------------------------------
# ControlNet
# ---------------------------------------------------------------------------------------------
class XSRControlNet(comfy.controlnet.ControlNet):
    """A ComfyUI ControlNet whose transformer blocks go through the adapter.

    ``get_control`` publishes E from the batched conditioning (the same ``xsr_embed``/``xsr_active``
    entries the U-Net sees); its control model patcher is a clone with object patches on the
    blocks' norm2, attn2.to_q, attn2.to_k and norm3.
    """

    xsr_runtime: AdaINRuntime | None = None

    def copy(self):
        c = XSRControlNet(None, global_average_pooling=self.global_average_pooling, load_device=self.load_device,
                          manual_cast_dtype=self.manual_cast_dtype)
        c.control_model = self.control_model
        c.control_model_wrapped = self.control_model_wrapped
        self.copy_to(c)
        c.xsr_runtime = self.xsr_runtime
        return c

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        runtime = self.xsr_runtime
        state = None
        if runtime is not None:
            state = runtime.activate(cond.get(XSR_KEY), t)
        token = _CURRENT.set(state)
        try:
            return super().get_control(x_noisy, t, cond, batched_number, transformer_options)
        finally:
            _CURRENT.reset(token)


def patch_controlnet(control_net: Any, runtime: AdaINRuntime) -> XSRControlNet:
    """An XSRControlNet copy of ``control_net`` (never mutated) with the adapter's ControlNet blocks patched."""
    if type(control_net) not in (comfy.controlnet.ControlNet, XSRControlNet):
        raise ValueError(
            f"XSR_AdaINPatch: control_net is a {type(control_net).__name__}; the AdaIN adapter needs a full SD1.x "
            "ControlNet (ControlNetLoader on e.g. control_v11f1e_sd15_tile), not a ControlLoRA/T2I-adapter."
        )
    c = XSRControlNet(None, global_average_pooling=control_net.global_average_pooling,
                      load_device=control_net.load_device, manual_cast_dtype=control_net.manual_cast_dtype)
    c.control_model = control_net.control_model
    c.control_model_wrapped = control_net.control_model_wrapped.clone()
    control_net.copy_to(c)
    c.xsr_runtime = runtime
    wrapped = c.control_model_wrapped
    wrapped.set_additional_models(WRAPPER_KEY, [runtime.adapter_patcher])
    control_ids = [b for b in runtime.adapter.block_ids if b.startswith("control.")]
    for block_id in control_ids:
        path = _comfy_block_path(block_id)
        try:
            wrapped.model.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"XSR_AdaINPatch: the adapter covers ControlNet block {block_id}, which this ControlNet does not "
                f"have (no {path}): use an SD1.x ControlNet matching the checkpoint."
            ) from None
        for site, sub in (("norm2", "norm2"), ("q", "attn2.to_q"), ("k", "attn2.to_k"), ("norm3", "norm3")):
            key = f"{path}.{sub}"
            wrapped.add_object_patch(key, _site_module(wrapped.get_model_object(key), block_id, site))
    return c
