"""One side stream per CUDA device for every CUDA-graph warm-up and capture XSR makes.

PyTorch keeps a cuBLAS workspace for each (handle, stream) pair that ever ran a cuBLAS call, for the life
of the process (tens of MiB each). ``torch.cuda.Stream()`` hands out the next stream of
a pool of 32, so code that makes a new stream per capture (the ViT graph, the caption-decode graphs, the
sampling graphs) leaves a new workspace behind with each new stream. All XSR captures use this one stream
instead (bench/bench_fixed_cost.py reports the memory beyond the loaded models; figures in bench/README.md).
"""

from __future__ import annotations

import threading

import torch

_STREAMS: dict[int, torch.cuda.Stream] = {}
_LOCK = threading.Lock()


def side_stream(device: torch.device | str | int | None = None) -> torch.cuda.Stream:
    """The XSR capture stream of ``device`` (default: the current CUDA device), made on first use."""
    d = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    index = d.index if d.index is not None else torch.cuda.current_device()
    with _LOCK:
        s = _STREAMS.get(index)
        if s is None:
            s = _STREAMS[index] = torch.cuda.Stream(device=index)
        return s
