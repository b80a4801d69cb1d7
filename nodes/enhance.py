"""XSR_Enhance: I2T -> enhanced image embedding E + caption; positive CONDITIONING carrying E."""

from __future__ import annotations

import logging

import torch

import comfy.model_management
from comfy_api.latest import io, ui

from .comfy_binding import attach_embedding
from .common import XSRModels, XSRRefs, throw_if_interrupted

logger = logging.getLogger(__name__)


def encode_texts(clip, texts: list[str]):
    """Encode one prompt per image with the user's CLIP; returns (cond (B,L,C), pooled (B,...))."""
    conds, pooled = [], []
    for text in texts:
        c, p = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        conds.append(c)
        pooled.append(p)
    longest = max(c.shape[1] for c in conds)
    if any(c.shape[1] != longest for c in conds):
        # prompts of different 77-token chunk counts: pad with the empty prompt's chunk
        empty, _ = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
        conds = [torch.cat([c] + [empty] * ((longest - c.shape[1]) // empty.shape[1]), dim=1) for c in conds]
    out_pooled = torch.cat(pooled) if all(p is not None for p in pooled) else None
    return torch.cat(conds), out_pooled


class XSREnhance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XSR_Enhance",
            display_name="XSR Enhance (I2T)",
            category="xsr",
            description="Fuses the LR with its references into the enhanced image embedding (for the AdaIN adapter) and "
                        "generates a caption with the distilled GPT-2; returns the positive conditioning encoded with "
                        "your CLIP and carrying the image embedding.",
            inputs=[
                XSRModels.Input("xsr_models", tooltip="from XSR Load Models"),
                XSRRefs.Input("refs", tooltip="from XSR Retrieve References"),
                io.Clip.Input("clip", tooltip="the text encoder of your SD checkpoint (CheckpointLoaderSimple)"),
                io.Int.Input("max_tokens", default=32, min=4, max=75, tooltip="longest generated caption, in GPT-2 tokens"),
                io.Int.Input("num_beams", default=1, min=1, max=8, tooltip="1 = greedy decoding; more = beam search"),
                io.String.Input("caption_override", multiline=True, default="", optional=True,
                                tooltip="if not empty, used instead of the generated caption (edit the text here)"),
                io.String.Input("extra_prompt", multiline=True, default="", optional=True,
                                tooltip="appended to the caption, e.g. 'high quality, detailed'"),
            ],
            outputs=[
                io.Conditioning.Output("positive", display_name="positive",
                                       tooltip="text conditioning + image embedding (for KSampler / ControlNetApplyAdvanced)"),
                io.String.Output("caption", display_name="caption", tooltip="the prompt actually used, one line per image"),
            ],
        )

    @classmethod
    def execute(cls, xsr_models, refs, clip, max_tokens: int, num_beams: int, caption_override: str = "",
                extra_prompt: str = "") -> io.NodeOutput:
        if clip is None:
            raise ValueError("XSR_Enhance: the 'clip' input is empty: connect the CLIP output of your checkpoint loader "
                             "(a checkpoint without a text encoder cannot be used).")
        comfy.model_management.load_model_gpu(xsr_models.i2t)
        i2t = xsr_models.i2t.model
        p = next(i2t.parameters())
        if refs.lr_tokens.shape[-1] != i2t.config.clip_dim:
            raise ValueError(f"XSR_Enhance: references carry {refs.lr_tokens.shape[-1]}-d CLIP tokens, the I2T expects "
                             f"{i2t.config.clip_dim}-d; use the same XSR models in XSR Retrieve and XSR Enhance.")
        with torch.no_grad():
            E = i2t(refs.lr_tokens.to(p.device, p.dtype), refs.ref_tokens.to(p.device, p.dtype),
                    ref_mask=refs.ref_mask.to(p.device))
            throw_if_interrupted()
            captions = i2t.generate_caption(E, xsr_models.tokenizer, max_new_tokens=max_tokens, num_beams=num_beams)
        texts = []
        for cap in captions:
            text = caption_override.strip() or cap.strip()
            if extra_prompt.strip():
                text = f"{text}, {extra_prompt.strip()}" if text else extra_prompt.strip()
            texts.append(text)
        cond, pooled = encode_texts(clip, texts)
        E = E.float().to(comfy.model_management.intermediate_device())
        opts = {}
        if pooled is not None:
            opts["pooled_output"] = pooled
        caption_text = "\n".join(texts)
        # E rides in the options (not model_conds): only an XSR-patched model reads it, so a text-only graph
        # keeps equal positive/negative keys and one batched CFG pass
        positive = attach_embedding([[cond, opts]], E)
        return io.NodeOutput(positive, caption_text, ui=ui.PreviewText(caption_text))
