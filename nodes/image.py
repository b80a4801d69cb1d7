"""Image nodes: XSR_PrepareLR (validate the LR, make the x16 hint and latent) and XSR_ColorFix."""

from __future__ import annotations

import torch

import comfy.model_management
from comfy_api.latest import io

from ..xsr_core import MAX_LR_SIDE, SCALE
from ..xsr_core.colorfix import METHODS, color_fix
from ..xsr_core.imaging import LRImageError, structure_hint, validate_lr
from .common import choice_input, xsr_schema
from .validation import check_batch, schema_problems, verdict
from ..xsr_core.tiling import MAX_TILED_LR_SIDE

LATENT_CHANNELS = 4  # SD1.x/SD2.x latent space
VAE_FACTOR = 8


def prepare_outputs() -> list:
    """The first outputs of XSR_PrepareLR and XSR_PrepareLRTiled: x16 hint, empty latent, validated LR."""
    return [
        io.Image.Output("hint", display_name="hint", tooltip=f"bicubic x{SCALE} upscale of the LR (ControlNet hint)"),
        io.Latent.Output("latent", display_name="latent", tooltip=f"empty SD latent of the x{SCALE} output size"),
        io.Image.Output("lr_rgb", display_name="lr_rgb", tooltip="the validated LR as RGB (for XSR Color Fix)"),
    ]


def hint_and_latent(lr: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The x16 ControlNet hint of a validated LR batch and the empty SD latent of the same output size."""
    hint = structure_hint(lr, SCALE)
    b, h, w, _ = hint.shape
    return hint, {"samples": torch.zeros(b, LATENT_CHANNELS, h // VAE_FACTOR, w // VAE_FACTOR)}


class XSRPrepareLR(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return xsr_schema(
            "XSR_PrepareLR",
            "XSR Prepare LR (x16)",
            (
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
            outputs=prepare_outputs(),
        )

    @classmethod
    def execute(cls, image: torch.Tensor) -> io.NodeOutput:
        check_batch("XSR_PrepareLR", "input 'image'", int(image.shape[0]) if image.ndim == 4 else 1)
        try:
            lr = validate_lr(image, what="XSR_PrepareLR input 'image'")
        except LRImageError as e:
            if image.ndim == 4 and MAX_LR_SIDE < max(image.shape[1:3]) <= MAX_TILED_LR_SIDE:
                raise ValueError(
                    f"{e} For LR images up to {MAX_TILED_LR_SIDE} px use the tiled workflow "
                    "(workflows/xsr_x16_tiled.json: XSR Prepare LR Tiles + XSR Tiled Diffusion)."
                ) from None
            raise ValueError(str(e)) from None
        return io.NodeOutput(*hint_and_latent(lr), lr)


class XSRColorFix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return xsr_schema(
            "XSR_ColorFix",
            "XSR Color Fix",
            "Corrects the colours of the SR result toward the LR input: 'wavelet' keeps the SR's detail "
            "and takes the LR's low frequencies (StableSR); 'adain' matches per-channel mean and std.",
            inputs=[
                io.Image.Input("image", tooltip="the SR result (e.g. VAEDecode output)"),
                io.Image.Input("lr", tooltip="the LR input the result was made from"),
                choice_input(
                    "method", METHODS, "wavelet", "wavelet: low frequencies from the LR; adain: mean/std matching"
                ),
            ],
            outputs=[io.Image.Output("fixed", display_name="image")],
        )

    @classmethod
    def validate_inputs(cls, **kw) -> bool | str:
        return verdict(schema_problems(cls, kw))

    @classmethod
    def execute(cls, image: torch.Tensor, lr: torch.Tensor, method: str) -> io.NodeOutput:
        try:
            dev = _fix_device(image)
            out = color_fix(image.to(dev), lr.to(dev), method)
        except (ValueError, LRImageError) as e:
            raise ValueError(f"XSR_ColorFix: {e}") from None
        return io.NodeOutput(out.to(comfy.model_management.intermediate_device()))


def _fix_device(image: torch.Tensor) -> torch.device:
    """Where the colour fix runs: ComfyUI's torch device when the working set fits its free memory (a few
    small kernels there instead of seconds of CPU convolutions at large sizes), else the image's device."""
    dev = comfy.model_management.get_torch_device()
    if dev.type == "cpu" or image.device == dev:
        return image.device
    need = image[..., :1].numel() * 4 * 3 * 10  # float32 RGB: SR, reference, the batched pyramid, temporaries
    try:
        free = comfy.model_management.get_free_memory(dev)
    except Exception:  # noqa: BLE001 - a device that cannot report its memory: stay where the image is
        return image.device
    return dev if need < free else image.device
