"""The thin ComfyUI layer of XSR: node classes and the single registration list.

Relative imports only: ComfyUI has its own top-level ``nodes`` module.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .adapter import XSRAdaINPatch, XSRApplyAdaIN, XSRLoadAdaINAdapter
from .cudagraph import XSRCUDAGraph
from .enhance import XSREnhance
from .folder import XSRLoadImageFolder
from .image import XSRColorFix, XSRPrepareLR
from .loaders import XSRLoadModels, XSRLoadReferenceDB
from .retrieval import XSRBuildReferenceDB, XSRRetrieve
from .tiled import XSRPrepareLRTiled, XSRTiledModel, XSRTilePreview

NODE_LIST: list[type[io.ComfyNode]] = [
    XSRPrepareLR,
    XSRLoadModels,
    XSRLoadReferenceDB,
    XSRRetrieve,
    XSRBuildReferenceDB,
    XSREnhance,
    XSRAdaINPatch,
    XSRLoadAdaINAdapter,
    XSRApplyAdaIN,
    XSRCUDAGraph,
    XSRColorFix,
    XSRLoadImageFolder,
    XSRPrepareLRTiled,
    XSRTiledModel,
    XSRTilePreview,
]


class XSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)
