"""The one caption-file reader (``train prepare --captions``, ``eval metrics --captions``,
``eval run``'s captions.jsonl).

Formats, by extension:

- ``.json``: an object ``{image: caption}``;
- ``.jsonl``: one object per line with an image key (``image``, ``file``, ``path``, ``filename``,
  ``file_name`` or ``name``) and a ``caption`` (or ``text``);
- ``.csv``: a header row with one of those image keys and ``caption`` (or ``text``);
- anything else (``.tsv``, ``.txt``): ``image<TAB>caption`` lines.

Keys are returned as written (an absolute path, a relative path or a file name, with or without
extension); matching them to images is the caller's business.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .paths import existing_file

IMAGE_KEYS = ("image", "file", "path", "filename", "file_name", "name")
CAPTION_KEYS = ("caption", "text")


class CaptionFileError(ValueError):
    """A caption file that cannot be read (the message names the file and line)."""


def _row(path: Path, n: int, row: dict) -> tuple[str, str]:
    key = next((row[k] for k in IMAGE_KEYS if k in row), None)
    cap = next((row[k] for k in CAPTION_KEYS if k in row), None)
    if key is None or cap is None:
        raise CaptionFileError(
            f"{path}: row {n} needs an image key ({'/'.join(IMAGE_KEYS)}) and a {'/'.join(CAPTION_KEYS)} key"
        )
    return str(key), str(cap).strip()


def _json_object(text: str, where: str, expected: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CaptionFileError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CaptionFileError(f"{where}: expected {expected}")
    return data


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """{image key: caption} from a caption file in any of the module's formats."""
    path = existing_file(path, "caption file", CaptionFileError)
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    out: dict[str, str] = {}
    if suffix == ".json":
        data = _json_object(text, str(path), "a JSON object {image name: caption}")
        return {str(k): str(v).strip() for k, v in data.items()}
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = _json_object(line, f"{path}:{n}", "a JSON object per line")
            k, c = _row(path, n, row)
            out[k] = c
        return out
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), 1):
                k, c = _row(path, n, row)
                out[k] = c
        return out
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise CaptionFileError(f"{path}:{n}: expected 'image<TAB>caption'")
        name, cap = line.split("\t", 1)
        out[name.strip()] = cap.strip()
    return out
