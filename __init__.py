"""XSR ComfyUI node pack: retrieval-augmented x16 super-resolution (V3 node API).

ComfyUI loads this folder from ``custom_nodes/``. We export only ``comfy_entrypoint`` (no
``NODE_CLASS_MAPPINGS``: the loader would take those and never call the V3 entry point). The node
modules are imported inside the entry point, so importing this folder outside ComfyUI (pytest,
tooling) does not need ComfyUI.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import XSRExtension

    return XSRExtension()


__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
