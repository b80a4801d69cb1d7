"""XSR_CUDAGraph: replay the whole per-step model work of a sampling run as one CUDA graph.

SD1.5 sampling at 512 px is launch-bound on a fast GPU: one step (ControlNet + U-Net + adapter, cond
and uncond batched) is a few thousand small kernels whose launch cost exceeds their run time. This
node returns a MODEL whose ``CALC_COND_BATCH`` wrapper captures that work, ``calc_cond_batch`` as
ComfyUI runs it (so the ControlNet's ``get_control``, every patch in ``model_options`` and the model's
own wrappers run during capture, treated as opaque), into a CUDA graph with static input buffers for
the latent and the sigma, and replays it at every later step of the run.

Per sampling run (an ``OUTER_SAMPLE`` wrapper starts and ends one):

- The first step of each distinct *plan* (input shapes + which ControlNets and conditionings are active
  at this sigma) runs eagerly: it is the warm-up (lazy state such as the ControlNet hint and the adapter
  statistics is made there, by ComfyUI's and XSR's own code) and its result is used. The second step
  replays a kept graph or captures one; later steps replay.
- Graphs are kept across prompts (sampling runs) on the MODEL this node returns, keyed by everything that
  is baked into them: input shapes and dtypes, the active conditionings' structure (keys, tensor shapes,
  Python scalars such as strengths), each ControlNet's settings and hint shape, the adapter plan's
  structure, the model options' patches and wrappers. What changes between prompts (the text context and
  other conditioning tensors, the ControlNet hint, the adapter's folded statistics) lives in static buffers
  of the graph: a later prompt with a new LR / seed / caption copies its values in and replays without a
  new capture. The kept graphs are dropped (one log line) when the weights move (model unloaded,
  offloaded or re-patched: checked by the weights' addresses at each run, and by ComfyUI's detach
  callback when it unloads the model); at most ``XSR_CUDAGRAPH_KEEP`` (default 4) are kept, least
  recently used first out, each with its own memory pool (VRAM held between prompts); they are freed
  with the MODEL (no module-level cache holds them). ``XSR_CUDAGRAPH_KEEP=0`` frees them at the end of
  every run (the earlier behaviour).
- Python branches on the sigma cannot live in a graph, so they are resolved outside it: conditionings
  with ``timestep_start``/``timestep_end`` are filtered per plan, and the ControlNets' start/end window
  is decided on the host (a ControlNet active at this sigma is captured with its window test switched
  off). Steps where some ControlNet is outside its window run eagerly.
- Conditioning tensors that ComfyUI keeps on the CPU (the text context) are moved to the GPU once per
  plan, so the graph holds no host-to-device copy.
- The run falls back to eager, with one log line, when the graph would not be faithful: no CUDA,
  a model not fully on the GPU (lowvram, partial load, Dynamic VRAM), hooks / area defaults / GLIGEN
  in the conditioning, context windows or multi-GPU, a ControlNet class not from ComfyUI core or XSR,
  or a wrapper / patch in ``model_options`` that is not ComfyUI's or XSR's known set (anything of
  unknown behaviour may branch on the step in Python). ComfyUI's TorchCompileModel is known: its
  inductor-compiled U-Net is captured like eager code (fused kernels, and no guard checks or launches on
  the host at a replay); compile settings that record CUDA graphs themselves (the ``cudagraphs`` backend,
  ``reduce-overhead``) are refused. A capture that fails for any other reason
  (e.g. a patch that syncs with the host) also falls back, logged once.

The progress bar and previews live in the sampler loop outside ``calc_cond_batch`` and are untouched;
eager ops check ComfyUI's interrupt flag per op, a replay runs no Python, so the wrapper checks the flag
before each replay. The graph backend is a small object so that the decision logic is testable on the CPU.
"""

from __future__ import annotations

import copy
import enum
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import comfy.conds
import comfy.model_management
import torch
from comfy.patcher_extension import CallbacksMP, WrappersMP
from comfy_api.latest import io

from ..xsr_core.adapter.adain import AdaINPlan, AdapterForward
from ..xsr_core.cuda_streams import side_stream
from .common import controls_of, xsr_schema

logger = logging.getLogger(__name__)

WRAPPER_KEY = "xsr_cudagraph"
# wrapper keys whose callables are XSR's own (reviewed: no host sync on the full-window path)
KNOWN_WRAPPER_KEYS = frozenset({WRAPPER_KEY, "xsr_adain"})
# ComfyUI's TorchCompileModel wrapper (comfy_api.torch_helpers.torch_compile): capturable with these settings
COMPILE_KEY = "torch.compile"
COMPILE_KWARGS_KEY = "torch_compile_kwargs"
COMPILE_WRAPPER_MODULE = "comfy_api.torch_helpers.torch_compile"
CAPTURABLE_COMPILE_BACKENDS = frozenset({"inductor", "eager", "aot_eager"})
CAPTURABLE_COMPILE_MODES = frozenset({None, "default", "max-autotune-no-cudagraphs"})
MAX_GRAPHS_PER_RUN = 8
DEFAULT_KEEP = 4  # graphs kept across prompts per XSR_CUDAGraph MODEL (XSR_CUDAGRAPH_KEEP)
_PACKAGE = __name__.rsplit(".", 2)[0]  # the node pack's package name (nodes/cudagraph.py -> pack)
_FULL_SIGMA = 1e8  # ControlNet windows store percent_to_sigma(0) = 999999999.9 for "from the start"


def _is_ours(fn: Any) -> bool:
    """True when ``fn`` (a function, bound method or callable object) is defined in this node pack."""
    fn = getattr(fn, "__func__", fn)
    mod = getattr(fn, "__module__", None)
    if not isinstance(mod, str) or not callable(fn) or mod == "builtins":
        mod = type(fn).__module__
    return mod == _PACKAGE or mod.startswith(_PACKAGE + ".")


def _describe(fn: Any) -> str:
    fn = getattr(fn, "__func__", fn)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', type(fn).__module__)}.{name}"


def compile_refusal(model_options: dict, fns: list) -> str | None:
    """Why the ``torch.compile`` wrapper of ComfyUI's TorchCompileModel (``comfy_api.torch_helpers``) cannot be
    captured, or None. Code compiled by inductor (or eager / aot_eager) is plain kernel launches: the graph records
    them, and a replay skips dynamo's guards and Python altogether. Settings under which the compiled code records
    CUDA graphs itself (the ``cudagraphs`` backend, the ``reduce-overhead`` / ``max-autotune`` modes, inductor's
    ``triton.cudagraphs`` option) cannot be nested in XSR's capture."""
    for fn in fns:
        if getattr(getattr(fn, "__func__", fn), "__module__", None) != COMPILE_WRAPPER_MODULE:
            return f"unknown {WrappersMP.APPLY_MODEL} wrapper {COMPILE_KEY!r} ({_describe(fn)})"
    kw = model_options.get(COMPILE_KWARGS_KEY) or {}
    backend, mode, options = kw.get("backend"), kw.get("mode"), kw.get("options") or {}
    if not isinstance(backend, str) or backend not in CAPTURABLE_COMPILE_BACKENDS:
        return (
            f"torch.compile backend {backend!r} cannot run inside XSR's CUDA graph (use inductor, or drop "
            "XSR_CUDAGraph: that backend records graphs itself)"
        )
    if mode not in CAPTURABLE_COMPILE_MODES or (isinstance(options, dict) and options.get("triton.cudagraphs")):
        return f"torch.compile mode {mode!r} / options {options!r} record CUDA graphs themselves"
    return None


def is_compiled(model_options: dict) -> bool:
    """True when ComfyUI's TorchCompileModel wrapper is on the model."""
    wrappers = model_options.get("transformer_options", {}).get("wrappers", {})
    return bool(wrappers.get(WrappersMP.APPLY_MODEL, {}).get(COMPILE_KEY))


def static_refusal(model_options: dict, conds: list) -> str | None:
    """Why this run cannot be captured faithfully (checked once per run), or None."""
    for key in ("context_handler", "multigpu_clones"):
        if model_options.get(key) is not None:
            return f"model_options has {key!r}"
    mfw = model_options.get("model_function_wrapper")
    if mfw is not None and not _is_ours(mfw):
        return f"unknown model_function_wrapper {_describe(mfw)}"
    topts = model_options.get("transformer_options", {})
    for wtype, by_key in topts.get("wrappers", {}).items():
        for key, fns in by_key.items():
            if not fns or key in KNOWN_WRAPPER_KEYS:
                continue
            if wtype == WrappersMP.APPLY_MODEL and key == COMPILE_KEY:
                reason = compile_refusal(model_options, fns)
                if reason is not None:
                    return reason
                continue
            return f"unknown {wtype} wrapper {key!r}"
    for name, fns in topts.get("patches", {}).items():
        for fn in fns:
            if not _is_ours(fn):
                return f"unknown {name} patch {_describe(fn)}"
    for name, by_block in topts.get("patches_replace", {}).items():
        for fn in by_block.values():
            if not _is_ours(fn):
                return f"unknown {name} replace {_describe(fn)}"
    for group in conds:
        for c in group or []:
            for key in ("hooks", "gligen", "default"):
                if c.get(key) is not None:
                    return f"conditioning has {key!r}"
    for ctrl in controls_of(conds):
        mod = type(ctrl).__module__
        if not (mod == "comfy.controlnet" or _is_ours(ctrl)):
            return f"unknown ControlNet class {type(ctrl).__module__}.{type(ctrl).__qualname__}"
    return None


def residency_refusal(model: Any, conds: list) -> str | None:
    """Why the weights are not all resident on the GPU (lowvram, partial or dynamic loading), or None."""
    patchers = []
    mp = getattr(model, "current_patcher", None)
    if mp is not None:
        patchers.append(mp)
        patchers += list(mp.get_additional_models()) if hasattr(mp, "get_additional_models") else []
    for ctrl in controls_of(conds):
        w = getattr(ctrl, "control_model_wrapped", None)
        if w is not None:
            patchers.append(w)
    for p in patchers:
        is_dynamic = getattr(p, "is_dynamic", None)
        if callable(is_dynamic) and is_dynamic():
            return f"{type(p.model).__name__} uses Dynamic VRAM (weights streamed per use)"
        if getattr(p.model, "model_lowvram", False) or getattr(p.model, "lowvram_patch_counter", 0):
            return f"{type(p.model).__name__} is partially loaded (lowvram / offloading)"
        dev = getattr(p, "load_device", None)
        if dev is not None and torch.device(dev).type == "cuda" and p.loaded_size() <= 0 and p.model_size() > 0:
            return f"{type(p.model).__name__} is not loaded on the GPU"
    return None


@dataclass
class Plan:
    """What one step runs: the key of its graph, or why it runs eagerly."""

    key: tuple | None
    eager_reason: str | None = None
    active_controls: tuple = ()
    cond_keep: tuple = ()  # per group, the indices of the conditionings active at this sigma


def _window_free(conds: list, controls: list) -> bool:
    if any("timestep_start" in c or "timestep_end" in c for g in conds for c in g or []):
        return False
    for ctrl in controls:
        r = getattr(ctrl, "timestep_range", None)
        if r is not None and not (r[0] >= _FULL_SIGMA and r[1] <= 0.0):
            return False
    return True


def make_plan(conds: list, x_in: torch.Tensor, timestep: torch.Tensor, window_free: bool) -> Plan:
    """The step's plan. Reads the sigma on the host only when some window depends on it."""
    shapes = (tuple(x_in.shape), x_in.dtype, tuple(timestep.shape), len(conds))
    controls = controls_of(conds)
    if window_free:
        keep = tuple(tuple(range(len(g or []))) for g in conds)
        return Plan(key=(shapes, keep), active_controls=tuple(controls), cond_keep=keep)
    sigma = float(timestep[0])
    keep = []
    for g in conds:
        idx = []
        for i, c in enumerate(g or []):
            if "timestep_start" in c and sigma > c["timestep_start"]:
                continue
            if "timestep_end" in c and sigma < c["timestep_end"]:
                continue
            idx.append(i)
        keep.append(tuple(idx))
    keep = tuple(keep)
    for ctrl in controls:
        r = getattr(ctrl, "timestep_range", None)
        if r is not None and (sigma > r[0] or sigma < r[1]):
            return Plan(key=None, eager_reason="a ControlNet is outside its start/end window at this step")
    return Plan(key=(shapes, keep), active_controls=tuple(controls), cond_keep=keep)


_WINDOW_KEYS = ("timestep_start", "timestep_end")  # a plan only holds the conditionings active at its step
_SKIP_COND_KEYS = _WINDOW_KEYS + ("uuid",)  # host-side / bookkeeping, not read by the graph


def _map_active(conds: list, keep: tuple, fn: Callable[[dict], Any]) -> list:
    """``fn`` of every active conditioning (``keep``: per cond group the indices of its active entries), as
    per-group lists; a group that is None (e.g. no uncond at CFG 1) stays None."""
    return [None if g is None else [fn(g[i]) for i in idx] for g, idx in zip(conds, keep)]


def _cond_tensor(v: Any) -> torch.Tensor | None:
    t = getattr(v, "cond", None)
    return t if isinstance(v, comfy.conds.CONDRegular) and torch.is_tensor(t) else None


def prepare_conds(conds: list, keep: tuple, device: torch.device) -> list:
    """Per-plan conditionings: inactive ones dropped, window keys removed, every tensor (model_conds entries and
    plain tensor values) copied to a buffer of its own on ``device``: the graph's static inputs, which later
    prompts copy their values into (:func:`cond_feeds`).

    Only fresh dicts / COND copies are made: the run's conditionings are not mutated.
    """

    def to_buffers(cond: dict) -> dict:
        c = {k: v.to(device, copy=True) if torch.is_tensor(v) else v for k, v in cond.items() if k not in _WINDOW_KEYS}
        mc = dict(c.get("model_conds", {}))
        for k, v in mc.items():
            t = _cond_tensor(v)
            if t is not None:
                mc[k] = v._copy_with(t.to(device, copy=True))
        c["model_conds"] = mc
        return c

    return _map_active(conds, keep, to_buffers)


# ---------------------------------------------------------------------------------------------
# What a graph bakes in (its key) and what it reads from buffers (its feeds)
# ---------------------------------------------------------------------------------------------
def value_sig(v: Any) -> Any:
    """A hashable signature of a value a graph may bake in: Python scalars by value, containers recursively,
    tensors by shape / dtype, any other object by identity (so an unknown object never matches another)."""
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
        return v
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(value_sig(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted(((repr(k), value_sig(x)) for k, x in v.items()), key=lambda kv: kv[0])))
    if torch.is_tensor(v):
        return ("tensor", tuple(v.shape), v.dtype)
    if isinstance(v, (frozenset, set)):
        return ("set", tuple(sorted(repr(x) for x in v)))
    if isinstance(v, enum.Enum):
        return ("enum", type(v).__qualname__, v.name)
    return ("id", type(v).__qualname__, id(v))


def _entry(k: str, v: Any, feeds: list) -> tuple:
    """Signature of one conditioning entry; its tensors (read by the graph) are appended to ``feeds``."""
    t = v if torch.is_tensor(v) else _cond_tensor(v)
    if t is not None:
        feeds.append(t)
        return (k, type(v).__qualname__, tuple(t.shape), t.dtype)
    if hasattr(v, "embed") and hasattr(v, "active") and hasattr(v, "stats_for"):  # CONDXSR: fed as adapter state
        e = v.embed
        return (k, "xsr", bool(v.active), v.batch, None if e is None else (tuple(e.shape), e.dtype))
    if isinstance(v, comfy.conds.CONDConstant):
        return (k, "const", value_sig(v.cond))
    return (k, value_sig(v))


def cond_feeds(conds: list, keep: tuple, controls: list) -> tuple[tuple, list[torch.Tensor]]:
    """(signature, tensors) of the active conditionings, in the order :func:`prepare_conds` lays them out:
    the tensors a graph reads from its static buffers; everything else baked in goes into the signature."""
    feeds: list[torch.Tensor] = []
    ctrl_index = {id(c): i for i, c in enumerate(controls)}

    def signature(c: dict) -> tuple:
        items = []
        for k in sorted(c):
            v = c[k]
            if k in _SKIP_COND_KEYS:
                continue
            if k == "model_conds":
                items.append((k, tuple(_entry(mk, v[mk], feeds) for mk in sorted(v))))
            elif k == "control" and id(v) in ctrl_index:
                items.append((k, "control", ctrl_index[id(v)]))
            else:
                items.append(_entry(k, v, feeds))
        return tuple(items)

    sig = _map_active(conds, keep, signature)
    return tuple(None if g is None else tuple(g) for g in sig), feeds


_CONTROL_PER_RUN = (
    "cond_hint",
    "cond_hint_original",
    "previous_controlnet",
    "model_sampling_current",
    "timestep_range",
)


def control_feeds(controls: list) -> tuple[tuple, list[torch.Tensor]]:
    """(signature, hint tensors) of the active ControlNets: their settings baked into the graph, and the
    hint each one made in the warm-up step (read by the graph from a static buffer)."""
    sig, feeds = [], []
    for c in controls:
        hint = getattr(c, "cond_hint", None)
        attrs = tuple((k, value_sig(v)) for k, v in sorted(vars(c).items()) if k not in _CONTROL_PER_RUN)
        sig.append((type(c).__module__, type(c).__qualname__, value_sig(hint), attrs))
        if torch.is_tensor(hint):
            feeds.append(hint)
    return tuple(sig), feeds


def adapter_runtimes(model_options: dict, controls: list) -> list:
    """XSR's AdaIN runtimes of this sampling (the U-Net's CALC_COND_BATCH wrapper, then the ControlNets'), each once."""
    out, seen = [], set()
    wrappers = model_options.get("transformer_options", {}).get("wrappers", {})
    fns = list(itertools.chain.from_iterable(by_key.get("xsr_adain", []) for by_key in wrappers.values()))
    for rt in [getattr(f, "xsr_runtime", None) for f in fns] + [getattr(c, "xsr_runtime", None) for c in controls]:
        if rt is not None and id(rt) not in seen and hasattr(rt, "current_state"):
            seen.add(id(rt))
            out.append(rt)
    return out


def _plan_tensors(state: AdapterForward) -> list:
    out = []
    for dt in sorted(state.plans, key=str):
        plan = state.plans[dt]
        for site in sorted(plan.sites if plan is not None else {}):
            out += [e for e in plan.sites[site]]
    return out


def state_feeds(states: list) -> tuple[tuple, list[torch.Tensor]]:
    """(signature, tensors) of the adapter states (:class:`AdapterForward`) a step uses: strength, rows and the
    folded plan's structure are baked in; its (k, c, 1-g) tensors are read from static buffers."""
    sig, feeds = [], []
    for st in states:
        if st is None:
            sig.append(None)
            continue
        plans = []
        for dt in sorted(st.plans, key=str):
            plan = st.plans[dt]
            if plan is None:
                plans.append((str(dt), None))
                continue
            sites = tuple(
                (site, tuple(None if e is None else tuple(tuple(t.shape) for t in e) for e in plan.sites[site]))
                for site in sorted(plan.sites)
            )
            plans.append((str(dt), sites, value_sig(plan.mask), plan.eps))
        sig.append((st.strength, st.rows_key, st.batch, st.fused, tuple(plans)))
        feeds += [t for e in _plan_tensors(st) if e is not None for t in e]
    return tuple(sig), feeds


def clone_state(state: AdapterForward | None) -> AdapterForward | None:
    """A copy of an adapter state whose folded plan tensors are buffers of its own (a graph's static inputs)."""
    if state is None:
        return None
    new = copy.copy(state)
    plans = {}
    for dt, plan in state.plans.items():
        if plan is None or not plan.sites:
            plans[dt] = plan
            continue
        sites = {
            site: [None if e is None else tuple(t.clone() for t in e) for e in entries]
            for site, entries in plan.sites.items()
        }
        plans[dt] = AdaINPlan(sites, plan.mask, plan.eps)
    new.plans = plans
    return new


def weights_fingerprint(model: Any, controls: list) -> tuple:
    """Addresses of every weight and buffer a step reads (U-Net, its additional models such as the adapter, the
    ControlNets): an unload / offload / re-patch moves them, and a kept graph would read freed memory."""
    modules = []
    if model is not None and hasattr(model, "parameters"):
        modules.append(model)
    mp = getattr(model, "current_patcher", None)
    if mp is not None and hasattr(mp, "get_additional_models"):
        modules += [getattr(p, "model", None) for p in mp.get_additional_models()]
    for c in controls:
        modules.append(getattr(c, "control_model", None))
    ptrs = []
    for m in modules:
        if isinstance(m, torch.nn.Module):
            ptrs.append(id(m))
            ptrs += [t.data_ptr() for t in itertools.chain(m.parameters(), m.buffers())]
    return tuple(ptrs)


def options_sig(model_options: dict) -> tuple:
    """The model options' patches and wrappers by identity (they are baked into a capture)."""
    topts = model_options.get("transformer_options", {})
    wr = tuple(
        (str(wt), k, tuple(id(f) for f in fns))
        for wt, by_key in sorted(topts.get("wrappers", {}).items(), key=lambda kv: str(kv[0]))
        for k, fns in sorted(by_key.items())
    )
    pa = tuple((n, tuple(id(f) for f in fns)) for n, fns in sorted(topts.get("patches", {}).items()))
    pr = tuple(
        (n, tuple(sorted((repr(b), id(f)) for b, f in by_block.items())))
        for n, by_block in sorted(topts.get("patches_replace", {}).items())
    )
    return (wr, pa, pr, id(model_options.get("model_function_wrapper")))


def keep_limit() -> int:
    try:
        return max(0, int(os.environ.get("XSR_CUDAGRAPH_KEEP", DEFAULT_KEEP)))
    except ValueError:
        return DEFAULT_KEEP


class CudaGraphBackend:
    """torch.cuda.CUDAGraph capture / replay (the one real backend).

    Each graph gets its own memory pool: graphs of one run never share intermediates, so a replay of one
    cannot overwrite tensors another graph reads (e.g. a ControlNet hint re-broadcast during a capture).
    """

    device_type = "cuda"

    def __init__(self):
        self.stream = side_stream()  # one stream for all XSR captures (one cuBLAS workspace)

    def warm_up(self, fn: Callable[[], Any]) -> None:
        """One eager call of ``fn`` on the capture stream (its result dropped)."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            fn()
        torch.cuda.current_stream().wait_stream(self.stream)

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        g = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        # thread_local: ComfyUI's server thread may touch CUDA (previews) while this one captures
        with torch.cuda.stream(self.stream):
            g.capture_begin(pool=torch.cuda.graph_pool_handle(), capture_error_mode="thread_local")
            try:
                out = fn()
            except BaseException:
                try:
                    g.capture_end()
                except RuntimeError as e:  # the capture is already invalid; the first error is the one to report
                    logger.debug("XSR_CUDAGraph: capture_end after a failed capture: %s", e)
                raise
            g.capture_end()
        torch.cuda.current_stream().wait_stream(self.stream)
        return g.replay, out


@dataclass
class _Graph:
    replay: Callable[[], None]
    static_x: torch.Tensor
    static_t: torch.Tensor
    outputs: Any
    keep_alive: list = field(default_factory=list)
    feeds: list = field(default_factory=list)  # static input buffers, in the order of step_feeds()
    uses: int = 0  # sampling runs that replayed this graph


@dataclass
class _Run:
    backend: Any = None
    refused: str | None = None
    checked: bool = False
    window_free: bool = True
    warm: set = field(default_factory=set)
    graphs: dict = field(default_factory=dict)  # plan key -> the graph this run replays for it
    logged: set = field(default_factory=set)
    replays: int = 0
    eager_steps: int = 0
    captures: int = 0  # graphs captured in this run
    reused: int = 0  # kept graphs of earlier runs replayed in this run (no capture)
    fingerprint_checked: bool = False
    compiled: bool = False  # the model runs under TorchCompileModel: one eager pass of the capture's body first


def step_feeds(plan: Plan, conds: list, model_options: dict) -> tuple[tuple, list[torch.Tensor], list]:
    """(key part, tensors, adapter runtimes) of one step after its warm-up: everything a graph bakes in, and the
    tensors it reads from static buffers (conditionings, ControlNet hints, adapter plans), in one order."""
    controls = list(plan.active_controls)
    csig, cfeeds = cond_feeds(conds, plan.cond_keep, controls)
    hsig, hfeeds = control_feeds(controls)
    runtimes = adapter_runtimes(model_options, controls)
    states = [(rt.current_state() or (None, None, None))[2] for rt in runtimes]
    ssig, sfeeds = state_feeds(states)
    return (csig, hsig, ssig, options_sig(model_options)), cfeeds + hfeeds + sfeeds, runtimes


class CudaGraphSampling:
    """The ``OUTER_SAMPLE`` + ``CALC_COND_BATCH`` wrappers of one XSR_CUDAGraph MODEL.

    One instance is shared by the clones of that MODEL (ComfyUI copies wrapper lists shallowly); its
    per-run state is made at the start of each sampling run; its graphs are kept across runs (:attr:`kept`,
    bounded, least recently used first out) and dropped when the weights they read move.
    """

    def __init__(self, backend_factory: Callable[[], Any] | None = None):
        self.backend_factory = backend_factory or CudaGraphBackend
        self.run: _Run | None = None
        self.kept: OrderedDict[tuple, _Graph] = OrderedDict()
        self.fingerprint: tuple | None = None
        self.backend: Any = None
        self.captures = 0  # over this MODEL's life
        self.dropped = 0

    def __deepcopy__(self, memo):
        return CudaGraphSampling(self.backend_factory)

    def drop_graphs(self, why: str) -> None:
        """Free every kept graph (one log line when there were any)."""
        if self.kept:
            logger.info("XSR_CUDAGraph: %s: dropping %d kept graph(s)", why, len(self.kept))
            self.dropped += len(self.kept)
        self.kept.clear()
        self.fingerprint = None

    def on_detach(self, patcher=None, unpatch_all: bool = True, *args, **kwargs) -> None:
        """ComfyUI's ON_DETACH callback. ``unpatch_all``: the model is unloaded (weights to the offload device):
        its graphs are void and their memory is freed now. Without it ComfyUI only hands the loaded weights to
        another clone of the same model (they stay where they are; the next run checks their addresses)."""
        if unpatch_all:
            self.drop_graphs("the model was unloaded from the GPU")

    # OUTER_SAMPLE
    def outer_sample(self, executor, *args, **kwargs):
        self.run = _Run()
        try:
            return executor(*args, **kwargs)
        finally:
            run, self.run = self.run, None
            if keep_limit() == 0:
                self.kept.clear()
            if run is not None and (run.replays or run.graphs):
                logger.debug(
                    "XSR_CUDAGraph: %d graph(s) (%d captured, %d kept from earlier runs), %d replays, %d eager steps",
                    len(run.graphs),
                    run.captures,
                    run.reused,
                    run.replays,
                    run.eager_steps,
                )

    def _log_once(self, run: _Run, key: str, msg: str, *args) -> None:
        if key not in run.logged:
            run.logged.add(key)
            logger.info("XSR_CUDAGraph: " + msg, *args)

    def _refuse(self, run: _Run, reason: str) -> None:
        run.refused = reason
        self._log_once(run, "refused", "sampling runs eagerly: %s", reason)

    # CALC_COND_BATCH
    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run = self.run
        if run is None:  # a sampler that bypasses outer_sample: one run per call sequence
            run = self.run = _Run()
        if run.refused is not None:
            return executor(model, conds, x_in, timestep, model_options)
        if not run.checked:
            run.checked = True
            wanted = getattr(self.backend_factory, "device_type", "cuda")
            if x_in.device.type != wanted:
                self._refuse(run, f"the latent is on {x_in.device.type}, not {wanted.upper()}")
            else:
                reason = static_refusal(model_options, conds)
                if reason is not None:
                    self._refuse(run, reason)
            if run.refused is not None:
                return executor(model, conds, x_in, timestep, model_options)
            run.window_free = _window_free(conds, controls_of(conds))
            run.compiled = is_compiled(model_options)

        plan = make_plan(conds, x_in, timestep, run.window_free)
        if plan.key is None:
            run.eager_steps += 1
            self._log_once(run, "eager:" + plan.eager_reason, "eager step(s): %s", plan.eager_reason)
            return executor(model, conds, x_in, timestep, model_options)
        graph = run.graphs.get(plan.key)
        if graph is None:
            if plan.key not in run.warm:
                run.warm.add(plan.key)  # warm-up: eager, makes lazy state (hint, statistics) outside the graph
                run.eager_steps += 1
                return executor(model, conds, x_in, timestep, model_options)
            if len(run.graphs) >= MAX_GRAPHS_PER_RUN:
                run.eager_steps += 1
                self._log_once(run, "max", "more than %d plans in one run: the others run eagerly", MAX_GRAPHS_PER_RUN)
                return executor(model, conds, x_in, timestep, model_options)
            reason = residency_refusal(model, conds)
            if reason is not None:
                self.drop_graphs(reason)
                self._refuse(run, reason)
                return executor(model, conds, x_in, timestep, model_options)
            if not run.fingerprint_checked:
                run.fingerprint_checked = True
                fp = weights_fingerprint(model, controls_of(conds))
                if self.fingerprint is not None and fp != self.fingerprint:
                    self.drop_graphs("the model's weights moved (reloaded, offloaded or re-patched)")
                self.fingerprint = fp
            sig, feeds, runtimes = step_feeds(plan, conds, model_options)
            full_key = (plan.key, sig)
            graph = self.kept.get(full_key)
            if graph is not None and (
                len(graph.feeds) != len(feeds) or any(d.shape != f.shape for d, f in zip(graph.feeds, feeds))
            ):
                del self.kept[full_key]  # cannot happen with an exact signature; never copy into a wrong buffer
                graph = None
            if graph is not None:  # a graph of an earlier run: this run's values into its static buffers
                for dst, src in zip(graph.feeds, feeds):
                    dst.copy_(src)
                self.kept.move_to_end(full_key)
                run.reused += 1
            else:
                if run.graphs or self.kept:
                    self._log_once(
                        run,
                        ("recapture", plan.key),
                        "new input shape %s, window state or conditioning structure: capturing another graph",
                        tuple(x_in.shape),
                    )
                try:
                    graph = self._capture(run, plan, executor, model, conds, x_in, timestep, model_options, runtimes)
                except comfy.model_management.InterruptProcessingException:
                    raise
                except Exception as e:  # noqa: BLE001 - any capture failure means: run this sampling eagerly
                    self._refuse(run, f"capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                    return executor(model, conds, x_in, timestep, model_options)
                run.captures += 1
                self.captures += 1
                limit = keep_limit()
                if limit:
                    self.kept[full_key] = graph
                    while len(self.kept) > limit:
                        self.kept.popitem(last=False)
            graph.uses += 1
            run.graphs[plan.key] = graph
        # eager ops check the interrupt flag (comfy.ops.run_every_op); a replay runs no Python: check it here
        comfy.model_management.throw_exception_if_processing_interrupted()
        graph.static_x.copy_(x_in)
        graph.static_t.copy_(timestep)
        graph.replay()
        run.replays += 1
        return [o.clone() for o in graph.outputs]

    def _capture(self, run, plan, executor, model, conds, x_in, timestep, model_options, runtimes) -> _Graph:
        if self.backend is None:
            self.backend = self.backend_factory()
        static_x = x_in.clone()
        static_t = timestep.clone()
        conds_c = prepare_conds(conds, plan.cond_keep, x_in.device)
        controls = list(plan.active_controls)
        # static copies of the per-run state made in the warm-up: the graph reads these, later runs copy into them
        pinned_controls = []
        for c in controls:
            hint = getattr(c, "cond_hint", None)
            if torch.is_tensor(hint):
                c.cond_hint = hint = hint.clone()
            pinned_controls.append((c, hint, getattr(c, "model_sampling_current", None)))
        pinned_states = []
        for rt in runtimes:
            cur = rt.current_state()
            if cur is not None:
                batch, adapter, state = cur
                pinned_states.append((rt, batch, adapter, clone_state(state)))
        # the captured closure re-pins them (a replay runs no Python; a re-running test backend does)
        saved = [(c, c.timestep_range) for c in controls if getattr(c, "timestep_range", None) is not None]

        def body():
            for c, hint, ms in pinned_controls:
                c.cond_hint = hint
                c.model_sampling_current = ms
            for rt, batch, adapter, st in pinned_states:
                rt.pin_state(batch, adapter, st)
            for c, _ in saved:
                c.timestep_range = None  # active at this plan: the host already decided; no tensor test in the graph
            try:
                return executor(model, conds_c, static_x, static_t, model_options)
            finally:
                for c, r in saved:
                    c.timestep_range = r

        # calc_cond_batch sizes its batch from the free memory; read it once here, not through CUDA mid-capture
        free = comfy.model_management.get_free_memory(x_in.device)
        mm_get_free = comfy.model_management.get_free_memory
        comfy.model_management.get_free_memory = lambda dev=None, torch_free_too=False: (
            (free, free) if torch_free_too else free
        )
        try:
            if run.compiled:
                # dynamo guards on the objects the capture's body passes (static buffers, pinned states): a guard
                # that fails there would compile (and autotune: kernel launches) mid-capture, which CUDA forbids.
                # One eager pass of the same body first compiles whatever the capture needs.
                warm_up = getattr(self.backend, "warm_up", None)
                warm_up(body) if warm_up is not None else body()
            replay, outputs = self.backend.capture(body)
        finally:
            comfy.model_management.get_free_memory = mm_get_free
        if not (isinstance(outputs, (list, tuple)) and all(torch.is_tensor(o) for o in outputs)):
            raise TypeError(f"calc_cond_batch returned {type(outputs).__name__}, not a list of tensors")
        _, cf = cond_feeds(conds_c, tuple(tuple(range(len(g))) if g is not None else () for g in conds_c), controls)
        _, hf = control_feeds(controls)
        _, sf = state_feeds([st for _, _, _, st in pinned_states] if pinned_states else [None] * len(runtimes))
        keep_alive = [conds_c, pinned_controls, pinned_states]
        return _Graph(replay, static_x, static_t, list(outputs), keep_alive, cf + hf + sf)


def _put_first(by_key: dict, key: str) -> dict:
    return {key: by_key[key], **{k: v for k, v in by_key.items() if k != key}}


def apply_cudagraph(model, backend_factory: Callable[[], Any] | None = None):
    """A clone of ``model`` whose sampling runs replay CUDA graphs (outermost CALC_COND_BATCH wrapper)."""
    m = model.clone()
    sampling = CudaGraphSampling(backend_factory)
    m.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    m.remove_wrappers_with_key(WrappersMP.CALC_COND_BATCH, WRAPPER_KEY)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, sampling.outer_sample)
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, sampling.calc_cond_batch)
    m.remove_callbacks_with_key(CallbacksMP.ON_DETACH, WRAPPER_KEY)
    m.add_callback_with_key(CallbacksMP.ON_DETACH, WRAPPER_KEY, sampling.on_detach)
    # outermost: the wrappers inside (XSR's own included) are captured with the model
    m.wrappers[WrappersMP.CALC_COND_BATCH] = _put_first(m.wrappers[WrappersMP.CALC_COND_BATCH], WRAPPER_KEY)
    return m


class XSRCUDAGraph(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return xsr_schema(
            "XSR_CUDAGraph",
            "XSR CUDA Graph Sampling",
            "Captures each sampling step (ControlNet + U-Net + AdaIN adapter, cond and uncond batched) "
            "as a CUDA graph on the second step and replays it, which removes the kernel-launch overhead "
            "that dominates SD1.5 steps on fast GPUs. Falls back to eager sampling, with one log line, "
            "where a graph would not be faithful (lowvram / offloaded models, hooks, unknown patches or "
            "wrappers); steps outside a ControlNet's start/end window run eagerly. No effect on CPU.",
            inputs=[io.Model.Input("model", tooltip="the MODEL going into the sampler (after XSR AdaIN Patch)")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        device = comfy.model_management.get_torch_device()
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            logger.info(
                "XSR_CUDAGraph: the sampling device is %s, not CUDA: the model is passed through unchanged", device
            )
            return io.NodeOutput(model)
        return io.NodeOutput(apply_cudagraph(model))
