"""AdaIN triple injection (DESIGN §2.4): the adapter math, its gates and per-block projectors.

In every patched transformer block (ids from :mod:`.blocks`) the per-channel token statistics of four
activations are moved toward statistics predicted from the enhanced image tokens E:

=========  ==================================================  =====  ================
site       activation                                          gate   shape of h
=========  ==================================================  =====  ================
``norm2``  output of the pre-cross-attention LayerNorm          α      (B, N, dim)
``q``      cross-attention query, after ``to_q``, before the   β      (B, N, inner)
           head split
``k``      cross-attention key, after ``to_k``, before the     β      (B, 77, inner)
           head split (shares β with ``q``)
``norm3``  output of the FFN-path LayerNorm                     γ      (B, N, dim)
=========  ==================================================  =====  ================

    AdaIN(h; μ, σ) = σ · (h − mean(h)) / sqrt(var(h) + eps) + μ      (mean/var over tokens, per channel,
                                                                     population variance)
    h' = h + g · strength · (AdaIN(h) − h)

Gates g are learnable scalars per block and site group (α, β, γ), initialised to zero, so an untrained
adapter is the identity. The projector: E (B, 257, embed_dim) → mean over tokens → LayerNorm → shared
trunk MLP (embed_dim → proj_hidden → proj_hidden, GELU) → per-block heads, stored as ONE Linear whose
output rows are the concatenation of every block's [μ | σ] for every site, so all blocks' statistics
come from one matmul. σ = softplus(raw) + sigma_min, with the bias set so σ starts at 1 and μ at 0.
Mean pooling was chosen over attention pooling because the RFA/I2T stages already attend over E; the
``pool`` config field leaves room for other poolings.

Cost model: :meth:`AdaINAdapter.compute_stats` runs once per image embedding; everything that does not
depend on the activations (gate·strength·σ, gate·strength·μ, 1 − gate·strength, the rows mask, which
sites have a zero gate) is folded once per (strength, rows, batch, dtype, device) into an
:class:`AdaINPlan` cached on the :class:`AdapterStats`. Applying one site is then :func:`adain_apply` on
the plan's entry: on CUDA without autograd ONE fused Triton kernel (statistics + h·a + b), else the eager
reference (``var_mean`` + five small per-channel ops + one ``addcmul`` over h), which is also what
``torch.compile`` traces. No host synchronisation either way (the CUDA-graph capture in
bench/bench_adapter.py checks it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import register
from .blocks import adapter_blocks, parse_block_id

logger = logging.getLogger(__name__)

SITES = ("norm2", "q", "k", "norm3")
GATE_NAMES = ("alpha", "beta", "gamma")
SITE_GATE = {"norm2": 0, "q": 1, "k": 1, "norm3": 2}  # index into GATE_NAMES / the gates' last dim
POOLS = ("mean",)

Rows = Sequence[bool] | None  # which rows of h get the adapter: None (all) or one bool per row


def adain(h: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain AdaIN over the token dim: ``h`` (B, N, C), ``mu``/``sigma`` (B, C) → (B, N, C).

    Reference formula (unfused); :meth:`AdaINAdapter.apply` computes the same thing in fused form.
    """
    var, mean = torch.var_mean(h, dim=1, keepdim=True, correction=0)
    return sigma[:, None, :] * (h - mean) / torch.sqrt(var + eps) + mu[:, None, :]


@dataclasses.dataclass
class AdaINAdapterConfig:
    """Architecture of :class:`AdaINAdapter`. Keys are forever: add fields with defaults, never rename."""

    embed_dim: int = 1024  # width of the enhanced image tokens E (CLIP ViT-L/14 hidden size)
    proj_hidden: int = 256  # width of the shared projector trunk
    eps: float = 1e-5  # added to the token variance inside AdaIN's std
    sigma_min: float = 1e-3  # lower bound of the predicted σ (σ = softplus(raw) + sigma_min)
    pool: str = "mean"  # pooling of E before the trunk: "mean" (mean over tokens, then LayerNorm)
    blocks: list[dict[str, Any]] = dataclasses.field(
        default_factory=list
    )  # [{"id", "dim", "inner_dim"}], order = head layout

    def __post_init__(self) -> None:
        for name in ("embed_dim", "proj_hidden"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"AdaINAdapterConfig.{name} must be positive, got {getattr(self, name)}")
        if not (self.eps > 0 and self.sigma_min >= 0):
            raise ValueError(f"AdaINAdapterConfig needs eps > 0 and sigma_min >= 0, got {self.eps}, {self.sigma_min}")
        if self.pool not in POOLS:
            raise ValueError(f"AdaINAdapterConfig.pool must be one of {POOLS}, got {self.pool!r}")
        if not self.blocks:
            raise ValueError(
                "AdaINAdapterConfig.blocks is empty: build it with AdaINAdapterConfig.from_unet_config(...)"
            )
        blocks = []
        for b in self.blocks:
            if dataclasses.is_dataclass(b):  # a BlockSpec
                b = b.as_config()
            b = dict(b)
            if set(b) != {"id", "dim", "inner_dim"}:
                raise ValueError(f"adapter block spec {b} must have exactly the keys id, dim, inner_dim")
            parse_block_id(b["id"])
            b["dim"], b["inner_dim"] = int(b["dim"]), int(b["inner_dim"])
            if b["dim"] <= 0 or b["inner_dim"] <= 0:
                raise ValueError(f"adapter block {b['id']}: dim and inner_dim must be positive")
            blocks.append(b)
        ids = [b["id"] for b in blocks]
        if len(set(ids)) != len(ids):
            raise ValueError(f"adapter block ids are not unique: {ids}")
        self.blocks = blocks

    @classmethod
    def from_unet_config(
        cls, unet_config: Mapping[str, Any], embed_dim: int = 1024, include_controlnet: bool = True, **kwargs: Any
    ) -> AdaINAdapterConfig:
        """Config covering every transformer block of a diffusers U-Net config (and its ControlNet)."""
        blocks = [b.as_config() for b in adapter_blocks(unet_config, include_controlnet=include_controlnet)]
        return cls(embed_dim=embed_dim, blocks=blocks, **kwargs)

    def site_width(self, block: Mapping[str, Any], site: str) -> int:
        return block["inner_dim"] if site in ("q", "k") else block["dim"]


class _Layout:
    """Where each (block, site) lives in the concatenated head output. Row layout of the head:
    [μ of site norm2 for all blocks | μ q | μ k | μ norm3 | σ norm2 | σ q | σ k | σ norm3]."""

    def __init__(self, config: AdaINAdapterConfig):
        self.ids = [b["id"] for b in config.blocks]
        self.index = {bid: i for i, bid in enumerate(self.ids)}
        self.site_offset: dict[str, int] = {}
        self.site_width: dict[str, int] = {}
        self.block_slices: dict[str, list[tuple[int, int]]] = {}  # site -> per block (start, stop) within the site
        self.channel_block: dict[str, list[int]] = {}  # site -> block index of every channel
        off = 0
        for site in SITES:
            self.site_offset[site] = off
            slices, owner, pos = [], [], 0
            for i, b in enumerate(config.blocks):
                w = config.site_width(b, site)
                slices.append((pos, pos + w))
                owner += [i] * w
                pos += w
            self.block_slices[site] = slices
            self.channel_block[site] = owner
            self.site_width[site] = pos
            off += pos
        self.total = off  # width of μ (and of σ)


def _rows_key(rows: Rows, batch: int) -> tuple[bool, ...] | None:
    """Normalise a rows selector: None (every row) or a tuple of ``batch`` bools (ValueError otherwise)."""
    if rows is None:
        return None
    if isinstance(rows, torch.Tensor) or not all(type(r).__name__ in ("bool", "bool_") for r in rows):
        raise ValueError(
            f"rows must be None or a sequence of one python bool per activation row (e.g. [True, False]), got {rows!r}"
        )
    key = tuple(bool(r) for r in rows)
    if len(key) != batch:
        raise ValueError(f"rows mask has {len(key)} entries but the activation batch is {batch}")
    return key


class AdaINPlan:
    """Everything one (strength, rows, batch, dtype, device) needs at apply time, folded once.

    ``sites[site][block_index]`` is ``(k, c, omg)`` shaped (B|1, 1, width) with k = g·s·σ, c = g·s·μ,
    omg = 1 − g·s, or None where the site's gate was zero when the stats were computed; ``mask`` is
    (B, 1, 1) bool when rows selects a strict subset, else None. ``records`` holds, beside every entry, what a
    direct launch of the fused kernel needs of it (:func:`_launch_record`), worked out here once rather than at
    every site.
    """

    __slots__ = ("sites", "mask", "eps", "records")

    def __init__(self, sites: dict[str, list[Any]], mask: torch.Tensor | None, eps: float):
        self.sites = sites
        self.mask = mask
        self.eps = eps
        m = None if mask is None else mask.view(torch.uint8)
        self.records = {
            site: [None if e is None else _launch_record(*e, m) for e in entries] for site, entries in sites.items()
        }


class AdapterStats:
    """All blocks' AdaIN statistics for one batch of image embeddings (from :meth:`AdaINAdapter.compute_stats`).

    - ``mu``, ``sigma``: (Bs, total) tensors in the adapter's dtype; :meth:`get` gives one block/site.
    - ``batch``: Bs, the number of embeddings (stats rows).
    - ``active``: frozenset of (block index, gate index) whose gate was non-zero when the stats were
      computed, or None when every site is computed (gradients wanted: gates are being trained).
    - ``gates``: the gate tensor they were computed with (keeps the autograd graph in training).

    Immutable by contract: ``copy.deepcopy`` returns the same object (cheap under ComfyUI's
    ``ModelPatcher.clone``). Folded :class:`AdaINPlan` s per (strength, rows, batch, dtype, device) are cached on it.
    """

    def __init__(
        self,
        layout: _Layout,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        gates: torch.Tensor,
        active: frozenset[tuple[int, int]] | None,
        eps: float,
        owners: dict[str, torch.Tensor] | None = None,
        index_cache: dict | None = None,
    ):
        self.layout = layout
        self._owners = owners or {}  # site -> (W,) block index of every channel (the adapter's buffers)
        self._index_cache = index_cache if index_cache is not None else {}  # small index tensors, per device
        self.mu = mu
        self.sigma = sigma
        self.gates = gates
        self.active = active
        self.eps = eps
        self.batch = mu.shape[0]
        self._plans: dict[Any, AdaINPlan] = {}

    def __deepcopy__(self, memo: dict) -> AdapterStats:
        return self

    def __repr__(self) -> str:
        n_active = "all" if self.active is None else len(self.active)
        return (
            f"AdapterStats(batch={self.batch}, blocks={len(self.layout.ids)}, active_gates={n_active}, "
            f"dtype={self.mu.dtype}, device={self.mu.device})"
        )

    def get(self, block_id: str, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) of one block and site, each (Bs, width)."""
        i = self.layout.index[block_id]
        a, b = self.layout.block_slices[site][i]
        off = self.layout.site_offset[site]
        return self.mu[:, off + a : off + b], self.sigma[:, off + a : off + b]

    def is_active(self, block_id: str, site: str) -> bool:
        return self.active is None or (self.layout.index[block_id], SITE_GATE[site]) in self.active

    def _small_tensor(self, values: tuple, device: torch.device) -> torch.Tensor:
        # host->device copies of rows masks, cached on the adapter: made once, not per step
        key = (values, str(device))
        t = self._index_cache.get(key)
        if t is None:
            if len(self._index_cache) > 256:
                self._index_cache.clear()
            t = self._index_cache[key] = torch.tensor(values, device=device)
        return t

    def plan(
        self, strength: float, rows_key: tuple[bool, ...] | None, batch: int, dtype: torch.dtype, device: torch.device
    ) -> AdaINPlan:
        """The folded :class:`AdaINPlan` for activations of ``batch`` rows in ``dtype`` on ``device`` (cached).

        ``rows_key``: None or a tuple of ``batch`` bools (see :func:`_rows_key`); stats rows Bs must be 1
        (one embedding for every row) or ``batch`` (one per row).
        """
        key = (strength, rows_key, batch, dtype, device)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if self.batch not in (1, batch):
            raise ValueError(
                f"the adapter stats hold {self.batch} image embeddings but the activation batch is {batch}: give one "
                "embedding for every row or one per row"
            )
        small_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        mask = None
        if rows_key is not None and not all(rows_key):
            mask = self._small_tensor(rows_key, device).view(-1, 1, 1)  # (B, 1, 1) bool
        lay = self.layout
        sites: dict[str, list[Any]] = {}
        for site in SITES:
            off, w = lay.site_offset[site], lay.site_width[site]
            owner = self._owners.get(site)
            if owner is None or owner.device != self.gates.device:
                owner = torch.tensor(lay.channel_block[site], device=self.gates.device)
            gs = (self.gates[:, SITE_GATE[site]] * strength).index_select(0, owner).to(self.mu.dtype)  # (W,)
            k = gs * self.sigma[:, off : off + w]  # (Bs, W)
            c = gs * self.mu[:, off : off + w]
            omg = (1.0 - gs).unsqueeze(0)  # (1, W)
            k, c, omg = (t.to(device=device, dtype=small_dtype).unsqueeze(1) for t in (k, c, omg))
            g = SITE_GATE[site]
            sites[site] = [
                (k[..., a:b], c[..., a:b], omg[..., a:b])
                if strength != 0.0 and (self.active is None or (i, g) in self.active)
                else None
                for i, (a, b) in enumerate(lay.block_slices[site])
            ]
        plan = self._plans[key] = AdaINPlan(sites, mask, self.eps)
        return plan


# -- optional fused CUDA kernel (Triton) ---------------------------------------------------------
# The eager apply is var_mean + 6 small launches; the step is launch-bound. One kernel per apply: each program owns one
# batch row and BLOCK_C channels, reads its (N, BLOCK_C) column strip twice (statistics, then
# h·a + b); the second read hits L2. Statistics are shifted sums in fp32 (shift = first token).
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON: Any = None  # None: not tried yet; False: unavailable; else the jitted kernel


def _triton_kernel() -> Any:
    global _TRITON
    if _TRITON is None:
        try:
            import triton
            import triton.language as tl
        except Exception:  # no Triton (e.g. some Windows installs): the eager path is used
            _TRITON = False
            return _TRITON

        @triton.jit
        def _adain_fused(
            h_ptr,
            out_ptr,
            k_ptr,
            c_ptr,
            omg_ptr,
            mask_ptr,
            N,
            C,
            s_hb,
            s_hn,
            s_kb,
            s_cb,
            s_ob,
            inv_n,
            eps,
            HAS_MASK: tl.constexpr,
            BLOCK_N: tl.constexpr,
            BLOCK_C: tl.constexpr,
        ):
            b = tl.program_id(0)
            cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
            cmask = cols < C
            base = h_ptr + b.to(tl.int64) * s_hb
            obase = out_ptr + b.to(tl.int64) * s_hb
            shift = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
            acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                rows = n0 + tl.arange(0, BLOCK_N)
                m = (rows < N)[:, None] & cmask[None, :]
                x = tl.load(base + rows[:, None] * s_hn + cols[None, :], mask=m, other=0.0).to(tl.float32)
                d = tl.where(m, x - shift[None, :], 0.0)
                acc += tl.sum(d, axis=0)
                acc2 += tl.sum(d * d, axis=0)
            mean_d = acc * inv_n
            var = tl.maximum(acc2 * inv_n - mean_d * mean_d, 0.0)
            mean = mean_d + shift
            kk = tl.load(k_ptr + b * s_kb + cols, mask=cmask, other=0.0).to(tl.float32)
            cc = tl.load(c_ptr + b * s_cb + cols, mask=cmask, other=0.0).to(tl.float32)
            om = tl.load(omg_ptr + b * s_ob + cols, mask=cmask, other=1.0).to(tl.float32)
            kr = kk / tl.sqrt(var + eps)
            a = om + kr
            bb = cc - kr * mean
            if HAS_MASK:
                sel = tl.load(mask_ptr + b) != 0
            for n0 in range(0, N, BLOCK_N):
                rows = n0 + tl.arange(0, BLOCK_N)
                m = (rows < N)[:, None] & cmask[None, :]
                offs = rows[:, None] * s_hn + cols[None, :]
                xr = tl.load(base + offs, mask=m, other=0.0)
                y = (xr.to(tl.float32) * a[None, :] + bb[None, :]).to(xr.dtype)
                if HAS_MASK:
                    y = tl.where(sel, y, xr)  # unselected rows: h's bits, untouched
                tl.store(obase + offs, y, mask=m)

        _TRITON = (triton, _adain_fused)
    return _TRITON


_FAST: bool | None = None  # direct launches: None until the first one is checked, then True, or False for good
_FAST_OFF = ""  # why direct launches were turned off
_RUNNERS: dict[tuple, Any] = {}  # launch key -> runner of the compiled kernel (see _adain_triton)
_RUNNERS_MAX = 1024
_STREAM: Any = None  # Triton's "current stream of device" function


def _launch_record(k: torch.Tensor, c: torch.Tensor, omg: torch.Tensor, m: torch.Tensor | None) -> tuple:
    """What a direct launch needs of one plan entry ``(k, c, omg)`` and the rows mask's bytes ``m``, computed once.

    ``(k, c, omg, m addresses, their batch strides, key part)``; the key part holds what Triton specialises on
    (batch strides, mask or not, each address's offset from 16-byte alignment). Addresses go to the launcher as
    ints: for a tensor argument Triton's launcher calls ``data_ptr`` and asks the driver about the address
    (``cuPointerGetAttribute``) at every launch. The plan that owns the entry keeps its tensors alive.
    """
    kp, cp, op = k.data_ptr(), c.data_ptr(), omg.data_ptr()
    mp = None if m is None else m.data_ptr()
    # batch stride of a (B|1, 1, C) plan slice; 0 when broadcast
    sk = 0 if k.shape[0] == 1 else k.stride(0)
    sc = 0 if c.shape[0] == 1 else c.stride(0)
    so = 0 if omg.shape[0] == 1 else omg.stride(0)
    part = (sk, sc, so, mp is not None, kp & 15, cp & 15, op & 15, -1 if mp is None else mp & 15)
    return kp, cp, op, mp, sk, sc, so, part


def _adain_triton(
    h: torch.Tensor,
    k: torch.Tensor,
    c: torch.Tensor,
    omg: torch.Tensor,
    mask: torch.Tensor | None,
    eps: float,
    inplace: bool = False,
    record: tuple | None = None,
) -> torch.Tensor:
    """One launch of the fused kernel.

    Triton's own launch (``kernel[grid](...)``) binds, specialises and looks up its cache in Python at every call,
    and an eager SD1.5 step (host-bound) runs ~90 sites. So the compiled kernel of every launch key (shapes,
    strides, dtype, mask or not, each pointer's offset from 16-byte alignment: everything Triton specialises on)
    is kept with its launcher, and later launches with that key go straight to it, with addresses as ints
    (:func:`_launch_record`). Each kept launcher is checked once against the launch that compiled it (same bits;
    never during CUDA-graph capture, which cannot sync); if one fails or differs, direct launches are off for good
    with one log line and Triton's launch is used (:func:`_check_runner`).

    ``inplace``: the result may be written into h's memory (the bindings' sites: h is the fresh output of the
    module they patch, owned by nobody else); a direct launch then allocates nothing. Each program reads its
    whole column strip for the statistics before it writes, and no two programs share a strip, so the bits are
    those of the out-of-place launch. The launch that compiles and checks a key is out-of-place (its check
    re-reads h); use the returned tensor either way. ``record``: the entry's :func:`_launch_record` if the
    caller keeps it (the plan does), else it is computed here.
    """
    triton, kernel = _TRITON
    B, N, C = h.shape
    if not h.is_contiguous():
        h = h.contiguous()
    if record is None:
        record = _launch_record(k, c, omg, None if mask is None else mask.view(torch.uint8))
    kp, cp, op, mp, sk, sc, so, part = record
    sb, sn = h.stride()[:2]
    hp = h.data_ptr()
    key = None
    if _FAST is not False:
        key = (torch.cuda.current_device(), h.dtype, B, N, C, sb, sn, hp & 15, part)
        direct = _RUNNERS.get(key)
        if direct is not None:
            run, g0, g1, function, meta, tail = direct
            # the kernel was compiled for a 16-byte aligned output (empty_like's): h is one only when aligned
            out = h if inplace and not hp & 15 else torch.empty_like(h)
            args = (hp, out.data_ptr(), kp, cp, op, hp if mp is None else mp, N, C, sb, sn, sk, sc, so, 1.0 / N, eps)
            run(g0, g1, 1, _STREAM(key[0]), function, meta, None, None, None, *args, *tail)
            return out
    out = torch.empty_like(h)  # from the caching allocator: always 16-byte aligned (not in the key)
    m = h if mask is None else mask.view(torch.uint8)  # any pointer when there is no mask (HAS_MASK off)
    head = (h, out, k, c, omg, m, N, C, sb, sn, sk, sc, so, 1.0 / N, eps)
    # tiling chosen with bench/bench_adapter.py over the SD1.5 shapes: 16-channel strips, 512-token tiles, 8 warps
    block_c = 16 if C >= 16 else triton.next_power_of_2(C)
    block_n = min(512, triton.next_power_of_2(N))
    grid = (B, triton.cdiv(C, block_c))
    compiled = kernel[grid](*head, HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=8)
    if key is not None and not torch.cuda.is_current_stream_capturing():
        ints = (hp, None, kp, cp, op, hp if mp is None else mp, *head[6:])  # the direct launch's form
        _check_runner(key, compiled, grid, ints, (mask is not None, block_n, block_c), out)
    return out


def _check_runner(key: tuple, compiled: Any, grid: tuple, ints: tuple, tail: tuple, out: torch.Tensor) -> None:
    """Keep ``compiled``'s launcher for ``key`` if a direct launch gives the bits of the launch that made ``out``.

    The direct launch is the call Triton's own launch ends in (``CompiledKernel.run``: grid, stream, function,
    metadata, no launch hooks, then every kernel argument, addresses as ints: ``ints`` with the output's left
    out), so none is made while Triton's launch hooks are set (a profiler such as proton would miss it).
    """
    global _FAST, _FAST_OFF, _STREAM
    try:
        import triton

        knobs = getattr(triton, "knobs", None)
        hooks = (
            (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
            if knobs is not None
            else (compiled.launch_enter_hook, compiled.launch_exit_hook)
        )
        # a hook is set unless None or an empty HookChain (Triton >= 3.5: always a chain, empty by default)
        if any(hook is not None and getattr(hook, "calls", True) for hook in hooks):
            raise RuntimeError("Triton launch hooks are set (a profiler?)")
        if _STREAM is None:
            from triton.runtime import driver

            _STREAM = driver.active.get_current_stream
        direct = (compiled.run, grid[0], grid[1], compiled.function, compiled.packed_metadata, tail)
        run, g0, g1, function, meta, _ = direct
        probe = torch.empty_like(out)
        run(g0, g1, 1, _STREAM(key[0]), function, meta, None, None, None, ints[0], probe.data_ptr(), *ints[2:], *tail)
        same = torch.equal(probe, out)
        why = "" if same else "its output differs from Triton's launch"
    except Exception as e:  # noqa: BLE001 - another Triton's API: its own launch keeps working
        same, why = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if not same:
        _FAST, _FAST_OFF = False, why
        _RUNNERS.clear()
        logger.info("fused AdaIN kernel: direct launches off (%s); Triton's own launch is used", why)
        return
    _FAST = True
    if len(_RUNNERS) >= _RUNNERS_MAX:
        _RUNNERS.clear()
    _RUNNERS[key] = direct


def _adain_eager(
    h: torch.Tensor, k: torch.Tensor, c: torch.Tensor, omg: torch.Tensor, mask: torch.Tensor | None, eps: float
) -> torch.Tensor:
    if h.is_cuda:
        var, mean = torch.var_mean(h, dim=1, keepdim=True, correction=0)  # (B, 1, C): one launch
    else:  # CPU: var_mean over the token dim is several times slower than two plain passes
        mean = h.mean(dim=1, keepdim=True)
        d = h - mean
        var = (d * d).mean(dim=1, keepdim=True)
    kr = k * torch.rsqrt(var + eps)  # g·s·σ / std
    a = kr + omg  # h' = h·a + b
    b = torch.addcmul(c, kr, mean, value=-1.0)
    if a.dtype != h.dtype:
        a, b = a.to(h.dtype), b.to(h.dtype)
    out = torch.addcmul(b, h, a)
    if mask is not None:
        out = torch.where(mask, out, h)
    return out


def adain_apply(
    h: torch.Tensor,
    entry: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    eps: float,
    fused: bool = True,
    inplace: bool = False,
    record: tuple | None = None,
) -> torch.Tensor:
    """Gated AdaIN of ``h`` (B, N, C) with one :class:`AdaINPlan` entry ``(k, c, omg)``: the hot path.

    No validation here (the plan and the bindings check shapes once). ``fused``: use the Triton kernel when
    h is a CUDA tensor, no gradient is needed and we are not inside ``torch.compile`` (which traces and
    fuses the eager ops itself). ``inplace``: the fused kernel may write the result into h's memory (h is
    then not to be used again: take the returned tensor); the eager path never does. ``record``: the plan's
    launch record of this entry (:attr:`AdaINPlan.records`), if the caller has it.
    """
    global _TRITON
    k, c, omg = entry
    if (
        fused
        and h.is_cuda
        and _TRITON is not False
        and h.dtype in _TRITON_DTYPES
        and not (torch.is_grad_enabled() and (h.requires_grad or k.requires_grad))
        and not torch.compiler.is_compiling()
        and _triton_kernel()
    ):
        try:
            return _adain_triton(h, k, c, omg, mask, eps, inplace, record)
        except Exception as e:  # a Triton/driver mismatch must not break sampling: fall back for good
            _TRITON = False
            logger.warning("fused AdaIN kernel unavailable (%s: %s); using the eager path", type(e).__name__, e)
    return _adain_eager(h, k, c, omg, mask, eps)


class AdapterForward:
    """The adapter state of one forward pass, as both bindings apply it at their sites (the hot path).

    Built once per model call from :class:`AdapterStats`, strength and rows; :meth:`apply` then costs one
    dict lookup (plan per activation dtype), one list index and :func:`adain_apply` per site. Validation
    (site widths, batch sizes) happens when the bindings attach and when a plan is first folded.
    """

    __slots__ = ("stats", "strength", "rows_key", "batch", "fused", "plans")

    def __init__(
        self,
        stats: AdapterStats,
        strength: float = 1.0,
        rows: Rows = None,
        batch: int | None = None,
        fused: bool = True,
    ):
        self.stats = stats
        self.strength = float(strength)
        self.batch = batch if batch is not None else (len(rows) if rows is not None else None)
        self.rows_key = None
        if rows is not None:
            key = _rows_key(rows, len(rows))
            self.rows_key = None if all(key) else key
        self.fused = fused
        self.plans: dict[torch.dtype, AdaINPlan | None] = {}

    def apply(self, index: int, site: str, h: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Site ``site`` of block ``index`` (position in the adapter's layout) on activation ``h`` (B, N, C).

        ``inplace``: h is a fresh module output that nobody else holds, so the fused kernel may write the result
        into it (see :func:`adain_apply`); use the returned tensor.
        """
        plan = self.plans.get(h.dtype)
        if plan is None:
            plan = self._fold(h)
        if plan is _NOTHING:
            return h
        entry = plan.sites[site][index]
        if entry is None:
            return h
        return adain_apply(h, entry, plan.mask, plan.eps, self.fused, inplace, plan.records[site][index])

    def _fold(self, h: torch.Tensor) -> AdaINPlan:
        batch = h.shape[0]
        if self.batch is not None and batch != self.batch:
            raise ValueError(
                f"the adapter was given rows/embeddings for {self.batch} rows but the activation batch is {batch}"
            )
        if self.strength == 0.0 or (self.rows_key is not None and not any(self.rows_key)):
            plan = _NOTHING  # nothing to fold (no tensor work: gradient checkpointing recomputes identically)
        else:
            plan = self.stats.plan(self.strength, self.rows_key, batch, h.dtype, h.device)
        self.plans[h.dtype] = plan
        return plan


_NOTHING = AdaINPlan({}, None, 0.0)  # AdapterForward's plan when no row or site is to be touched


@register
class AdaINAdapter(nn.Module):
    """The AdaIN adapter: projectors E → (μ, σ) for every block/site, zero-initialised gates α, β, γ.

    Usage (both bindings)::

        stats = adapter.compute_stats(E)                    # once per image embedding
        h = adapter.apply("unet.input.1.0", "norm2", h, stats, strength=1.0, rows=None)
    """

    config_class = AdaINAdapterConfig

    def __init__(self, config: AdaINAdapterConfig):
        super().__init__()
        self.config = config
        self.layout = _Layout(config)
        self.block_ids = tuple(self.layout.ids)
        self.pool_norm = nn.LayerNorm(config.embed_dim)
        self.trunk = nn.Sequential(
            nn.Linear(config.embed_dim, config.proj_hidden),
            nn.GELU(),
            nn.Linear(config.proj_hidden, config.proj_hidden),
            nn.GELU(),
        )
        # All per-block heads in one Linear: rows [μ (total) | σ raw (total)], see _Layout.
        self.head = nn.Linear(config.proj_hidden, 2 * self.layout.total)
        self.gates = nn.Parameter(torch.zeros(len(config.blocks), len(GATE_NAMES)))  # (blocks, [α, β, γ])
        for site in SITES:  # block index of every channel of a site (not saved: derived from the config)
            # on the CPU even when the model is built on the meta device (weights.load_model fills a meta build)
            owner = torch.tensor(self.layout.channel_block[site], device="cpu")
            self.register_buffer(f"_owner_{site}", owner, persistent=False)
        self._index_cache: dict = {}
        # one fused Triton kernel per apply on CUDA when available and no gradient is needed
        # (inference); the eager path below is the reference and the training path
        self.use_triton = os.environ.get("XSR_ADAPTER_TRITON", "1") != "0"
        self._active_cache: tuple[Any, frozenset[tuple[int, int]]] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """μ ≈ 0 and σ ≈ 1 at init (small E dependence), gates exactly 0."""
        total = self.layout.total
        nn.init.normal_(self.head.weight, std=0.01)
        with torch.no_grad():
            self.head.bias[:total].zero_()
            # softplus(b) + sigma_min == 1  ->  b = log(expm1(1 - sigma_min))
            self.head.bias[total:].fill_(math.log(math.expm1(1.0 - self.config.sigma_min)))
            self.gates.zero_()

    # -- statistics ------------------------------------------------------------------------------
    def compute_stats(self, E: torch.Tensor, *, skip_zero_gates: bool | None = None) -> AdapterStats:
        """All blocks' (μ, σ) for a batch of image embeddings, in one pass.

        ``E``: (B, N, embed_dim) enhanced image tokens (or (B, embed_dim) already pooled, or (N, embed_dim)
        for one image). Returns :class:`AdapterStats` reusable across all sampling steps.
        ``skip_zero_gates``: record which gates are zero so :meth:`apply` returns h untouched there
        (one host sync the first time, cached until the gates change; none in :meth:`apply`).
        Default: skip unless gradients are being tracked for the gates (training must compute every site
        so zero-initialised gates receive gradients).
        """
        if E.dim() not in (2, 3) or E.shape[-1] != self.config.embed_dim:
            raise ValueError(
                f"image embedding E must be (B, N, {self.config.embed_dim}) tokens or (B, {self.config.embed_dim}) "
                f"pooled, got shape {tuple(E.shape)}: check that the enhancer and the adapter were trained together"
            )
        p = self.head.weight
        E = E.to(device=p.device, dtype=p.dtype)
        pooled = E.mean(dim=1) if E.dim() == 3 else E  # (B, embed_dim)
        feats = self.trunk(self.pool_norm(pooled))  # (B, proj_hidden)
        raw = self.head(feats)  # (B, 2 * total)
        total = self.layout.total
        mu = raw[:, :total]
        sigma = F.softplus(raw[:, total:]) + self.config.sigma_min
        if skip_zero_gates is None:
            skip_zero_gates = not (torch.is_grad_enabled() and self.gates.requires_grad)
        active = self._active_gates() if skip_zero_gates else None
        owners = {site: getattr(self, f"_owner_{site}") for site in SITES}
        return AdapterStats(self.layout, mu, sigma, self.gates, active, self.config.eps, owners, self._index_cache)

    def _active_gates(self) -> frozenset[tuple[int, int]]:
        """(block, gate) pairs whose gate is non-zero. One host sync, then cached until the gates change
        (in-place updates bump the tensor's version counter; ``.to()`` / ``load_state_dict`` change it too)."""
        g = self.gates
        if g.is_inference():  # made under inference_mode (ComfyUI loaders): no version counter to key a cache on
            return frozenset((int(i), int(j)) for i, j in torch.nonzero(g.detach()).cpu().tolist())
        key = (g.data_ptr(), g._version, g.device, g.dtype)
        if self._active_cache is None or self._active_cache[0] != key:
            nz = torch.nonzero(g.detach()).cpu().tolist()
            self._active_cache = (key, frozenset((int(i), int(j)) for i, j in nz))
        return self._active_cache[1]

    # -- the patch -------------------------------------------------------------------------------
    def apply(
        self, block_id: str, site: str, h: torch.Tensor, stats: AdapterStats, strength: float = 1.0, rows: Rows = None
    ) -> torch.Tensor:
        """Gated AdaIN of activation ``h`` (B, N, width) at ``site`` of ``block_id`` (checked entry point).

        ``strength``: python float multiplying the gate; 0 returns ``h`` itself.
        ``rows``: which rows of h get the adapter (e.g. the cond half under CFG): None (all) or a sequence
        of B bools. Stats rows: Bs == 1 serves every row; Bs == B aligns with h's rows.
        Unselected rows, zero gates (when the stats recorded them) and strength 0 return h's values
        bit-identically. The bindings call :func:`adain_apply` on a precomputed plan instead.
        """
        if site not in SITE_GATE:
            raise ValueError(f"unknown adapter site {site!r}; sites are {SITES}")
        i = self.layout.index.get(block_id)
        if i is None:
            raise ValueError(f"block {block_id!r} is not covered by this adapter (it has {len(self.block_ids)} blocks)")
        strength = float(strength)
        if strength == 0.0 or (stats.active is not None and (i, SITE_GATE[site]) not in stats.active):
            return h
        if stats.layout is not self.layout and stats.layout.ids != self.layout.ids:
            raise ValueError("these AdapterStats were computed by a different adapter")
        if h.dim() != 3:
            raise ValueError(f"adapter site {block_id}/{site}: expected h of shape (B, N, C), got {tuple(h.shape)}")
        rows_key = _rows_key(rows, h.shape[0])
        if rows_key is not None:
            if not any(rows_key):
                return h
            if all(rows_key):
                rows_key = None
        plan = stats.plan(strength, rows_key, h.shape[0], h.dtype, h.device)
        entry = plan.sites[site][i]
        if entry[0].shape[-1] != h.shape[-1]:
            raise ValueError(
                f"adapter site {block_id}/{site}: h has {h.shape[-1]} channels, the adapter expects "
                f"{entry[0].shape[-1]}: the adapter was built for another U-Net config"
            )
        return adain_apply(h, entry, plan.mask, plan.eps, fused=self.use_triton)

    # -- conveniences ----------------------------------------------------------------------------
    def gate(self, block_id: str, site: str) -> torch.Tensor:
        """The gate (0-dim view) used at ``site`` of ``block_id``."""
        return self.gates[self.layout.index[block_id], SITE_GATE[site]]

    def extra_repr(self) -> str:
        return f"blocks={len(self.block_ids)}, stats_width={self.layout.total}"
