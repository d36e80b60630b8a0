"""``impl="triton"`` of :func:`batchlab.losses.sogclr`: SogCLR / iSogCLR on fused Triton kernels.

The per-example temperatures are per-row (and, for the symmetric loss, per-column) scales of
the one similarity tile ``S = a @ c.T``, so the kernels have InfoNCE's shape
(:mod:`._sogclr_kernels`):

* forward: ONE pass over the tiles gives every anchor's statistics of both directions (the
  symmetric loss: images' over the rows, texts' over the columns of the same tile), then a
  finish kernel applies the update rules (moving average of ``u``, value, temperature
  gradient) and sums the loss; 2 launches (+1 sum) and no host synchronisation;
* backward: one kernel recomputes the tiles and writes ``dLoss/dS`` (the positive's term
  folded into the excluded entry) in the inputs' dtype; two cuBLAS products give the
  gradients of both inputs (row panels of ``panel_rows`` above 8,192 rows, as the InfoNCE
  kernels do, with fp32 accumulation across panels).

Column statistics are exact at any temperature: each tile's column maxima are its own, and
the per-(row block, column) partials (8 bytes each; at most ``CHUNK_BYTES`` at a time) are
combined in a fixed order (deterministic, no atomics).

Coverage: bf16 and fp32 inputs (fp32 products follow torch's TF32 switch, as the InfoNCE
kernels); the symmetric loss in one process in one kernel pair; one_way, two_view and the
distributed shards per direction (one pass per candidate block). Everything else (fp16,
float64, ``neg_mask``) runs on the tiled engine with identical results
(:func:`batchlab.losses.sogclr` decides). The kernels run inside ``torch.library`` custom ops
with fake implementations and autograd formulas, so ``torch.compile`` traces them.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import triton

from batchlab.losses import _dispatch
from batchlab.losses.sogclr import Direction
from batchlab.losses.triton import _sogclr_kernels as ks
from batchlab.losses.triton._launch import (FP32_BD, addmm_f32_, interpreting, kernel_flags, operands, panel_rows,
                                            tile_shares)

#: Tile shapes of the forward (two softmaxes per tile) and backward kernels on the GPU; FLAT as
#: in ``_launch.KERNEL_OPTIONS``. fp32 inputs halve the d chunk (``BD``). Chosen by the sweep of
#: ``tests/losses/gpu_check_sogclr.py`` on one H200 (N = 65,536, d = 512, bf16; forward alone
#: 19.2 ms at 128 x 64 / 4 warps against 24.5 ms at 128 x 128 / 4 warps and 28.0 ms at 128 x 128 /
#: 8 warps; forward + backward 42.3 ms with the backward at 4 warps against 46.6 ms at 8):
#: ``benchmarks/results/sogclr-h200-triton/sweep.json``.
CONFIGS: dict[str, dict[str, int]] = {
    "fwd": dict(BM=128, BN=64, BD=64, num_warps=4, num_stages=3, TMA=1, FLAT=0),
    "bwd": dict(BM=128, BN=128, BD=64, num_warps=4, num_stages=3, TMA=1),
}
_INTERPRET = dict(BM=16, BN=32, BD=16, num_warps=4, num_stages=1, TMA=0)
#: Bytes of column partials held at once (row blocks x columns x 8 B); above it the row blocks
#: run in chunks whose partials are folded as they come (N > ~180,000 at BM = 128).
CHUNK_BYTES = 3 << 29
#: Dtypes the kernels take (fp16 could underflow in the stored logit gradient; float64: no tensor cores).
DTYPES = (torch.bfloat16, torch.float32)
_FINISH_BLOCK = 128


def _config(kernel: str, dtype: torch.dtype) -> dict:
    cfg = dict(_INTERPRET) if interpreting() else dict(CONFIGS[kernel])
    if dtype == torch.float32 and not interpreting():
        cfg["BD"] = min(cfg["BD"], FP32_BD)
    cfg.setdefault("TMA", 0)
    return cfg


def _launch_opts(cfg: dict) -> dict:
    return {key: cfg[key] for key in ("BM", "BN", "BD", "num_warps", "num_stages", "TMA", "FLAT") if key in cfg}


# ----------------------------------------------------------------------------- forward


def _forward(a, c, p, tau, log_u, starts, sizes, offsets, cols: bool, log_n: float, gamma: float, rho: float,
             coef: float):
    """``(values (D, n), stats (4, D, n), parts)``: see ``sog_finish_kernel``."""
    n, d = a.shape
    n_dirs = tau.shape[0]
    f32 = dict(device=a.device, dtype=torch.float32)
    cfg = _config("fwd", a.dtype)
    bm, bn = cfg["BM"], cfg["BN"]
    row_blocks = triton.cdiv(n, bm)
    flags = kernel_flags(a, cfg["BD"])
    # one launch shape per candidate block: (groups of column tiles, row blocks per chunk)
    plans = []
    for size in sizes:
        n_tiles = max(1, triton.cdiv(size, bn))
        chunk = row_blocks
        if cols:
            chunk = max(1, min(row_blocks, CHUNK_BYTES // max(1, 8 * size)))
        groups, per_group = tile_shares(n_tiles, chunk, a.device, 4)
        plans.append((groups, per_group, chunk))
    p_rows = sum(g for g, _, _ in plans)
    chunked = cols and plans[0][2] < row_blocks
    p_cols = (1 + plans[0][2] if chunked else row_blocks) if cols else 0
    length = n
    lse = torch.empty((p_rows + p_cols) * length, **f32)
    wm = torch.empty_like(lse)
    col_lse, col_wm = lse[p_rows * length:], wm[p_rows * length:]
    if chunked:
        col_lse[:length].fill_(float("-inf"))
        col_wm[:length].zero_()
    row0 = 0
    for (start, size, off), (groups, per_group, chunk) in zip(zip(starts, sizes, offsets), plans):
        block = c.narrow(0, start, size)
        a_arg, c_arg, cfg_b = operands(a, block, cfg)
        for rb0 in range(0, row_blocks, chunk):
            rbs = min(chunk, row_blocks - rb0)
            ks.sog_fwd_kernel[(rbs, groups)](
                a_arg, c_arg, tau[0], tau[n_dirs - 1], lse, wm, col_lse, col_wm,
                n, size, d, a.stride(0), block.stride(0), off, per_group, rb0, row0, 1 if chunked else rb0,
                COLS=cols, **flags, **_launch_opts(cfg_b),
            )
            if chunked:
                ks.sog_combine_kernel[(triton.cdiv(length, 256),)](col_lse, col_wm, length, 1 + rbs, BLOCK=256)
        row0 += groups
    if chunked:
        p_cols = 1
    values = torch.empty(n_dirs, n, **f32)
    stats = torch.empty(4, n_dirs, n, **f32)
    programs = triton.cdiv(n, _FINISH_BLOCK)
    parts = torch.empty(n_dirs * programs, **f32)
    memory = gamma < 1.0
    bd = 64 if d >= 64 else triton.next_power_of_2(d)
    ks.sog_finish_kernel[(programs, n_dirs)](
        lse, wm, a, p, tau, log_u, values, stats, parts,
        n, d, a.stride(0), p.stride(0), p_rows, p_cols, log_n,
        math.log1p(-gamma) if memory else 0.0, math.log(gamma), rho, coef,
        BLOCK=_FINISH_BLOCK, BD=bd, MEMORY=memory, EVEN_D=d % bd == 0,
    )
    return values, stats, parts


@torch.library.custom_op("batchlab::sogclr_forward", mutates_args=())
def sogclr_forward(a: torch.Tensor, c: torch.Tensor, p: torch.Tensor, tau: torch.Tensor, log_u: torch.Tensor,
                   starts: List[int], sizes: List[int], offsets: List[int], cols: bool, log_n: float, gamma: float,
                   rho: float, coef: float, reduce: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, stats)``: ``coef * sum`` of the values (0-d) when ``reduce``, else the values (D, n);
    ``stats`` (4, D, n) fp32: new ``log u``, ``d loss / d tau``, and the backward's bias and ``s``."""
    values, stats, parts = _forward(a, c, p, tau, log_u, starts, sizes, offsets, cols, log_n, gamma, rho, coef)
    return (parts.sum() if reduce else values), stats


@sogclr_forward.register_fake
def _(a, c, p, tau, log_u, starts, sizes, offsets, cols, log_n, gamma, rho, coef, reduce):
    n_dirs, n = tau.shape
    loss = a.new_empty(() if reduce else (n_dirs, n), dtype=torch.float32)
    return loss, a.new_empty((4, n_dirs, n), dtype=torch.float32)


# ----------------------------------------------------------------------------- backward


def _backward(a, c, tau, stats, g, starts, sizes, offsets, cols: bool, coef: float, need_a: bool, need_c: bool):
    """``(da, dc)`` from ``dLoss/dS``, block by block and panel by panel."""
    n, d = a.shape
    n_dirs = tau.shape[0]
    cfg = _config("bwd", a.dtype)
    flags = kernel_flags(a, cfg["BD"])
    g = g.float()
    if g.dim() == 0:
        sgd = sgi = 0
    else:
        sgd, sgi = g.stride(0), g.stride(1)
    single = len(sizes) == 1
    da = da32 = None
    dc = torch.empty_like(c) if need_c and not single else None
    for b, (start, size, off) in enumerate(zip(starts, sizes, offsets)):
        block = c.narrow(0, start, size)
        rows_per_panel = panel_rows(n, size, a.element_size(), cfg["BM"], None)
        panels = [(r0, min(n, r0 + rows_per_panel)) for r0 in range(0, n, rows_per_panel)]
        buf = torch.empty(min(rows_per_panel, n), size, device=a.device, dtype=a.dtype)
        a_arg, c_arg, cfg_b = operands(a, block, cfg)
        dc32 = None
        for r0, r1 in panels:
            ks.sog_bwd_kernel[(triton.cdiv(r1 - r0, cfg["BM"]), triton.cdiv(size, cfg["BN"]))](
                a_arg, c_arg, tau, stats, g, buf, r0, r1, size, d, a.stride(0), block.stride(0), buf.stride(0),
                off, n, n_dirs, 0, n_dirs - 1, sgd, sgi, coef,
                COLS=cols, POS=b == 0, **flags, **{k: v for k, v in _launch_opts(cfg_b).items() if k != "FLAT"},
            )
            grad = buf[: r1 - r0]
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
def sogclr_backward(a: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, stats: torch.Tensor, g: torch.Tensor,
                    starts: List[int], sizes: List[int], offsets: List[int], cols: bool, coef: float, need_a: bool,
                    need_c: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(da, dc)`` of the loss given its upstream gradient ``g`` (0-d, or (D, n)); empty when not needed."""
    da, dc = _backward(a, c, tau, stats, g, starts, sizes, offsets, cols, coef, need_a, need_c)
    return (da if need_a else a.new_empty(0)), (dc if need_c else c.new_empty(0))


@sogclr_backward.register_fake
def _(a, c, tau, stats, g, starts, sizes, offsets, cols, coef, need_a, need_c):
    return a.new_empty(a.shape if need_a else (0,)), c.new_empty(c.shape if need_c else (0,))


def _setup(ctx, inputs, output):
    a, c, p, tau, log_u, starts, sizes, offsets, cols, log_n, gamma, rho, coef, reduce = inputs
    ctx.save_for_backward(a, c, tau, output[1])
    ctx.blocks, ctx.cols, ctx.coef, ctx.reduce = (starts, sizes, offsets), cols, coef, reduce


def _autograd_backward(ctx, g, _g_stats):
    a, c, tau, stats = ctx.saved_tensors
    need_a, need_c, _, need_tau = ctx.needs_input_grad[:4]
    coef = ctx.coef if ctx.reduce else 1.0
    da = dc = d_tau = None
    if need_a or need_c:
        da, dc = sogclr_backward(a, c, tau, stats, g, *ctx.blocks, ctx.cols, coef, need_a, need_c)
    if need_tau:  # d value_i / d tau_i is the DRO temperature gradient (see batchlab.losses.sogclr)
        d_tau = (g * coef * stats[1]).to(tau.dtype)
    return ((da if need_a else None), (dc if need_c else None), None, d_tau) + (None,) * 10


sogclr_forward.register_autograd(_autograd_backward, setup_context=_setup)


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
    return table.dtype == torch.float32 and table.is_contiguous() and (table.is_cuda or interpreting())


# ----------------------------------------------------------------------------- the implementations


def supported(q: torch.Tensor) -> bool:
    """Whether the kernels take these embeddings (else the tiled engine runs)."""
    return q.dtype in DTYPES


def _count(n: int, sizes, offsets) -> float:
    """log of each anchor's number of negatives: the candidates less one excluded entry per block."""
    return math.log(sum(sizes) - len(sizes))


@_dispatch.register("sogclr_symmetric", "triton")
def sogclr_symmetric_triton(q, k, tau, log_u, *, gamma: float, rho: float, reduction: str = "mean"):
    """Both directions of the symmetric loss from one tile pass: ``(loss, new log u (2, n), tau_grad (2, n))``.

    ``loss`` is already reduced as :func:`batchlab.losses.sogclr` does in one process (mean or sum
    over rows of the mean over the two directions; ``"none"``: (n,))."""
    n = q.shape[0]
    q, k = q.contiguous(), k.contiguous()
    reduce = reduction != "none"
    coef = (0.5 / n if reduction == "mean" else 0.5) if reduce else 1.0
    loss, stats = sogclr_forward(q, k, k, tau.contiguous(), log_u.contiguous(), [0], [n], [0], True,
                                 _count(n, [n], [0]), gamma, rho, coef, reduce)
    if not reduce:
        loss = loss.mean(0)
    return loss, stats[0], stats[1]


@_dispatch.register("sogclr", "triton")
def sogclr_direction_triton(direction: Direction, tau, log_u, *, gamma: float, rho: float):
    """One direction (any mode, local rows against gathered candidates): ``(value, new log u, tau_grad)``."""
    a, c = direction.anchors.contiguous(), direction.cands.contiguous()
    p = direction.positives.contiguous()
    loss, stats = sogclr_forward(a, c, p, tau[None].contiguous(), log_u[None].contiguous(), list(direction.starts),
                                 list(direction.sizes), list(direction.offsets), False,
                                 _count(a.shape[0], direction.sizes, direction.offsets), gamma, rho, 1.0, False)
    return loss[0], stats[0, 0], stats[1, 0]


def direction_ok(direction: Direction) -> bool:
    """The kernels' exclusion rule (entry ``offset + i`` of every block) holds for every anchor."""
    n = direction.anchors.shape[0]
    return direction.mask is None and all(off + n <= size for size, off in zip(direction.sizes, direction.offsets))
