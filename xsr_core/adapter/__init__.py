"""AdaIN triple-injection adapter (DESIGN §2.4): canonical block ids, the pure-PyTorch math, bindings.

The diffusers binding lives in :mod:`.diffusers_binding` and is not imported here, so that the
ComfyUI side (which has no diffusers requirement at inference) only pulls torch.
"""

from .adain import (
    GATE_NAMES,
    SITE_GATE,
    SITES,
    AdaINAdapter,
    AdaINAdapterConfig,
    AdapterStats,
    AdaINPlan,
    AdapterForward,
    adain,
    adain_apply,
)
from .blocks import (
    BlockSpec,
    adapter_blocks,
    block_id_from_comfy,
    comfy_block_path,
    controlnet_blocks,
    make_block_id,
    parse_block_id,
    unet_blocks,
)

__all__ = [
    "GATE_NAMES",
    "SITE_GATE",
    "SITES",
    "AdaINAdapter",
    "AdaINAdapterConfig",
    "AdapterStats",
    "BlockSpec",
    "AdaINPlan",
    "AdapterForward",
    "adain",
    "adain_apply",
    "adapter_blocks",
    "block_id_from_comfy",
    "comfy_block_path",
    "controlnet_blocks",
    "make_block_id",
    "parse_block_id",
    "unet_blocks",
]
