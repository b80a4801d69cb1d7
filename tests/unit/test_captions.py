"""One caption-file reader for prepare and eval (xsr_core.captions): every format gives the same mapping."""

from __future__ import annotations

import json

import pytest

from xsr_core.captions import CaptionFileError, read_captions


def test_all_formats_agree_and_errors_name_the_line(tmp_path):
    want = {"a/img00.png": "a cat", "img01": "a dog"}
    (tmp_path / "c.json").write_text(json.dumps(want))
    (tmp_path / "c.jsonl").write_text(
        '{"image": "a/img00.png", "caption": "a cat"}\n\n{"file": "img01", "text": "a dog"}\n'
    )
    (tmp_path / "c.csv").write_text("file_name,caption\na/img00.png,a cat\nimg01, a dog\n")
    (tmp_path / "c.tsv").write_text("a/img00.png\ta cat\nimg01\ta dog\n")
    for name in ("c.json", "c.jsonl", "c.csv", "c.tsv"):
        assert read_captions(tmp_path / name) == want, name
    (tmp_path / "bad.jsonl").write_text('{"image": "x", "caption": "y"}\n{"image": "z"}\n')
    with pytest.raises(CaptionFileError, match="row 2"):
        read_captions(tmp_path / "bad.jsonl")
    (tmp_path / "bad.tsv").write_text("no tab here\n")
    with pytest.raises(CaptionFileError, match="bad.tsv:1"):
        read_captions(tmp_path / "bad.tsv")
    with pytest.raises(CaptionFileError, match="does not exist"):
        read_captions(tmp_path / "missing.jsonl")
