"""The paper's Table 1 (ImageNet x16, 32->512, 2k test images) and the markdown table beside it.

Rows are restated from DESIGN.md §3. :func:`format_table` renders a results dict from
:func:`xsr_core.eval.metrics.compute_metrics` (or its JSON file) as a markdown table in the paper's
column order with the paper's rows above this run's row, plus a second table for the metrics the
paper does not report (PSNR, SSIM, CLIP-T, other MANIQA/MUSIQ checkpoints) and a footnote per
column naming the exact metric variant used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# The paper's columns, in the paper's order.
PAPER_COLUMNS: tuple[str, ...] = ("FID", "DISTS", "LPIPS", "CLIP-Score", "MANIQA", "MUSIQ")

# True where lower is better (the arrows in the paper's header).
LOWER_BETTER: dict[str, bool] = {
    "FID": True,
    "DISTS": True,
    "LPIPS": True,
    "CLIP-Score": False,
    "MANIQA": False,
    "MUSIQ": False,
}

# Decimals the paper prints per column (also used for extra columns with the same scale).
DECIMALS: dict[str, int] = {"FID": 2, "DISTS": 4, "LPIPS": 4, "CLIP-Score": 4, "MANIQA": 4, "MUSIQ": 2}

# (model, {column: value}) in the paper's row order.
PAPER_ROWS: tuple[tuple[str, dict[str, float]], ...] = (
    ("SeeSR", {"FID": 33.15, "DISTS": 0.1940, "LPIPS": 0.3914, "CLIP-Score": 0.7162, "MANIQA": 0.3781, "MUSIQ": 64.76}),
    (
        "StableSR",
        {"FID": 46.39, "DISTS": 0.2163, "LPIPS": 0.4010, "CLIP-Score": 0.7116, "MANIQA": 0.6374, "MUSIQ": 65.76},
    ),
    ("CoSeR", {"FID": 37.97, "DISTS": 0.2088, "LPIPS": 0.4356, "CLIP-Score": 0.6910, "MANIQA": 0.3890, "MUSIQ": 63.31}),
    (
        "text-only base",
        {"FID": 34.61, "DISTS": 0.2066, "LPIPS": 0.4587, "CLIP-Score": 0.7551, "MANIQA": 0.6730, "MUSIQ": 69.84},
    ),
    (
        "full (AdaIN)",
        {"FID": 29.45, "DISTS": 0.1883, "LPIPS": 0.3936, "CLIP-Score": 0.7683, "MANIQA": 0.6470, "MUSIQ": 68.10},
    ),
)

PAPER_NOTE = (
    "Paper rows: ImageNet x16 (32->512), 2k test images, as reported (DESIGN.md §3). The paper does "
    "not name its metric variants; its MANIQA column mixes checkpoints (KonIQ vs PIPAL give different "
    "ranges) and its CLIP-Score is described as the agreement of the SR image with its text condition (here "
    "CLIP-T, ViT-L/14, raw cosine), so compare those two columns with care."
)


def _fmt(value: float | str | None, decimals: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):  # non-finite values are stored as strings in the JSON
        return value
    if math.isinf(value) or math.isnan(value):
        return str(value)
    if round(value, decimals) == 0:  # no "-0.00" from a tiny negative rounding error
        value = 0.0
    return f"{value:.{decimals}f}"


def table_assignment(metrics: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """Split computed metrics into the paper's columns and extra columns.

    ``metrics`` maps metric key -> entry with at least ``column``. The first metric (in ``metrics``
    order, which is the registry order) whose ``column`` is a paper column fills that column; every
    other metric is an extra. Returns ({paper column: metric key}, [extra metric keys]).
    """
    assigned: dict[str, str] = {}
    extras: list[str] = []
    for key, entry in metrics.items():
        column = entry.get("column")
        if column in PAPER_COLUMNS and column not in assigned:
            assigned[column] = key
        else:
            extras.append(key)
    return assigned, extras


def format_table(results: Mapping[str, Any], *, label: str | None = None, paper_rows: bool = True) -> str:
    """Render ``results`` (from ``compute_metrics`` or its JSON) as markdown.

    The first table has the paper's columns in the paper's order; the paper's rows come first (when
    ``paper_rows``), then this run's row named ``label`` (default: ``"this run (N images)"``).
    Columns this run did not compute show "—". A second table lists extra metrics, and a footnote
    names the exact variant behind every value.
    """
    return format_rows([(label, results)], paper_rows=paper_rows)


def format_rows(runs: Sequence[tuple[str | None, Mapping[str, Any]]], *, paper_rows: bool = True) -> str:
    """Several runs side by side (e.g. the two Table-1 rows: text-only base and full AdaIN), one row each.

    ``runs``: (label or None, results). Extra metrics get one column per run; the variant footnote lists
    every variant used by any run (a column computed with different variants in different runs is
    flagged).
    """
    rows = []
    for label, results in runs:
        n = results.get("n_images")
        rows.append((label or (f"this run ({n} images)" if n is not None else "this run"), results.get("metrics", {})))
    header = "| model | " + " | ".join(f"{c}{'↓' if LOWER_BETTER[c] else '↑'}" for c in PAPER_COLUMNS) + " |"
    lines = [header, "|---" * (len(PAPER_COLUMNS) + 1) + "|"]
    if paper_rows:
        for name, row in PAPER_ROWS:
            cells = [_fmt(row.get(c), DECIMALS[c]) for c in PAPER_COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    assigned_all, extras_all, variants = [], [], {}
    for label, metrics in rows:
        assigned, extras = table_assignment(metrics)
        assigned_all.append(assigned)
        for key in extras:
            if key not in extras_all:
                extras_all.append(key)
        cells = [_fmt(metrics[assigned[c]]["value"], DECIMALS[c]) if c in assigned else "—" for c in PAPER_COLUMNS]
        lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
        for c, key in assigned.items():
            variants.setdefault(c, {}).setdefault(metrics[key]["variant"], []).append(label)
        for key in extras:
            e = metrics[key]
            variants.setdefault(e.get("label", key), {}).setdefault(e["variant"], []).append(label)

    if extras_all:
        labels = [label for label, _ in rows]
        lines += ["", "| extra metric | " + " | ".join(labels) + " | better |", "|---" * (len(labels) + 2) + "|"]
        for key in extras_all:
            first = next(m[key] for _, m in rows if key in m)
            cells = [_fmt(m[key]["value"], int(m[key].get("decimals", 4))) if key in m else "—" for _, m in rows]
            arrow = "lower" if first.get("lower_better") else "higher"
            lines.append(f"| {first.get('label', key)} | " + " | ".join(cells) + f" | {arrow} |")

    lines += ["", "Variants used:"]
    names = list(PAPER_COLUMNS) + [k for k in variants if k not in PAPER_COLUMNS]
    for c in names:
        vs = variants.get(c)
        if not vs:
            if c in PAPER_COLUMNS:
                lines.append(f"- {c}: not computed")
            continue
        if len(vs) == 1:
            lines.append(f"- {c}: {next(iter(vs))}")
        else:  # runs disagree on the variant: say so instead of comparing apples and pears silently
            for v, who in vs.items():
                lines.append(f"- {c} (**differs between runs**; {', '.join(who)}): {v}")
    if paper_rows:
        lines += ["", PAPER_NOTE]
    return "\n".join(lines) + "\n"
