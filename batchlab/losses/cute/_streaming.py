"""Host side of the CuTe streaming passes: tile configs, bounded scratch, and the calls the Triton path makes.

:func:`shifted_sums` replaces ``lse_fwd_tile_kernel`` (the forward's one pass) and :func:`logit_grad_panel` the
backward's ``lse_bwd_tile_kernel`` for one gradient panel; both take the same device tensors as those kernels
(scale, ``ctl``, base-2 log-sum-exps, upstream weights) and never read anything back to the host.

Shapes: ``q`` (N, d), ``k`` (M, d) bf16/fp16, contiguous (see :func:`batchlab.losses.cute.unsupported`).

Example (what ``_lse._lse_forward_tiles`` does)::

    row_sum, col_sum = torch.empty(n, ...), torch.empty(m, ...)
    shifted_sums(q, k, scale32, ctl, row_sum, col_sum)   # row_sum[i] = sum_j 2^(s log2(e) q_i.k_j - ctl[0])
"""

from __future__ import annotations

import torch

#: quack tile configs (tile rows, tile columns, cluster rows, pingpong). At N = 65,536, d = 512 on an H200 128 x 128
#: pingpong tiles were the fastest of seven configs for both passes in three runs, cluster 1 or 2 by turns within
#: noise (session 10, ``benchmarks/results/losses-h200-s10/``). Edit at run time to try others.
CONFIGS = {
    "sums": dict(tile_M=128, tile_N=128, cluster_M=1, cluster_N=1, pingpong=True),
    "grad": dict(tile_M=128, tile_N=128, cluster_M=1, cluster_N=1, pingpong=True),
}
#: fp32 elements of partial sums the forward may hold at once (256 MiB); larger problems go in row panels.
SCRATCH_FLOATS = 1 << 26


def _mods():
    """The epilogue GEMMs (imports quack; a test may stand in CPU versions with the same call contract)."""
    from batchlab.losses.cute import _epilogues

    return _epilogues


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sums_panel_rows(n: int, m: int, cfg: dict | None = None) -> int:
    """Rows per forward panel: its partials ``rows x cdiv(M, tile_N)`` and ``cdiv(rows, tile_M) x M`` fit in
    :data:`SCRATCH_FLOATS` (a multiple of tile_M, at least one tile)."""
    cfg = cfg or CONFIGS["sums"]
    tm = cfg["tile_M"]
    per_row = _cdiv(m, cfg["tile_N"]) + _cdiv(m, tm)
    return min(n, max(tm, SCRATCH_FLOATS // per_row // tm * tm))


def shifted_sums(q, k, scale32, ctl, row_sum, col_sum) -> None:
    """``row_sum[i] = sum_j 2^(l2_ij - ctl[0])`` and ``col_sum[j] = sum_i 2^(l2_ij - ctl[0])`` (fp32, written).

    ``l2 = s log2(e) q_i . k_j`` with ``s = scale32[0]``; ``ctl[0]`` is the fixed shift of ``_lse.control``.
    Per row panel: one epilogue GEMM, then the partials summed in a fixed order (deterministic, no atomics).
    """
    n, m = q.shape[0], k.shape[0]
    cfg = CONFIGS["sums"]
    rows = sums_panel_rows(n, m, cfg)
    f32 = dict(device=q.device, dtype=torch.float32)
    rp_all = torch.empty(rows, _cdiv(m, cfg["tile_N"]), **f32)
    cp_all = torch.empty(_cdiv(rows, cfg["tile_M"]), m, **f32)
    ref2 = ctl[:1]
    mod = _mods().shifted_sums[bool(n % cfg["tile_M"] or m % cfg["tile_N"])]  # (panels are whole tiles but the last)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        rp, cp = rp_all[: r1 - r0], cp_all[: _cdiv(r1 - r0, cfg["tile_M"])]
        mod.gemm(q[r0:r1], k, None, epi_args=dict(scale=scale32, ref2=ref2, rsum=rp, csum=cp), **cfg)
        torch.sum(rp, 1, out=row_sum[r0:r1])
        if r0 == 0:
            torch.sum(cp, 0, out=col_sum)
        else:
            col_sum.add_(cp.sum(0))


def logit_grad_panel(q_rows, k, scale32, ginv, lse_r, g_r, lse_c, g_c, out, ds_rows=None) -> None:
    """``out = G * ginv`` for the panel's rows (``q_rows`` (P, d)), ``G = g_r 2^(l2 - lse_r) + g_c 2^(l2 - lse_c)``.

    ``lse_r``, ``g_r`` (P,) and ``lse_c``, ``g_c`` (M,): fp32, base-2 log-sum-exps and upstream weights;
    ``out``: (P, M) in the inputs' dtype. ``ds_rows`` (P,) fp32: when given, each row's ``sum_j G_ij q_i . k_j``
    (in-kernel per-tile partials, then summed over the tiles).
    """
    cfg = CONFIGS["grad"]
    args = dict(scale=scale32, lse_r=lse_r[None], g_r=g_r[None], lse_c=lse_c[None], g_c=g_c[None], ginv=ginv)
    if ds_rows is None:
        _mods().logit_grad.gemm(q_rows, k, out, epi_args=args, **cfg)
        return
    parts = torch.empty(q_rows.shape[0], _cdiv(k.shape[0], cfg["tile_N"]), device=q_rows.device, dtype=torch.float32)
    _mods().logit_grad_ds[bool(k.shape[0] % cfg["tile_N"])].gemm(q_rows, k, out, epi_args=dict(args, ds=parts), **cfg)
    torch.sum(parts, 1, out=ds_rows)
