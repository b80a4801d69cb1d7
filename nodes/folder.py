"""XSR_LoadImageFolder: every image of a subfolder of ComfyUI's input directory as one LR IMAGE batch.

ComfyUI 0.3.75 has no core batch-folder loader: comfy_extras' experimental
``LoadImageDataSetFromFolder`` returns an output *list* in ``os.listdir`` order (unsorted, no size
checks), so the batch workflow would run the pipeline per image in arbitrary order. This node
returns one sorted ``[B, H, W, 3]`` batch that XSR_PrepareLR / XSR_Retrieve take as is.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image, ImageOps

import folder_paths
import node_helpers
from comfy_api.latest import io

from ..xsr_core import MAX_LR_SIDE
from ..xsr_core.imaging import LRImageError, validate_lr

logger = logging.getLogger(__name__)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def resolve_input_subfolder(folder: str) -> str:
    """Absolute path of ``folder`` inside ComfyUI's input directory; refuses anything outside it."""
    root = os.path.realpath(folder_paths.get_input_directory())
    name = (folder or "").strip().strip("/\\")
    if not name:
        raise ValueError("XSR_LoadImageFolder: 'folder' is empty; name a subfolder of ComfyUI's input directory "
                         f"({root}), e.g. 'xsr_lr'.")
    if os.path.isabs(folder.strip()):
        raise ValueError(f"XSR_LoadImageFolder: 'folder' must be relative to ComfyUI's input directory ({root}), "
                         f"got the absolute path '{folder}'.")
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"XSR_LoadImageFolder: 'folder' '{folder}' points outside ComfyUI's input directory ({root}); "
                         "use a subfolder of it.")
    if not os.path.isdir(path):
        raise ValueError(f"XSR_LoadImageFolder: the folder '{name}' does not exist in ComfyUI's input directory "
                         f"({root}); create {path} and put the LR images (up to {MAX_LR_SIDE} px per side) in it.")
    return path


def _load_rgb(path: str) -> torch.Tensor:
    img = node_helpers.pillow(Image.open, path)
    img = node_helpers.pillow(ImageOps.exif_transpose, img)
    if img.mode == "I":
        img = img.point(lambda i: i * (1 / 255))
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        arr = np.asarray(img, dtype=np.float32) / 255.0
        # alpha over black, as XSR_PrepareLR does for RGBA LRs
        return torch.from_numpy(arr[..., :3] * arr[..., 3:4])
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


class XSRLoadImageFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XSR_LoadImageFolder",
            display_name="XSR Load LR Image Folder",
            category="xsr",
            description="Loads every image of a subfolder of ComfyUI's input directory (sorted by file name) as one "
                        f"IMAGE batch of LR images (same size, at most {MAX_LR_SIDE} px per side) for batch x16 "
                        "super-resolution.",
            inputs=[
                io.String.Input("folder", default="xsr_lr",
                                tooltip="subfolder of ComfyUI's input directory holding the LR images (png, jpg, webp...)"),
                io.Int.Input("limit", default=0, min=0, max=4096,
                             tooltip="load at most this many images (first by sorted name); 0 = all"),
            ],
            outputs=[
                io.Image.Output("images", display_name="images", tooltip="the LR images as one batch, sorted by name"),
                io.String.Output("names", display_name="names", tooltip="the file names, one per line, batch order"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, limit: int) -> str:
        # re-run when the folder's files change
        try:
            path = resolve_input_subfolder(folder)
            entries = sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(path) if e.is_file())
        except (ValueError, OSError):
            return f"{folder}:{limit}:missing"
        return f"{folder}:{limit}:{entries}"

    @classmethod
    def execute(cls, folder: str, limit: int) -> io.NodeOutput:
        path = resolve_input_subfolder(folder)
        names = sorted(f for f in os.listdir(path)
                       if f.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(path, f)))
        if limit > 0:
            names = names[:limit]
        if not names:
            raise ValueError(f"XSR_LoadImageFolder: no images ({', '.join(IMAGE_EXTS)}) in {path}; put the LR images there.")
        images = []
        for name in names:
            try:
                img = _load_rgb(os.path.join(path, name))
                images.append(validate_lr(img[None], what=f"XSR_LoadImageFolder image '{name}'")[0])
            except LRImageError as e:
                raise ValueError(str(e)) from None
            except OSError as e:
                raise ValueError(f"XSR_LoadImageFolder: cannot read '{name}' in {path}: {e}") from None
        sizes = {tuple(t.shape[:2]) for t in images}
        if len(sizes) > 1:
            listing = ", ".join(f"{n} {t.shape[1]}x{t.shape[0]}" for n, t in zip(names, images))
            raise ValueError(f"XSR_LoadImageFolder: the images in {path} must all have the same size to form one batch "
                             f"({listing}); resize them to one size (e.g. 32x32) or split them into folders.")
        logger.info("XSR_LoadImageFolder: %d images from %s", len(names), path)
        return io.NodeOutput(torch.stack(images), "\n".join(names))
