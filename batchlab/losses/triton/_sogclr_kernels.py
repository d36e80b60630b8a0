"""Triton kernels of SogCLR / iSogCLR (:mod:`._sogclr`): per-row and per-column temperatures.

Everything is in base 2, as in :mod:`._kernels`. For anchors ``a_i`` (rows) and candidates
``c_j`` (columns) the kernels see ``y_ij = (a_i . c_j) log2(e) / tau_i`` (rows) and, for the
symmetric loss, ``y'_ij = (a_i . c_j) log2(e) / tau'_j`` (columns: anchor ``c_j`` against the
negatives ``a_i``); the positive's logit ``a_i . p_i / tau_i`` is a per-row constant that the
finish subtracts, so the tile loops never touch it. The entry ``j == i + OFF`` (the anchor's
positive, or itself for two views) is no negative.

* ``sog_fwd_kernel``: one pass over (rows x column tiles). A program owns BM rows and a
  group of column tiles; per row it keeps the online (max, sum of ``2^y``, sum of ``2^y y``)
  and writes them as a partial ``(lse, softmax-weighted mean of y)`` per group. With
  ``COLS`` every tile also yields its columns' partial statistics over its BM rows, written
  per (row block, column). No atomics: the partials are combined in a fixed order.

  Two ways to take a tile's exponentials, both exact (fp32 sums):

  - per-row and per-column temperatures: every row and every column gets its own shift (the
    tile's row maximum and column maximum of ``a . c``, scaled by its temperature), so any
    temperature works; two exponentials per logit, each of one FMA (``s ar_i - shift_i``: the
    shift stored is the rounded one used, so the log-sum-exp does not depend on its rounding);
  - ``ONE_TAU`` and ``FAST`` (one temperature for every row and column: SogCLR): ONE exponential per logit,
    ``2^(a (s_ij - T))`` with ``T`` the tile's maximum, serves the row and the column sums.
    That is exact while every row's and column's sum over the tile stays above ``2^-90``
    (then what fp32 flushes to zero, under ``2^-126`` per term, is below ``2^-29`` of the sum):
    a row or column whose best logit in the tile lies more than ~90 (base 2) below the tile's
    best. When a tile of a program breaks that, the program redoes its tiles with the
    per-row/per-column shifts (a second loop, no branch inside a loop: Triton pipelines loops
    without branches). With unit embeddings that needs cosines ~0.6 apart at tau = 0.01. Measured on
    an H200 (N = 65,536): 13.9 ms against 15.2 for the two-exponential loop on random embeddings,
    28.8 against 15.2 ms on clustered ones (most programs redo), so ``FAST`` is off by default.

  ``WSUM=False`` skips the softmax-weighted sums (only the temperature gradient needs them).
* ``sog_fwd_tile_kernel`` (``TILE``): the symmetric forward with one 128 x 128 tile per program
  (InfoNCE's one-tile shape: no loop-carried statistics, so the wide tile fits 4 warps without
  spills), each tile storing its rows' and its columns' partials at its own per-row and per-column
  maxima (``FAST``: at the tile's maximum, one exponential per logit, the tile redone where terms
  could be lost). H200, N = 65,536: SogCLR's forward 15.2 -> 9.2 ms, iSogCLR's 15.8 -> 12.2 ms.
* ``sog_finish_kernel``: combines the partials of each anchor, computes the positive's
  logit and applies the update rules (moving average of ``u``, value, temperature
  gradient, and the bias that turns ``y`` into ``log2 P`` for the backward), plus one
  partial sum of the loss per program. ``GATHER``: ``log u`` and ``tau`` are read from the
  module's (rows, examples) tables at the batch's ids, and with ``UPDATE`` the step of the
  module (new ``log u``; iSogCLR's momentum and clipped temperature) is written back there.
* ``sog_combine_kernel``: folds rows of partials into the first (large N, in chunks).
* ``sog_bwd_kernel``: recomputes a panel of rows' tiles and writes
  ``dLoss/dS_ij = G_i P_ij + G'_j P'_ij`` in the inputs' dtype, with ``-(G_i s_i + G'_i s'_i)``
  on the positive's entry (the ``- a_i . p_i`` term of ``h``), so that two matrix products
  (cuBLAS) give every embedding gradient.
* ``sog_update_kernel``: the stateful module's step (``u`` rows, iSogCLR's momentum and
  clipped temperature) scattered into the tables by dataset id, for the paths that do not
  fuse it into the finish (two views, ``torch.compile``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchlab.losses.triton._dense_kernels import _finish_total
from batchlab.losses.triton._kernels import _rcp, _tile_at, _tile_dot, _tile_dot_ws, panel_order_tile

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
#: ``ONE_TAU``'s exactness bound on a row's or column's sum over a tile (see the module docstring).
RISK: tl.constexpr = tl.constexpr(8.077935669463161e-28)  # 2**-90
#: What an excluded or out-of-range entry of a tile holds instead of ``a . c``: finite, so that a
#: weight of 0 times it is 0 (one tile in registers instead of two), and far below any logit.
NEG: tl.constexpr = tl.constexpr(-1.0e30)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _sums(p, s, axis: tl.constexpr, WSUM: tl.constexpr, PAIR: tl.constexpr):
    """``(sum p, sum p s)`` along ``axis`` (``WSUM=False``: the first twice); ``PAIR``: in one reduction."""
    if WSUM:
        if PAIR:
            return tl.reduce((p, p * s), axis, _add2)
        return tl.sum(p, axis), tl.sum(p * s, axis)
    total = tl.sum(p, axis)
    return total, total


@triton.jit
def _tau_at(tau_ptr, ids_ptr, idx, mask, GATHER: tl.constexpr):
    """The temperatures of anchors ``idx``: ``tau[idx]``, or with ``GATHER`` the table's ``tau[ids[idx]]``."""
    if GATHER:
        idx = tl.load(ids_ptr + idx, mask=mask, other=0).to(tl.int64)
    return tl.load(tau_ptr + idx, mask=mask, other=1.0)


@triton.jit
def _temps(tau_ptr, ids_ptr, idx, mask, GATHER: tl.constexpr = False, FASTLOG: tl.constexpr = 0):
    """``log2(e) / tau`` of the anchors ``idx`` (see :func:`_tau_at`). ``FASTLOG`` (GPU only): 1, one
    ``div.full`` (2 ulp); 2, times one ``rcp.approx`` (1 ulp; temperatures are normal numbers)."""
    if FASTLOG == 2:
        return 1.4426950408889634 * _rcp(_tau_at(tau_ptr, ids_ptr, idx, mask, GATHER), False)
    if FASTLOG == 1:
        return tl.fdiv(tl.zeros_like(idx).to(tl.float32) + 1.4426950408889634,
                       _tau_at(tau_ptr, ids_ptr, idx, mask, GATHER))
    return 1.4426950408889634 / _tau_at(tau_ptr, ids_ptr, idx, mask, GATHER)


@triton.jit
def _fold_rows(m_i, l_i, w_i, shift, rl, rw, WSUM: tl.constexpr):
    """Fold a tile's row sums ``rl`` (and weighted ``rw``) taken at base-2 ``shift`` into the online rows."""
    has = rl > 0  # rows without a negative in the tile keep their max (their sum is 0)
    m_new = tl.where(has, tl.maximum(m_i, shift), m_i)  # m_i >= -1e30: finite
    alpha = tl.exp2(m_i - m_new)
    beta = tl.where(has, tl.exp2(shift - m_new), 0.0)
    l_i = l_i * alpha + rl * beta
    if WSUM:
        w_i = w_i * alpha + rw * beta
    return m_new, l_i, w_i


@triton.jit
def _store_cols(clse_ptr, cwm_ptr, out, cmask, shift, cl, cw, ac, WSUM: tl.constexpr, FASTLOG: tl.constexpr = 0):
    """Partials ``(shift + log2 cl, ac cw / cl)`` (``(-inf, 0)`` where ``cl = 0``). ``FASTLOG`` (GPU only):
    ``lg2.approx`` (one MUFU instruction; absolute error ~2^-22) instead of libdevice's log2f (a
    ~20-instruction polynomial), and the division as ``div.full`` (1, 2 ulp) or times ``rcp.approx``
    (2, 1 ulp; ``cl`` is a normal number: >= 1, or >= RISK in the one-exponential loops): the reduced
    vectors are replicated across the lanes and warps of a tile (each thread takes BN / 4 columns at 4
    warps)."""
    ok = cl > 0
    cl1 = tl.where(ok, cl, 1.0)
    if FASTLOG:
        lg = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [cl1], dtype=tl.float32, is_pure=True,
                                       pack=1)
    else:
        lg = tl.log2(cl1)
    tl.store(clse_ptr + out, tl.where(ok, shift + lg, float("-inf")), mask=cmask)
    if WSUM:
        if FASTLOG == 2:
            tl.store(cwm_ptr + out, tl.where(ok, ac * cw * _rcp(cl1, False), 0.0), mask=cmask)
        elif FASTLOG == 1:
            tl.store(cwm_ptr + out, tl.where(ok, ac * tl.fdiv(cw, cl1), 0.0), mask=cmask)
        else:
            tl.store(cwm_ptr + out, tl.where(ok, ac * (cw / cl1), 0.0), mask=cmask)


@triton.jit
def sog_fwd_kernel(a_ptr, c_ptr, tau_r_ptr, tau_c_ptr, ids_ptr, tau_scale, rlse_ptr, rwm_ptr, clse_ptr, cwm_ptr,
                   ctr_ptr, N, M, D, stride_a, stride_c, OFF, tiles_per_group, rb0, rpart0, cpart0,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, COLS: tl.constexpr,
                   ONE_TAU: tl.constexpr, WSUM: tl.constexpr, TOTAL: tl.constexpr,
                   EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                   FLAT: tl.constexpr = False, FAST: tl.constexpr = False, PAIR: tl.constexpr = False,
                   GATHER_TAU: tl.constexpr = False, FASTLOG: tl.constexpr = 0):
    """Partial row statistics over a group of column tiles; with ``COLS`` each tile's column partials.

    Row partials go to ``r*_ptr[(rpart0 + group) * N + row]``; column partials of row block
    ``rb0 + pid_m`` to ``c*_ptr[(cpart0 + pid_m) * M + col]``: ``lse`` of ``y`` (base 2; -inf
    when empty) and the softmax-weighted mean of ``y`` (0 when empty; only with ``WSUM``).
    Temperatures: ``ONE_TAU``: ``tau_scale = log2(e) / tau`` for all (``FAST``: the one-exponential
    loop, else the per-row/per-column one); else ``tau_r[i]`` (rows) and ``tau_c[j]`` (columns), or
    with ``GATHER_TAU`` the module's table rows at the batch's ids: ``tau_r[ids[i]]``, ``tau_c[ids[j]]``.
    ``PAIR``: each weighted sum shares one reduction with its sum. ``TOTAL``: program (0, 0) zeroes
    the int32 counter ``ctr`` with which the finish kernel adds up the loss.
    """
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    if TOTAL:
        if (pid_m == 0) & (pid_g == 0):
            tl.store(ctr_ptr, 0)
    row0 = (rb0 + pid_m) * BM
    rows = row0 + tl.arange(0, BM)
    rmask = rows < N
    if ONE_TAU:
        ar = tl.zeros((BM,), dtype=tl.float32) + tau_scale
    else:
        ar = _temps(tau_r_ptr, ids_ptr, rows, rmask, GATHER_TAU)
    excl = rows + OFF
    m_i = tl.full((BM,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    w_i = tl.zeros((BM,), dtype=tl.float32)
    t_start = pid_g * tiles_per_group
    t_end = tl.minimum(t_start + tiles_per_group, tl.cdiv(M, BN))
    part_c = (cpart0 + pid_m).to(tl.int64) * M
    if ONE_TAU and FAST:
        # one exponential per logit at the tile's maximum; `risk` marks a row or column whose
        # sum fell under RISK (the flushed terms could matter): then the loop below redoes all
        n_rows = tl.minimum(N - row0, BM)
        risk = tl.zeros((BM,), dtype=tl.int32)
        risk_c = tl.zeros((BN,), dtype=tl.int32)  # folded over tiles, reduced once after the loop
        for t in tl.range(t_start, t_end, flatten=FLAT):
            cols = t * BN + tl.arange(0, BN)
            cmask = cols < M
            acc = _tile_dot(a_ptr, c_ptr, rows, cols, N, M, D, stride_a, stride_c, BM, BN, BD, EVEN_D, UPCAST, PREC,
                            TMA)
            s = tl.where(rmask[:, None] & cmask[None, :] & (cols[None, :] != excl[:, None]), acc, NEG)
            top = tl.max(tl.max(s, 1), 0)
            top = tl.where(top == NEG, 0.0, top)  # no negative in the tile: every weight 2^(NEG a) = 0
            e = tl.exp2((s - top) * tau_scale)  # (fewer registers than the FMA form here: 203 vs 239)
            shift = top * tau_scale
            rl, rw = _sums(e, s, 1, WSUM, PAIR)
            m_i, l_i, w_i = _fold_rows(m_i, l_i, w_i, shift, rl, rw, WSUM)
            # a row has a negative in the tile unless the tile's one column is its excluded entry
            n_cols = tl.minimum(M - t * BN, BN)
            risk |= (rmask & (rl < RISK) & ((n_cols > 1) | (excl != t * BN))).to(tl.int32)
            if COLS:
                cl, cw = _sums(e, s, 0, WSUM, PAIR)
                _store_cols(clse_ptr, cwm_ptr, part_c + cols, cmask, shift, cl, cw, tau_scale, WSUM, FASTLOG)
                risk_c |= (cmask & (cl < RISK) & ((n_rows > 1) | (cols != row0 + OFF))).to(tl.int32)
        redo = (tl.max(risk, 0) > 0) | (tl.max(risk_c, 0) > 0)
        t_stop = tl.where(redo, t_end, t_start)
        m_i = tl.where(redo, -1.0e30, m_i)
        l_i = tl.where(redo, 0.0, l_i)
        w_i = tl.where(redo, 0.0, w_i)
    else:
        t_stop = t_end
    if COLS and not ONE_TAU:  # the columns' temperatures, one tile ahead (loaded before the tile's product)
        nxt = t_start * BN + tl.arange(0, BN)
        tau_next = _tau_at(tau_c_ptr, ids_ptr, nxt, nxt < M, GATHER_TAU)
    # exact for any temperatures: per-row and per-column shifts, two exponentials per logit
    for t in tl.range(t_start, t_stop, flatten=FLAT):
        cols = t * BN + tl.arange(0, BN)
        cmask = cols < M
        if COLS and not ONE_TAU:
            ac = 1.4426950408889634 / tau_next
            nxt = cols + BN
            tau_next = _tau_at(tau_c_ptr, ids_ptr, nxt, nxt < M, GATHER_TAU)
        acc = _tile_dot(a_ptr, c_ptr, rows, cols, N, M, D, stride_a, stride_c, BM, BN, BD, EVEN_D, UPCAST, PREC, TMA)
        s = tl.where(rmask[:, None] & cmask[None, :] & (cols[None, :] != excl[:, None]), acc, NEG)
        rmax = tl.max(s, 1)
        rmax = tl.where(rmax == NEG, 0.0, rmax)
        if COLS:
            cmax = tl.max(s, 0)
            cmax = tl.where(cmax == NEG, 0.0, cmax)
        shift_r = rmax * ar
        rl, rw = _sums(tl.exp2(s * ar[:, None] - shift_r[:, None]), s, 1, WSUM, PAIR)
        m_i, l_i, w_i = _fold_rows(m_i, l_i, w_i, shift_r, rl, rw, WSUM)
        if COLS:
            if ONE_TAU:
                ac = tl.zeros((BN,), dtype=tl.float32) + tau_scale
            shift_c = cmax * ac
            cl, cw = _sums(tl.exp2(s * ac[None, :] - shift_c[None, :]), s, 0, WSUM, PAIR)
            _store_cols(clse_ptr, cwm_ptr, part_c + cols, cmask, shift_c, cl, cw, ac, WSUM, FASTLOG)
    ok = l_i > 0
    l1 = tl.where(ok, l_i, 1.0)
    out = (rpart0 + pid_g).to(tl.int64) * N + rows
    tl.store(rlse_ptr + out, tl.where(ok, m_i + tl.log2(l1), float("-inf")), mask=rmask)
    if WSUM:
        tl.store(rwm_ptr + out, tl.where(ok, ar * (w_i / l1), 0.0), mask=rmask)


@triton.jit
def _tile_exact(s, ar, ac, WSUM: tl.constexpr, PAIR: tl.constexpr):
    """A tile's row and column statistics at its own per-row and per-column maxima (two exponentials
    per logit, exact at any temperature): ``(shift_r, rl, rw, shift_c, cl, cw)``, base 2."""
    cmax = tl.max(s, 0)
    cmax = tl.where(cmax == NEG, 0.0, cmax)
    shift_c = cmax * ac
    cl, cw = _sums(tl.exp2(s * ac[None, :] - shift_c[None, :]), s, 0, WSUM, PAIR)
    rmax = tl.max(s, 1)
    rmax = tl.where(rmax == NEG, 0.0, rmax)
    shift_r = rmax * ar
    rl, rw = _sums(tl.exp2(s * ar[:, None] - shift_r[:, None]), s, 1, WSUM, PAIR)
    return shift_r, rl, rw, shift_c, cl, cw


@triton.jit
def sog_fwd_tile_kernel(a_ptr, c_ptr, tau_r_ptr, tau_c_ptr, ids_ptr, tau_scale, lse_ptr, wm_ptr, ctr_ptr,
                        N, M, D, stride_a, stride_c, OFF, panel_blocks, cpart0,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, ONE_TAU: tl.constexpr,
                        WSUM: tl.constexpr, TOTAL: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
                        PREC: tl.constexpr, TMA: tl.constexpr, FAST: tl.constexpr = False, PAIR: tl.constexpr = False,
                        GATHER_TAU: tl.constexpr = False, MASK_ALL: tl.constexpr = True, FASTLOG: tl.constexpr = 0):
    """``sog_fwd_kernel`` with ``COLS`` and one tile per program: the tile's row AND column partials.

    Program ``pid`` (1-D grid of ``cdiv(N, BM) * cdiv(M, BN)``, walked as ``lse_fwd_tile_kernel``
    walks it: panels of ``panel_blocks`` row blocks, column tile by column tile, row block fastest)
    stores its rows' partial ``(lse, mean)`` over its BN columns at ``[col_tile * N + row]`` and its
    columns' over its BM rows at ``[(cpart0 + row_tile) * M + col]`` of ``lse_ptr`` / ``wm_ptr``
    (the finish kernel combines them; no loop-carried statistics, no atomics). Shifts per tile:
    ``ONE_TAU`` and ``FAST``: one exponential per logit at the tile's maximum, the tile redone with
    per-row/per-column shifts when one of its rows or columns could have lost terms (``RISK``; a
    uniform branch: no loop here to pipeline); else per-row and per-column maxima, two exponentials.
    """
    pid = tl.program_id(0)
    if TOTAL:
        if pid == 0:
            tl.store(ctr_ptr, 0)
    row_tile, col_tile = panel_order_tile(pid, N, M, BM, BN, panel_blocks)  # InfoNCE's forward tile order
    row0 = row_tile * BM
    col0 = col_tile * BN
    rows, cols, rmask, cmask, acc = _tile_at(a_ptr, c_ptr, row0, col0, N, M, D, stride_a, stride_c, BM, BN, BD,
                                             EVEN_D, UPCAST, PREC, TMA, False)
    excl = rows + OFF
    if MASK_ALL:
        s = tl.where(rmask[:, None] & cmask[None, :] & (cols[None, :] != excl[:, None]), acc, NEG)
    elif (row0 + OFF < col0 + BN) & (col0 < row0 + OFF + BM) | (row0 + BM > N) | (col0 + BN > M):
        s = tl.where(rmask[:, None] & cmask[None, :] & (cols[None, :] != excl[:, None]), acc, NEG)
    else:  # no excluded entry and nothing out of range in this tile
        s = acc
    if ONE_TAU:
        ar = tl.zeros((BM,), dtype=tl.float32) + tau_scale
        ac = tl.zeros((BN,), dtype=tl.float32) + tau_scale
    else:
        ar = _temps(tau_r_ptr, ids_ptr, rows, rmask, GATHER_TAU, FASTLOG)
        ac = _temps(tau_c_ptr, ids_ptr, cols, cmask, GATHER_TAU, FASTLOG)
    if ONE_TAU and FAST:
        top = tl.max(tl.max(s, 1), 0)
        top = tl.where(top == NEG, 0.0, top)  # no negative in the tile: every weight 2^(NEG a) = 0
        e = tl.exp2((s - top) * tau_scale)
        shift = top * tau_scale
        cl, cw = _sums(e, s, 0, WSUM, PAIR)
        rl, rw = _sums(e, s, 1, WSUM, PAIR)
        shift_r = tl.zeros((BM,), dtype=tl.float32) + shift
        shift_c = tl.zeros((BN,), dtype=tl.float32) + shift
        # a row (column) has a negative in the tile unless the tile's one column (row) is its excluded entry
        n_cols = tl.minimum(M - col0, BN)
        n_rows = tl.minimum(N - row0, BM)
        risk = tl.max((rmask & (rl < RISK) & ((n_cols > 1) | (excl != col0))).to(tl.int32), 0)
        risk_c = tl.max((cmask & (cl < RISK) & ((n_rows > 1) | (cols != row0 + OFF))).to(tl.int32), 0)
        if (risk > 0) | (risk_c > 0):  # the product again: the tile need not stay live past the sums
            acc = _tile_dot_ws(a_ptr, c_ptr, row0, col0, N, M, D, stride_a, stride_c, BM, BN, BD, EVEN_D, UPCAST,
                               PREC, TMA, False)
            s = tl.where(rmask[:, None] & cmask[None, :] & (cols[None, :] != excl[:, None]), acc, NEG)
            shift_r, rl, rw, shift_c, cl, cw = _tile_exact(s, ar, ac, WSUM, PAIR)
    else:
        shift_r, rl, rw, shift_c, cl, cw = _tile_exact(s, ar, ac, WSUM, PAIR)
    _store_cols(lse_ptr, wm_ptr, (cpart0 + row_tile).to(tl.int64) * M + cols, cmask, shift_c, cl, cw, ac, WSUM, FASTLOG)
    _store_cols(lse_ptr, wm_ptr, col_tile.to(tl.int64) * N + rows, rmask, shift_r, rl, rw, ar, WSUM, FASTLOG)


@triton.jit
def _combine(lse_ptr, wm_ptr, base, L, P, idx, mask, BLOCK: tl.constexpr, WSUM: tl.constexpr, PB: tl.constexpr = 8):
    """Fold ``P`` partials ``(lse, mean)`` at ``base + p * L + idx`` into ``(max, sum, weighted sum)``,
    ``PB`` partials per step (their loads in flight together; a fixed order: deterministic)."""
    mx = tl.full((BLOCK,), -1.0e30, dtype=tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    w = tl.zeros((BLOCK,), dtype=tl.float32)
    for p0 in range(0, P, PB):
        pp = p0 + tl.arange(0, PB)
        off = base + pp[:, None].to(tl.int64) * L + idx[None, :]
        m2 = (pp[:, None] < P) & mask[None, :]
        lp = tl.load(lse_ptr + off, mask=m2, other=float("-inf"))
        m_new = tl.maximum(mx, tl.max(lp, 0))  # >= -1e30: finite
        alpha = tl.exp2(mx - m_new)
        e = tl.exp2(lp - m_new[None, :])
        s = s * alpha + tl.sum(e, 0)
        if WSUM:
            w = w * alpha + tl.sum(e * tl.load(wm_ptr + off, mask=m2, other=0.0), 0)
        mx = m_new
    return mx, s, w


@triton.jit
def sog_combine_kernel(lse_ptr, wm_ptr, L, P, BLOCK: tl.constexpr, WSUM: tl.constexpr):
    """Rows ``[0, P)`` of the (P, L) partials folded into row 0 (each program owns its columns)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < L
    mx, s, w = _combine(lse_ptr, wm_ptr, 0, L, P, idx, mask, BLOCK, WSUM)
    ok = s > 0
    s1 = tl.where(ok, s, 1.0)
    tl.store(lse_ptr + idx, tl.where(ok, mx + tl.log2(s1), float("-inf")), mask=mask)
    if WSUM:
        tl.store(wm_ptr + idx, tl.where(ok, w / s1, 0.0), mask=mask)


@triton.jit
def sog_finish_kernel(lse_ptr, wm_ptr, x_ptr, p_ptr, ids_ptr, tau_ptr, logu_ptr, mom_ptr, val_ptr, stats_ptr, part_ptr,
                      ctr_ptr, loss_ptr, L, D, stride_x, stride_p, stride_tab, P0, P1, log_n, log_keep, log_gamma,
                      rho, coef, tau_value, keep, beta, eta, tau_min, tau_max,
                      BLOCK: tl.constexpr, BD: tl.constexpr, MEMORY: tl.constexpr, ONE_TAU: tl.constexpr,
                      WSUM: tl.constexpr, GATHER: tl.constexpr, UPDATE: tl.constexpr, ISOG: tl.constexpr,
                      TOTAL: tl.constexpr, SNAP: tl.constexpr = False, PB: tl.constexpr = 8):
    """The update rules for anchors ``idx`` of direction ``program_id(1)`` (see :mod:`batchlab.losses.sogclr`).

    Direction 0's partials are ``P0`` rows of (lse, mean) from offset 0, direction 1's ``P1`` rows
    from ``P0 * L``. ``x``/``p``: anchors and positives (the positive's logit ``x_i . p_i``).
    ``tau`` and ``log u`` of anchor i of direction d: entry ``d * stride_tab + i`` (with ``GATHER``:
    ``+ ids[i]``, the module's tables); ``ONE_TAU``: ``tau_value`` for all. ``UPDATE`` writes the
    new ``log u`` (and, ``ISOG``, the momentum ``keep m + beta dtau`` and the clipped temperature
    ``tau - eta m``) back at the same entries. ``stats`` (4 planes of (D_dirs, L)): new ``log u``,
    ``d loss / d tau``, the backward's base-2 bias ``-(x_i . p_i / tau_i + log u_i + log n) log2(e)``
    and ``s_i = sum_j P_ij``; ``SNAP``: a fifth plane, the temperatures read (before the update: what
    the backward uses). Without ``WSUM`` the temperature gradient is not computed (NaN). Each program stores ``coef``
    times its values' sum at ``part[d * programs + pid]``; with ``TOTAL`` the last program to finish
    adds them up in a fixed order into ``loss`` (``ctr``: zeroed by the forward kernel).
    """
    pid = tl.program_id(0)
    d = tl.program_id(1)
    n_dirs = tl.num_programs(1)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < L
    P = tl.where(d == 0, P0, P1)
    base = (d * P0).to(tl.int64) * L
    mx, s, w = _combine(lse_ptr, wm_ptr, base, L, P, idx, mask, BLOCK, WSUM, PB)
    pos = tl.zeros((BLOCK,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        m2 = mask[:, None] & (dd[None, :] < D)
        xa = tl.load(x_ptr + idx[:, None].to(tl.int64) * stride_x + dd[None, :], mask=m2, other=0.0)
        pa = tl.load(p_ptr + idx[:, None].to(tl.int64) * stride_p + dd[None, :], mask=m2, other=0.0)
        pos += tl.sum(xa.to(tl.float32) * pa.to(tl.float32), 1)
    row = d * L + idx
    if GATHER:
        tab = d * stride_tab + tl.load(ids_ptr + idx, mask=mask, other=0).to(tl.int64)
    else:
        tab = d * stride_tab + idx
    if ONE_TAU:
        tau = tl.zeros((BLOCK,), dtype=tl.float32) + tau_value
    else:
        tau = tl.load(tau_ptr + tab, mask=mask, other=1.0)
    log_u = tl.load(logu_ptr + tab, mask=mask, other=0.0)
    s1 = tl.where(s > 0, s, 1.0)
    px = pos / tau
    lse = (mx + tl.log2(s1)) * 0.6931471805599453 - px  # log sum_j exp(h_ij / tau_i)
    log_g = lse - log_n
    if MEMORY:  # log((1 - gamma) u + gamma g); u = g on a first visit (log u = -inf)
        u1 = log_u + log_keep
        g1 = log_g + log_gamma
        hi = tl.maximum(u1, g1)
        lo = tl.minimum(u1, g1)
        mixed = hi + tl.log(1.0 + tl.exp(lo - hi))
        new_u = tl.where(log_u == float("-inf"), log_g, mixed)
    else:
        new_u = log_g
    shift = new_u + log_n
    s_i = tl.exp(log_g - new_u)
    if WSUM:
        mean_x = (w / s1) * 0.6931471805599453 - px  # softmax-weighted mean of h_ij / tau_i
        tau_grad = new_u + rho - s_i * mean_x
    else:
        tau_grad = tl.full((BLOCK,), float("nan"), dtype=tl.float32)
    value = tau * (new_u + rho)
    tl.store(val_ptr + row, value, mask=mask)
    plane = n_dirs * L
    tl.store(stats_ptr + row, new_u, mask=mask)
    tl.store(stats_ptr + plane + row, tau_grad, mask=mask)
    tl.store(stats_ptr + 2 * plane + row, -(px + shift) * 1.4426950408889634, mask=mask)
    tl.store(stats_ptr + 3 * plane + row, s_i, mask=mask)
    if SNAP:
        tl.store(stats_ptr + 4 * plane + row, tau, mask=mask)
    if UPDATE:
        tl.store(logu_ptr + tab, new_u, mask=mask)
        if ISOG:
            mom = keep * tl.load(mom_ptr + tab, mask=mask, other=0.0) + beta * tau_grad
            tl.store(mom_ptr + tab, mom, mask=mask)
            tl.store(tau_ptr + tab, tl.minimum(tl.maximum(tau - eta * mom, tau_min), tau_max), mask=mask)
    tl.store(part_ptr + d * tl.num_programs(0) + pid, tl.sum(tl.where(mask, value, 0.0), 0) * coef)
    if TOTAL:
        _finish_total(part_ptr, loss_ptr, ctr_ptr, tl.num_programs(0) * n_dirs, 1, 128)


@triton.jit
def _bwd_anchor_terms(tau_ptr, stats_ptr, g_ptr, idx, mask, d, L, plane, sgd, sgi, coef, tau_scale,
                      SIZE: tl.constexpr, ONE_TAU: tl.constexpr, G0: tl.constexpr = False):
    """``(table index, log2(e) / tau, bias, coef * upstream gradient)`` of ``sog_bwd_kernel``'s anchors
    ``idx`` of direction ``d`` (its rows or its columns): their logit gradient is ``g * exp2(S * a + b)``.
    ``G0``: the upstream gradient is one number (returned as a scalar)."""
    t_idx = d * L + idx
    if ONE_TAU:
        a = tl.zeros((SIZE,), dtype=tl.float32) + tau_scale
    else:
        a = 1.4426950408889634 / tl.load(tau_ptr + t_idx, mask=mask, other=1.0)
    b = tl.load(stats_ptr + 2 * plane + t_idx, mask=mask, other=0.0)
    if G0:
        g = tl.load(g_ptr) * coef
    else:
        g = tl.load(g_ptr + d * sgd + idx * sgi, mask=mask, other=0.0) * coef
    return t_idx, a, b, g


@triton.jit
def sog_bwd_kernel(a_ptr, c_ptr, tau_ptr, stats_ptr, g_ptr, out_ptr,
                   r0, r1, M, D, stride_a, stride_c, stride_out, OFF, L, n_dirs, DR, DC, sgd, sgi, coef, tau_scale,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, COLS: tl.constexpr, POS: tl.constexpr,
                   ONE_TAU: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                   TMA: tl.constexpr, LEAN: tl.constexpr = False, G0: tl.constexpr = False):
    """``dLoss/dS`` on one tile of the row panel [r0, r1), written at panel-relative rows.

    Row anchors use direction ``DR``'s temperatures and statistics, columns (``COLS``) direction
    ``DC``'s; the upstream gradient of anchor i of direction d is ``g[d * sgd + i * sgi] * coef``.
    ``POS``: the excluded entry is the positive, whose logit enters ``h`` with weight ``-G s``.
    Temperatures: ``tau[d * L + i]``, or ``ONE_TAU``: ``tau_scale = log2(e) / tau`` for all.
    ``LEAN``: the positive's entry from per-row values only (the column anchor of row i's excluded
    entry is ``i + OFF``), so that no per-column vector beyond the exponent's scale and bias (and
    gradient) is live: each costs BN / 4 registers a thread at 4 warps. ``G0``: the upstream
    gradient is one number (``sgd = sgi = 0``), applied once per entry at the end.
    """
    rows = r0 + tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < r1
    cmask = cols < M
    acc = _tile_dot(a_ptr, c_ptr, rows, cols, r1, M, D, stride_a, stride_c, BM, BN, BD, EVEN_D, UPCAST, PREC, TMA)
    plane = n_dirs * L
    r_idx, ar, br, gr = _bwd_anchor_terms(tau_ptr, stats_ptr, g_ptr, rows, rmask, DR, L, plane, sgd, sgi, coef,
                                          tau_scale, BM, ONE_TAU, G0)
    grad = tl.exp2(acc * ar[:, None] + br[:, None])
    if POS:  # the positive's entry: -(G_i s_i + G'_j s'_j), j = i + OFF (its column)
        pos = tl.load(stats_ptr + 3 * plane + r_idx, mask=rmask, other=0.0)
    if not G0:
        grad = gr[:, None] * grad
        if POS:
            pos = pos * gr
    if COLS:
        c_idx, ac, bc, gc = _bwd_anchor_terms(tau_ptr, stats_ptr, g_ptr, cols, cmask, DC, L, plane, sgd, sgi, coef,
                                              tau_scale, BN, ONE_TAU, G0)
        if G0:
            grad += tl.exp2(acc * ac[None, :] + bc[None, :])
        else:
            grad += gc[None, :] * tl.exp2(acc * ac[None, :] + bc[None, :])
        if POS:
            if LEAN:  # the column anchor of row i's positive, read at the rows
                j = rows + OFF
                jm = rmask & (j < M)
                pc = tl.load(stats_ptr + 3 * plane + DC * L + j, mask=jm, other=0.0)
                if not G0:
                    pc = pc * tl.load(g_ptr + DC * sgd + j * sgi, mask=jm, other=0.0) * coef
                pos = pos + pc
            else:
                pos_c = tl.load(stats_ptr + 3 * plane + c_idx, mask=cmask, other=0.0)
                if not G0:
                    pos_c = pos_c * gc
    diag = cols[None, :] == (rows + OFF)[:, None]
    if POS:
        if COLS and not LEAN:
            grad = tl.where(diag, -pos[:, None] - pos_c[None, :], grad)
        else:
            grad = tl.where(diag, -pos[:, None], grad)
    else:
        grad = tl.where(diag, 0.0, grad)
    if G0:
        grad = grad * gr
    out = out_ptr + (rows - r0)[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def sog_update_kernel(ids_ptr, new_u_ptr, tau_grad_ptr, logu_tab, tau_tab, mom_tab, n, num,
                      keep, beta, eta, tau_min, tau_max,
                      ROWS: tl.constexpr, TWO_VIEW: tl.constexpr, ISOG: tl.constexpr, BLOCK: tl.constexpr):
    """Scatter the batch's new ``log u`` (and iSogCLR's momentum and temperature) into the tables.

    ``TWO_VIEW``: one table row fed by both views (``log u`` = log of the mean of the two ``u``,
    the temperature step their mean), as :class:`~batchlab.losses.SogCLRLoss` documents.
    """
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    ids = tl.load(ids_ptr + idx, mask=mask, other=0).to(tl.int64)
    for d in tl.static_range(ROWS):
        if TWO_VIEW:
            u0 = tl.load(new_u_ptr + idx, mask=mask, other=0.0)
            u1 = tl.load(new_u_ptr + n + idx, mask=mask, other=0.0)
            hi = tl.maximum(u0, u1)
            new_u = hi + tl.log(tl.exp(u0 - hi) + tl.exp(u1 - hi)) - 0.6931471805599453
            tg = (tl.load(tau_grad_ptr + idx, mask=mask, other=0.0)
                  + tl.load(tau_grad_ptr + n + idx, mask=mask, other=0.0)) * 0.5
        else:
            new_u = tl.load(new_u_ptr + d * n + idx, mask=mask, other=0.0)
            tg = tl.load(tau_grad_ptr + d * n + idx, mask=mask, other=0.0)
        at = d * num + ids
        tl.store(logu_tab + at, new_u, mask=mask)
        if ISOG:
            mom = keep * tl.load(mom_tab + at, mask=mask, other=0.0) + beta * tg
            tau = tl.load(tau_tab + at, mask=mask, other=1.0) - eta * mom
            tau = tl.minimum(tl.maximum(tau, tau_min), tau_max)
            tl.store(mom_tab + at, mom, mask=mask)
            tl.store(tau_tab + at, tau, mask=mask)
