"""What the live CUDA allocations of a benchmark process are, by the code that made them.

``start(torch)`` turns on PyTorch's allocation history (Python stacks of every allocation from then on; it slows
allocation down, so time nothing in a run that records). ``report(torch, mm)`` groups the live blocks by the
first frame in ComfyUI, XSR or the bench (the call that asked for the memory) and lists the largest groups,
with the loaded models' weights counted apart, and what clearing cuBLAS's per-stream workspaces frees.
"""

from __future__ import annotations

import collections
import gc
from pathlib import PurePath

_OURS = ("comfy", "nodes", "xsr_core", "bench", "comfy_extras", "comfy_api", "execution.py")


def start(torch, max_entries: int = 200_000) -> None:
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")


def _label(frames: list[dict]) -> str:
    for f in frames:  # innermost first
        name = f.get("filename", "")
        if any(part in name for part in _OURS) and "/torch/" not in name:
            return f"{PurePath(name).parent.name}/{PurePath(name).name}:{f.get('line')} {f.get('name')}"
    return "(no ComfyUI / XSR frame)" if frames else "(allocated before recording started)"


def report(torch, mm, top: int = 25) -> str:
    gc.collect()
    torch.cuda.synchronize()
    weights: dict[int, int] = {}
    for lm in mm.current_loaded_models:
        model = getattr(lm.model, "model", None)
        if model is None:
            continue
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_cuda:
                weights[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    snap = torch.cuda.memory._snapshot()
    groups: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    total = 0
    for seg in snap["segments"]:
        addr = seg["address"]
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                size = b["size"]
                total += size
                label = "loaded model weights" if addr in weights else _label(b.get("frames") or [])
                groups[label] += size
                counts[label] += 1
            addr += b["size"]
    lines = [
        f"live CUDA allocations: {total / 2**20:.1f} MiB in {sum(counts.values())} blocks "
        f"(torch.cuda.memory_allocated {torch.cuda.memory_allocated() / 2**20:.1f} MiB); largest groups:",
        "",
        "| MiB | blocks | allocated by |",
        "|---|---|---|",
    ]
    for label, size in groups.most_common(top):
        lines.append(f"| {size / 2**20:.1f} | {counts[label]} | `{label}` |")
    before = torch.cuda.memory_allocated()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
        freed = (before - torch.cuda.memory_allocated()) / 2**20
        lines += ["", f"clearing cuBLAS's per-stream workspaces freed {freed:.1f} MiB"]
    return "\n".join(lines)
