"""The command line and result naming the ComfyUI benchmarks share (bench_e2e, bench_fixed_cost, bench_tiled,
bench_vram_modes): ``--comfy`` (the ComfyUI folder), ``--tiny`` (the CPU smoke run), ``--workdir`` and
``--results``, and the ``<device>[_<tag>]`` part of the result files' names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"


def bench_parser(
    doc: str, *, comfy_help: str = "ComfyUI folder", tiny_help: str = "tiny widths on CPU (smoke test)"
) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc``, holding the options every benchmark takes."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--comfy", required=True, help=comfy_help)
    ap.add_argument("--tiny", action="store_true", help=tiny_help)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--results", default=str(RESULTS))
    return ap


def results_dir(args: argparse.Namespace) -> Path:
    """The ``--results`` folder, made if missing."""
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    return out


def result_tag(tiny: bool, device: str, tag: str = "") -> str:
    """``tiny_cpu`` for a ``--tiny`` run, else the device name in lower case with ``_`` for spaces; then ``_<tag>``."""
    return ("tiny_cpu" if tiny else device.lower().replace(" ", "_")) + (f"_{tag}" if tag else "")
