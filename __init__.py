"""XSR ComfyUI node pack: retrieval-augmented x16 super-resolution (V3 node API).

ComfyUI loads this folder from ``custom_nodes/``. We export only ``comfy_entrypoint`` (no
``NODE_CLASS_MAPPINGS``: the loader would take those and never call the V3 entry point).
"""

from .nodes import XSRExtension

WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> XSRExtension:
    return XSRExtension()


__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
