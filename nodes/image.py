"""Image nodes: XSR_PrepareLR (validate the LR, make the x16 hint and latent)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..xsr_core import MAX_LR_SIDE, SCALE
from ..xsr_core.imaging import LRImageError, structure_hint, validate_lr

LATENT_CHANNELS = 4  # SD1.x/SD2.x latent space
VAE_FACTOR = 8


class XSRPrepareLR(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XSR_PrepareLR",
            display_name="XSR Prepare LR (x16)",
            category="xsr",
            description=(
                f"Checks a low-resolution image (up to {MAX_LR_SIDE} px per side; RGB, RGBA or "
                f"grayscale) and returns its bicubic x{SCALE} upscale, the ControlNet structure hint, "
                "plus an empty latent of the matching x16 size for the sampler."
            ),
            inputs=[
                io.Image.Input(
                    "image",
                    tooltip=f"LR image, at most {MAX_LR_SIDE}x{MAX_LR_SIDE} px (the paper uses 32x32). "
                    "Alpha is composited over black; grayscale becomes RGB.",
                ),
            ],
            outputs=[
                io.Image.Output("hint", display_name="hint", tooltip=f"bicubic x{SCALE} upscale of the LR (ControlNet hint)"),
                io.Latent.Output("latent", display_name="latent", tooltip=f"empty SD latent of the x{SCALE} output size"),
                io.Image.Output("lr_rgb", display_name="lr_rgb", tooltip="the validated LR as RGB"),
            ],
        )

    @classmethod
    def execute(cls, image: torch.Tensor) -> io.NodeOutput:
        try:
            lr = validate_lr(image, what="XSR_PrepareLR input 'image'")
        except LRImageError as e:
            raise ValueError(str(e)) from None
        hint = structure_hint(lr, SCALE)
        b, h, w, _ = hint.shape
        latent = torch.zeros(b, LATENT_CHANNELS, h // VAE_FACTOR, w // VAE_FACTOR)
        return io.NodeOutput(hint, {"samples": latent}, lr)
