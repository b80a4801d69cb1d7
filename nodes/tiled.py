"""Tiled x16 for LR images up to 256 px: XSR_PrepareLRTiled, XSR_TiledModel, XSR_TilePreview.

How it plugs into a stock graph (workflows/xsr_x16_tiled.json):

    LR ─► XSR_PrepareLRTiled ─► tiles (T LR tiles of 32x32) ─► XSR_Retrieve ─► XSR_Enhance ─► positive (T rows)
                             ├► hint (full x16) ─► ControlNetApplyAdvanced
                             ├► latent (full x16 / 8) ─► KSampler (stock; any sampler/scheduler)
                             └► tiling ─► XSR_TiledModel(model) ─► KSampler.model

Each tile is one row of the conditioning, exactly like one LR image of a batch: its own references
(XSR_Retrieve already answers a batch row by row), its own image embedding E (the ``xsr``
conditioning entry) and its own caption (XSR_Enhance writes one per row). The full-size latent is
sampled once by the stock KSampler; XSR_TiledModel's ``CALC_COND_BATCH`` wrapper cuts the latent
into the tiles at every model call, hands ComfyUI's own ``calc_cond_batch`` a *batch of tiles* with
the matching conditioning rows (so the adapter binding, ControlNet, CFG batching and hooks all see
an ordinary batch of 32x32 problems) and blends the per-tile predictions back with normalised
weights (cosine feathering by default; Mixture of Diffusers' Gaussian; MultiDiffusion's average).
All tiles share one noise field and one trajectory, so there are no seams.

The ControlNet hint is cut the same way: for every ControlNet in the conditioning (and its
``previous_controlnet`` chain) the full-size hint is prepared once per run as ComfyUI's ControlNet
does it, and each tile batch sets ``cond_hint`` to its crops before the call, so ControlNet sees
tile-sized hints that match its tile-sized input (the approach of ComfyUI-TiledDiffusion).

Captions: one per tile (the default), because the caption is decoded from the same per-tile E the
adapter uses, so text and image conditions agree per tile; one global caption repeated over every
tile is the classic tiled-upscaling failure (the object named in the prompt reappears in every
tile). A user who wants one prompt for all tiles types it into XSR_Enhance's ``caption_override``.

Tiles are batched: the tile batch is the most tiles whose CFG batch fits in free memory by
ComfyUI's own estimate (``model.memory_required``, ``get_free_memory``), or the user's fixed
``tile_batch``. KSampler's progress bar advances once per step, and a step covers all tiles;
interrupts are checked between tile batches.

Contract with the adapter binding: only the ``xsr`` key carrying one E row per conditioning row
(``CONDXSR(E)`` in the conditioning options, as XSR_Enhance attaches it with
``comfy_binding.attach_embedding``, or in ``model_conds``) and ComfyUI's public wrapper API.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

import comfy.conds
import comfy.controlnet
import comfy.model_management
import comfy.utils
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io, ui

from ..xsr_core import SCALE
from ..xsr_core.imaging import LRImageError, bicubic_resize, validate_lr
from ..xsr_core.tiling import (
    LATENT_PER_LR,
    MAX_TILED_LR_SIDE,
    TILE,
    WEIGHTINGS,
    Tiling,
    TilingError,
    blend,
    crop_tiles,
    tile_weights,
)
from .comfy_binding import XSR_KEY, CONDXSR
from .validation import max_tiles
from .common import XSRRefs, choice_input, controls_of, int_input, xsr_schema
from .image import hint_and_latent, prepare_outputs

logger = logging.getLogger(__name__)

XSRTiles = io.Custom("XSR_TILES")
WRAPPER_KEY = "xsr_tiled"
PREVIEW_THUMB = 128  # side of the reference thumbnails XSR_TilePreview shows


def _tiling_input() -> io.Input:
    """The tile-geometry input of XSR_TiledModel and XSR_TilePreview."""
    return XSRTiles.Input("tiling", tooltip="from XSR Prepare LR Tiles")


class XSRPrepareLRTiled(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return xsr_schema(
            "XSR_PrepareLRTiled",
            "XSR Prepare LR Tiles (tiled x16)",
            (
                f"Checks an LR image of any aspect ratio up to {MAX_TILED_LR_SIDE} px per side and cuts it into "
                f"overlapping {TILE}x{TILE} tiles (each one the paper's 32->512 problem). Returns the tiles for "
                f"XSR Retrieve (one row per tile), the full x{SCALE} ControlNet hint and empty latent, and the "
                "tiling for XSR Tiled Diffusion."
            ),
            inputs=[
                io.Image.Input(
                    "image", tooltip=f"one LR image, 4 to {MAX_TILED_LR_SIDE} px per side (RGB, RGBA or grayscale)"
                ),
                int_input(
                    "overlap",
                    8,
                    0,
                    TILE - 8,
                    f"minimum overlap of neighbouring tiles in LR px (x{SCALE} in the output); "
                    "more overlap: smoother blending, more tiles",
                    step=1,
                ),
            ],
            outputs=[
                *prepare_outputs(),
                io.Image.Output(
                    "tiles", display_name="tiles", tooltip="the LR tiles as a batch, row-major (for XSR Retrieve)"
                ),
                XSRTiles.Output("tiling", display_name="tiling", tooltip="the tile geometry (for XSR Tiled Diffusion)"),
            ],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, overlap: int) -> io.NodeOutput:
        try:
            lr = validate_lr(image, max_side=MAX_TILED_LR_SIDE, what="XSR_PrepareLRTiled input 'image'")
        except LRImageError as e:
            raise ValueError(str(e)) from None
        if lr.shape[0] != 1:
            raise ValueError(
                f"XSR_PrepareLRTiled: got a batch of {lr.shape[0]} images; the tiled path takes one LR "
                "image per run (queue them one by one, or use the batch-folder workflow for many small images)."
            )
        _, h, w, _ = lr.shape
        try:
            tiling = Tiling.make(h, w, TILE, int(overlap))
        except TilingError as e:
            raise ValueError(f"XSR_PrepareLRTiled: {e}") from None
        cap = max_tiles()
        if len(tiling) > cap:
            raise ValueError(
                f"XSR_PrepareLRTiled: a {w}x{h} LR at overlap {overlap} makes {len(tiling)} tiles, above "
                f"the cap of {cap} (XSR_MAX_TILES in the server's environment); lower the overlap "
                "(the default 8 gives at most 121 tiles) or raise the cap."
            )
        logger.info(
            "XSR tiled: %dx%d LR -> %d tiles (%dx%d grid, overlap %d px)",
            w,
            h,
            len(tiling),
            tiling.rows,
            tiling.cols,
            overlap,
        )
        return io.NodeOutput(*hint_and_latent(lr), lr, tiling.crop_lr(lr), tiling)


# ---------------------------------------------------------------------------------------------
# The tiled model call
# ---------------------------------------------------------------------------------------------
def _slice_entry(name: str, entry: Any, rows: torch.Tensor, n_tiles: int, batch: int) -> Any:
    """The conditioning entry for a batch of tiles: per-tile entries (n_tiles rows) take their rows."""
    if isinstance(entry, CONDXSR):
        embed = entry.embed
        if embed is None or embed.shape[0] in (1, batch) and embed.shape[0] != n_tiles:
            return entry  # null entry, or one E for every tile: ComfyUI repeats it to the batch
        if embed.shape[0] != n_tiles:
            raise ValueError(
                f"XSR_TiledModel: the conditioning carries {embed.shape[0]} image embeddings but the tiling "
                f"has {n_tiles} tiles; feed XSR Retrieve with the 'tiles' output of the same "
                "XSR_PrepareLRTiled node that made the tiling."
            )
        return CONDXSR(embed[rows.to(embed.device)])
    if isinstance(entry, comfy.conds.CONDNoiseShape):
        raise ValueError(
            f"XSR_TiledModel: the model takes a latent-shaped conditioning '{name}' (inpainting / "
            "instruct-pix2pix models), which the tiled path does not cut into tiles; use an SD1.x "
            "text-to-image checkpoint."
        )
    cond = getattr(entry, "cond", None)
    if isinstance(cond, torch.Tensor) and hasattr(entry, "_copy_with"):
        if cond.shape[0] == n_tiles:
            return entry._copy_with(cond[rows.to(cond.device)])
        if cond.shape[0] not in (1, batch):
            raise ValueError(
                f"XSR_TiledModel: conditioning '{name}' has {cond.shape[0]} rows, the tiling {n_tiles} "
                "tiles; one row per tile (from XSR Enhance on the tiles) or one row for all is expected."
            )
    return entry


class TiledRuntime:
    """State of one XSR_TiledModel: the tiling, its weights and per-run caches (light under clone())."""

    def __init__(self, tiling: Tiling, weighting: str, tile_batch: int):
        self.tiling = tiling
        self.weighting = weighting
        self.tile_batch = int(tile_batch)
        self._weights: dict[tuple, torch.Tensor] = {}
        self._conds: dict[tuple, tuple[Any, dict]] = {}
        self._hints: dict[int, tuple[Any, torch.Tensor]] = {}

    def __deepcopy__(self, memo):
        return self

    def clear(self) -> None:
        self._conds.clear()
        self._hints.clear()

    # -- pieces ---------------------------------------------------------------------------------
    def weights(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        w = self._weights.get(key)
        if w is None:
            w = self._weights[key] = tile_weights(self.tiling, LATENT_PER_LR, self.weighting).to(
                device=device, dtype=dtype
            )
        return w

    def group_size(self, model, x_in: torch.Tensor, conds: list) -> int:
        n = len(self.tiling)
        if self.tile_batch > 0:
            return min(self.tile_batch, n)
        chunks = max(1, sum(1 for g in conds if g))
        th, tw = (s * LATENT_PER_LR for s in self.tiling.tile_hw)
        free = comfy.model_management.get_free_memory(x_in.device)
        factor = 1.5 * (1.5 if controls_of(conds) else 1.0)  # ComfyUI's margin; a ControlNet adds about half a U-Net
        g = n
        while g > 1 and model.memory_required([chunks * g * x_in.shape[0], x_in.shape[1], th, tw]) * factor >= free:
            g -= 1
        batches = math.ceil(n / g)
        return math.ceil(n / batches)  # even batches

    def cond_for(self, c: dict, index: tuple[int, ...], batch: int) -> dict:
        key = (id(c), index, batch)
        hit = self._conds.get(key)
        if hit is not None and hit[0] is c:
            return hit[1]
        if "area" in c or "mask" in c:
            raise ValueError(
                "XSR_TiledModel: area or mask conditioning (ConditioningSetArea/SetMask) is not supported "
                "by the tiled path; the tiles already give every region its own conditioning."
            )
        rows = torch.tensor(index).repeat_interleave(batch)
        n = len(self.tiling)
        new = dict(c)
        new["model_conds"] = {k: _slice_entry(k, v, rows, n, batch) for k, v in c.get("model_conds", {}).items()}
        if isinstance(c.get(XSR_KEY), CONDXSR):  # E in the conditioning options (comfy_binding.attach_embedding)
            new[XSR_KEY] = _slice_entry(XSR_KEY, c[XSR_KEY], rows, n, batch)
        self._conds[key] = (c, new)
        return new

    def full_hint(self, ctrl: Any, x_in: torch.Tensor) -> torch.Tensor:
        hit = self._hints.get(id(ctrl))
        if hit is not None and hit[0] is ctrl:
            return hit[1]
        if (
            not isinstance(ctrl, comfy.controlnet.ControlNet)
            or getattr(ctrl, "vae", None) is not None
            or getattr(ctrl, "latent_format", None) is not None
            or len(getattr(ctrl, "extra_concat_orig", ())) > 0
        ):
            raise ValueError(
                f"XSR_TiledModel: {type(ctrl).__name__} is not supported by the tiled path; use an SD1.x "
                "ControlNet (ControlNetLoader, e.g. the tile ControlNet) whose hint is an image."
            )
        cr = ctrl.compression_ratio
        h, w = x_in.shape[-2:]
        # the steps of ComfyUI's ControlNet.get_control, at the full latent size
        full = comfy.utils.common_upscale(ctrl.cond_hint_original, w * cr, h * cr, ctrl.upscale_algorithm, "center")
        full = ctrl.preprocess_image(full)
        dtype = ctrl.manual_cast_dtype if ctrl.manual_cast_dtype is not None else ctrl.control_model.dtype
        full = comfy.utils.repeat_to_batch_size(full, x_in.shape[0]).to(device=x_in.device, dtype=dtype)
        self._hints[id(ctrl)] = (ctrl, full)
        return full

    # -- the wrapper ----------------------------------------------------------------------------
    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        tiling = self.tiling
        if x_in.ndim != 4 or tuple(x_in.shape[-2:]) != tiling.latent_hw:
            lh, lw = tiling.latent_hw
            raise ValueError(
                f"XSR_TiledModel: the latent is {x_in.shape[-1] * 8}x{x_in.shape[-2] * 8} px but the tiling was made "
                f"for a {tiling.lr_width}x{tiling.lr_height} LR ({lw * 8}x{lh * 8} px): sample the 'latent' output of "
                "the XSR_PrepareLRTiled node that made the tiling."
            )
        n, batch = len(tiling), x_in.shape[0]
        weights = self.weights(x_in.device, x_in.dtype)
        controls = controls_of(conds)
        g = self.group_size(model, x_in, conds)
        out = [torch.zeros_like(x_in) for _ in conds]
        for start in range(0, n, g):
            comfy.model_management.throw_exception_if_processing_interrupted()
            index = tuple(range(start, min(n, start + g)))
            x_t = crop_tiles(x_in, tiling, list(index), LATENT_PER_LR, batch=batch)
            t_t = timestep.repeat(len(index))  # tile-major rows: tile j's rows are j*batch ... (j+1)*batch
            conds_t = [None if grp is None else [self.cond_for(c, index, batch) for c in grp] for grp in conds]
            for ctrl in controls:
                full = self.full_hint(ctrl, x_in)
                ctrl.cond_hint = crop_tiles(
                    full, tiling, list(index), LATENT_PER_LR * ctrl.compression_ratio, batch=batch
                )
            try:
                res = executor(model, conds_t, x_t, t_t, model_options)
            finally:
                for ctrl in controls:
                    ctrl.cond_hint = None
            for i, grp in enumerate(conds):
                if grp is not None:
                    blend(res[i], weights, tiling, LATENT_PER_LR, out=out[i], index=list(index), batch=batch)
        return out

    def outer_sample(self, executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            self.clear()


class XSRTiledModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return xsr_schema(
            "XSR_TiledModel",
            "XSR Tiled Diffusion (x16)",
            "Makes the stock KSampler denoise the full x16 latent as overlapping 512x512 tiles in one "
            "sampling run: every tile gets its own conditioning row (references, image embedding, "
            "caption from XSR Retrieve/Enhance on the tiles) and its crop of the ControlNet hint, and the "
            "per-tile predictions are blended at every step (no seams). Works on the XSR-patched model "
            "or any SD1.x MODEL.",
            inputs=[
                io.Model.Input("model", tooltip="the (XSR AdaIN-patched) MODEL"),
                _tiling_input(),
                choice_input(
                    "weighting",
                    WEIGHTINGS,
                    "cosine",
                    "cosine: feathered overlaps, tile interiors untouched; gaussian: Mixture of "
                    "Diffusers; constant: MultiDiffusion's plain average",
                ),
                int_input("tile_batch", 0, 0, 256, "tiles per model call; 0 = as many as fit in free VRAM"),
            ],
            outputs=[io.Model.Output("tiled_model", display_name="model")],
        )

    @classmethod
    def execute(cls, model, tiling: Tiling, weighting: str, tile_batch: int) -> io.NodeOutput:
        if not isinstance(tiling, Tiling):
            raise ValueError("XSR_TiledModel: 'tiling' must come from XSR Prepare LR Tiles.")
        runtime = TiledRuntime(tiling, weighting, tile_batch)
        m = model.clone()
        m.remove_wrappers_with_key(WrappersMP.CALC_COND_BATCH, WRAPPER_KEY)
        m.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
        m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, runtime.calc_cond_batch)
        m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, runtime.outer_sample)
        # outermost: the tiles are cut before any other calc_cond_batch wrapper (e.g. the adapter's, which
        # gives the negative a matching image-embedding entry) sees the conditioning
        w = m.wrappers[WrappersMP.CALC_COND_BATCH]
        m.wrappers[WrappersMP.CALC_COND_BATCH] = {WRAPPER_KEY: w.pop(WRAPPER_KEY), **w}
        return io.NodeOutput(m)


# ---------------------------------------------------------------------------------------------
# UI: per-tile references
# ---------------------------------------------------------------------------------------------
class XSRTilePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return xsr_schema(
            "XSR_TilePreview",
            "XSR Tile References Preview",
            "Shows the tile grid with the top reference of every tile; click a tile for all its "
            "references, scores and caption.",
            inputs=[
                _tiling_input(),
                XSRRefs.Input("refs", tooltip="from XSR Retrieve (run on the tiles)"),
                io.Image.Input("references", tooltip="the 'references' output of the same XSR Retrieve"),
                io.String.Input(
                    "caption",
                    force_input=True,
                    optional=True,
                    tooltip="the 'caption' output of XSR Enhance (one line per tile)",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, tiling: Tiling, refs, references: torch.Tensor, caption: str | None = None) -> io.NodeOutput:
        n = len(tiling)
        if len(refs.names) != n:
            raise ValueError(
                f"XSR_TilePreview: the references are for {len(refs.names)} images, the tiling has {n} "
                "tiles; connect the XSR Retrieve that ran on this tiling's 'tiles'."
            )
        tiles, flat = [], 0
        for i in range(n):
            valid = [j for j in range(refs.ids.shape[1]) if refs.ids[i, j] >= 0]
            items = []
            for rank, (j, name) in enumerate(zip(valid, refs.names[i])):
                items.append({"index": flat, "rank": rank, "score": float(refs.scores[i, j]), "name": name})
                flat += 1
            tiles.append({"refs": items})
        if references.shape[0] < flat:
            raise ValueError(
                f"XSR_TilePreview: 'references' holds {references.shape[0]} images, the refs {flat}; connect "
                "the 'references' output of the same XSR Retrieve."
            )
        lines = [ln for ln in (caption or "").split("\n")]
        captions = lines if len(lines) == n else ([caption] if caption else [])
        thumbs = bicubic_resize(references[:flat], (PREVIEW_THUMB, PREVIEW_THUMB)) if flat else references[:1]
        saved = ui.PreviewImage(thumbs, cls=cls).as_dict()["images"]
        # not under "images": the frontend would show its own flat preview of every thumbnail
        ui_out = {
            "xsr_tile_images": saved,
            "xsr_tiles": [{"tiling": tiling.as_dict(), "tiles": tiles, "captions": captions}],
        }
        return io.NodeOutput(ui=ui_out)
