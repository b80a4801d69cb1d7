"""XSR_LoadImageFolder: every image of a subfolder of ComfyUI's input directory as one LR IMAGE batch.

ComfyUI 0.3.75 has no core batch-folder loader: comfy_extras' experimental
``LoadImageDataSetFromFolder`` returns an output *list* in ``os.listdir`` order (unsorted, no size
checks), so the batch workflow would run the pipeline per image in arbitrary order. This node
returns one sorted ``[B, H, W, 3]`` batch that XSR_PrepareLR / XSR_Retrieve take as is.
"""

from __future__ import annotations

import logging
import os

import torch

import folder_paths
from comfy_api.latest import io

from ..xsr_core import MAX_LR_SIDE
from ..xsr_core.image_io import IMAGE_EXTENSIONS, ImageDecodeError, list_images, load_rgb_float
from ..xsr_core.imaging import LRImageError, validate_lr
from ..xsr_core.paths import PathConfinementError
from .common import int_input, xsr_schema
from .validation import DEFAULT_MAX_BATCH, check_batch, collect, schema_problems, verdict

logger = logging.getLogger(__name__)
IMAGE_EXTS = IMAGE_EXTENSIONS  # the one list (xsr_core.image_io)


def resolve_input_subfolder(folder: str) -> str:
    """Absolute path of ``folder`` inside ComfyUI's input directory; refuses anything outside it."""
    root = os.path.realpath(folder_paths.get_input_directory())
    name = (folder or "").strip().strip("/\\")
    if not name:
        raise ValueError(
            "XSR_LoadImageFolder: 'folder' is empty; name a subfolder of ComfyUI's input directory "
            f"({root}), e.g. 'xsr_lr'."
        )
    if os.path.isabs(folder.strip()):
        raise ValueError(
            f"XSR_LoadImageFolder: 'folder' must be relative to ComfyUI's input directory ({root}), "
            f"got the absolute path '{folder}'."
        )
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(
            f"XSR_LoadImageFolder: 'folder' '{folder}' points outside ComfyUI's input directory ({root}); "
            "use a subfolder of it."
        )
    if not os.path.isdir(path):
        raise ValueError(
            f"XSR_LoadImageFolder: the folder '{name}' does not exist in ComfyUI's input directory "
            f"({root}); create {path} and put the LR images (up to {MAX_LR_SIDE} px per side) in it."
        )
    return path


def _load_rgb(path: str) -> torch.Tensor:
    """Any image mode → float RGB [H, W, 3] (16-bit kept, alpha over black: xsr_core.image_io)."""
    return torch.from_numpy(load_rgb_float(path, what=f"XSR_LoadImageFolder: image '{os.path.basename(path)}'"))


def list_folder(folder: str) -> tuple[str, list[str]]:
    """(folder path, sorted image file names) of a subfolder of the input directory; a file that
    resolves outside it (a symlink pointing elsewhere) is an error naming it."""
    path = resolve_input_subfolder(folder)
    try:
        files = list_images(path)
    except PathConfinementError as e:
        raise ValueError(f"XSR_LoadImageFolder: {e}") from None
    return path, [os.path.basename(f) for f in files]


class XSRLoadImageFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return xsr_schema(
            "XSR_LoadImageFolder",
            "XSR Load LR Image Folder",
            "Loads every image of a subfolder of ComfyUI's input directory (sorted by file name) as one "
            f"IMAGE batch of LR images (same size, at most {MAX_LR_SIDE} px per side) for batch x16 "
            "super-resolution.",
            inputs=[
                io.String.Input(
                    "folder",
                    default="xsr_lr",
                    tooltip="subfolder of ComfyUI's input directory holding the LR images (png, jpg, webp...)",
                ),
                int_input(
                    "limit",
                    0,
                    0,
                    4096,
                    "load at most this many images (first by sorted name); 0 = all. A batch holds "
                    f"at most XSR_MAX_BATCH images (default {DEFAULT_MAX_BATCH})",
                ),
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
            # symlinks: their targets' changes count too
            entries += sorted((e.name, os.path.realpath(e.path)) for e in os.scandir(path) if e.is_symlink())
        except (ValueError, OSError):
            return f"{folder}:{limit}:missing"
        return f"{folder}:{limit}:{entries}"

    @classmethod
    def validate_inputs(cls, **kw) -> bool | str:
        problems = schema_problems(cls, kw)
        if kw.get("folder") is not None:
            found = collect(problems, list_folder, kw["folder"])
            if found is not None:
                n = len(found[1]) if not kw.get("limit") else min(len(found[1]), int(kw["limit"]))
                collect(problems, check_batch, "XSR_LoadImageFolder", f"folder '{kw['folder']}'", n)
        return verdict(problems)

    @classmethod
    def execute(cls, folder: str, limit: int) -> io.NodeOutput:
        path, names = list_folder(folder)
        if limit > 0:
            names = names[:limit]
        if not names:
            raise ValueError(
                f"XSR_LoadImageFolder: no images ({', '.join(IMAGE_EXTS)}) in {path}; put the LR images there."
            )
        check_batch("XSR_LoadImageFolder", f"folder '{folder}'", len(names))
        images = []
        for name in names:
            try:
                img = _load_rgb(os.path.join(path, name))
                images.append(validate_lr(img[None], what=f"XSR_LoadImageFolder image '{name}'")[0])
            except (LRImageError, ImageDecodeError) as e:
                raise ValueError(str(e)) from None
            except OSError as e:
                raise ValueError(f"XSR_LoadImageFolder: cannot read '{name}' in {path}: {e}") from None
        sizes = {tuple(t.shape[:2]) for t in images}
        if len(sizes) > 1:
            listing = ", ".join(f"{n} {t.shape[1]}x{t.shape[0]}" for n, t in zip(names, images))
            raise ValueError(
                f"XSR_LoadImageFolder: the images in {path} must all have the same size to form one batch "
                f"({listing}); resize them to one size (e.g. 32x32) or split them into folders."
            )
        logger.info("XSR_LoadImageFolder: %d images from %s", len(names), path)
        return io.NodeOutput(torch.stack(images), "\n".join(names))
