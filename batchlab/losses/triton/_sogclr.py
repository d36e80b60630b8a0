"""``impl="triton"`` of :func:`batchlab.losses.sogclr`: SogCLR / iSogCLR on fused Triton kernels.

The per-example temperatures are per-row (and, for the symmetric loss, per-column) scales of
the one similarity tile ``S = a @ c.T``, so the kernels have InfoNCE's shape
(:mod:`._sogclr_kernels`):

* forward: ONE pass over the tiles gives every anchor's statistics of both directions (the
  symmetric loss: images' over the rows, texts' over the columns of the same tile), then a
  finish kernel applies the update rules (moving average of ``u``, value, temperature
  gradient) and sums the loss per program; 2 launches (+1 sum) and no host synchronisation.
  One temperature for all (SogCLR, or a float ``tau``) can take one exponential per logit
  (``FAST``; off by default: measured slower on clustered embeddings, see ``CONFIGS``). ``TILE``:
  the same statistics from one tile per program (``sog_fwd_tile_kernel``), the finish combining
  every tile's row and column partials;
* backward: one kernel recomputes the tiles and writes ``dLoss/dS`` (the positive's term
  folded into the excluded entry) in the inputs' dtype; two cuBLAS products give the
  gradients of both inputs (row panels of ``panel_rows`` above 8,192 rows, as the InfoNCE
  kernels do, with fp32 accumulation across panels).

Column statistics are exact at any temperature: each tile's column maxima are its own, and
the per-(row block, column) partials (8 bytes each; at most ``CHUNK_BYTES`` at a time) are
combined in a fixed order (deterministic, no atomics).

Host cost per call (what bounds small batches): eager calls go through one
``torch.autograd.Function`` (:class:`_SogFunction`) and launch the compiled kernels directly
(``_dense._Kernel``); under ``torch.compile`` the same code runs as ``torch.library`` custom ops
with fake implementations and autograd formulas, so that ``fullgraph=True`` traces them.
:func:`sogclr_step` is the stateful modules' step in one autograd function: the kernels read
``log u`` and the temperatures from the module's tables at the batch's ids and the finish
kernel writes the step back there (no gather, no separate update launch, no host sync).

Coverage: bf16 and fp32 inputs (fp32 products follow torch's TF32 switch, as the InfoNCE
kernels); the symmetric loss in one process in one kernel pair; one_way, two_view and the
distributed shards per direction (one pass per candidate block). Everything else (fp16,
float64, ``neg_mask``) runs on the tiled engine with identical results
(:func:`batchlab.losses.sogclr` decides).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import triton

from batchlab.losses import _dispatch
from batchlab.losses.sogclr import Direction
from batchlab.losses.triton import _sogclr_kernels as ks
from batchlab.losses.triton._dense import _INTERPRET as _INTERPRETING
from batchlab.losses.triton._dense import EAGER_FUNCTION, _cdiv, _Kernel
from batchlab.losses.triton._launch import FP32_BD, LOG2E, addmm_f32_, kernel_flags, operands, panel_rows, tile_shares

#: Tile shapes on the GPU: "fwd" for per-row/per-column temperatures (iSogCLR), "fwd_one" for one
#: temperature (SogCLR), "tile" for the one-tile forward (TILE, below), "split" for the two-pass
#: forward, "bwd" for the backward; FLAT as in ``_launch.KERNEL_OPTIONS``; FAST ("fwd_one"): the
#: one-exponential loop (with its per-program redo) instead of the per-row / per-column one; PAIR
#: ("fwd"): each weighted sum shares one reduction with its sum; SPLIT: from this many logits (N x N)
#: on, the symmetric loss takes two row-only passes of the forward kernel with the "split" tiles (rows
#: of ``a`` against ``c``, then rows of ``c`` against ``a``: twice the products, but no column maxima
#: or sums across the warps of a tile; 0: never, 1: always; TILE takes precedence).
#:
#: TILE ("fwd" / "fwd_one"; 0: never, else from this many logits on): the symmetric forward in one
#: launch of ``sog_fwd_tile_kernel`` with the "tile" config: one tile per program (no loop-carried
#: statistics: InfoNCE's one-tile shape, 128 x 128 at 4 warps), each storing its rows' and its columns'
#: partials for the finish ((N / BN + N / BM) x N of them, 4 bytes each, 8 with the weighted sums;
#: above CHUNK_BYTES of them the looped kernels run). "tile" options: FAST (one temperature): one
#: exponential per logit, a tile redone with two where it could lose terms; PANEL: rows per panel of
#: the launch's tile order (``_lse._TILE_PANEL_ROWS``); MASK_ALL=0: only tiles with an excluded entry
#: or out-of-range rows or columns mask the product (a uniform branch per tile); PB: partials the
#: finish kernel combines per step; GATHER (iSogCLR's module step): 1 reads the temperatures at the ids
#: in the kernel, 0 gathers them first (one index_select); FASTLOG (any forward config; GPU only, inline
#: PTX): the partials' log2 as one ``lg2.approx`` instead of libdevice's log2f, and the divisions
#: (temperatures, weighted means) as ``div.full`` (1) or ``rcp.approx`` times (2): the reduced column
#: vectors are replicated over the lanes and warps, so each thread took BN / 4 log2 polynomials and
#: divisions per tile. sm_90 SASS of the tile kernel (Triton 3.6; InfoNCE's one-tile forward: 1,392
#: instructions): SogCLR 3,704 (FASTLOG=0) -> 2,776 (1); iSogCLR ~4,100 -> 3,800 (1) -> 3,512 (2, not
#: timed yet). 128 x 128 / 4 warps, 2 or 3 stages: 255 registers, no spills, 2 CTAs/SM (8 warps: one
#: CTA/SM; iSogCLR spills at 256 x 128 and 128 x 256).
#:
#: G0 and LEAN ("bwd"): a scalar upstream gradient (the reduced loss) applied once per entry, and (LEAN)
#: the positive's entry from per-row values. sm_90 AOT, Triton 3.6, 128 x 128 / 4 warps, spill
#: instructions: iSogCLR 18 (session 8's kernel) -> 2 (G0=0 or 1) / 6 (LEAN=1); SogCLR 2 -> 0 (G0=1).
#: fp32 inputs halve the d chunk (``BD``).
#:
#: Chosen by H200 runs at N = 65,536, d = 512, bf16, the module steps interleaved with
#: ``info_nce(impl="auto")`` (session 9, ``.gpu/s9/sog_variants.py``, call 4 of the lead; forward-only
#: ms, then the step's wall clock against InfoNCE's, random / clustered embeddings): the looped
#: defaults until then (forward 15.2 SogCLR, 15.8 iSogCLR): 1.29x / 1.36x SogCLR, 1.31x / 1.34x
#: iSogCLR; TILE with 3 stages, FASTLOG=1, MASK_ALL=0 and G0=1 (forward 9.5 / 12.2 ms): 1.06x /
#: 1.04x SogCLR, 1.17x / 1.16x iSogCLR (2 stages: +1.3 ms forward; FASTLOG=0: +2.3 / +1.1 ms; MASK_ALL=1:
#: +0.0 / +0.5 ms; FAST=1: 12.2 ms random but 21.3 ms clustered, the redo). G0 alone took iSogCLR's
#: backward ~1.5 ms down (call 3). Below 8,192^2 logits (N = 4,096: host-bound, the target met by the
#: looped kernels) the forward is as before. Session 7 (``benchmarks/results/sogclr-h200-s7/``): the
#: looped kernels' shapes (128 x 64 / 4 warps one pass; two passes 16.2-16.5 ms at 128 x 128 / 4 warps,
#: 30.7 at 128 x 64; FAST=1 28.8 ms on clustered embeddings), the backward's 128 x 128 / 4 warps
#: (128 x 64: +3.5 ms).
CONFIGS: dict[str, dict[str, int]] = {
    "fwd": dict(BM=128, BN=64, BD=64, num_warps=4, num_stages=3, TMA=1, FLAT=0, PAIR=0, SPLIT=8192 * 8192,
                TILE=8192 * 8192),
    "fwd_one": dict(BM=128, BN=64, BD=64, num_warps=4, num_stages=3, TMA=1, FLAT=0, FAST=0, SPLIT=0,
                    TILE=8192 * 8192),
    "split": dict(BM=128, BN=128, BD=64, num_warps=4, num_stages=3, TMA=1, FLAT=0),
    "bwd": dict(BM=128, BN=128, BD=64, num_warps=4, num_stages=3, TMA=1, G0=1),
    "tile": dict(BM=128, BN=128, BD=64, num_warps=4, num_stages=3, TMA=1, FAST=0, PAIR=0, PANEL=8192, MASK_ALL=0,
                 FASTLOG=1, PB=8, GATHER=1),
}
#: The interpreter's one config (every kernel): small tiles, the GPU defaults' options where they apply
#: at test sizes (G0, MASK_ALL; TILE from 8,192^2 logits: never here, the tests ask for it).
_INTERPRET = dict(BM=16, BN=32, BD=16, num_warps=4, num_stages=1, TMA=0, FAST=0, PAIR=0, SPLIT=0, TILE=0, PANEL=32,
                  MASK_ALL=0, G0=1)
#: Tensor-descriptor loads (TMA) only from this many logits (N x M) on: below it the kernels load
#: through pointers, and the host builds no descriptors (four per step, each encoded by Triton's
#: launcher on every launch: host time, which bounds small batches). 0: TMA wherever a config asks.
#: H200 (call 4 of session 7, N = 4,096, interleaved wall clock per step): SogCLRLoss 0.98 ms without
#: against 1.07 ms with TMA, ISogCLRLoss 1.01 against 1.12 ms (InfoNCE 1.03 ms); device time unchanged
#: (171-193 us). At 65,536 the kernels keep TMA.
TMA_MIN_LOGITS = 8192 * 8192
#: Bytes of column partials held at once (row blocks x columns x 8 B); above it the row blocks
#: run in chunks whose partials are folded as they come (N > ~180,000 at BM = 128).
CHUNK_BYTES = 3 << 29
#: Dtypes the kernels take (fp16 could underflow in the stored logit gradient; float64: no tensor cores).
DTYPES = (torch.bfloat16, torch.float32)
_FINISH_BLOCK = 128


def _config(kernel: str, dtype: torch.dtype, logits: int | None = None) -> dict:
    """The launch config of ``kernel`` for inputs of ``dtype`` (``logits``: the problem's N x M, for
    :data:`TMA_MIN_LOGITS`)."""
    cfg = dict(_INTERPRET) if _INTERPRETING else dict(CONFIGS[kernel])
    if dtype == torch.float32 and not _INTERPRETING:
        cfg["BD"] = min(cfg["BD"], FP32_BD)
    cfg.setdefault("TMA", 0)
    if logits is not None and logits < TMA_MIN_LOGITS:
        cfg["TMA"] = 0
    return cfg


def _launch_opts(cfg: dict, *, flat: bool = True) -> dict:
    keys = ("BM", "BN", "BD", "num_warps", "num_stages", "TMA") + (("FLAT", "FAST", "PAIR") if flat else ())
    opts = {key: cfg[key] for key in keys if key in cfg}
    if flat and cfg.get("FASTLOG", 0) and not _INTERPRETING:  # inline PTX: not in the interpreter
        opts["FASTLOG"] = int(cfg["FASTLOG"])
    return opts


#: One direct launcher per kernel (``_Kernel`` tells its specialisations apart, tensor descriptors'
#: dtypes and block shapes included).
_LAUNCHERS: dict = {}


def _launch(fn, grid: tuple, args: tuple, consts: dict) -> None:
    """Launch ``fn`` on ``grid`` through its direct launcher."""
    launcher = _LAUNCHERS.get(fn)
    if launcher is None:
        launcher = _LAUNCHERS[fn] = _Kernel(fn)
    launcher(grid, args, consts)


#: Launch plans per problem shape (configs, flags, grids: the host work that does not depend on the
#: tensors' values or addresses); keyed by everything they depend on, CONFIGS' values included.
_PLANS: dict = {}


def _plan(kind: str, a: torch.Tensor, build, *key):
    tf32 = a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    # what _config(kind, a.dtype) derives its result from (the dtype is in the key): no dict built per call
    source = _INTERPRET if _INTERPRETING else CONFIGS[kind]
    full = (kind, a.shape, a.dtype, a.device, tf32, tuple(source.items()), TMA_MIN_LOGITS, CHUNK_BYTES, *key)
    plan = _PLANS.get(full)
    if plan is None:
        if len(_PLANS) > 256:
            _PLANS.clear()
        plan = _PLANS[full] = build()
    return plan


# ----------------------------------------------------------------------------- forward


def _forward_plan(a, sizes, cols: bool, one: bool, wsum: bool, gather: bool, gamma: float, gather_tau: bool) -> dict:
    n, d = a.shape
    logits = n * sum(sizes)
    cfg = _config("fwd_one" if one else "fwd", a.dtype, logits)
    # SPLIT: the symmetric loss as two row-only passes (rows of a against c, then rows of c against a)
    # strict fp32 (no TF32) keeps the looped kernels on the GPU: the one-tile kernel's fp32 product
    # without tensor cores spills (sm_90 AOT, Triton 3.6: 15,080 spill instructions; with TF32: none)
    strict = a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 and not _INTERPRETING
    tile = cols and len(sizes) == 1 and 0 < cfg.get("TILE", 0) <= logits and not strict
    if tile:
        t_cfg = _config("tile", a.dtype, logits)
        parts = (_cdiv(sizes[0], t_cfg["BN"]) + _cdiv(n, t_cfg["BM"])) * n * (8 if wsum else 4)
        tile = parts <= CHUNK_BYTES
    if tile:
        return _tile_plan(a, sizes[0], t_cfg, one, wsum, gather, gamma, gather_tau)
    split = cols and 0 < cfg.get("SPLIT", 0) <= logits
    if split:
        cfg = _config("split", a.dtype, logits)
        cfg["FAST"] = 0  # row-only: the per-row loop already takes one exponential per logit
    row_blocks = _cdiv(n, cfg["BM"])
    blocks = []  # per candidate block: (groups of column tiles, tiles per group, row blocks per chunk)
    for size in sizes:
        chunk = max(1, min(row_blocks, CHUNK_BYTES // max(1, 8 * size))) if cols and not split else row_blocks
        blocks.append((*tile_shares(max(1, _cdiv(size, cfg["BN"])), chunk, a.device, 4), chunk))
    p_rows = sum(b[0] for b in blocks)
    chunked = cols and not split and blocks[0][2] < row_blocks
    memory = gamma < 1.0
    return dict(
        tile=False, cfg=cfg, row_blocks=row_blocks, blocks=blocks, p_rows=p_rows, chunked=chunked, split=split,
        p_cols=(p_rows if split else 1 + blocks[0][2] if chunked else row_blocks) if cols else 0,
        consts=dict(COLS=cols and not split, ONE_TAU=one, WSUM=wsum, GATHER_TAU=gather_tau,
                    **kernel_flags(a, cfg["BD"])),
        programs=_cdiv(n, _FINISH_BLOCK), memory=memory,
        finish=_finish_consts(d, memory, one, wsum, gather, gather_tau),
    )


def _finish_consts(d: int, memory: bool, one: bool, wsum: bool, gather: bool, gather_tau: bool) -> dict:
    bd = 64 if d >= 64 else triton.next_power_of_2(d)
    return dict(BLOCK=_FINISH_BLOCK, BD=bd, MEMORY=memory, ONE_TAU=one, WSUM=wsum, GATHER=gather, SNAP=gather_tau)


def _tile_plan(a, size: int, cfg: dict, one: bool, wsum: bool, gather: bool, gamma: float, gather_tau: bool) -> dict:
    """The TILE forward's plan: one launch of ``sog_fwd_tile_kernel``, then the finish."""
    n, d = a.shape
    row_blocks, col_tiles = _cdiv(n, cfg["BM"]), _cdiv(size, cfg["BN"])
    keys = ("BM", "BN", "BD", "num_warps", "num_stages", "TMA")
    return dict(
        tile=True, cfg={key: cfg[key] for key in keys}, grid=(row_blocks * col_tiles,),
        panel=max(1, cfg.get("PANEL", 8192) // cfg["BM"]), p_rows=col_tiles, p_cols=row_blocks, chunked=False,
        row_blocks=row_blocks, split=False,
        consts=dict(ONE_TAU=one, WSUM=wsum, GATHER_TAU=gather_tau, FAST=bool(one and cfg.get("FAST", 0)),
                    PAIR=bool(cfg.get("PAIR", 0)), MASK_ALL=bool(cfg.get("MASK_ALL", 1)),
                    FASTLOG=0 if _INTERPRETING else int(cfg.get("FASTLOG", 0)), **kernel_flags(a, cfg["BD"])),
        programs=_cdiv(n, _FINISH_BLOCK), memory=gamma < 1.0,
        finish={**_finish_consts(d, gamma < 1.0, one, wsum, gather, gather_tau), "PB": cfg.get("PB", 8)},
    )


def _forward(a, c, p, tau, tau_value: float, log_u, starts, sizes, offsets, cols: bool, log_n: float, gamma: float,
             rho: float, coef: float, *, ids=None, tau_table=None, mom=None, update: bool = False, isog: bool = False,
             wsum: bool = True, total: bool = True, hyper=(0.0, 0.0, 0.0, 0.0, 0.0), gather_tau: bool = False):
    """``(values (D, n), stats (4, D, n), loss)``: see ``sog_finish_kernel``; ``loss`` (0-d) is
    ``coef`` times the values' sum, added up in the finish kernel (``total``; else None).
    ``gather_tau`` (with ``ids``): ``tau`` is the module's (D, examples) table, read at ``ids`` by the
    kernels themselves, and ``stats`` gets a fifth plane: the temperatures read (for the backward).

    ``tau`` (D, n) per anchor, or None: ``tau_value`` for all (one exponential per logit). With
    ``ids`` (the modules' step) ``log_u``, ``tau_table`` and ``mom`` are the (D, examples) tables
    the finish reads at ``ids``; ``update`` writes the step back there (``hyper``: keep, beta, eta,
    tau_min, tau_max).
    """
    n, d = a.shape
    n_dirs = log_u.shape[0]
    one, gather = tau is None, ids is not None
    plan = _plan("fwd_one" if one else "fwd", a,
                 lambda: _forward_plan(a, sizes, cols, one, wsum, gather, gamma, gather_tau),
                 tuple(sizes), cols, one, wsum, gather, gamma < 1.0, gather_tau, tuple(CONFIGS["split"].items()),
                 tuple(CONFIGS["tile"].items()))
    f32 = dict(device=a.device, dtype=torch.float32)
    p_rows, row_blocks, chunked = plan["p_rows"], plan["row_blocks"], plan["chunked"]
    lse = torch.empty((p_rows + plan["p_cols"]) * n, **f32)
    wm = torch.empty_like(lse) if wsum else lse
    col_lse, col_wm = lse[p_rows * n:], wm[p_rows * n:]
    if chunked:
        col_lse[:n].fill_(float("-inf"))
        col_wm[:n].zero_()
    tau_arg = lse if one else tau
    tau_c = tau_arg[n_dirs - 1] if not one and n_dirs > 1 else tau_arg
    scale = LOG2E / tau_value if one else 1.0
    ctr = torch.empty(1, device=a.device, dtype=torch.int32) if total else lse
    row0 = 0
    if plan["tile"]:
        a_arg, c_arg, cfg_t = operands(a, c, plan["cfg"]) if plan["cfg"]["TMA"] else (a, c, plan["cfg"])
        _launch(ks.sog_fwd_tile_kernel, plan["grid"], (
            a_arg, c_arg, tau_arg, tau_c, ids if gather_tau else lse, scale, lse, wm, ctr, n, c.shape[0], d,
            a.stride(0), c.stride(0), offsets[0], plan["panel"], p_rows), {**plan["consts"], "TOTAL": total, **cfg_t})
    for start, size, off, (groups, per_group, chunk) in zip(starts, sizes, offsets, plan.get("blocks", ())):
        block = c if size == c.shape[0] else c.narrow(0, start, size)
        a_arg, c_arg, cfg_b = operands(a, block, plan["cfg"]) if plan["cfg"]["TMA"] else (a, block, plan["cfg"])
        opts = {**plan["consts"], "TOTAL": total, **_launch_opts(cfg_b)}
        for rb0 in range(0, row_blocks, chunk):
            rbs = min(chunk, row_blocks - rb0)
            _launch(ks.sog_fwd_kernel, (rbs, groups), (
                a_arg, c_arg, tau_arg, tau_c, ids if gather_tau else lse, scale, lse, wm, col_lse, col_wm, ctr,
                n, size, d, a.stride(0), block.stride(0), off, per_group, rb0, row0, 1 if chunked else rb0), opts)
            if chunked:
                _launch(ks.sog_combine_kernel, (_cdiv(n, 256),), (col_lse, col_wm, n, 1 + rbs),
                        dict(BLOCK=256, WSUM=wsum))
        if plan["split"]:  # the columns' direction: rows of c (temperatures tau_c) against a, partials after a's
            c_arg, a_arg, cfg_b = operands(c, a, plan["cfg"]) if plan["cfg"]["TMA"] else (c, a, plan["cfg"])
            _launch(ks.sog_fwd_kernel, (row_blocks, groups), (
                c_arg, a_arg, tau_c, tau_c, ids if gather_tau else lse, scale, lse, wm, lse, wm, ctr,
                n, n, d, c.stride(0), a.stride(0), 0, per_group, 0, p_rows, 0), {**opts, **_launch_opts(cfg_b)})
        row0 += groups
    values = torch.empty(n_dirs, n, **f32)
    stats = torch.empty(5 if gather_tau else 4, n_dirs, n, **f32)
    programs = plan["programs"]
    parts = torch.empty(n_dirs * programs, **f32)
    loss = torch.empty((), **f32) if total else None
    memory = plan["memory"]
    _launch(ks.sog_finish_kernel, (programs, n_dirs), (
        lse, wm, a, p, ids if gather else lse, tau_table if gather and not one else tau_arg, log_u,
        mom if mom is not None else lse, values, stats, parts, ctr,
        parts if loss is None else loss, n, d, a.stride(0), p.stride(0), log_u.stride(0), p_rows,
        1 if chunked else plan["p_cols"], log_n,
        math.log1p(-gamma) if memory else 0.0, math.log(gamma), rho, coef, float(tau_value), *hyper),
        {**plan["finish"], "UPDATE": update, "ISOG": isog, "TOTAL": total})
    return values, stats, loss


@torch.library.custom_op("batchlab::sogclr_forward", mutates_args=())
def sogclr_forward(a: torch.Tensor, c: torch.Tensor, p: torch.Tensor, tau: Optional[torch.Tensor], tau_value: float,
                   log_u: torch.Tensor, starts: List[int], sizes: List[int], offsets: List[int], cols: bool,
                   log_n: float, gamma: float, rho: float, coef: float, reduce: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, stats)``: ``coef * sum`` of the values (0-d) when ``reduce``, else the values (D, n);
    ``stats`` (4, D, n) fp32: new ``log u``, ``d loss / d tau``, and the backward's bias and ``s``.
    ``tau`` None: ``tau_value`` for every anchor. The op that ``torch.compile`` traces."""
    values, stats, loss = _forward(a, c, p, tau, tau_value, log_u, starts, sizes, offsets, cols, log_n, gamma, rho,
                                   coef, total=reduce)
    return (loss if reduce else values), stats


@sogclr_forward.register_fake
def _(a, c, p, tau, tau_value, log_u, starts, sizes, offsets, cols, log_n, gamma, rho, coef, reduce):
    n_dirs, n = log_u.shape
    loss = a.new_empty(() if reduce else (n_dirs, n), dtype=torch.float32)
    return loss, a.new_empty((4, n_dirs, n), dtype=torch.float32)


# ----------------------------------------------------------------------------- backward


def _backward_plan(a, sizes, cols: bool, one: bool) -> dict:
    n = a.shape[0]
    cfg = _config("bwd", a.dtype, n * sum(sizes))
    blocks = []  # per candidate block: (rows per panel, panels, grid columns)
    for size in sizes:
        rows = panel_rows(n, size, a.element_size(), cfg["BM"], None)
        blocks.append((rows, [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)], _cdiv(size, cfg["BN"])))
    return dict(cfg=cfg, blocks=blocks, consts=dict(COLS=cols, ONE_TAU=one, **kernel_flags(a, cfg["BD"])))


def _backward(a, c, tau, tau_value: float, stats, g, starts, sizes, offsets, cols: bool, coef: float, need_a: bool,
              need_c: bool):
    """``(da, dc)`` from ``dLoss/dS``, block by block and panel by panel (``tau`` None: ``tau_value``)."""
    n, d = a.shape
    n_dirs = stats.shape[1]
    one = tau is None
    plan = _plan("bwd", a, lambda: _backward_plan(a, sizes, cols, one), tuple(sizes), cols, one)
    cfg = plan["cfg"]
    if g.dtype != torch.float32:
        g = g.float()
    sgd, sgi = (0, 0) if g.dim() == 0 else (g.stride(0), g.stride(1))
    tau_arg = stats if one else tau
    scale = LOG2E / tau_value if one else 1.0
    single = len(sizes) == 1
    da = da32 = None
    dc = torch.empty_like(c) if need_c and not single else None
    for b, (start, size, off, (rows_per_panel, panels, grid_n)) in enumerate(zip(starts, sizes, offsets,
                                                                                  plan["blocks"])):
        block = c if size == c.shape[0] else c.narrow(0, start, size)
        buf = torch.empty(min(rows_per_panel, n), size, device=a.device, dtype=a.dtype)
        a_arg, c_arg, cfg_b = operands(a, block, cfg) if cfg["TMA"] else (a, block, cfg)
        opts = {**plan["consts"], "POS": b == 0, **_launch_opts(cfg_b, flat=False)}
        if cfg.get("LEAN", 0):
            opts.update(LEAN=True, G0=g.dim() == 0)
        elif cfg.get("G0", 0):
            opts["G0"] = g.dim() == 0
        dc32 = None
        for r0, r1 in panels:
            _launch(ks.sog_bwd_kernel, (_cdiv(r1 - r0, cfg["BM"]), grid_n), (
                a_arg, c_arg, tau_arg, stats, g, buf, r0, r1, size, d, a.stride(0), block.stride(0), buf.stride(0),
                off, n, n_dirs, 0, n_dirs - 1, sgd, sgi, coef, scale), opts)
            grad = buf if r1 - r0 == buf.shape[0] else buf[: r1 - r0]
            if need_a:
                if single and len(panels) == 1:
                    da = torch.mm(grad, block)
                elif single:  # a panel's rows are complete: one rounding
                    if da is None:
                        da = torch.empty_like(a)
                    da[r0:r1] = torch.mm(grad, block)
                else:
                    if da32 is None:
                        da32 = torch.zeros(n, d, device=a.device, dtype=torch.float32)
                    addmm_f32_(da32[r0:r1], grad, block)
            if need_c:
                if single and len(panels) == 1:
                    dc = torch.mm(grad.t(), a)
                elif len(panels) == 1:
                    dc[start:start + size] = torch.mm(grad.t(), a)
                else:
                    if dc32 is None:
                        dc32 = torch.zeros(size, d, device=a.device, dtype=torch.float32)
                    addmm_f32_(dc32, grad.t(), a[r0:r1])
        if dc32 is not None:
            if dc is None:
                dc = torch.empty_like(c)
            dc[start:start + size] = dc32
    if da32 is not None:
        da = da32.to(a.dtype)
    return da, dc


@torch.library.custom_op("batchlab::sogclr_backward", mutates_args=())
def sogclr_backward(a: torch.Tensor, c: torch.Tensor, tau: Optional[torch.Tensor], tau_value: float,
                    stats: torch.Tensor, g: torch.Tensor, starts: List[int], sizes: List[int], offsets: List[int],
                    cols: bool, coef: float, need_a: bool, need_c: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(da, dc)`` of the loss given its upstream gradient ``g`` (0-d, or (D, n)); empty when not needed."""
    da, dc = _backward(a, c, tau, tau_value, stats, g, starts, sizes, offsets, cols, coef, need_a, need_c)
    return (da if need_a else a.new_empty(0)), (dc if need_c else c.new_empty(0))


@sogclr_backward.register_fake
def _(a, c, tau, tau_value, stats, g, starts, sizes, offsets, cols, coef, need_a, need_c):
    return a.new_empty(a.shape if need_a else (0,)), c.new_empty(c.shape if need_c else (0,))


def _input_grads(ctx, g, backward):
    """``(da, dc, d_tau)`` of the forward op for the upstream gradient ``g`` of its loss; ``backward``:
    the custom op (what torch.compile traces) or the plain function (eager)."""
    a, c, tau, stats = ctx.saved_tensors
    need_a, need_c, _, need_tau = ctx.needs_input_grad[:4]
    coef = ctx.coef if ctx.reduce else 1.0
    da = dc = d_tau = None
    if need_a or need_c:
        da, dc = backward(a, c, tau, ctx.tau_value, stats, g, *ctx.blocks, ctx.cols, coef, need_a, need_c)
    if need_tau:  # d value_i / d tau_i is the DRO temperature gradient (see batchlab.losses.sogclr)
        d_tau = (g * coef * stats[1]).to(tau.dtype)
    return (da if need_a else None), (dc if need_c else None), d_tau


def _setup(ctx, inputs, output):
    a, c, p, tau, tau_value, log_u, starts, sizes, offsets, cols, log_n, gamma, rho, coef, reduce = inputs
    ctx.save_for_backward(a, c, tau, output[1])
    ctx.blocks, ctx.cols, ctx.coef, ctx.reduce, ctx.tau_value = (starts, sizes, offsets), cols, coef, reduce, tau_value


def _autograd_backward(ctx, g, _g_stats):
    da, dc, d_tau = _input_grads(ctx, g, sogclr_backward)
    return (da, dc, None, d_tau) + (None,) * 11


sogclr_forward.register_autograd(_autograd_backward, setup_context=_setup)


class _SogFunction(torch.autograd.Function):
    """The eager twin of :func:`sogclr_forward` (same kernels, no custom-op dispatch: a fraction of
    its host time per call, as ``_dense._ClipDense``)."""

    @staticmethod
    def forward(ctx, a, c, p, tau, tau_value, log_u, blocks, cols, log_n, gamma, rho, coef, reduce):
        values, stats, loss = _forward(a, c, p, tau, tau_value, log_u, *blocks, cols, log_n, gamma, rho, coef,
                                       total=reduce)
        ctx.save_for_backward(a, c, tau, stats)
        ctx.blocks, ctx.cols, ctx.coef, ctx.reduce, ctx.tau_value = blocks, cols, coef, reduce, tau_value
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return (loss if reduce else values), stats

    @staticmethod
    def backward(ctx, g, _g_stats):
        if g is None:
            return (None,) * 13
        da, dc, d_tau = _input_grads(ctx, g, _backward)
        return da, dc, None, d_tau, *(None,) * 9


def _sog(a, c, p, tau, tau_value, log_u, blocks, cols, log_n, gamma, rho, coef, reduce):
    """The forward op: the autograd function in eager mode, the custom op under ``torch.compile``."""
    if EAGER_FUNCTION and not torch.compiler.is_compiling():
        return _SogFunction.apply(a, c, p, tau, tau_value, log_u, blocks, cols, log_n, gamma, rho, coef, reduce)
    return sogclr_forward(a, c, p, tau, tau_value, log_u, *blocks, cols, log_n, gamma, rho, coef, reduce)


# ----------------------------------------------------------------------------- the modules' step


class _SogStep(torch.autograd.Function):
    """:func:`sogclr_step`'s forward (tables read and written by the kernels) and backward."""

    @staticmethod
    def forward(ctx, a, c, ids, log_u_table, tau_table, mom_table, tau_value, cols, log_n, gamma, rho, coef, reduce,
                hyper):
        n = a.shape[0]
        isog = tau_table is not None
        # iSogCLR: the kernels read the temperatures at the ids themselves (the finish keeps what it read
        # for the backward), or, where a one-pass forward would do that per tile at large N, they are
        # gathered once here (contiguous rows and columns for the tile loop)
        in_kernel = isog and _gathers_tau(a, c)
        tau = (tau_table if in_kernel else tau_table.index_select(1, ids)) if isog else None
        values, stats, loss = _forward(a, c, c if c.shape[0] == n else c[:n], tau, tau_value, log_u_table,
                                       [0], [c.shape[0]], [0], cols, log_n, gamma, rho, coef, ids=ids,
                                       tau_table=tau_table, mom=mom_table, update=True, isog=isog, wsum=isog,
                                       total=reduce, hyper=hyper, gather_tau=in_kernel)
        ctx.save_for_backward(a, c, stats[4] if in_kernel else tau, stats)
        ctx.cols, ctx.coef, ctx.reduce, ctx.tau_value = cols, coef, reduce, tau_value
        ctx.set_materialize_grads(False)
        return loss if reduce else values.mean(0)

    @staticmethod
    def backward(ctx, g):
        a, c, tau, stats = ctx.saved_tensors
        need_a, need_c = ctx.needs_input_grad[:2]
        if g is None or not (need_a or need_c):
            return (None,) * 14
        coef = ctx.coef
        if not ctx.reduce:  # loss = values.mean(0): each direction's row i gets g_i / D
            coef = 1.0 / stats.shape[1]
            g = g[None].expand(stats.shape[1], -1)
        da, dc = _backward(a, c, tau, ctx.tau_value, stats, g, [0], [c.shape[0]], [0], ctx.cols, coef, need_a,
                           need_c)
        return da, dc, *(None,) * 12


#: iSogCLR's module step reads the temperatures at the batch's ids inside the kernels below this
#: many logits, and wherever the forward takes two row-only passes (rows' temperatures loaded once
#: per program); a one-pass forward above it gathers them first (one index_select: a per-tile
#: gather of the columns' temperatures cost 24.2 against 18.5 ms at N = 65,536 on the H200).
GATHER_TAU_MAX_LOGITS = 8192 * 8192


def _gathers_tau(a: torch.Tensor, c: torch.Tensor) -> bool:
    logits = a.shape[0] * c.shape[0]
    cfg = _config("fwd", a.dtype)
    if logits < GATHER_TAU_MAX_LOGITS:
        return True
    if 0 < cfg.get("TILE", 0) <= logits:  # the TILE forward's GATHER option (1: in-kernel, 0: gathered first)
        return bool(_config("tile", a.dtype).get("GATHER", 1))
    return 0 < cfg.get("SPLIT", 0) <= logits


def step_ok(q: torch.Tensor, k: torch.Tensor, tables) -> bool:
    """Whether :func:`sogclr_step` can run this batch (else the module takes :func:`batchlab.losses.sogclr`)."""
    device = q.device
    return (q.dtype in DTYPES and (device.type == "cuda" or _INTERPRETING) and k.device == device
            and k.dtype == q.dtype and all(update_ok(t) and t.device == device for t in tables))


def sogclr_step(q, k, ids, log_u_table, tau_table, mom_table, *, tau_value: float, mode: str, gamma: float,
                rho: float, beta: float, eta: float, tau_min: float, tau_max: float, reduction: str):
    """One step of :class:`~batchlab.losses.SogCLRLoss` (symmetric or one_way, one process), eager only.

    The loss of the batch (reduced as :func:`batchlab.losses.sogclr` reduces it); as a side effect
    the finish kernel writes the batch's new ``log u`` (and, with ``tau_table``, iSogCLR's momentum
    and temperature) into the tables at ``ids``. ``tau_table`` None: ``tau_value`` for all.
    Gradients flow to ``q`` and ``k``.
    """
    n, m = q.shape[0], k.shape[0]
    cols = mode == "symmetric"
    n_dirs = 2 if cols else 1
    reduce = reduction != "none"
    coef = (1.0 / (n_dirs * n) if reduction == "mean" else 1.0 / n_dirs) if reduce else 1.0
    hyper = (1.0 - beta, beta, eta, tau_min, tau_max)
    return _SogStep.apply(q.contiguous(), k.contiguous(), ids.contiguous(), log_u_table, tau_table, mom_table,
                          float(tau_value), cols, math.log(m - 1), gamma, rho, coef, reduce, hyper)


# ----------------------------------------------------------------------------- state update


@torch.library.custom_op("batchlab::sogclr_update", mutates_args=("log_u_table", "tau_table", "momentum"))
def sogclr_update(ids: torch.Tensor, new_log_u: torch.Tensor, tau_grad: torch.Tensor, log_u_table: torch.Tensor,
                  tau_table: Optional[torch.Tensor], momentum: Optional[torch.Tensor], two_view: bool, beta: float,
                  eta: float, tau_min: float, tau_max: float) -> None:
    """The module's step in one launch: ``log u`` rows and (iSogCLR) momentum and clipped temperature,
    scattered into the (rows, num_examples) fp32 tables at ``ids``."""
    n = ids.shape[0]
    isog = tau_table is not None
    ks.sog_update_kernel[(triton.cdiv(max(n, 1), 256),)](
        ids, new_log_u.contiguous(), tau_grad.contiguous(), log_u_table,
        tau_table if isog else log_u_table, momentum if isog else log_u_table, n, log_u_table.shape[1],
        1.0 - beta, beta, eta, tau_min, tau_max,
        ROWS=log_u_table.shape[0], TWO_VIEW=two_view, ISOG=isog, BLOCK=256,
    )


@sogclr_update.register_fake
def _(ids, new_log_u, tau_grad, log_u_table, tau_table, momentum, two_view, beta, eta, tau_min, tau_max):
    return None


def update_ok(table: torch.Tensor) -> bool:
    """Whether :func:`sogclr_update` can step a module's state held in ``table``."""
    return table.dtype == torch.float32 and table.is_contiguous() and (table.is_cuda or _INTERPRETING)


# ----------------------------------------------------------------------------- the implementations


def supported(q: torch.Tensor) -> bool:
    """Whether the kernels take these embeddings (else the tiled engine runs)."""
    return q.dtype in DTYPES


def _count(sizes) -> float:
    """log of each anchor's number of negatives: the candidates less one excluded entry per block."""
    return math.log(sum(sizes) - len(sizes))


def _temperature(tau):
    """``(tensor or None, value)``: a float temperature goes to the kernels as one number."""
    if isinstance(tau, torch.Tensor):
        return tau.contiguous(), 0.0
    return None, float(tau)


@_dispatch.register("sogclr_symmetric", "triton")
def sogclr_symmetric_triton(q, k, tau, log_u, *, gamma: float, rho: float, reduction: str = "mean"):
    """Both directions of the symmetric loss from one tile pass: ``(loss, new log u (2, n), tau_grad (2, n))``.

    ``tau``: (2, n), or a float for every anchor (one exponential per logit). ``loss`` is already
    reduced as :func:`batchlab.losses.sogclr` does in one process (mean or sum over rows of the
    mean over the two directions; ``"none"``: (n,))."""
    n = q.shape[0]
    q, k = q.contiguous(), k.contiguous()
    reduce = reduction != "none"
    coef = (0.5 / n if reduction == "mean" else 0.5) if reduce else 1.0
    tau_t, tau_value = _temperature(tau)
    loss, stats = _sog(q, k, k, tau_t, tau_value, log_u.contiguous(), ([0], [n], [0]), True,
                       _count([n]), gamma, rho, coef, reduce)
    if not reduce:
        loss = loss.mean(0)
    return loss, stats[0], stats[1]


@_dispatch.register("sogclr", "triton")
def sogclr_direction_triton(direction: Direction, tau, log_u, *, gamma: float, rho: float):
    """One direction (any mode, local rows against gathered candidates): ``(value, new log u, tau_grad)``.

    ``tau``: (n,), or a float for every anchor."""
    a, c = direction.anchors.contiguous(), direction.cands.contiguous()
    p = direction.positives.contiguous()
    tau_t, tau_value = _temperature(tau)
    loss, stats = _sog(a, c, p, None if tau_t is None else tau_t[None], tau_value, log_u[None].contiguous(),
                       (list(direction.starts), list(direction.sizes), list(direction.offsets)), False,
                       _count(direction.sizes), gamma, rho, 1.0, False)
    return loss[0], stats[0, 0], stats[1, 0]


def direction_ok(direction: Direction) -> bool:
    """The kernels' exclusion rule (entry ``offset + i`` of every block) holds for every anchor."""
    n = direction.anchors.shape[0]
    return direction.mask is None and all(off + n <= size for size, off in zip(direction.sizes, direction.offsets))
