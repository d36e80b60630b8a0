"""Fused Triton kernel for JEST's InfoNCE neighbour term (imported only when asked for).

For each pair ``p`` (a model and a direction), the selected rows ``a[p]`` (m, d, already
scaled by the logit scale), the candidates ``b[p]`` (N, d) and one log-sum-exp ``r[p, j]``
per selected row, the kernel returns

    out[p, i] = sum_{j < m} softplus(a[p, j] . b[p, i] - r[p, j])          (P, N)

without writing the (m, N) logits: a program owns BN candidates and a share of the
selected rows' tiles, computes each (BM, BN) tile (fp32 accumulation; bf16, or fp32
with TF32/IEEE products; its own d loop, so that it does not follow the changes of the
losses' internal tile helpers) and folds it into a
per-candidate sum in registers. Programs that split the rows write partial sums
(``split``, N), added by the caller, so the result is deterministic (no atomics).

``softplus(z) = max(z, 0) + log1p(exp(-|z|))`` with ``log1p(y) ~ y (1 - y / 2)`` below
``y = 1e-4`` (relative error < 4e-9 there) and ``log(1 + y)`` above.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchlab.losses.triton._launch import interpreting, tile_shares

# H100-friendly tiles (the losses' forward config); small ones in the interpreter so that
# tests exercise several tiles and d chunks.
_CONFIG = dict(BM=128, BN=128, num_warps=8, num_stages=3)
_INTERPRET = dict(BM=16, BN=32, BD=16, num_warps=4, num_stages=1)


@triton.jit
def _neighbour_kernel(a_ptr, b_ptr, r_ptr, out_ptr, M, N, D, stride_ap, stride_a, stride_bp, stride_b, stride_rp,
                      stride_op, tiles_per_split,
                      BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                      EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_p = tl.program_id(2).to(tl.int64)
    a_ptr += pid_p * stride_ap
    b_ptr += pid_p * stride_bp
    r_ptr += pid_p * stride_rp
    out_ptr += pid_p * stride_op
    cols = pid_n * BN + tl.arange(0, BN)
    total = tl.zeros((BN,), dtype=tl.float32)
    n_tiles = tl.cdiv(M, BM)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        rows = t * BM + tl.arange(0, BM)
        # (BM, BN) = a[rows] @ b[cols].T; rows/cols clamped in range here, out-of-range rows masked below
        rows_c = tl.minimum(rows, M - 1).to(tl.int64)
        cols_c = tl.minimum(cols, N - 1).to(tl.int64)
        x = tl.zeros((BM, BN), dtype=tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            a_ptrs = a_ptr + rows_c[:, None] * stride_a + dd[None, :]
            b_ptrs = b_ptr + cols_c[:, None] * stride_b + dd[None, :]
            if EVEN_D:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=dd[None, :] < D, other=0.0)
                b = tl.load(b_ptrs, mask=dd[None, :] < D, other=0.0)
            if UPCAST:  # the CPU interpreter computes bf16 dots wrongly: upcast there only
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            x = tl.dot(a, tl.trans(b), x, input_precision=PREC)
        r = tl.load(r_ptr + rows, mask=rows < M, other=0.0)
        z = x - r[:, None]
        y = tl.exp(-tl.abs(z))
        log1p = tl.where(y < 1e-4, y * (1.0 - 0.5 * y), tl.log(1.0 + y))
        sp = tl.maximum(z, 0.0) + log1p
        sp = tl.where(rows[:, None] < M, sp, 0.0)
        total += tl.sum(sp, axis=0)
    tl.store(out_ptr + pid_s * N + cols, total, mask=cols < N)


def neighbour_sum(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, *, precision: str) -> torch.Tensor:
    """``out[p, i] = sum_j softplus(a[p, j] . b[p, i] - r[p, j])``: a (P, m, d), b (P, N, d), r (P, m) -> (P, N).

    ``precision``: ``"bf16"`` (a, b already bf16), ``"tf32"`` or ``"float32"`` (a, b float32).
    The result is float32.
    """
    a, b, r = a.contiguous(), b.contiguous(), r.float().contiguous()
    pairs, m, d = a.shape
    n = b.shape[1]
    cfg = dict(_INTERPRET) if interpreting() else dict(_CONFIG, BD=64 if a.dtype == torch.bfloat16 else 32)
    bm, bn, bd = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BD")
    col_blocks = triton.cdiv(n, bn)
    n_tiles = triton.cdiv(m, bm)
    # enough programs for about four waves on the device, never more splits than row tiles
    split, tiles_per_split = tile_shares(n_tiles, col_blocks * pairs, a.device, 4)
    out = torch.empty(pairs, split, n, device=a.device, dtype=torch.float32)
    prec = "ieee" if precision == "float32" else "tf32"
    _neighbour_kernel[(col_blocks, split, pairs)](
        a, b, r, out, m, n, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1), r.stride(0), out.stride(0),
        tiles_per_split, BM=bm, BN=bn, BD=bd, EVEN_D=d % bd == 0, UPCAST=interpreting(), PREC=prec, **cfg,
    )
    return out.sum(1)
