"""ComfyUI binding of the AdaIN adapter (DESIGN §2.4): patches with ComfyUI's own signatures.

The adapter math lives in ``xsr_core.adapter`` (pure PyTorch); this module only routes ComfyUI's
activations through :meth:`AdaINAdapter.apply`. Shape of the design:

- The patched MODEL / CONTROL_NET are **image-independent** (patched once, cached across prompts).
  The per-image embedding E travels inside the positive CONDITIONING as two ``model_conds`` entries,
  ``xsr_embed`` (B, N, D) and ``xsr_active`` (B, 1), which ComfyUI batches with the text context.
- Conditioning without E (the negative prompt) gets a matching null entry (zeros, active 0) from a
  ``CALC_COND_BATCH`` wrapper, so positive and negative keep equal keys and are still batched
  together under CFG (a key on one side only would split CFG into two passes). With
  ``apply_to="both"`` the null entries carry the positive's E instead.
- U-Net: a keyed ``DIFFUSION_MODEL`` wrapper takes E from the model kwargs, computes the adapter's
  statistics once per call and publishes them (context variable) to
  ``set_model_attn2_patch`` (pre-cross-attention norm, α), ``set_model_attn2_replace`` (Q/K, β;
  chaining into any replace already present, e.g. IPAdapter's), and an object patch of each block's
  ``norm3`` (FFN-path norm, γ: ComfyUI has no hook there).
- ControlNet: U-Net transformer_options never reach ComfyUI's ControlNet blocks, so the cloned
  ControlNet gets object patches on its own modules (norm2, attn2.to_q, attn2.to_k, norm3) and a
  ``get_control`` that publishes E from the batched conditioning.
- The adapter weights live in their own ModelPatcher registered with ``set_additional_models``, so
  ComfyUI loads/offloads them with the U-Net. Patch objects hold only references (light under clone()).

Rows whose ``xsr_active`` is 0 (unconditional branch, or conditioning without E) are returned
bit-identically, and so is everything at strength 0 or outside [start_percent, end_percent].
"""

from __future__ import annotations

import contextvars
import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

import comfy.conds
import comfy.controlnet
import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
from comfy.patcher_extension import WrappersMP

from ..xsr_core.adapter import AdaINAdapter, parse_block_id

logger = logging.getLogger(__name__)

EMBED_KEY = "xsr_embed"  # model_conds: (B, N, D) enhanced image tokens E
ACTIVE_KEY = "xsr_active"  # model_conds: (B, 1) 1.0 where E applies, 0.0 for null entries
WRAPPER_KEY = "xsr_adain"
APPLY_TO = ("cond", "both")


@dataclass
class _Active:
    """What the patches need during one forward: the adapter, its stats, strength and rows."""

    runtime: "AdaINRuntime"
    stats: Any
    rows: torch.Tensor | None  # bool (B,) or None for all rows


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

    def in_window(self, sigma: torch.Tensor | float | None) -> bool:
        if self.sigma_range is None or sigma is None:
            return True
        s = float(sigma.max()) if isinstance(sigma, torch.Tensor) else float(sigma)
        hi, lo = self.sigma_range
        return lo <= s <= hi

    def activate(self, embed: torch.Tensor | None, active: torch.Tensor | None, sigma: Any) -> _Active | None:
        """The per-forward state, or None when nothing is to be applied."""
        if embed is None or self.strength == 0.0 or not self.in_window(sigma):
            return None
        adapter = self.adapter
        p = adapter.head.weight
        with torch.no_grad():
            stats = adapter.compute_stats(embed.to(device=p.device, dtype=p.dtype))
        rows = None
        if active is not None:
            rows = active.reshape(active.shape[0], -1)[:, 0] > 0.5
        return _Active(self, stats, rows)


def _apply(block_id: str, site: str, h: torch.Tensor, state: _Active) -> torch.Tensor:
    adapter = state.runtime.adapter
    if block_id not in adapter.layout.index:
        return h
    rows = state.rows
    if rows is not None and rows.shape[0] != h.shape[0]:
        # ComfyUI may run a sub-batch (e.g. uncond alone); without matching rows nothing is applied
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


def _site_module(original: torch.nn.Module, block_id: str, site: str, source: str) -> torch.nn.Module:
    """A shallow twin of ``original`` whose output goes through the adapter.

    The twin shares ``original``'s parameter dict, so weight patches (LoRA), casting and device moves
    of the original apply to it too; only ``forward`` differs. ``source`` says where the state comes
    from ("current": the context variable).
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
        embed = kwargs.pop(EMBED_KEY, None)
        active = kwargs.pop(ACTIVE_KEY, None)
        state = runtime.activate(embed, active, transformer_options.get("sigmas"))
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
    """Give every conditioning without E a matching entry (null E, or the positive's with "both")."""
    template = None
    for group in conds:
        for c in group or []:
            mc = c.get("model_conds", {})
            if EMBED_KEY in mc:
                template = mc
                break
        if template is not None:
            break
    if template is None:
        return conds
    e = template[EMBED_KEY].cond
    if apply_to == "both":
        null_e, null_a = template[EMBED_KEY], template[ACTIVE_KEY]
    else:
        null_e = comfy.conds.CONDRegular(torch.zeros_like(e))
        null_a = comfy.conds.CONDRegular(torch.zeros(e.shape[0], 1, dtype=e.dtype, device=e.device))
    out = []
    for group in conds:
        if group is None:
            out.append(group)
            continue
        new_group = []
        for c in group:
            mc = c.get("model_conds", {})
            if EMBED_KEY not in mc:
                c = dict(c)
                c["model_conds"] = {**mc, EMBED_KEY: null_e, ACTIVE_KEY: null_a}
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
        m.add_object_patch(key, _site_module(m.get_model_object(key), block_id, "norm3", "current"))
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
            state = runtime.activate(cond.get(EMBED_KEY), cond.get(ACTIVE_KEY), t)
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
            wrapped.add_object_patch(key, _site_module(wrapped.get_model_object(key), block_id, site, "current"))
    return c
