"""XSR_Enhance: I2T -> enhanced image embedding E + caption; positive CONDITIONING carrying E."""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

import comfy.model_management
from comfy_api.latest import io, ui

from .comfy_binding import attach_embedding
from .common import XSRModels, XSRRefs, int_input, load_models, throw_if_interrupted, xsr_schema
from .graphs import ModuleGraphs
from .loaders import offload_after_use
from .validation import check_batch, check_text, schema_problems, verdict

logger = logging.getLogger(__name__)


_TEXT_CACHE: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()
_TEXT_CACHE_SIZE = 64
_TEXT_LOCK = threading.Lock()


class TextGraphs(ModuleGraphs):
    """CUDA graphs of the CLIP text encoder's transformer layers (``comfy.clip_model.CLIPEncoder``, the bulk of a
    prompt's kernels) while XSR_Enhance encodes its captions (:mod:`.graphs`); ``XSR_TEXT_CUDAGRAPH=0`` turns
    them off. ComfyUI's own code does the rest of the encode eagerly (tokens, embeddings, masks, final norm,
    pooling, projection): only the layers' forward is swapped, on the encoder instances, for the time of the
    call. Every caption of one token count and batch shares a graph (hidden states and mask are its inputs).
    Eager for on-the-fly weight patches (``weight_function`` / ``bias_function``: LoRA on a lowvram model), an
    intermediate-layer selection other than one layer or none, Dynamic VRAM and anything not all on CUDA."""

    env = "XSR_TEXT_CUDAGRAPH"
    what = "the CLIP text encoder"

    def __init__(self):
        super().__init__()
        self._encoders: weakref.WeakKeyDictionary[Any, list] = weakref.WeakKeyDictionary()

    @staticmethod
    def usable(clip) -> bool:
        """A CLIP whose encoders can be hooked: ComfyUI's text model, loaded (not Dynamic VRAM) for CUDA."""
        patcher = getattr(clip, "patcher", None)
        return (
            isinstance(getattr(clip, "cond_stage_model", None), torch.nn.Module)
            and getattr(getattr(patcher, "load_device", None), "type", None) == "cuda"
            and not getattr(patcher, "is_dynamic", lambda: False)()
        )

    @contextlib.contextmanager
    def hooked(self, clip) -> Iterator[None]:
        """For the time of the block, ``clip``'s CLIPEncoder instances run their layers through the graphs."""
        if not self.enabled() or not self.usable(clip):
            yield
            return
        model, patcher = clip.cond_stage_model, clip.patcher
        encoders = self._encoders.get(model)
        if encoders is None:
            import comfy.clip_model

            kind = comfy.clip_model.CLIPEncoder
            encoders = self._encoders[model] = [weakref.ref(m) for m in model.modules() if type(m) is kind]
        hooked = []
        try:
            for ref in encoders:
                enc = ref()
                if enc is not None and "forward" not in enc.__dict__:
                    enc.forward = self._graphed_forward(enc, getattr(patcher, "patches_uuid", None))
                    hooked.append(enc)
            yield
        finally:
            for enc in hooked:
                del enc.forward

    def _graphed_forward(self, enc, patches):
        orig = type(enc).forward.__get__(enc)

        def forward(x, mask=None, intermediate_output=None):
            io_ = intermediate_output
            if mask is None or not (io_ is None or isinstance(io_, int)) or self._patched_on_the_fly(enc):
                return orig(x, mask=mask, intermediate_output=io_)
            return self.run(enc, lambda a, m: orig(a, mask=m, intermediate_output=io_), (x, mask), (io_, patches))

        return forward

    def _patched_on_the_fly(self, enc) -> bool:
        return any(
            getattr(m, "weight_function", None) or getattr(m, "bias_function", None)
            for m in self._state(enc)["modules"]
        )


TEXT_GRAPHS = TextGraphs()


def _encode_text(clip, text: str):
    """(cond, pooled) of one prompt, memoised per CLIP object and patch state (tokenizer + text encoder skipped
    for a prompt seen before, e.g. a fixed caption_override / extra_prompt or a repeated caption)."""
    key = (getattr(getattr(clip, "patcher", None), "patches_uuid", None), text)
    with _TEXT_LOCK:
        per_clip = _TEXT_CACHE.get(clip)
        hit = per_clip.get(key) if per_clip is not None else None
        if hit is not None:
            per_clip.move_to_end(key)
            return hit
    tokens = clip.tokenize(text)
    with TEXT_GRAPHS.hooked(clip):
        out = clip.encode_from_tokens(tokens, return_pooled=True)
    with _TEXT_LOCK:
        try:
            per_clip = _TEXT_CACHE.setdefault(clip, OrderedDict())
        except TypeError:  # not weak-referenceable: no caching
            return out
        per_clip[key] = out
        while len(per_clip) > _TEXT_CACHE_SIZE:
            per_clip.popitem(last=False)
    return out


def encode_texts(clip, texts: list[str]):
    """Encode one prompt per image with the user's CLIP; returns (cond (B,L,C), pooled (B,...))."""
    conds, pooled = [], []
    for text in texts:
        c, p = _encode_text(clip, text)
        conds.append(c)
        pooled.append(p)
    longest = max(c.shape[1] for c in conds)
    if any(c.shape[1] != longest for c in conds):
        # prompts of different 77-token chunk counts: pad with the empty prompt's chunk
        empty, _ = _encode_text(clip, "")
        conds = [torch.cat([c] + [empty] * ((longest - c.shape[1]) // empty.shape[1]), dim=1) for c in conds]
    out_pooled = torch.cat(pooled) if all(p is not None for p in pooled) else None
    return torch.cat(conds), out_pooled


def _optional_text(name: str, tooltip: str) -> io.String.Input:
    return io.String.Input(name, multiline=True, default="", optional=True, tooltip=tooltip)


class XSREnhance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return xsr_schema(
            "XSR_Enhance",
            "XSR Enhance (I2T)",
            "Fuses the LR with its references into the enhanced image embedding (for the AdaIN adapter) "
            "and generates a caption with the distilled GPT-2; returns the positive conditioning encoded with "
            "your CLIP and carrying the image embedding.",
            inputs=[
                XSRModels.Input("xsr_models", tooltip="from XSR Load Models"),
                XSRRefs.Input("refs", tooltip="from XSR Retrieve References"),
                io.Clip.Input("clip", tooltip="the text encoder of your SD checkpoint (CheckpointLoaderSimple)"),
                int_input("max_tokens", 32, 4, 75, "longest generated caption, in GPT-2 tokens"),
                int_input("num_beams", 1, 1, 8, "1 = greedy decoding; more = beam search"),
                _optional_text(
                    "caption_override", "if not empty, used instead of the generated caption (edit the text here)"
                ),
                _optional_text("extra_prompt", "appended to the caption, e.g. 'high quality, detailed'"),
            ],
            outputs=[
                io.Conditioning.Output(
                    "positive",
                    display_name="positive",
                    tooltip="text conditioning + image embedding (for KSampler / ControlNetApplyAdvanced)",
                ),
                io.String.Output(
                    "caption", display_name="caption", tooltip="the prompt actually used, one line per image"
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, **kw) -> bool | str:
        return verdict(schema_problems(cls, kw))

    @classmethod
    def execute(
        cls, xsr_models, refs, clip, max_tokens: int, num_beams: int, caption_override: str = "", extra_prompt: str = ""
    ) -> io.NodeOutput:
        check_text("XSR_Enhance", "caption_override", caption_override)
        check_text("XSR_Enhance", "extra_prompt", extra_prompt)
        check_batch("XSR_Enhance", "refs", int(refs.lr_tokens.shape[0]), tiles_ok=True)
        if clip is None:
            raise ValueError(
                "XSR_Enhance: the 'clip' input is empty: connect the CLIP output of your checkpoint loader "
                "(a checkpoint without a text encoder cannot be used)."
            )
        load_models([xsr_models.i2t])
        i2t = xsr_models.i2t.model
        p = next(i2t.parameters())
        if refs.lr_tokens.shape[-1] != i2t.config.clip_dim:
            raise ValueError(
                f"XSR_Enhance: references carry {refs.lr_tokens.shape[-1]}-d CLIP tokens, the I2T expects "
                f"{i2t.config.clip_dim}-d; use the same XSR models in XSR Retrieve and XSR Enhance."
            )
        with torch.no_grad():
            E = i2t(
                refs.lr_tokens.to(p.device, p.dtype),
                refs.ref_tokens.to(p.device, p.dtype),
                ref_mask=refs.ref_mask.to(p.device),
            )
            throw_if_interrupted()
            captions = i2t.generate_caption(E, xsr_models.tokenizer, max_new_tokens=max_tokens, num_beams=num_beams)
        E = E.float().to(comfy.model_management.intermediate_device())
        offload_after_use(xsr_models.i2t, "i2t")  # not needed again for this image (XSR_OFFLOAD)
        texts = []
        for cap in captions:
            text = caption_override.strip() or cap.strip()
            if extra_prompt.strip():
                text = f"{text}, {extra_prompt.strip()}" if text else extra_prompt.strip()
            texts.append(text)
        cond, pooled = encode_texts(clip, texts)
        opts = {}
        if pooled is not None:
            opts["pooled_output"] = pooled
        caption_text = "\n".join(texts)
        # E rides in the options (not model_conds): only an XSR-patched model reads it, so a text-only graph
        # keeps equal positive/negative keys and one batched CFG pass
        positive = attach_embedding([[cond, opts]], E)
        return io.NodeOutput(positive, caption_text, ui=ui.PreviewText(caption_text))
