"""Small helpers for the live-server tests (importable from test modules)."""

from __future__ import annotations

import io

from PIL import Image


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size
