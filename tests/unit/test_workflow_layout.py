"""The shipped workflows open without nodes hiding each other (boxes from the UI-format JSON).

A node's box is ``pos`` .. ``pos + size`` plus the title bar above ``pos`` (LiteGraph draws the title
outside the body). tests/browser checks the same on the boxes the frontends lay out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TITLE = 30  # LiteGraph.NODE_TITLE_HEIGHT in frontends 1.32 and 1.49
FILES = sorted((REPO / "workflows").glob("*.json"))
EXAMPLES = REPO / "example_workflows"  # what ComfyUI's template browser and the registry read


def boxes(wf: dict) -> list[tuple[str, tuple[float, float, float, float]]]:
    out = []
    for n in wf["nodes"]:
        (x, y), (w, h) = n["pos"], n["size"]
        out.append((f"{n['id']} {n['type']}", (x, y - TITLE, x + w, y + h)))
    return out


def overlaps(wf: dict) -> list[tuple[str, str]]:
    bs = boxes(wf)
    return [
        (a, b)
        for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(bs)
        for b, (bx0, by0, bx1, by1) in bs[i + 1 :]
        if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1
    ]


def test_overlap_check_finds_overlaps():
    wf = {
        "nodes": [
            {"id": 1, "type": "A", "pos": [0, 40], "size": [100, 100]},
            {"id": 2, "type": "B", "pos": [50, 150], "size": [100, 100]},
        ]
    }  # B's title bar covers A's foot
    assert overlaps(wf) == [("1 A", "2 B")]
    wf["nodes"][1]["pos"] = [50, 171]
    assert overlaps(wf) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_workflow_nodes_do_not_overlap(path):
    assert overlaps(json.loads(path.read_text())) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_workflows_are_the_workflows_with_a_thumbnail(path):
    from PIL import Image

    copy = EXAMPLES / path.name
    assert copy.is_file() and copy.read_bytes() == path.read_bytes(), (
        f"example_workflows/{path.name} differs from workflows/{path.name}: "
        "run `.venv/bin/python scripts/workflow_thumbnails.py` (copies them and renders the thumbnails)"
    )
    with Image.open(EXAMPLES / f"{path.stem}.png") as thumb:
        assert thumb.format == "PNG" and thumb.width >= 320
