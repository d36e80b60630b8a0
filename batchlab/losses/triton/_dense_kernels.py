"""Triton kernels of the small-batch path (:mod:`._dense`): a handful of launches per step.

* ``clip_lse_kernel``: from the fp32 product ``S = q @ k.T`` (one cuBLAS call), every
  row's and (symmetric) every column's exact log-sum-exp of ``s * S``, the positive
  logits, the per-row and per-column losses and one partial sum of the loss per
  program. Programs ``[0, row_blocks)`` own row blocks and sweep the columns; the
  others own column blocks and sweep the rows (exact online maxima both ways, no bound).
* ``clip_grad_kernel``: recomputes a tile of ``q . k`` and writes ``s * dLoss/dL`` in
  the inputs' dtype (two cuBLAS products turn it into ``dq`` and ``dk``) and a partial
  sum of ``dLoss/dL * (q . k)`` (the scale gradient).
* ``siglip_loss_kernel`` / ``siglip_grad_kernel``: the same for the sigmoid loss, whose
  terms need no statistics (its forward needs no product buffer).

The upstream gradient and the loss normalisation enter the kernels as a coefficient
(``cr``, ``cc``) times ``g`` (a scalar, or one value per row when ``G_VEC``).

Totals without a summing launch (:func:`_finish_total`): the tiled forward's merge and the two
gradient kernels add their programs' partial sums up themselves. Every program stores its
partial, then counts itself on an int32 counter; the last to arrive sums all partials in a
fixed order (deterministic) and resets the counter. The counter is set to zero by the call's
forward kernel (``clip_lse_kernel``, ``clip_tile_stats_kernel``, ``siglip_loss_kernel``): one
int32 per call, saved for the backward, so repeated backward passes (``retain_graph``) find
it at zero again.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchlab.losses.triton._kernels import _tile_dot, online_lse

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _finish_total(part_ptr, out_ptr, ctr_ptr, programs, WIDTH: tl.constexpr, RB: tl.constexpr):
    """Called by every program after storing its ``WIDTH`` partial sums at ``part_ptr[pid * WIDTH + w]``:
    the last of the ``programs`` programs to arrive adds all of them up (fixed order, blocks of ``RB``),
    stores the ``WIDTH`` totals at ``out_ptr[w]`` and sets the int32 counter at ``ctr_ptr`` (zero
    before the launch) back to zero."""
    tl.debug_barrier()  # this program's partials are stored before it counts itself
    done = tl.atomic_add(ctr_ptr, 1, sem="acq_rel", scope="gpu")
    if done == programs - 1:
        acc = tl.zeros((RB,), dtype=tl.float32)
        for i0 in range(0, programs * WIDTH, RB):  # RB is a multiple of WIDTH: lane i holds total i % WIDTH
            i = i0 + tl.arange(0, RB)
            acc += tl.load(part_ptr + i, mask=i < programs * WIDTH, other=0.0, cache_modifier=".cg")
        lane = tl.arange(0, RB) % WIDTH
        for w in tl.static_range(WIDTH):
            tl.store(out_ptr + w, tl.sum(tl.where(lane == w, acc, 0.0), 0))
        tl.store(ctr_ptr, 0)


@triton.jit
def _store_lse_losses(stats_ptr, out_ptr, part_ptr, pid, idx, imask, lse, loss, coef, STORE_LOSSES: tl.constexpr):
    """Epilogue of a block of rows or columns: its log-sum-exps, losses (``STORE_LOSSES``) and
    the block's partial loss sum times ``coef`` (``stats_ptr`` already offset for the columns)."""
    tl.store(stats_ptr + idx, lse, mask=imask)
    if STORE_LOSSES:
        tl.store(out_ptr + idx, loss, mask=imask)
    tl.store(part_ptr + pid, tl.sum(tl.where(imask, loss, 0.0), 0) * coef)


@triton.jit
def clip_lse_kernel(s_ptr, scale_ptr, tgt_ptr, stats_ptr, rows_out_ptr, cols_out_ptr, ws_ptr, part_ptr,
                    N, M, stride_s, coef_row, coef_col,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr, SYM: tl.constexpr, HAS_TGT: tl.constexpr,
                    STORE_LOSSES: tl.constexpr = True):
    """Row (and column) log-sum-exp, losses and partial loss sums of ``s * S`` (see module doc).

    ``stats`` (N + M,): row then column log-sum-exp (natural log); ``ws`` (int32): the backward's
    counter (set to zero here), then (from ``ws[1]``) the positives per column (written with
    ``HAS_TGT`` only: the diagonal has one per column). ``STORE_LOSSES``: write the per-row
    (``rows_out``) and per-column (``cols_out``) losses (only ``reduction="none"`` reads them).
    """
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(ws_ptr, 0)
    row_blocks = tl.cdiv(N, BLOCK)
    s2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    if pid < row_blocks:
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < N
        if HAS_TGT:
            t = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
        else:
            t = rows
        m_i = tl.full((BLOCK,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK,), dtype=tl.float32)
        pos = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, M, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            mask = rmask[:, None] & (cols[None, :] < M)
            x = tl.load(s_ptr + rows[:, None].to(tl.int64) * stride_s + cols[None, :], mask=mask, other=0.0) * s2
            pos += tl.sum(tl.where(cols[None, :] == t[:, None], x, 0.0), 1)
            m_i, l_i, _ = online_lse(m_i, l_i, tl.where(mask, x, float("-inf")))
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        loss = lse - pos * 0.6931471805599453
        _store_lse_losses(stats_ptr, rows_out_ptr, part_ptr, pid, rows, rmask, lse, loss, coef_row, STORE_LOSSES)
    else:
        cols = (pid - row_blocks) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < M
        m_j = tl.full((BLOCK,), -1.0e30, dtype=tl.float32)
        l_j = tl.zeros((BLOCK,), dtype=tl.float32)
        pos = tl.zeros((BLOCK,), dtype=tl.float32)
        cnt = tl.zeros((BLOCK,), dtype=tl.int32)
        for r0 in range(0, N, CHUNK):
            rows = r0 + tl.arange(0, CHUNK)
            rmask = rows < N
            if HAS_TGT:
                t = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
            else:
                t = tl.where(rmask, rows, -1)
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(s_ptr + rows[:, None].to(tl.int64) * stride_s + cols[None, :], mask=mask, other=0.0) * s2
            hit = t[:, None] == cols[None, :]
            pos += tl.sum(tl.where(hit, x, 0.0), 0)
            cnt += tl.sum(hit.to(tl.int32), 0)
            x = tl.where(mask, x, float("-inf"))
            m_new = tl.maximum(m_j, tl.max(x, 0))
            l_j = l_j * tl.exp2(m_j - m_new) + tl.sum(tl.exp2(x - m_new[None, :]), 0)
            m_j = m_new
        lse = (m_j + tl.log2(l_j)) * 0.6931471805599453
        loss = lse - pos * 0.6931471805599453 / tl.maximum(cnt, 1).to(tl.float32)
        if HAS_TGT:
            tl.store(ws_ptr + 1 + cols, cnt, mask=cmask)
        _store_lse_losses(stats_ptr + N, cols_out_ptr, part_ptr, pid, cols, cmask, lse, loss, coef_col,
                          STORE_LOSSES)


@triton.jit
def _coefficient(g_ptr, idx, mask, c, G_VEC: tl.constexpr):
    """``c * g`` for the entries ``idx``: g is one scalar, or one value per entry (``G_VEC``)."""
    if G_VEC:
        return tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32) * c
    return tl.load(g_ptr).to(tl.float32) * c + tl.zeros(idx.shape, dtype=tl.float32)


@triton.jit
def clip_grad_kernel(q_ptr, k_ptr, scale_ptr, tgt_ptr, stats_ptr, gstats_ptr, ws_ptr, g_ptr, out_ptr, part_ptr,
                     N, M, D, stride_q, stride_k, stride_out, cr, cc,
                     BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                     SYM: tl.constexpr, HAS_TGT: tl.constexpr, G_VEC: tl.constexpr,
                     EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                     HAS_GSTATS: tl.constexpr = True, RB: tl.constexpr = 1024):
    """``out = s * dLoss/dL`` on one tile, ``part[pid] = sum dLoss/dL * (q . k)``, and the last
    program to finish writes the sum over programs (the scale gradient) after them, to ``part[programs]``.

    ``ws`` (int32) is the forward's: the counter of :func:`_finish_total` (zero), then the
    positives per column from ``ws[1]`` (read with ``SYM`` and ``HAS_TGT``).

    Row loss ``lse_i - L_{i,t_i}`` weighs ``a_i = cr g``; column loss ``lse_j - mean_{i: t_i = j} L_ij``
    weighs ``b_j = cc g``; ``gstats`` adds the gradients of the returned log-sum-exps (read only with
    ``HAS_GSTATS``: without it they are zero and ``gstats_ptr`` may be any tensor).
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < N
    cmask = cols < M
    acc = _tile_dot(q_ptr, k_ptr, rows, cols, N, M, D, stride_q, stride_k, BM, BN, BD, EVEN_D, UPCAST, PREC, False)
    s = tl.load(scale_ptr).to(tl.float32)
    l2 = acc * (s * 1.4426950408889634)
    if HAS_TGT:
        t = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
    else:
        t = rows
    pos = cols[None, :] == t[:, None]
    a = _coefficient(g_ptr, rows, rmask, cr, G_VEC)
    lse_r = tl.load(stats_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
    if HAS_GSTATS:
        a_lse = a + tl.load(gstats_ptr + rows, mask=rmask, other=0.0)
    else:
        a_lse = a
    grad = a_lse[:, None] * tl.exp2(l2 - lse_r[:, None]) - tl.where(pos, a[:, None], 0.0)
    if SYM:
        b = _coefficient(g_ptr, cols, cmask, cc, G_VEC)
        lse_c = tl.load(stats_ptr + N + cols, mask=cmask, other=0.0) * 1.4426950408889634
        if HAS_GSTATS:
            b_lse = b + tl.load(gstats_ptr + N + cols, mask=cmask, other=0.0)
        else:
            b_lse = b
        if HAS_TGT:
            b_pos = b / tl.maximum(tl.load(ws_ptr + 1 + cols, mask=cmask, other=1), 1).to(tl.float32)
        else:
            b_pos = b
        grad += b_lse[None, :] * tl.exp2(l2 - lse_c[None, :]) - tl.where(pos, b_pos[None, :], 0.0)
    mask = rmask[:, None] & cmask[None, :]
    grad = tl.where(mask, grad, 0.0)
    out = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out, (grad * s).to(out_ptr.dtype.element_ty), mask=mask)
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(part_ptr + pid, tl.sum(tl.sum(grad * acc, 1), 0))
    programs = tl.num_programs(0) * tl.num_programs(1)
    _finish_total(part_ptr, part_ptr + programs, ws_ptr, programs, 1, RB)


@triton.jit
def _siglip_terms(q_ptr, k_ptr, scale_ptr, bias_ptr, tgt_ptr, N, M, D, stride_q, stride_k,
                  BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, HAS_TGT: tl.constexpr,
                  EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """This program's tile: indices, mask, ``q . k``, the positives, ``x = -y z`` and ``e = exp(-|x|)``."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < N
    mask = rmask[:, None] & (cols[None, :] < M)
    acc = _tile_dot(q_ptr, k_ptr, rows, cols, N, M, D, stride_q, stride_k, BM, BN, BD, EVEN_D, UPCAST, PREC, False)
    z = acc * tl.load(scale_ptr).to(tl.float32) + tl.load(bias_ptr).to(tl.float32)
    if HAS_TGT:
        t = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
    else:
        t = rows
    pos = cols[None, :] == t[:, None]
    x = tl.where(pos, -z, z)  # the term is softplus(x)
    e = tl.exp2(-tl.abs(x) * 1.4426950408889634)
    return rows, mask, acc, pos, x, e


@triton.jit
def siglip_loss_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, tgt_ptr, part_ptr, ctr_ptr, N, M, D, stride_q, stride_k,
                       coef, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, HAS_TGT: tl.constexpr,
                       EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """``part[pid] = coef * sum softplus(-y z)`` over this program's tile; the backward's counter
    (int32 at ``ctr``) set to zero."""
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(ctr_ptr, 0)
    rows, mask, acc, pos, x, e = _siglip_terms(q_ptr, k_ptr, scale_ptr, bias_ptr, tgt_ptr, N, M, D, stride_q,
                                               stride_k, BM, BN, BD, HAS_TGT, EVEN_D, UPCAST, PREC)
    sp = tl.maximum(x, 0.0) + tl.log2(1.0 + e) * 0.6931471805599453
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(part_ptr + pid, tl.sum(tl.sum(tl.where(mask, sp, 0.0), 1), 0) * coef)


@triton.jit
def siglip_grad_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, tgt_ptr, g_ptr, out_ptr, part_ptr, ctr_ptr,
                       N, M, D, stride_q, stride_k, stride_out, coef,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, HAS_TGT: tl.constexpr,
                       EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, RB: tl.constexpr = 1024):
    """``out = s * dLoss/dz`` on one tile; ``part[pid] = (sum dLoss/dz * (q . k), sum dLoss/dz)``; the last
    program to finish writes the two sums over programs (scale and bias gradients) to ``part[programs]``
    (``ctr``: the forward's counter)."""
    rows, mask, acc, pos, x, e = _siglip_terms(q_ptr, k_ptr, scale_ptr, bias_ptr, tgt_ptr, N, M, D, stride_q,
                                               stride_k, BM, BN, BD, HAS_TGT, EVEN_D, UPCAST, PREC)
    r = 1.0 / (1.0 + e)
    sig = tl.where(x >= 0, r, e * r)  # sigmoid(x) without cancellation
    grad = tl.where(pos, -sig, sig) * (tl.load(g_ptr).to(tl.float32) * coef)
    grad = tl.where(mask, grad, 0.0)
    s = tl.load(scale_ptr).to(tl.float32)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    out = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out, (grad * s).to(out_ptr.dtype.element_ty), mask=mask)
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(part_ptr + 2 * pid, tl.sum(tl.sum(grad * acc, 1), 0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(tl.sum(grad, 1), 0))
    programs = tl.num_programs(0) * tl.num_programs(1)
    _finish_total(part_ptr, part_ptr + 2 * programs, ctr_ptr, programs, 2, RB)


@triton.jit
def clip_tile_stats_kernel(s_ptr, q_ptr, k_ptr, scale_ptr, tgt_ptr, rm_ptr, rl_ptr, rp_ptr, cm_ptr, cl_ptr, cp_ptr,
                           cc_ptr, ws_ptr, N, M, D, stride_s, stride_q, stride_k,
                           BR: tl.constexpr, BC: tl.constexpr, SYM: tl.constexpr, HAS_TGT: tl.constexpr,
                           DOT: tl.constexpr = False, BD: tl.constexpr = 64, EVEN_D: tl.constexpr = True,
                           UPCAST: tl.constexpr = False, PREC: tl.constexpr = "tf32"):
    """Per-tile partial statistics of ``s * S`` (base 2), every tile read once (the large-N forward).

    Program (i, j) owns rows ``[i BR, (i+1) BR)`` and columns ``[j BC, (j+1) BC)`` and writes, for its
    rows, the tile's row maximum, sum of ``2^(x - max)`` and sum of positive logits at ``[j, row]``
    of ``rm``/``rl``/``rp`` ((col tiles, N) each); with ``SYM`` the same per column at ``[i, col]``
    of ``cm``/``cl``/``cp`` ((row tiles, M)) and, with ``HAS_TGT``, the positives per column in ``cc``.
    ``clip_combine_kernel`` merges them. Program (0, 0) sets the counter ``ws[0]`` to zero.
    ``DOT``: the tile is ``q . k`` computed here (matrix units, d in chunks of ``BD``) instead of
    read from the fp32 product ``S`` (``s_ptr`` unused): no product buffer, one launch less.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if (pid_r == 0) & (pid_c == 0):
        tl.store(ws_ptr, 0)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    rmask = rows < N
    cmask = cols < M
    mask = rmask[:, None] & cmask[None, :]
    s2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    if DOT:
        x = _tile_dot(q_ptr, k_ptr, rows, cols, N, M, D, stride_q, stride_k, BR, BC, BD, EVEN_D, UPCAST, PREC,
                      False) * s2
    else:
        x = tl.load(s_ptr + rows[:, None].to(tl.int64) * stride_s + cols[None, :], mask=mask, other=0.0) * s2
    if HAS_TGT:
        t = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
    else:
        t = tl.where(rmask, rows, -1)
    hit = (cols[None, :] == t[:, None]) & mask
    xp = tl.where(hit, x, 0.0)
    x = tl.where(mask, x, float("-inf"))
    m_r = tl.max(x, 1)
    m_r = tl.where(rmask, m_r, 0.0)  # rows past N: any finite value (not stored)
    l_r = tl.sum(tl.exp2(x - m_r[:, None]), 1)
    out = pid_c * N + rows
    tl.store(rm_ptr + out, m_r, mask=rmask)
    tl.store(rl_ptr + out, l_r, mask=rmask)
    tl.store(rp_ptr + out, tl.sum(xp, 1), mask=rmask)
    if SYM:
        m_c = tl.max(x, 0)
        m_c = tl.where(cmask, m_c, 0.0)
        l_c = tl.sum(tl.exp2(x - m_c[None, :]), 0)
        out_c = pid_r * M + cols
        tl.store(cm_ptr + out_c, m_c, mask=cmask)
        tl.store(cl_ptr + out_c, l_c, mask=cmask)
        tl.store(cp_ptr + out_c, tl.sum(xp, 0), mask=cmask)
        if HAS_TGT:
            tl.store(cc_ptr + out_c, tl.sum(hit.to(tl.int32), 0), mask=cmask)


@triton.jit
def _merge_partials(m_ptr, l_ptr, p_ptr, c_ptr, idx, imask, size, tiles,
                    BLOCK: tl.constexpr, TB: tl.constexpr, COUNT: tl.constexpr):
    """Natural log-sum-exp, positive-logit sum (base 2) and (``COUNT``) positives of ``idx`` from
    ``tiles`` partials laid out ``(tiles, size)``."""
    m_i = tl.full((BLOCK,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    pos = tl.zeros((BLOCK,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK,), dtype=tl.int32)
    for t0 in range(0, tiles, TB):
        t = t0 + tl.arange(0, TB)
        mask = (t[:, None] < tiles) & imask[None, :]
        off = t[:, None].to(tl.int64) * size + idx[None, :]
        pm = tl.load(m_ptr + off, mask=mask, other=float("-inf"))
        pl = tl.load(l_ptr + off, mask=mask, other=0.0)
        pos += tl.sum(tl.load(p_ptr + off, mask=mask, other=0.0), 0)
        if COUNT:
            cnt += tl.sum(tl.load(c_ptr + off, mask=mask, other=0), 0)
        m_new = tl.maximum(m_i, tl.max(pm, 0))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(pl * tl.exp2(pm - m_new[None, :]), 0)
        m_i = m_new
    return (m_i + tl.log2(l_i)) * 0.6931471805599453, pos, cnt


@triton.jit
def clip_combine_kernel(rm_ptr, rl_ptr, rp_ptr, cm_ptr, cl_ptr, cp_ptr, cc_ptr, stats_ptr, rows_out_ptr,
                        cols_out_ptr, ws_ptr, part_ptr, loss_ptr, N, M, TC, TR, coef_row, coef_col,
                        BLOCK: tl.constexpr, TB: tl.constexpr, SYM: tl.constexpr, HAS_TGT: tl.constexpr,
                        STORE_LOSSES: tl.constexpr, RB: tl.constexpr = 1024):
    """Merge ``clip_tile_stats_kernel``'s partials into the outputs of ``clip_lse_kernel`` (same layout).

    Programs ``[0, cdiv(N, BLOCK))`` merge the ``TC`` column-tile partials of a block of rows; the
    others (``SYM``) the ``TR`` row-tile partials of a block of columns. Without ``STORE_LOSSES``
    the last program to finish writes the loss (the sum of the partials) to ``loss``.
    """
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BLOCK)
    if pid < row_blocks:
        idx = pid * BLOCK + tl.arange(0, BLOCK)
        imask = idx < N
        lse, pos, _ = _merge_partials(rm_ptr, rl_ptr, rp_ptr, cc_ptr, idx, imask, N, TC, BLOCK, TB, False)
        loss = lse - pos * 0.6931471805599453
        _store_lse_losses(stats_ptr, rows_out_ptr, part_ptr, pid, idx, imask, lse, loss, coef_row, STORE_LOSSES)
    else:
        idx = (pid - row_blocks) * BLOCK + tl.arange(0, BLOCK)
        imask = idx < M
        lse, pos, cnt = _merge_partials(cm_ptr, cl_ptr, cp_ptr, cc_ptr, idx, imask, M, TR, BLOCK, TB, HAS_TGT)
        if HAS_TGT:
            loss = lse - pos * 0.6931471805599453 / tl.maximum(cnt, 1).to(tl.float32)
            tl.store(ws_ptr + 1 + idx, cnt, mask=imask)
        else:
            loss = lse - pos * 0.6931471805599453
        _store_lse_losses(stats_ptr + N, cols_out_ptr, part_ptr, pid, idx, imask, lse, loss, coef_col,
                          STORE_LOSSES)
    if not STORE_LOSSES:
        _finish_total(part_ptr, loss_ptr, ws_ptr, tl.num_programs(0), 1, RB)
