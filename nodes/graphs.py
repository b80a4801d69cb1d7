"""CUDA graphs of one module's forward pass, keyed by its input shapes and the placement of its weights.

XSR_Retrieve's CLIP vision pass and XSR_Enhance's CLIP text pass are a few hundred small kernels each (ComfyUI's
manual-cast ops), so they are launch-bound: replaying a captured graph removes the host work. The first call of
a key runs eagerly (warm-up), the second captures, checks the replay against its own eager result (any
difference beyond float noise, or any failure: eager from then on for that module, one log line) and later calls
replay. Only for weights all on the inputs' CUDA device (a lowvram-streamed model runs eagerly); a moved weight
(ComfyUI unloaded / reloaded the model) changes the key, and at most :attr:`ModuleGraphs.keep` graphs per module
are kept (oldest out), sharing one memory pool (it stays reserved between prompts). Weak-keyed by the module: the
graphs go with the model.
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..xsr_core.cuda_streams import side_stream

logger = logging.getLogger(__name__)


class ModuleGraphs:
    """CUDA graphs of ``call(*inputs)`` for one module (see the module docstring); ``env`` names the switch that
    turns them off (``=0``), ``what`` the pass in the log line."""

    keep = 4
    env = "XSR_CLIP_CUDAGRAPH"
    what = "the CLIP vision pass"

    def __init__(self):
        self._per_model: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
        self.captures = self.replays = 0

    @classmethod
    def enabled(cls) -> bool:
        return os.environ.get(cls.env, "1").strip().lower() not in ("0", "false", "off", "no")

    def run(self, module, call: Callable[..., Any], inputs: tuple[torch.Tensor, ...], extra: tuple = ()):
        """``call(*inputs)``, replayed from a graph of ``module``'s weights where it can be; ``extra``: the
        non-tensor arguments that select a different graph. Returns the outputs' tensors cloned."""
        dev = inputs[0].device
        if dev.type != "cuda" or not self.enabled():
            return call(*inputs)
        st = self._state(module)
        if st["off"] is not None:
            return call(*inputs)
        tensors = [
            t
            for m in (module, *st["modules"])
            for t in itertools.chain(m._parameters.values(), m._buffers.values())
            if t is not None
        ]
        if any(t.device != dev for t in itertools.chain(tensors, inputs)):
            return call(*inputs)  # streamed / partially loaded: nothing fixed to capture
        shapes = tuple((tuple(t.shape), t.dtype) for t in inputs)
        key = (shapes, extra, torch.is_inference_mode_enabled(), tuple(t.data_ptr() for t in tensors))
        entry = st["graphs"].get(key)
        if entry is None:
            if key not in st["warm"]:
                if len(st["warm"]) >= 64:  # weights that move every call (never captured): keep the set small
                    st["warm"].clear()
                st["warm"].add(key)
                return call(*inputs)
            return self._capture(call, inputs, st, key)
        st["graphs"].move_to_end(key)
        static, graph, out = entry
        for s, t in zip(static, inputs):
            s.copy_(t)
        graph.replay()
        self.replays += 1
        return _cloned(out)

    def _state(self, module) -> dict:
        """The per-module state: warm-up keys, kept graphs, their pool and the submodules below ``module``, listed
        once (Module.parameters() re-walks the tree: milliseconds a call for a ViT-L); their parameter / buffer
        slots are read every call, so moved or replaced weights change the key. ``module`` itself is not in the
        list: a value that refers to its weak key keeps the model, its weights and its graphs alive for good."""
        st = self._per_model.get(module)
        if st is None:
            mods = [m for m in module.modules() if m is not module]
            st = self._per_model[module] = {"warm": set(), "graphs": OrderedDict(), "off": None, "pool": None}
            st["modules"] = mods
        return st

    def _capture(self, call, inputs, st, key):
        try:
            static = tuple(t.clone() for t in inputs)
            graph = torch.cuda.CUDAGraph()
            stream = side_stream(inputs[0].device)  # one stream for all XSR captures (one cuBLAS workspace)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                if st["pool"] is None:  # one pool per module: its graphs replay one at a time, outputs cloned
                    st["pool"] = torch.cuda.graph_pool_handle()
                graph.capture_begin(pool=st["pool"], capture_error_mode="thread_local")
                try:
                    out = call(*static)
                finally:
                    graph.capture_end()
            torch.cuda.current_stream().wait_stream(stream)
            eager = call(*inputs)
            graph.replay()
            worst = 0.0
            for a, b in zip(_tensors(out), _tensors(eager), strict=True):
                tol = 1e-3 * max(1.0, float(b.abs().max()))
                worst = max(worst, float((a.float() - b.float()).abs().max()) / tol)
            if worst > 1.0:
                raise RuntimeError(f"the replay differs from eager ({worst:.1f} x the float tolerance)")
        except Exception as e:  # noqa: BLE001 - any failure: this module's pass stays eager
            st["off"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            st["graphs"].clear()
            logger.info("XSR: %s runs eagerly (no CUDA graph): %s", self.what, st["off"])
            return call(*inputs)
        st["graphs"][key] = (static, graph, out)
        while len(st["graphs"]) > self.keep:
            st["graphs"].popitem(last=False)
        self.captures += 1
        return eager


def _tensors(out) -> list[torch.Tensor]:
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def _cloned(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    return type(out)(t.clone() if isinstance(t, torch.Tensor) else t for t in out)
