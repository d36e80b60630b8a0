"""Small kernels around the streaming InfoNCE/DCL kernels (``_lse.stream_loss``): the O(N d) work
that PyTorch's ops did in ~45 launches per forward + backward, in four.

* ``stream_prologue_kernel`` (forward, before ``control_kernel``): each block of rows' largest squared
  norm (``norm_max_kernel``'s output, same layout), the positives ``q_i . k_i`` in fp32 (the diagonal),
  and the zeroed row and column sums that ``lse_fwd_tile_kernel`` adds into.
* ``stream_loss_kernel`` (forward, after the finishes): the natural log-sum-exps and the loss
  ``c_r sum_i (lse_i - s pos_i) + c_c sum_j (lse_j - s pos_j)`` (or per row for ``"none"``).
* ``stream_grad_prologue_kernel`` (backward, before the panels): the upstream weights of the row
  and column log-sum-exps (``g_row``, ``g_col``) and the positives' query gradient ``dq_i = -s w_i k_i``,
  written in dq where the panels' products then add theirs.
* ``stream_grad_epilogue_kernel`` (backward, after the panels): the key gradient: the products' fp32
  accumulator plus the positives' ``-s w_i q_i``, rounded once into the inputs' dtype; the scale gradient:
  the panel kernels' fp32 partials minus ``sum_i w_i pos_i``.

The totals (loss, scale gradient) are summed without float atomics: each program stores its partial, the
last program to finish (an int32 counter zeroed by the kernel before) adds them in program order, so
the results are the same on every call.

``w_i = (c_r + c_c) g_i``: the weight of query i's positive in the loss (``g``: the upstream gradient,
one value or one per row).
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchlab.losses.triton._dense_kernels import _finish_total
from batchlab.losses.triton._kernels import _row_norm2_max


@triton.jit
def _round(x, ty: tl.constexpr, RNE: tl.constexpr):
    """fp32 ``x`` in ``ty``, rounded to nearest even. ``RNE``: by hand (bf16): Triton's CPU interpreter
    truncates its fp32 -> bf16 casts (the GPU's conversion rounds to nearest even)."""
    if RNE:
        if ty == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
    return x.to(ty)


@triton.jit
def stream_prologue_kernel(q_ptr, k_ptr, part_ptr, pos_ptr, sums_ptr, ctr_ptr, N, M, D, stride_q, stride_k,
                           q_blocks, BR: tl.constexpr, BD: tl.constexpr):
    """Programs [0, q_blocks): BR rows of ``q``: ``part[pid]`` (largest squared norm), ``pos[rows] =
    q_i . k_i`` (fp32), ``sums[rows] = 0``. The others: BR rows of ``k``: ``part[pid]``, ``sums[N + rows] = 0``.
    Program 0 also zeroes the loss kernel's counter ``ctr[0]``."""
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(ctr_ptr, 0)
    if pid < q_blocks:
        rows = pid * BR + tl.arange(0, BR)
        rmask = rows < N
        norm = tl.zeros((BR,), dtype=tl.float32)
        dot = tl.zeros((BR,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            mask = rmask[:, None] & (dd[None, :] < D)
            x = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_q + dd[None, :], mask=mask, other=0.0)
            y = tl.load(k_ptr + rows[:, None].to(tl.int64) * stride_k + dd[None, :], mask=mask, other=0.0)
            x = x.to(tl.float32)
            norm += tl.sum(x * x, 1)
            dot += tl.sum(x * y.to(tl.float32), 1)
        tl.store(part_ptr + pid, tl.max(norm, 0))
        tl.store(pos_ptr + rows, dot, mask=rmask)
        tl.store(sums_ptr + rows, tl.zeros((BR,), dtype=tl.float32), mask=rmask)
    else:
        row0 = (pid - q_blocks) * BR
        tl.store(part_ptr + pid, _row_norm2_max(k_ptr, row0, M, D, stride_k, BR, BD))
        rows = row0 + tl.arange(0, BR)
        tl.store(sums_ptr + N + rows, tl.zeros((BR,), dtype=tl.float32), mask=rows < M)


@triton.jit
def _last_total(part_ptr, total, ctr_ptr, out_ptr, programs, BLOCK: tl.constexpr):
    """Stores this program's ``total`` at ``part[pid]``; the last of ``programs`` to arrive (counter at
    ``ctr``, zero before the launch, left at zero) sums the partials in program order into ``out[0]``
    (deterministic: the same partition and order on every call)."""
    tl.store(part_ptr + tl.program_id(0), total)
    _finish_total(part_ptr, out_ptr, ctr_ptr, programs, 1, BLOCK)


@triton.jit
def stream_loss_kernel(row2_ptr, col2_ptr, pos_ptr, scale_ptr, loss_ptr, lse_ptr, part_ptr, ctr_ptr, N, cr, cc,
                       COLS: tl.constexpr, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK rows per program: ``lse[:N]`` (rows) and, with ``COLS``, ``lse[N:2N]`` (columns) in natural log
    from the base-2 ``row2``/``col2``; the loss: ``loss[i] = cr (row_i - s pos_i) + cc (col_i - s pos_i)`` per
    row (``PER_ROW``), or their total in ``loss[0]`` (programs' partials in ``part``, summed by the last;
    counter ``ctr[0]``, zeroed by ``stream_prologue_kernel``)."""
    s = tl.load(scale_ptr).to(tl.float32)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    sp = s * tl.load(pos_ptr + i, mask=mask, other=0.0)
    r = tl.load(row2_ptr + i, mask=mask, other=0.0) * 0.6931471805599453
    tl.store(lse_ptr + i, r, mask=mask)
    x = cr * (r - sp)
    if COLS:
        c = tl.load(col2_ptr + i, mask=mask, other=0.0) * 0.6931471805599453
        tl.store(lse_ptr + N + i, c, mask=mask)
        x += cc * (c - sp)
    if PER_ROW:
        tl.store(loss_ptr + i, x, mask=mask)
    else:
        _last_total(part_ptr, tl.sum(tl.where(mask, x, 0.0), 0), ctr_ptr, loss_ptr, tl.num_programs(0), BLOCK)


@triton.jit
def stream_grad_prologue_kernel(go_ptr, k_ptr, scale_ptr, g_row_ptr, g_col_ptr, dq_ptr, ctr_ptr,
                                N, D, stride_k, cr, cc,
                                BR: tl.constexpr, BD: tl.constexpr, GO_VEC: tl.constexpr, COLS: tl.constexpr,
                                NEED_Q: tl.constexpr, RNE: tl.constexpr):
    """BR rows per program: ``g_row = cr g``, ``g_col = cc g`` (``COLS``), ``dq[rows] = -s w k[rows]``
    (``NEED_Q``; dq's dtype, contiguous (N, D)). Program 0 also zeroes the epilogue's counter ``ctr[0]``."""
    if tl.program_id(0) == 0:
        tl.store(ctr_ptr, 0)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    qmask = rows < N
    if GO_VEC:
        go = tl.load(go_ptr + rows, mask=qmask, other=0.0).to(tl.float32)
    else:
        go = tl.load(go_ptr).to(tl.float32) + tl.zeros((BR,), dtype=tl.float32)
    tl.store(g_row_ptr + rows, cr * go, mask=qmask)
    if COLS:
        tl.store(g_col_ptr + rows, cc * go, mask=qmask)
    if NEED_Q:
        w = -tl.load(scale_ptr).to(tl.float32) * (cr + cc) * go
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            mask = qmask[:, None] & (dd[None, :] < D)
            y = tl.load(k_ptr + rows[:, None].to(tl.int64) * stride_k + dd[None, :], mask=mask, other=0.0)
            tl.store(dq_ptr + rows[:, None].to(tl.int64) * D + dd[None, :],
                     _round(w[:, None] * y.to(tl.float32), dq_ptr.dtype.element_ty, RNE), mask=mask)


@triton.jit
def stream_grad_epilogue_kernel(acc_ptr, dk_ptr, q_ptr, stride_q, scale_ptr, parts_ptr, n_parts, per_part, go_ptr,
                                pos_ptr, per_pos, ds_ptr, part_ptr, ctr_ptr, M, N, D, cpos,
                                BR: tl.constexpr, BD: tl.constexpr, SB: tl.constexpr, DK: tl.constexpr,
                                DS: tl.constexpr, GO_VEC: tl.constexpr, RNE: tl.constexpr):
    """``DK``: BR key rows per program: ``dk = acc - s w_i q_i`` (the positives' key gradient, rows i < N)
    rounded to dk's dtype (``acc`` and ``dk``: contiguous (M, D); ``dk`` may be ``acc``). ``DS``: the scale
    gradient ``ds = sum(parts[:n_parts]) - cpos sum_i g_i pos_i``: each program sums ``per_part`` partials
    and ``per_pos`` positives (SB per step), the last to finish adds the programs' totals (``_last_total``;
    counter ``ctr[0]``, zeroed by ``stream_grad_prologue_kernel``)."""
    pid = tl.program_id(0)
    if DK:
        rows = pid * BR + tl.arange(0, BR)
        rmask = rows < M
        pmask = rows < N
        if GO_VEC:
            go = tl.load(go_ptr + rows, mask=pmask, other=0.0).to(tl.float32)
        else:
            go = tl.load(go_ptr).to(tl.float32) + tl.zeros((BR,), dtype=tl.float32)
        w = -tl.load(scale_ptr).to(tl.float32) * cpos * go
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            dmask = dd[None, :] < D
            out = rows[:, None].to(tl.int64) * D + dd[None, :]
            a = tl.load(acc_ptr + out, mask=rmask[:, None] & dmask, other=0.0).to(tl.float32)
            x = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_q + dd[None, :], mask=pmask[:, None] & dmask,
                        other=0.0).to(tl.float32)
            tl.store(dk_ptr + out, _round(a + w[:, None] * x, dk_ptr.dtype.element_ty, RNE),
                     mask=rmask[:, None] & dmask)
    if DS:
        acc = tl.zeros((SB,), dtype=tl.float32)
        end = tl.minimum(n_parts, (pid + 1) * per_part)
        for j0 in range(pid * per_part, end, SB):
            j = j0 + tl.arange(0, SB)
            acc += tl.load(parts_ptr + j, mask=j < end, other=0.0)
        pos = tl.zeros((SB,), dtype=tl.float32)
        end = tl.minimum(N, (pid + 1) * per_pos)
        for j0 in range(pid * per_pos, end, SB):
            j = j0 + tl.arange(0, SB)
            p = tl.load(pos_ptr + j, mask=j < end, other=0.0)
            if GO_VEC:
                p = p * tl.load(go_ptr + j, mask=j < end, other=0.0).to(tl.float32)
            pos += p
        weight = cpos
        if not GO_VEC:
            weight = cpos * tl.load(go_ptr).to(tl.float32)
        _last_total(part_ptr, tl.sum(acc, 0) - weight * tl.sum(pos, 0), ctr_ptr, ds_ptr, tl.num_programs(0), SB)
