"""diffusers binding of the AdaIN adapter (DESIGN §2.4), used by stage-2 training and diffusers inference.

For every block the adapter covers, in a ``UNet2DConditionModel`` and/or a ``ControlNetModel``:

- ``norm2`` / ``norm3``: forward hooks on the block's LayerNorms replace their output by
  ``adapter.apply(id, "norm2"|"norm3", out, ...)``;
- ``q`` / ``k``: ``attn2``'s processor is swapped for :class:`AdaINAttnProcessor`, an
  ``AttnProcessor2_0`` that applies the adapter to ``to_q`` / ``to_k`` outputs before the head split and
  otherwise computes exactly what ``AttnProcessor2_0`` computes. When the adapter is inactive for the
  block it calls the original processor, so outputs are bit-identical to the unpatched model.

The image embedding is supplied per forward pass through a context manager::

    binding = DiffusersAdapterBinding(adapter, unet=unet, controlnet=controlnet)
    with binding.embedding(E, rows=None, strength=1.0):
        down, mid = controlnet(x, t, text, controlnet_cond=hint, return_dict=False)
        pred = unet(x, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()          # inside the context when gradient checkpointing recomputes blocks
    binding.detach()

Outside any context the patched models behave exactly like the unpatched ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from .adain import AdaINAdapter, AdapterStats, Rows
from .blocks import controlnet_blocks, unet_blocks

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Active:
    stats: AdapterStats
    strength: float
    rows: Rows


class AdaINAttnProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` with the adapter's ``q`` and ``k`` sites for one block's ``attn2``."""

    def __init__(self, binding: DiffusersAdapterBinding, block_id: str, original: Any):
        super().__init__()
        self.binding = binding
        self.block_id = block_id
        self.original = original

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        st = self.binding._active
        if st is None or st.strength == 0.0 or not st.stats.is_active(self.block_id, "q"):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        adapter = self.binding.adapter
        # AttnProcessor2_0.__call__ for 3-D inputs without spatial/group norm (checked at attach time)
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)  # (B, N, inner)
        key = attn.to_k(encoder_hidden_states)  # (B, 77, inner)
        value = attn.to_v(encoder_hidden_states)
        query = adapter.apply(self.block_id, "q", query, st.stats, st.strength, st.rows)
        key = adapter.apply(self.block_id, "k", key, st.stats, st.strength, st.rows)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # (B, N, inner)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class DiffusersAdapterBinding:
    """Attach an :class:`AdaINAdapter` to a diffusers U-Net and/or ControlNet (see module docstring).

    ``unet`` takes the adapter's ``unet.*`` blocks, ``controlnet`` its ``control.*`` blocks; a model not
    given leaves its blocks unpatched. Raises ValueError when a block path is missing or its widths do
    not match the adapter (an adapter trained for another base model).
    """

    def __init__(self, adapter: AdaINAdapter, unet: nn.Module | None = None, controlnet: nn.Module | None = None):
        if unet is None and controlnet is None:
            raise ValueError("DiffusersAdapterBinding needs a unet and/or a controlnet to attach to")
        self.adapter = adapter
        self._active: _Active | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._processors: list[tuple[Attention, Any]] = []
        self.patched_blocks: list[str] = []
        models = {"unet": unet, "control": controlnet}
        paths: dict[str, str] = {}  # block id -> diffusers module path, derived from each model's own config
        if unet is not None:
            paths.update((b.id, b.diffusers_path) for b in unet_blocks(unet.config))
        if controlnet is not None:
            paths.update((b.id, b.diffusers_path) for b in controlnet_blocks(controlnet.config))
        try:
            for spec in adapter.config.blocks:
                kind = spec["id"].split(".", 1)[0]
                if models[kind] is None:
                    continue
                if spec["id"] not in paths:
                    raise ValueError(
                        f"adapter block {spec['id']} does not exist in the given {type(models[kind]).__name__}: the "
                        "adapter was built for another U-Net layout (AdaINAdapterConfig.from_unet_config(unet.config))"
                    )
                self._attach_block(models[kind], spec, paths[spec["id"]])
        except Exception:
            self.detach()
            raise
        logger.debug("attached AdaIN adapter to %d blocks", len(self.patched_blocks))

    def _attach_block(self, model: nn.Module, spec: dict[str, Any], path: str) -> None:
        bid = spec["id"]
        try:
            block = model.get_submodule(path)
        except AttributeError as e:
            raise ValueError(
                f"adapter block {bid}: {type(model).__name__} has no module {path}; the adapter was built for "
                "another U-Net layout (rebuild it with AdaINAdapterConfig.from_unet_config(unet.config))"
            ) from e
        if not isinstance(block, BasicTransformerBlock) or block.attn2 is None or block.norm2 is None:
            raise ValueError(f"adapter block {bid}: {path} is not a cross-attention BasicTransformerBlock")
        attn = block.attn2
        if (tuple(block.norm2.normalized_shape) != (spec["dim"],) or tuple(block.norm3.normalized_shape) != (spec["dim"],)
                or attn.to_q.out_features != spec["inner_dim"] or attn.to_k.out_features != spec["inner_dim"]):
            raise ValueError(
                f"adapter block {bid}: widths (dim {spec['dim']}, inner {spec['inner_dim']}) do not match {path} "
                f"(norm2 {tuple(block.norm2.normalized_shape)}, to_q {attn.to_q.out_features}): wrong base model"
            )
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError(f"adapter block {bid}: attn2 with spatial/group norm is not supported")
        self._hooks.append(block.norm2.register_forward_hook(self._norm_hook(bid, "norm2")))
        self._hooks.append(block.norm3.register_forward_hook(self._norm_hook(bid, "norm3")))
        original = attn.processor
        self._processors.append((attn, original))
        attn.set_processor(AdaINAttnProcessor(self, bid, original))
        self.patched_blocks.append(bid)

    def _norm_hook(self, bid: str, site: str):
        adapter = self.adapter

        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            st = self._active
            if st is None:
                return None
            return adapter.apply(bid, site, output, st.stats, st.strength, st.rows)

        return hook

    @contextlib.contextmanager
    def embedding(
        self, E: torch.Tensor | None = None, *, stats: AdapterStats | None = None, rows: Rows = None,
        strength: float = 1.0,
    ) -> Iterator[AdapterStats]:
        """Within the block, patched models use the image embedding ``E`` (or precomputed ``stats``).

        Stats are computed once on entry (with gradients when the adapter trains) and yielded. ``rows``
        and ``strength`` follow :meth:`AdaINAdapter.apply`. Contexts nest; exiting restores the outer one.
        """
        if (E is None) == (stats is None):
            raise ValueError("binding.embedding() takes exactly one of E (image tokens) or stats")
        if stats is None:
            stats = self.adapter.compute_stats(E)
        prev = self._active
        self._active = _Active(stats, float(strength), rows)
        try:
            yield stats
        finally:
            self._active = prev

    def detach(self) -> None:
        """Remove every hook and restore the original attention processors (idempotent)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for attn, original in reversed(self._processors):
            attn.set_processor(original)
        self._processors.clear()
        self.patched_blocks = []
        self._active = None
