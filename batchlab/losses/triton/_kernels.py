"""Triton kernels for the contrastive losses (imported only when Triton is asked for).

Everything works in base 2: a tile's logits ``L = s * q_i . k_j`` are kept as
``L2 = L * log2(e)`` so that every exponential is one ``exp2``; log-sum-exps leave
the kernels as ``lse2`` and are turned into natural logs by the caller.

Three kernels:

* ``lse_fwd_kernel``: one pass over the (N, M) logits. A program owns BM rows and
  a group of column tiles; it keeps the rows' online max and sum (exact at any
  scale) and, when ``COLS``, adds each tile's column sums ``sum_i 2^(L2_ij - ref2)``
  to a global fp32 vector with one relaxed atomic per column per tile (never in the
  inner d loop). ``ref2 = B log2(e) - 92`` is a fixed shift chosen by the caller
  from the bound ``B = |s| max|q| max|k| >= |L|``: no term can overflow; the caller
  detects the rare columns whose sum underflowed and recomputes them exactly with
  this same kernel on swapped inputs.
  With the ``one_exp`` flag (small enough ``B``) the column term is the row term times a
  per-row factor: one exp2 per logit instead of two. The shift and the flag are read
  from a device tensor (``ctl``), so the host never waits for the bound.
* ``lse_bwd_kernel``: recomputes a panel of rows' tiles and writes the logit
  gradient ``G_ij = g_i softmax_row_ij + h_j softmax_col_ij`` (divided by a global
  ``gscale`` so that it fits in bf16/fp16) plus per-program partial sums of
  ``G * (q_i . k_j)`` for the scale gradient. The caller turns ``G`` into ``dq`` and
  ``dk`` with two matrix products (cuBLAS).
* ``siglip_kernel``: one pass that writes per-row loss sums and, when asked, the
  logit gradient of the sigmoid loss the same way (no normaliser, so no statistics),
  with per-program fp32 sums for the bias and (``DS``) scale gradients. ``siglip_lean_kernel``
  (``TILE=2``) is the same pass with an element-wise epilogue that sm_90 compiles without spills.
* ``norm_max_kernel`` and ``control_kernel``: the logits' bound and ``ctl`` (``_lse.control``).

The scale-gradient sums (``DS``) are taken before the logit gradient's store: after it, the
fp32 ``q . k`` tile and the gradient tile are live together and the sm_90 build spills.

The d dimension is looped over in chunks of BD with a mask, so any d works.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _load_chunk(ptr, idx, d0, N, D, stride,
                BD: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Rows ``idx`` (consecutive) of a (N, D) operand, d columns [d0, d0 + BD), zeros past D.

    ``TMA``: ``ptr`` is a tensor descriptor; the copy engine zero-fills rows and columns
    past the end. Otherwise out-of-range rows repeat the last row (the caller masks them).
    """
    if TMA:
        x = ptr.load([tl.min(idx, 0), d0])
    else:
        idx_c = tl.minimum(idx, N - 1)
        dd = d0 + tl.arange(0, BD)
        ptrs = ptr + idx_c[:, None].to(tl.int64) * stride + dd[None, :]
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=dd[None, :] < D, other=0.0)
    if UPCAST:  # Triton's CPU interpreter computes bf16 dots wrongly; upcast there only
        x = x.to(tl.float32)
    return x


@triton.jit
def _tile_dot(q_ptr, k_ptr, rows, cols, N, M, D, stride_q, stride_k,
              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
              EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """acc[BM, BN] = q[rows] @ k[cols].T in fp32 (out-of-range rows/cols hold junk; caller masks).

    ``TMA``: q_ptr/k_ptr are tensor descriptors (blocks [BM, BD] and [BN, BD]).
    """
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in range(0, D, BD):
        a = _load_chunk(q_ptr, rows, d0, N, D, stride_q, BD, EVEN_D, UPCAST, TMA)
        b = _load_chunk(k_ptr, cols, d0, M, D, stride_k, BD, EVEN_D, UPCAST, TMA)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit
def _valid(rows, cols, N, M, tgt_ptr, EXCLUDE: tl.constexpr, HAS_TGT: tl.constexpr, TGT_ON_COLS: tl.constexpr):
    """Which tile entries take part: in range, and not an excluded positive (DCL)."""
    valid = (rows[:, None] < N) & (cols[None, :] < M)
    if EXCLUDE:
        if HAS_TGT:
            if TGT_ON_COLS:  # swapped roles: "row" j is key j, "col" i is query i with target t_i
                t = tl.load(tgt_ptr + cols, mask=cols < M, other=-1)
                valid = valid & (t[None, :] != rows[:, None])
            else:
                t = tl.load(tgt_ptr + rows, mask=rows < N, other=-1)
                valid = valid & (cols[None, :] != t[:, None])
        else:
            valid = valid & (cols[None, :] != rows[:, None])
    return valid


@triton.jit
def _panel_tile(q_ptr, k_ptr, r0, r1, M, D, stride_q, stride_k,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """This program's tile of a row panel [r0, r1): indices, masks and ``q . k`` in fp32."""
    rows = r0 + tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = _tile_dot(q_ptr, k_ptr, rows, cols, r1, M, D, stride_q, stride_k, BM, BN, BD, EVEN_D, UPCAST, PREC, TMA)
    return rows, cols, rows < r1, cols < M, acc


@triton.jit
def _store_logit_grad(out_ptr, g, ginv, rows, cols, r0, stride_out, mask, TMA_OUT: tl.constexpr):
    """Write ``g * ginv`` (in the buffer's dtype) at the panel-relative rows.

    ``TMA_OUT``: ``out_ptr`` is a tensor descriptor of the panel (rows ``r1 - r0``); the
    copy engine writes the tile asynchronously and clips what lies past the panel.
    """
    if TMA_OUT:
        out_ptr.store([tl.min(rows, 0) - r0, tl.min(cols, 0)], (g * ginv).to(out_ptr.dtype))
    else:
        out = out_ptr + (rows - r0)[:, None].to(tl.int64) * stride_out + cols[None, :]
        tl.store(out, (g * ginv).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_total(x, rmask, cmask):
    """fp32 total of the in-range entries of a (BM, BN) tile: rows' sums first, then their total."""
    return tl.sum(tl.where(rmask, tl.sum(tl.where(cmask[None, :], x, 0.0), 1), 0.0), 0)


@triton.jit
def online_lse(m_i, l_i, x):
    """Fold a (rows, cols) tile of base-2 exponents ``x`` into each row's running max and
    sum of ``2^x``; returns ``(m_new, l_new, 2^(x - m_new))``. Rows start at
    ``m = -1e30`` (finite, so that ``exp2(m_old - m_new)`` never sees ``-inf - -inf``)."""
    m_new = tl.maximum(m_i, tl.max(x, 1))
    p = tl.exp2(x - m_new[:, None])
    return m_new, l_i * tl.exp2(m_i - m_new) + tl.sum(p, 1), p


@triton.jit
def _fwd_tile(acc, rows, cols, m_i, l_i, s2, ref2, col_sum_ptr, tgt_ptr, N, M,
              COLS: tl.constexpr, EXCLUDE: tl.constexpr, HAS_TGT: tl.constexpr, TGT_ON_COLS: tl.constexpr,
              ONE_EXP: tl.constexpr):
    """Fold one tile of ``q . k`` into the rows' online (max, sum) and the columns' shifted sums."""
    l2 = acc * s2
    valid = _valid(rows, cols, N, M, tgt_ptr, EXCLUDE, HAS_TGT, TGT_ON_COLS)
    l2m = tl.where(valid, l2, float("-inf"))
    m_new, l_i, p = online_lse(m_i, l_i, l2m)
    if COLS:
        if ONE_EXP:  # 2^(l2 - ref2) = p * 2^(m_new - ref2): exact while p cannot underflow
            pc = p * tl.exp2(m_new - ref2)[:, None]
        else:
            pc = tl.where(valid, tl.exp2(l2 - ref2), 0.0)
        tl.atomic_add(col_sum_ptr + cols, tl.sum(pc, 0), mask=cols < M, sem="relaxed")
    return m_new, l_i


@triton.jit
def lse_fwd_kernel(q_ptr, k_ptr, tgt_ptr, scale_ptr, ctl_ptr,
                   row_m_ptr, row_l_ptr, col_sum_ptr,
                   N, M, D, stride_q, stride_k, tiles_per_group,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                   COLS: tl.constexpr, EXCLUDE: tl.constexpr, HAS_TGT: tl.constexpr, TGT_ON_COLS: tl.constexpr,
                   EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                   FLAT: tl.constexpr = False, FIX: tl.constexpr = False):
    """Rows' online (max, sum) over a group of column tiles, and the columns' shifted sums.

    ``ctl`` (fp32, device): ``[ref2, one_exp]``, the column shift and the epilogue flag, so
    that the host never reads the logits' bound. ``FLAT`` (speed only) lets Triton flatten
    the tile and d loops into one software pipeline.

    ``FIX`` (one group, swapped inputs: rows are keys): the column pass's finish. Each
    program reads its keys' shifted sums from ``col_sum_ptr``; only a program holding a key
    whose sum underflowed walks the queries (exact online max); every program writes
    its keys' final base-2 log-sum-exp to ``row_m_ptr``. No host decision, no sync.
    """
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    s2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    ref2 = tl.load(ctl_ptr)
    one_exp = tl.load(ctl_ptr + 1) != 0
    # A finite floor instead of -inf keeps exp2(m_old - m_new) free of inf - inf.
    m_i = tl.full((BM,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    n_tiles = tl.cdiv(M, BN)
    t_start = pid_g * tiles_per_group
    t_end = tl.minimum(t_start + tiles_per_group, n_tiles)
    if FIX:
        shifted = tl.load(col_sum_ptr + rows, mask=rows < N, other=1.0)
        low = shifted < 1.3552527156068805e-20  # 2**-66: the flushed terms could matter
        t_end = tl.where(tl.max(low.to(tl.int32), 0) > 0, t_end, t_start)
    # The runtime flag picks one of two loops (never a branch inside the loop, which would
    # stop Triton from software-pipelining it).
    if one_exp:
        for t in tl.range(t_start, t_end, flatten=FLAT):
            cols = t * BN + tl.arange(0, BN)
            acc = _tile_dot(q_ptr, k_ptr, rows, cols, N, M, D, stride_q, stride_k, BM, BN, BD, EVEN_D, UPCAST, PREC,
                            TMA)
            m_i, l_i = _fwd_tile(acc, rows, cols, m_i, l_i, s2, ref2, col_sum_ptr, tgt_ptr, N, M,
                                 COLS, EXCLUDE, HAS_TGT, TGT_ON_COLS, True)
    else:
        for t in tl.range(t_start, t_end, flatten=FLAT):
            cols = t * BN + tl.arange(0, BN)
            acc = _tile_dot(q_ptr, k_ptr, rows, cols, N, M, D, stride_q, stride_k, BM, BN, BD, EVEN_D, UPCAST, PREC,
                            TMA)
            m_i, l_i = _fwd_tile(acc, rows, cols, m_i, l_i, s2, ref2, col_sum_ptr, tgt_ptr, N, M,
                                 COLS, EXCLUDE, HAS_TGT, TGT_ON_COLS, False)
    if FIX:
        final = tl.where(low, m_i + tl.log2(l_i), ref2 + tl.log2(shifted))
        tl.store(row_m_ptr + rows, final, mask=rows < N)
    else:
        out = pid_g.to(tl.int64) * N + rows
        tl.store(row_m_ptr + out, m_i, mask=rows < N)
        tl.store(row_l_ptr + out, l_i, mask=rows < N)


@triton.jit
def _row_norm2_max(x_ptr, row0, N, D, stride, BR: tl.constexpr, BD: tl.constexpr):
    """Largest squared norm (fp32) of rows [row0, row0 + BR) of a (N, D) operand."""
    rows = row0 + tl.arange(0, BR)
    acc = tl.zeros((BR,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        ptrs = x_ptr + rows[:, None].to(tl.int64) * stride + dd[None, :]
        x = tl.load(ptrs, mask=(rows[:, None] < N) & (dd[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.sum(x * x, 1)
    return tl.max(acc, 0)


@triton.jit
def norm_max_kernel(q_ptr, k_ptr, part_ptr, N, M, D, stride_q, stride_k, q_blocks,
                    BR: tl.constexpr, BD: tl.constexpr):
    """``part[pid]``: the largest squared row norm of a block of BR rows: of ``q`` for the first
    ``q_blocks`` programs, of ``k`` for the rest (``control_kernel`` takes the maxima)."""
    pid = tl.program_id(0)
    if pid < q_blocks:
        top = _row_norm2_max(q_ptr, pid * BR, N, D, stride_q, BR, BD)
    else:
        top = _row_norm2_max(k_ptr, (pid - q_blocks) * BR, M, D, stride_k, BR, BD)
    tl.store(part_ptr + pid, top)


@triton.jit
def control_kernel(part_ptr, scale_ptr, ctl_ptr, q_blocks, blocks, limit2, margin, headroom2,
                   BLOCK: tl.constexpr):
    """One program: ``ctl = [ref2, one_exp]`` from ``norm_max_kernel``'s partial maxima.

    ``bound2 = |s| max|q_i| max|k_j| * margin * log2(e)`` bounds every base-2 logit; ``ref2 = bound2 -
    headroom2`` is the column shift and ``one_exp = 2 bound2 <= limit2`` (as 1.0 / 0.0) the
    single-exponential flag (see ``_lse.control``)."""
    qmax = 0.0
    kmax = 0.0
    for i0 in range(0, blocks, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        x = tl.load(part_ptr + i, mask=i < blocks, other=0.0)
        qmax = tl.maximum(qmax, tl.max(tl.where(i < q_blocks, x, 0.0), 0))
        kmax = tl.maximum(kmax, tl.max(tl.where(i >= q_blocks, x, 0.0), 0))
    scale = tl.abs(tl.load(scale_ptr).to(tl.float32))
    bound2 = scale * tl.sqrt(qmax) * tl.sqrt(kmax) * margin * 1.4426950408889634
    tl.store(ctl_ptr, bound2 - headroom2)
    tl.store(ctl_ptr + 1, tl.where(2 * bound2 <= limit2, 1.0, 0.0))


@triton.jit
def lse_bwd_kernel(q_ptr, k_ptr, tgt_ptr, scale_ptr, ginv_ptr, ctl_ptr,
                   row_lse2_ptr, col_lse2_ptr, g_row_ptr, g_col_ptr, out_ptr, ds_ptr,
                   r0, r1, M, D, stride_q, stride_k, stride_out,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                   COLS: tl.constexpr, EXCLUDE: tl.constexpr, HAS_TGT: tl.constexpr,
                   EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                   TMA_OUT: tl.constexpr = False, TPP: tl.constexpr = 1, FLAT: tl.constexpr = False,
                   DS: tl.constexpr = False):
    """Logit gradient of ``sum_i g_i row_lse_i + sum_j h_j col_lse_j`` for rows [r0, r1).

    A program owns BM rows and ``TPP`` consecutive column tiles (its row statistics are
    loaded once); ``FLAT`` flattens the tile and d loops as in ``lse_fwd_kernel``.
    Without ``DS`` the scale gradient is not summed here: ``sum G * (q . k) = sum_i q_i . (G @ k)_i``
    comes out of the gradient product for free (fewer live tiles in this kernel), but from the
    bf16/fp16 ``G``, which loses the few significant bits left when the logits are nearly uniform
    (small scales). ``DS``: this program's fp32 ``sum G * (q . k)`` goes to ``ds[pid]``.
    """
    rows = r0 + tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < r1
    s2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    lse_r = tl.load(row_lse2_ptr + rows, mask=rmask, other=0.0)
    g_r = tl.load(g_row_ptr + rows, mask=rmask, other=0.0)
    ginv = tl.load(ginv_ptr)
    one_exp = tl.load(ctl_ptr + 1) != 0  # runtime flag, uniform over the launch (see lse_fwd_kernel)
    a = tl.exp2(lse_r)  # used by the single-exponential epilogue only
    t0 = tl.program_id(1) * TPP
    t1 = tl.minimum(t0 + TPP, tl.cdiv(M, BN))
    ds = tl.sum(tl.zeros((BM,), dtype=tl.float32), 0)
    if one_exp:  # one loop per epilogue: no branch inside the pipelined loop
        for t in tl.range(t0, t1, flatten=FLAT):
            ds += _bwd_tile(q_ptr, k_ptr, tgt_ptr, col_lse2_ptr, g_col_ptr, out_ptr, rows, rmask, t, r0, r1, M, D,
                            stride_q, stride_k, stride_out, s2, lse_r, g_r, a, ginv,
                            BM, BN, BD, COLS, EXCLUDE, HAS_TGT, True, EVEN_D, UPCAST, PREC, TMA, TMA_OUT, DS)
    else:
        for t in tl.range(t0, t1, flatten=FLAT):
            ds += _bwd_tile(q_ptr, k_ptr, tgt_ptr, col_lse2_ptr, g_col_ptr, out_ptr, rows, rmask, t, r0, r1, M, D,
                            stride_q, stride_k, stride_out, s2, lse_r, g_r, a, ginv,
                            BM, BN, BD, COLS, EXCLUDE, HAS_TGT, False, EVEN_D, UPCAST, PREC, TMA, TMA_OUT, DS)
    if DS:
        tl.store(ds_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), ds)


@triton.jit
def _bwd_tile(q_ptr, k_ptr, tgt_ptr, col_lse2_ptr, g_col_ptr, out_ptr, rows, rmask, t, r0, r1, M, D,
              stride_q, stride_k, stride_out, s2, lse_r, g_r, a, ginv,
              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, COLS: tl.constexpr, EXCLUDE: tl.constexpr,
              HAS_TGT: tl.constexpr, ONE_EXP: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
              PREC: tl.constexpr, TMA: tl.constexpr, TMA_OUT: tl.constexpr, DS: tl.constexpr = False):
    """One column tile of ``lse_bwd_kernel``: recompute, form the logit gradient, store it; returns
    the tile's fp32 ``sum G * (q . k)`` with ``DS`` (else 0)."""
    cols = t * BN + tl.arange(0, BN)
    cmask = cols < M
    acc = _tile_dot(q_ptr, k_ptr, rows, cols, r1, M, D, stride_q, stride_k, BM, BN, BD, EVEN_D, UPCAST, PREC, TMA)
    l2 = acc * s2
    p_r = tl.exp2(l2 - lse_r[:, None])
    if COLS:
        lse_c = tl.load(col_lse2_ptr + cols, mask=cmask, other=0.0)
        g_c = tl.load(g_col_ptr + cols, mask=cmask, other=0.0)
        if ONE_EXP:  # 2^(l2 - lse_c) = p_r 2^lse_r 2^-lse_c: exact while p_r cannot underflow
            b = g_c * tl.exp2(-lse_c)
            g = p_r * (g_r[:, None] + a[:, None] * b[None, :])
        else:
            g = g_r[:, None] * p_r + g_c[None, :] * tl.exp2(l2 - lse_c[None, :])
    else:
        g = g_r[:, None] * p_r
    if EXCLUDE:  # out-of-range entries are never stored; excluded positives must be zero
        g = tl.where(_valid(rows, cols, r1, M, tgt_ptr, EXCLUDE, HAS_TGT, False), g, 0.0)
    mask = rmask[:, None] & cmask[None, :]
    part = 0.0
    if DS:
        part = _masked_total(g * acc, rmask, cmask)
    _store_logit_grad(out_ptr, g, ginv, rows, cols, r0, stride_out, mask, TMA_OUT)
    return part


@triton.jit
def _log1p_unit(e):
    """``log(1 + e)`` for ``e`` in [0, 1], relative error ~2e-7 at every ``e`` (tiny ones included).

    ``e * p(e)``, ``p`` a degree-8 fit of ``log1p(e) / e`` on [0, 1] (error 2.6e-8): 8 FMAs and a
    multiply, where ``log2(1 + e)`` went through libdevice's log2f and lost the low bits of a small
    ``e`` to the rounding of ``1 + e`` (~1e-3 of each term at e ~ 5e-5, b = -10).
    """
    p = 0.005395807325839996 * e - 0.030163994058966637
    p = p * e + 0.07930813729763031
    p = p * e - 0.13755978643894196
    p = p * e + 0.1915014088153839
    p = p * e - 0.2485443651676178
    p = p * e + 0.3332056701183319
    p = p * e - 0.4999956786632538
    p = p * e + 1.0
    return p * e


@triton.jit
def _siglip_terms(acc, scale_ptr, bias_ptr, tgt_ptr, rows, cols, rmask, HAS_TGT: tl.constexpr):
    """``(pos, x, e)`` of a SigLIP tile: the positives, ``x = -y z`` (each term is softplus(x)),
    and ``e = exp(-|x|)`` in (0, 1] (softplus(x) = max(x, 0) + log(1 + e); sigmoid(x) from e
    without overflow)."""
    z = acc * tl.load(scale_ptr).to(tl.float32) + tl.load(bias_ptr).to(tl.float32)
    if HAS_TGT:
        t = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
        pos = cols[None, :] == t[:, None]
    else:
        pos = cols[None, :] == rows[:, None]
    x = tl.where(pos, -z, z)
    return pos, x, tl.exp2(-tl.abs(x) * 1.4426950408889634)


@triton.jit
def siglip_kernel(q_ptr, k_ptr, tgt_ptr, scale_ptr, bias_ptr, ginv_ptr, g_row_ptr,
                  row_loss_ptr, out_ptr, db_ptr, ds_ptr,
                  r0, r1, M, D, stride_q, stride_k, stride_out,
                  BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                  LOSS: tl.constexpr, GRAD: tl.constexpr, HAS_TGT: tl.constexpr,
                  EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                  TMA_OUT: tl.constexpr = False, DS: tl.constexpr = False):
    """SigLIP over rows [r0, r1): per-row sums of softplus(-y z) and/or the logit gradient.

    ``z = s q_i . k_j + b``, ``y = +1`` on (i, target_i) else -1. The gradient written is
    ``g_i * d softplus(-y z) / dz = -y g_i sigmoid(-y z)``, times ``ginv``; per-program sums
    of it go to ``db_ptr[pid]`` (the bias gradient) and, with ``DS``, the fp32 sums of
    ``g * (q . k)`` (the scale gradient) to ``ds_ptr[pid]``; without ``DS`` the caller takes the
    scale gradient from the product of the stored (bf16/fp16) gradient, which loses it when the
    logits are nearly uniform (small scales).
    """
    rows, cols, rmask, cmask, acc = _panel_tile(q_ptr, k_ptr, r0, r1, M, D, stride_q, stride_k,
                                                BM, BN, BD, EVEN_D, UPCAST, PREC, TMA)
    pos, x, e = _siglip_terms(acc, scale_ptr, bias_ptr, tgt_ptr, rows, cols, rmask, HAS_TGT)
    if GRAD:  # before the loss terms (sm_90: no spills, with or without DS; 38 and 176 spill instructions after them)
        r = tl.fdiv(1.0, 1.0 + e)  # fast reciprocal: 1 / (1 + e) in [1/2, 1]
        sig = tl.where(x >= 0, r, e * r)  # sigmoid(x) without cancellation
        g_r = tl.load(g_row_ptr + rows, mask=rmask, other=0.0)  # 0 on rows past the panel
        g = tl.where(pos, -sig, sig) * g_r[:, None]  # d softplus(x)/dz = sigmoid(x) * dx/dz
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if DS:
            tl.store(ds_ptr + pid, _masked_total(g * acc, rmask, cmask))
        g = tl.where(cmask[None, :], g, 0.0)
        tl.store(db_ptr + pid, tl.sum(tl.sum(g, 1), 0))
    if LOSS:
        sp = tl.maximum(x, 0.0) + _log1p_unit(e)
        sp = tl.where(cmask[None, :], sp, 0.0)
        tl.atomic_add(row_loss_ptr + rows, tl.sum(sp, 1), mask=rmask, sem="relaxed")
    if GRAD:
        _store_logit_grad(out_ptr, g, tl.load(ginv_ptr), rows, cols, r0, stride_out, rmask[:, None] & cmask[None, :],
                          TMA_OUT)


# ---------------------------------------------------------------------------------------------
# One tile per program (``TILE=1`` in ``_launch.CONFIGS``): no loop around the d loop, so that
# Triton's Hopper warp specialisation (``WS``: a producer warp group issues the copy-engine loads
# of the d loop, two consumer warp groups split the tile's rows) can take the kernel; without
# ``WS`` the simpler structure needs fewer registers than the looped kernels (no spills).
# Triton 3.6's Hopper pass refuses atomics and column reductions inside a specialised kernel, so
# these kernels write per-tile row partials with plain stores where they need reductions.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _chunk_at(ptr, row0, idx, d0, N, D, stride,
              BD: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """``_load_chunk`` with the first row index passed as a scalar (what the copy engine takes)."""
    if TMA:
        x = ptr.load([row0, d0])
        if UPCAST:
            x = x.to(tl.float32)
    else:
        x = _load_chunk(ptr, idx, d0, N, D, stride, BD, EVEN_D, UPCAST, False)
    return x


@triton.jit
def _tile_dot_ws(q_ptr, k_ptr, row0, col0, N, M, D, stride_q, stride_k,
                 BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                 EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                 WS: tl.constexpr):
    """acc[BM, BN] = q[row0:row0+BM] @ k[col0:col0+BN].T in fp32; the d loop warp-specialised when ``WS``."""
    rows = row0 + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in tl.range(0, D, BD, warp_specialize=WS):
        a = _chunk_at(q_ptr, row0, rows, d0, N, D, stride_q, BD, EVEN_D, UPCAST, TMA)
        b = _chunk_at(k_ptr, col0, cols, d0, M, D, stride_k, BD, EVEN_D, UPCAST, TMA)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit
def _tile_at(q_ptr, k_ptr, row0, col0, N, M, D, stride_q, stride_k,
             BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
             EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    """The (BM, BN) tile from (row0, col0) of a one-tile kernel: rows, columns, their masks (< N, < M) and
    ``q . k`` in fp32."""
    acc = _tile_dot_ws(q_ptr, k_ptr, row0, col0, N, M, D, stride_q, stride_k, BM, BN, BD, EVEN_D, UPCAST, PREC, TMA, WS)
    rows = row0 + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BN)
    return rows, cols, rows < N, cols < M, acc


@triton.jit
def _panel_tile_ws(q_ptr, k_ptr, r0, r1, M, D, stride_q, stride_k,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                   EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    """``_panel_tile`` for the one-tile kernels: rows, columns, their masks and ``q . k`` in fp32."""
    return _tile_at(q_ptr, k_ptr, r0 + tl.program_id(0) * BM, tl.program_id(1) * BN, r1, M, D, stride_q, stride_k,
                    BM, BN, BD, EVEN_D, UPCAST, PREC, TMA, WS)


@triton.jit
def panel_order_tile(pid, N, M, BM: tl.constexpr, BN: tl.constexpr, panel_blocks):
    """``(row_tile, col_tile)`` of program ``pid`` of a 1-D grid over the (N, M) tiles in panels of
    ``panel_blocks`` row blocks: panel by panel, column tile by column tile, row block fastest (the
    programs in flight share a panel's rows in L2 while the columns stream past once per panel)."""
    per_panel = panel_blocks * tl.cdiv(M, BN)
    panel = pid // per_panel
    rem = pid - panel * per_panel
    blocks_here = tl.minimum(panel_blocks, tl.cdiv(N, BM) - panel * panel_blocks)  # the last panel: fewer
    col_tile = rem // blocks_here
    return panel * panel_blocks + rem - col_tile * blocks_here, col_tile


@triton.jit
def lse_fwd_tile_kernel(q_ptr, k_ptr, tgt_ptr, scale_ptr, ctl_ptr, row_sum_ptr, col_sum_ptr,
                        N, M, D, stride_q, stride_k, panel_blocks,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                        COLS: tl.constexpr, EXCLUDE: tl.constexpr, HAS_TGT: tl.constexpr,
                        EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """One tile of the (N, M) logits: its shifted sums ``sum 2^(L2 - ref2)`` added to its rows' and
    (``COLS``) its columns' totals (relaxed atomics, one per row and column per tile).

    Both directions use the column pass's fixed shift (``ctl[0]``): one exp2 per logit and no
    running max. Rows or columns whose total underflowed are recomputed exactly by
    ``lse_fwd_kernel``'s ``FIX`` pass, as the columns always were.

    One launch, 1-D grid (``cdiv(N, BM) * cdiv(M, BN)`` programs) in panels of ``panel_blocks``
    row blocks: panel by panel, column tile by column tile, row block fastest, so that the
    programs in flight share a panel's query rows in L2 while the keys stream past once per
    panel (the order that one launch per panel had).
    """
    row_tile, col_tile = panel_order_tile(tl.program_id(0), N, M, BM, BN, panel_blocks)
    rows, cols, rmask, cmask, acc = _tile_at(q_ptr, k_ptr, row_tile * BM, col_tile * BN, N, M, D, stride_q, stride_k,
                                             BM, BN, BD, EVEN_D, UPCAST, PREC, TMA, False)
    s2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    valid = _valid(rows, cols, N, M, tgt_ptr, EXCLUDE, HAS_TGT, False)
    p = tl.where(valid, tl.exp2(acc * s2 - tl.load(ctl_ptr)), 0.0)
    tl.atomic_add(row_sum_ptr + rows, tl.sum(p, 1), mask=rmask, sem="relaxed")
    if COLS:
        tl.atomic_add(col_sum_ptr + cols, tl.sum(p, 0), mask=cmask, sem="relaxed")


@triton.jit
def lse_bwd_tile_kernel(q_ptr, k_ptr, tgt_ptr, scale_ptr, ginv_ptr, ctl_ptr,
                        row_lse2_ptr, col_lse2_ptr, g_row_ptr, g_col_ptr, out_ptr, ds_ptr,
                        r0, r1, M, D, stride_q, stride_k, stride_out,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                        COLS: tl.constexpr, EXCLUDE: tl.constexpr, HAS_TGT: tl.constexpr,
                        EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                        WS: tl.constexpr = False, TWO_EXP: tl.constexpr = False, DS: tl.constexpr = False):
    """``lse_bwd_kernel`` with one tile per program (same arguments and output, plus ``WS``).

    ``TWO_EXP``: always two exp2 per logit (row and column terms), so the epilogue has no
    branch on the run-time one-exponential flag (a branch stops Triton's warp specialisation
    and costs registers); exact at every scale, one more exp2 per logit.
    """
    rows, cols, rmask, cmask, acc = _panel_tile_ws(q_ptr, k_ptr, r0, r1, M, D, stride_q, stride_k,
                                                   BM, BN, BD, EVEN_D, UPCAST, PREC, TMA, WS)
    l2 = acc * (tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634)
    lse_r = tl.load(row_lse2_ptr + rows, mask=rmask, other=0.0)
    g_r = tl.load(g_row_ptr + rows, mask=rmask, other=0.0)
    p_r = tl.exp2(l2 - lse_r[:, None])
    if COLS:
        lse_c = tl.load(col_lse2_ptr + cols, mask=cmask, other=0.0)
        g_c = tl.load(g_col_ptr + cols, mask=cmask, other=0.0)
        if TWO_EXP:
            g = g_r[:, None] * p_r + g_c[None, :] * tl.exp2(l2 - lse_c[None, :])
        elif tl.load(ctl_ptr + 1) != 0:  # one exp2 per logit (see _bwd_tile); uniform, outside any loop
            b = g_c * tl.exp2(-lse_c)
            g = p_r * (g_r[:, None] + tl.exp2(lse_r)[:, None] * b[None, :])
        else:
            g = g_r[:, None] * p_r + g_c[None, :] * tl.exp2(l2 - lse_c[None, :])
    else:
        g = g_r[:, None] * p_r
    if EXCLUDE:
        g = tl.where(_valid(rows, cols, r1, M, tgt_ptr, EXCLUDE, HAS_TGT, False), g, 0.0)
    mask = rmask[:, None] & cmask[None, :]
    if DS:  # before the store, rows then columns: no spills on sm_90 (106 spill instructions summed after it)
        tl.store(ds_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), _masked_total(g * acc, rmask, cmask))
    _store_logit_grad(out_ptr, g, tl.load(ginv_ptr), rows, cols, r0, stride_out, mask, False)


@triton.jit
def siglip_tile_kernel(q_ptr, k_ptr, tgt_ptr, scale_ptr, bias_ptr, ginv_ptr, g_row_ptr,
                       loss_part_ptr, out_ptr, g_part_ptr,
                       r0, r1, M, D, stride_q, stride_k, stride_out, stride_part,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                       LOSS: tl.constexpr, GRAD: tl.constexpr, HAS_TGT: tl.constexpr,
                       EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                       WS: tl.constexpr = False, DS: tl.constexpr = False):
    """``siglip_kernel`` with one tile per program; row partials instead of atomics.

    Program (i, j) stores its rows' sums over its BN columns at ``[j, rows - r0]`` of the
    (column tiles, panel rows) buffers: ``loss_part`` (softplus terms, ``LOSS``) and ``g_part``
    (gradient terms before ``ginv``, ``GRAD``: their total is the bias gradient; with ``DS`` a third
    buffer of the same shape follows ``g_part``: the rows' fp32 sums of ``g * (q . k)``, the scale
    gradient's). The caller sums the buffers over the column tiles.
    """
    rows, cols, rmask, cmask, acc = _panel_tile_ws(q_ptr, k_ptr, r0, r1, M, D, stride_q, stride_k,
                                                   BM, BN, BD, EVEN_D, UPCAST, PREC, TMA, WS)
    pos, x, e = _siglip_terms(acc, scale_ptr, bias_ptr, tgt_ptr, rows, cols, rmask, HAS_TGT)
    part = tl.program_id(1).to(tl.int64) * stride_part + (rows - r0)
    if LOSS:
        sp = tl.maximum(x, 0.0) + _log1p_unit(e)
        sp = tl.where(cmask[None, :], sp, 0.0)
        tl.store(loss_part_ptr + part, tl.sum(sp, 1), mask=rmask)
    if GRAD:
        r = tl.fdiv(1.0, 1.0 + e)
        sig = tl.where(x >= 0, r, e * r)
        g_r = tl.load(g_row_ptr + rows, mask=rmask, other=0.0)
        g = tl.where(pos, -sig, sig) * g_r[:, None]
        g = tl.where(cmask[None, :], g, 0.0)
        tl.store(g_part_ptr + part, tl.sum(g, 1), mask=rmask)
        if DS:
            tl.store(g_part_ptr + tl.num_programs(1).to(tl.int64) * stride_part + part, tl.sum(g * acc, 1), mask=rmask)
        _store_logit_grad(out_ptr, g, tl.load(ginv_ptr), rows, cols, r0, stride_out, rmask[:, None] & cmask[None, :],
                          False)


# ---------------------------------------------------------------------------------------------
# SigLIP with a lean epilogue (``TILE=2`` in ``_launch.CONFIGS["siglip"]``): one tile per program,
# every full-tile value consumed element by element (the loss and gradient row sums and the
# stored gradient tile are formed before any cross-thread step), no column mask and no positive
# test on the tiles that need neither (all but the last column tile and the tiles that hold a
# positive: a uniform branch), and log(1 + e) from a polynomial (no libdevice log2f, no rounding
# of 1 + e).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rcp(u, UPCAST: tl.constexpr):
    """``1 / u`` for ``u`` in [1, 2]: one ``rcp.approx`` (1 ulp) on the GPU; a division in the interpreter."""
    if UPCAST:
        return 1.0 / u
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _siglip_lean_epilogue(acc, s2, b2, gg, t, cols, cmask,
                          LOSS: tl.constexpr, GRAD: tl.constexpr, DS: tl.constexpr, GENERAL: tl.constexpr,
                          UPCAST: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Row sums of one tile (loss terms, ``g`` and ``g * acc`` over the columns, ``g`` without the
    row weight) and the stored tile ``g * g_r * ginv`` (``gg = g_r * ginv``) in ``OUT_DTYPE``.

    Base 2: ``w = acc * s2 + b2 = z log2(e)`` (``s2``, ``b2``: scale and bias times log2(e)).
    ``GENERAL``: the tile may hold positives (``cols == t``) or columns past ``M``; otherwise every
    entry is an in-range negative (``y = -1``: the term is softplus(z), its derivative sigmoid(z)).
    Rows are not masked here: the caller's ``g_r`` is 0 and its stores are masked past the panel.
    """
    w = acc * s2 + b2
    if GENERAL:
        pos = cols[None, :] == t[:, None]
        w = tl.where(pos, -w, w)  # x log2(e), x = -y z
    e = tl.exp2(-tl.abs(w))  # exp(-|x|) in (0, 1]
    zero = tl.zeros((acc.shape[0],), dtype=tl.float32)
    loss_rows = zero
    g_rows = zero
    ds_rows = zero
    out = tl.zeros(acc.shape, dtype=OUT_DTYPE)
    if GRAD:
        r = _rcp(1.0 + e, UPCAST)
        sig = tl.where(w >= 0, r, e * r)  # sigmoid(x) without cancellation
        if GENERAL:
            sig = tl.where(pos, -sig, sig)  # d softplus(x) / dz
            sigm = tl.where(cmask[None, :], sig, 0.0)
        else:
            sigm = sig
        if DS:
            ds_rows = tl.sum(sigm * acc, 1)
        g_rows = tl.sum(sigm, 1)
        out = (sig * gg[:, None]).to(OUT_DTYPE)
    if LOSS:
        sp = tl.maximum(w, 0.0) * 0.6931471805599453 + _log1p_unit(e)  # softplus(x)
        if GENERAL:
            sp = tl.where(cmask[None, :], sp, 0.0)
        loss_rows = tl.sum(sp, 1)
    return loss_rows, g_rows, ds_rows, out


@triton.jit
def _siglip_lean_tile(q_ptr, k_ptr, out_ptr, row0, col0, rows, rmask, t, r0, r1, M, D, stride_q, stride_k,
                      stride_out, s2, b2, gg,
                      BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                      LOSS: tl.constexpr, GRAD: tl.constexpr, HAS_TGT: tl.constexpr, DS: tl.constexpr,
                      EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                      TMA_OUT: tl.constexpr, WS: tl.constexpr):
    """One tile of ``siglip_lean_kernel``: its rows' sums (loss, ``g``, ``g * acc``; see
    ``_siglip_lean_epilogue``) returned, its gradient tile stored (``GRAD``)."""
    if HAS_TGT:
        hit = tl.max(((t >= col0) & (t < col0 + BN)).to(tl.int32), 0) > 0
    else:
        hit = (row0 < col0 + BN) & (col0 < row0 + BM)
    general = hit | (col0 + BN > M)
    acc = _tile_dot_ws(q_ptr, k_ptr, row0, col0, r1, M, D, stride_q, stride_k, BM, BN, BD, EVEN_D, UPCAST, PREC,
                       TMA, WS)
    cols = col0 + tl.arange(0, BN)
    cmask = cols < M
    if TMA_OUT:
        out_dtype: tl.constexpr = out_ptr.dtype
    else:
        out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    if general:
        loss_rows, g_rows, ds_rows, out = _siglip_lean_epilogue(acc, s2, b2, gg, t, cols, cmask,
                                                                LOSS, GRAD, DS, True, UPCAST, out_dtype)
    else:
        loss_rows, g_rows, ds_rows, out = _siglip_lean_epilogue(acc, s2, b2, gg, t, cols, cmask,
                                                                LOSS, GRAD, DS, False, UPCAST, out_dtype)
    if GRAD:
        if TMA_OUT:
            out_ptr.store([row0 - r0, col0], out)
        else:
            dst = out_ptr + (rows - r0)[:, None].to(tl.int64) * stride_out + cols[None, :]
            tl.store(dst, out, mask=rmask[:, None] & cmask[None, :])
    return loss_rows, g_rows, ds_rows


@triton.jit
def siglip_lean_kernel(q_ptr, k_ptr, tgt_ptr, scale_ptr, bias_ptr, ginv_ptr, g_row_ptr,
                       row_loss_ptr, out_ptr, db_ptr, ds_ptr,
                       r0, r1, M, D, stride_q, stride_k, stride_out,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                       LOSS: tl.constexpr, GRAD: tl.constexpr, HAS_TGT: tl.constexpr,
                       EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                       TMA_OUT: tl.constexpr = False, DS: tl.constexpr = False, WS: tl.constexpr = False,
                       TPP: tl.constexpr = 1, FLAT: tl.constexpr = False):
    """``siglip_kernel`` (same arguments and outputs) with the lean epilogue above.

    A program owns BM rows and ``TPP`` consecutive column tiles (grid ``(row blocks, cdiv(column
    tiles, TPP))``; ``FLAT`` lets Triton flatten the tile and d loops into one pipeline). Per program:
    the rows' loss sums added to ``row_loss`` (relaxed atomics), the bias and (``DS``) scale gradient
    sums ``sum_i g_i sum_j ...`` stored at ``db[pid]`` and ``ds[pid]``, the gradient tiles stored at
    the panel-relative rows.
    """
    row0 = r0 + tl.program_id(0) * BM
    rows = row0 + tl.arange(0, BM)
    rmask = rows < r1
    if HAS_TGT:
        t = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
    else:
        t = rows
    s2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    b2 = tl.load(bias_ptr).to(tl.float32) * 1.4426950408889634
    if GRAD:
        g_r = tl.load(g_row_ptr + rows, mask=rmask, other=0.0)  # 0 on rows past the panel
        gg = g_r * tl.load(ginv_ptr)
    else:
        g_r = tl.zeros((BM,), dtype=tl.float32)
        gg = g_r
    if TPP == 1:
        loss_rows, g_rows, ds_rows = _siglip_lean_tile(
            q_ptr, k_ptr, out_ptr, row0, tl.program_id(1) * BN, rows, rmask, t, r0, r1, M, D, stride_q, stride_k,
            stride_out, s2, b2, gg, BM, BN, BD, LOSS, GRAD, HAS_TGT, DS, EVEN_D, UPCAST, PREC, TMA, TMA_OUT, WS)
    else:
        loss_rows = tl.zeros((BM,), dtype=tl.float32)
        g_rows = tl.zeros((BM,), dtype=tl.float32)
        ds_rows = tl.zeros((BM,), dtype=tl.float32)
        t0 = tl.program_id(1) * TPP
        t1 = tl.minimum(t0 + TPP, tl.cdiv(M, BN))
        for tile in tl.range(t0, t1, flatten=FLAT):
            lr, gr, dr = _siglip_lean_tile(
                q_ptr, k_ptr, out_ptr, row0, tile * BN, rows, rmask, t, r0, r1, M, D, stride_q, stride_k,
                stride_out, s2, b2, gg, BM, BN, BD, LOSS, GRAD, HAS_TGT, DS, EVEN_D, UPCAST, PREC, TMA, TMA_OUT, WS)
            loss_rows += lr
            g_rows += gr
            ds_rows += dr
    if LOSS:
        tl.atomic_add(row_loss_ptr + rows, loss_rows, mask=rmask, sem="relaxed")
    if GRAD:
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(db_ptr + pid, tl.sum(g_r * g_rows, 0))
        if DS:
            tl.store(ds_ptr + pid, tl.sum(g_r * ds_rows, 0))
