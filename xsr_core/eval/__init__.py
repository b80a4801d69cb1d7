"""Evaluation: the paper's Table-1 metrics (``metrics``) and batch x16 inference (``run``).

``python -m xsr_core.eval metrics --sr DIR --hr DIR`` computes FID, DISTS, LPIPS, CLIP-Score,
MANIQA, MUSIQ (+ PSNR, SSIM) and prints them beside the paper's rows. Heavy libraries (torchmetrics,
torch-fidelity, pyiqa, transformers) are imported only when a metric is built.
"""

from .metrics import (
    DEFAULT_METRICS,
    METRICS,
    Metric,
    MetricContext,
    MetricInputError,
    MetricSpec,
    MissingWeightsError,
    PerImageMetric,
    WeightFile,
    check_weights,
    compute_metrics,
    pair_images,
    write_results,
)
from .paper import PAPER_COLUMNS, PAPER_ROWS, format_table

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "PAPER_COLUMNS",
    "PAPER_ROWS",
    "Metric",
    "MetricContext",
    "MetricInputError",
    "MetricSpec",
    "MissingWeightsError",
    "PerImageMetric",
    "WeightFile",
    "check_weights",
    "compute_metrics",
    "format_table",
    "pair_images",
    "write_results",
]
