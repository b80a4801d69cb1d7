"""diffusers binding of the AdaIN adapter (DESIGN §2.4), used by stage-2 training and diffusers inference.

For every block the adapter covers, in a ``UNet2DConditionModel`` and/or a ``ControlNetModel``, forward
hooks on four modules replace their output by ``adapter.apply(id, site, out, ...)``:

- ``norm2`` / ``norm3``: the block's LayerNorms (sites ``norm2`` / ``norm3``);
- ``attn2.to_q`` / ``attn2.to_k``: the cross-attention projections (sites ``q`` / ``k``), so Q and K are
  adapted before the head split whatever attention processor ``attn2`` uses.

These are the same four modules the ComfyUI binding object-patches. A hook returns None when no
embedding is active, so outputs are then bit-identical to the unpatched model.

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
import logging
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from .adain import AdaINAdapter, AdapterForward, AdapterStats, Rows
from .blocks import controlnet_blocks, unet_blocks

logger = logging.getLogger(__name__)


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
        self._active: AdapterForward | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
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
        if (
            tuple(block.norm2.normalized_shape) != (spec["dim"],)
            or tuple(block.norm3.normalized_shape) != (spec["dim"],)
            or attn.to_q.out_features != spec["inner_dim"]
            or attn.to_k.out_features != spec["inner_dim"]
        ):
            raise ValueError(
                f"adapter block {bid}: widths (dim {spec['dim']}, inner {spec['inner_dim']}) do not match {path} "
                f"(norm2 {tuple(block.norm2.normalized_shape)}, to_q {attn.to_q.out_features}): wrong base model"
            )
        if getattr(attn, "fused_projections", False):
            raise ValueError(
                f"adapter block {bid}: attn2 uses fused projections (to_qkv); call "
                "unfuse_qkv_projections() first so to_q / to_k run as their own modules"
            )
        for module, site in ((block.norm2, "norm2"), (attn.to_q, "q"), (attn.to_k, "k"), (block.norm3, "norm3")):
            self._hooks.append(module.register_forward_hook(self._site_hook(bid, site)))
        self.patched_blocks.append(bid)

    def _site_hook(self, bid: str, site: str):
        index = self.adapter.layout.index[bid]

        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            st = self._active
            if st is None:
                return None
            # a LayerNorm's / Linear's output is a new tensor only this call holds: adapted in place
            fresh = output._base is None and not (inputs and output is inputs[0])
            return st.apply(index, site, output, fresh)

        return hook

    @contextlib.contextmanager
    def embedding(
        self,
        E: torch.Tensor | None = None,
        *,
        stats: AdapterStats | None = None,
        rows: Rows = None,
        strength: float = 1.0,
    ) -> Iterator[AdapterStats]:
        """Within the block, patched models use the image embedding ``E`` (or precomputed ``stats``).

        Stats are computed once on entry (with gradients when the adapter trains) and yielded. ``rows``
        (None or one bool per batch row) and ``strength`` follow :meth:`AdaINAdapter.apply`; the sites run
        :class:`AdapterForward` (the hot path the ComfyUI binding uses too). Contexts nest; exiting
        restores the outer one.
        """
        if (E is None) == (stats is None):
            raise ValueError("binding.embedding() takes exactly one of E (image tokens) or stats")
        if stats is None:
            stats = self.adapter.compute_stats(E)
        prev = self._active
        self._active = AdapterForward(stats, strength, rows, fused=self.adapter.use_triton)
        try:
            yield stats
        finally:
            self._active = prev

    def detach(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.patched_blocks = []
        self._active = None
