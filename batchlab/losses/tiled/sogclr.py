"""Tiled SogCLR / iSogCLR: ``impl="tiled"`` of :func:`batchlab.losses.sogclr`, no (N, K) matrix.

Per direction (see :mod:`batchlab.losses.sogclr` for the math), with per-row temperatures
folded into the anchors (``h_ij / tau_i = (a_i / tau_i) . c_j - a_i . p_i / tau_i``):

* forward, one pass over (rows x columns) tiles: an online log-sum-exp of ``x = h / tau``
  over each anchor's negatives, and beside it the softmax-weighted sum of ``x`` (rescaled
  with the running maximum like the sum itself) -- that is all the temperature gradient
  needs, so ``tau_grad`` is ready when the forward returns (the module steps ``tau`` then);
* backward, one pass that recomputes each tile's ``P_ij = exp(x_ij - log u_i - log n_i)``
  and accumulates ``W = P @ c`` (rows) and ``P.T @ (G a)`` (candidates).

Saved for the backward: O(n) statistics besides the inputs. Statistics accumulate in
float32 (float64 stays float64); gradients come back in the inputs' dtype. Products follow
the tiled engine's precision rule (:mod:`batchlab.losses.tiled.engine`): on CUDA, bf16/fp16
tiles are multiplied in their own dtype with fp32 output and the backward's tile of ``P``
is rounded to that dtype for its two products; on the CPU everything is fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from batchlab.losses import _dispatch
from batchlab.losses._common import compute_dtype
from batchlab.losses.sogclr import Direction, excluded, finish_rows, log_negatives, touches_exclusions
from batchlab.losses.tiled.engine import matmul_operand, resolve_tile, spans, tile_mm, uses_low_precision_matmul


class _Rows(NamedTuple):
    """A block of anchors: as matmul operand, in the compute dtype, temperatures, ``a.p / tau``."""

    op: torch.Tensor
    a: torch.Tensor
    tau: torch.Tensor
    pos: torch.Tensor


def _row_block(direction: Direction, tau, r0: int, r1: int, cd) -> _Rows:
    raw = direction.anchors[r0:r1]
    a = raw.to(cd)
    t = tau[r0:r1]
    return _Rows(matmul_operand(raw), a, t, (a * direction.positives[r0:r1].to(cd)).sum(1) / t)


def _tile_logits(direction: Direction, rows: _Rows, r0: int, r1: int, c0: int, c1: int, cd):
    """``x = h / tau`` for rows [r0, r1) x candidates [c0, c1), excluded entries -inf; and the mask
    (None for a tile with no excluded entry, most tiles of a large batch).

    The product runs as the engine's do (CUDA bf16/fp16: in the input dtype, fp32 out) and the
    per-row temperature divides the fp32 result, so no scaled operand is ever rounded."""
    x = tile_mm(rows.op, matmul_operand(direction.cands[c0:c1]).T, cd) / rows.tau[:, None] - rows.pos[:, None]
    if not touches_exclusions(direction, r0, r1, c0, c1):
        return x, None
    device = x.device
    ex = excluded(direction, torch.arange(r0, r1, device=device), torch.arange(c0, c1, device=device))
    return x.masked_fill(ex, float("-inf")), ex


def forward_stats(direction: Direction, tau, tile: tuple[int, int]):
    """``(log sum_j exp x_ij, sum_j softmax_ij x_ij, number of negatives)`` per anchor, tile by tile."""
    cd = compute_dtype(direction.anchors.dtype)
    n, k = direction.anchors.shape[0], direction.cands.shape[0]
    lse = torch.empty(n, dtype=cd, device=tau.device)
    mean_x = torch.empty(n, dtype=cd, device=tau.device)
    count = torch.empty(n, dtype=cd, device=tau.device)
    floor = torch.finfo(cd).min / 4  # a finite start: exp(floor - max) is 0, never NaN
    for r0, r1 in spans(n, tile[0]):
        rows = _row_block(direction, tau, r0, r1, cd)
        m = torch.full((r1 - r0,), floor, dtype=cd, device=tau.device)
        s = torch.zeros_like(m)
        w = torch.zeros_like(m)
        kept = torch.zeros_like(m)
        for c0, c1 in spans(k, tile[1]):
            x, ex = _tile_logits(direction, rows, r0, r1, c0, c1, cd)
            m_new = torch.maximum(m, x.max(1).values)
            alpha = torch.exp(m - m_new)
            e = torch.exp(x - m_new[:, None])
            s = s * alpha + e.sum(1)
            w = w * alpha + (e * (x if ex is None else x.masked_fill(ex, 0))).sum(1)
            kept += (c1 - c0) if ex is None else (~ex).sum(1)
            m = m_new
        lse[r0:r1] = m + torch.log(s)
        mean_x[r0:r1] = w / s
        count[r0:r1] = kept
    return lse, mean_x, count


class _SogCLRDirection(torch.autograd.Function):
    """``value, log_u_new, tau_grad = _SogCLRDirection.apply(anchors, cands, positives, tau, log_u, meta)``."""

    @staticmethod
    def forward(ctx, anchors, cands, positives, tau, log_u, meta):
        gamma, rho, tile, check, d = meta
        d = d._replace(anchors=anchors, cands=cands, positives=positives)
        cd = compute_dtype(anchors.dtype)
        lse, mean_x, count = forward_stats(d, tau, tile)
        log_n = log_negatives(count, check)
        value, log_u_new, s, tau_grad = finish_rows(lse - log_n, mean_x, log_u.to(cd), tau, gamma, rho)
        ctx.meta = meta
        ctx.save_for_backward(anchors, cands, positives, tau, log_u_new + log_n, s, tau_grad)
        ctx.mark_non_differentiable(log_u_new, tau_grad)
        return value, log_u_new, tau_grad

    @staticmethod
    def backward(ctx, g_value, _g_log_u, _g_tau_grad):
        anchors, cands, positives, tau, shift, s, tau_grad = ctx.saved_tensors
        _, _, tile, _, d = ctx.meta
        d = d._replace(anchors=anchors, cands=cands, positives=positives)
        cd = compute_dtype(anchors.dtype)
        n, k = anchors.shape[0], cands.shape[0]
        g = g_value.to(cd)
        d_a = torch.zeros(anchors.shape, dtype=cd, device=anchors.device)
        d_c = torch.zeros(cands.shape, dtype=cd, device=anchors.device) if ctx.needs_input_grad[1] else None
        d_p = torch.zeros(positives.shape, dtype=cd, device=anchors.device)
        # CUDA bf16/fp16: the tile of P is rounded to the input dtype for its two products (as the
        # engine and FlashAttention do); elsewhere everything stays in the compute dtype
        low = (lambda t: t.to(anchors.dtype)) if uses_low_precision_matmul(anchors) else (lambda t: t)
        for r0, r1 in spans(n, tile[0]):
            rows = _row_block(d, tau, r0, r1, cd)
            a = rows.a
            acc = torch.zeros(r1 - r0, anchors.shape[1], dtype=cd, device=anchors.device)
            ga = low(g[r0:r1, None] * a)
            for c0, c1 in spans(k, tile[1]):
                x, _ = _tile_logits(d, rows, r0, r1, c0, c1, cd)
                weights = low(torch.exp(x - shift[r0:r1, None]))  # P_ij (0 where excluded)
                acc += tile_mm(weights, matmul_operand(cands[c0:c1]), cd)
                if d_c is not None:
                    d_c[c0:c1] += tile_mm(weights.T, ga, cd)
            gs = (g * s)[r0:r1, None]
            d_a[r0:r1] = g[r0:r1, None] * acc - gs * positives[r0:r1].to(cd)
            d_p[r0:r1] = -gs * a
        d_tau = g * tau_grad if ctx.needs_input_grad[3] else None
        return (
            d_a.to(anchors.dtype),
            None if d_c is None else d_c.to(cands.dtype),
            d_p.to(positives.dtype),
            d_tau,
            None,
            None,
        )


@_dispatch.register("sogclr", "tiled")
def sogclr_direction_tiled(direction: Direction, tau, log_u, *, gamma: float, rho: float, check: bool = True,
                           tile_size=None):
    """One direction without the (n, K) logits; ``tile_size``: int or (rows, cols)."""
    tile = resolve_tile(tile_size, direction.anchors.device)
    # the tensors go through apply (autograd sees them); the rest rides along in meta
    meta = (gamma, rho, tile, check, direction._replace(anchors=None, cands=None, positives=None))
    return _SogCLRDirection.apply(direction.anchors, direction.cands, direction.positives, tau, log_u, meta)
