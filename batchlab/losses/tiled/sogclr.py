"""Tiled SogCLR / iSogCLR: ``impl="tiled"`` of :func:`batchlab.losses.sogclr`, no (N, K) matrix.

Per direction (see :mod:`batchlab.losses.sogclr` for the math), with per-row temperatures
folded into the anchors (``h_ij / tau_i = (a_i / tau_i) . c_j - a_i . p_i / tau_i``):

* forward, one pass over (rows x columns) tiles: an online log-sum-exp of ``x = h / tau``
  over each anchor's negatives, and beside it the softmax-weighted sum of ``x`` (rescaled
  with the running maximum like the sum itself) -- that is all the temperature gradient
  needs, so ``tau_grad`` is ready when the forward returns (the module steps ``tau`` then);
* backward, one pass that recomputes each tile's ``P_ij = exp(x_ij - log u_i - log n_i)``
  and accumulates ``W = P @ c`` (rows) and ``P.T @ (G a)`` (candidates).

The symmetric loss in one process (``sogclr_symmetric_tiled``) computes each tile's product
``q_r k_c^T`` once for both directions: rows' statistics online over the column tiles,
columns' online over the row tiles; its backward turns ``D = G P_row + G' P_col`` into
``dq`` and ``dk`` with two products (four products in all, against eight for two separate
directions), accumulated in fp32 and rounded once. One-way, two-view and the distributed
shards (local rows against gathered candidates) run per direction.

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
from batchlab.losses._common import compute_dtype, neg_mask_tile
from batchlab.losses.sogclr import Direction, excluded, finish_rows, touches_exclusions
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


class Online(NamedTuple):
    """Running statistics of one set of anchors: max, sum of exp, exp-weighted sum of x, count."""

    m: torch.Tensor
    s: torch.Tensor
    w: torch.Tensor
    kept: torch.Tensor

    @staticmethod
    def start(n: int, cd, device) -> "Online":
        floor = torch.finfo(cd).min / 4  # a finite start: exp(floor - max) is 0, never NaN
        zeros = torch.zeros(n, dtype=cd, device=device)
        return Online(torch.full((n,), floor, dtype=cd, device=device), zeros, zeros.clone(), zeros.clone())

    def add(self, x: torch.Tensor, ex: torch.Tensor | None, dim: int) -> "Online":
        """Fold a tile of ``x`` (-inf where ``ex``) in along ``dim`` (1: rows are the anchors, 0: columns)."""
        m_new = torch.maximum(self.m, x.amax(dim))
        alpha = torch.exp(self.m - m_new)
        e = torch.exp(x - m_new.unsqueeze(dim))
        finite = x if ex is None else x.masked_fill(ex, 0)
        kept = x.shape[dim] if ex is None else (~ex).sum(dim)
        return Online(m_new, self.s * alpha + e.sum(dim), self.w * alpha + (e * finite).sum(dim), self.kept + kept)

    def finish(self):
        """``(log sum exp x, softmax-weighted mean of x, number of negatives)``."""
        return self.m + torch.log(self.s), self.w / self.s, self.kept


def forward_stats(direction: Direction, tau, tile: tuple[int, int]):
    """``(log sum_j exp x_ij, sum_j softmax_ij x_ij, number of negatives)`` per anchor, tile by tile."""
    cd = compute_dtype(direction.anchors.dtype)
    n, k = direction.anchors.shape[0], direction.cands.shape[0]
    parts = []
    for r0, r1 in spans(n, tile[0]):
        rows = _row_block(direction, tau, r0, r1, cd)
        stats = Online.start(r1 - r0, cd, tau.device)
        for c0, c1 in spans(k, tile[1]):
            stats = stats.add(*_tile_logits(direction, rows, r0, r1, c0, c1, cd), dim=1)
        parts.append(stats.finish())
    return tuple(torch.cat(p) for p in zip(*parts))


def close_direction(stats, log_u, tau, gamma: float, rho: float):
    """A direction's ``(value, new log u, s, tau_grad, backward shift)`` from its tile statistics."""
    lse, mean_x, count = stats
    return finish_rows(lse, torch.log(count), mean_x, log_u.to(lse.dtype), tau, gamma, rho)


class _SogCLRDirection(torch.autograd.Function):
    """``value, log_u_new, tau_grad = _SogCLRDirection.apply(anchors, cands, positives, tau, log_u, meta)``."""

    @staticmethod
    def forward(ctx, anchors, cands, positives, tau, log_u, meta):
        gamma, rho, tile, d = meta
        d = d._replace(anchors=anchors, cands=cands, positives=positives)
        value, log_u_new, s, tau_grad, shift = close_direction(forward_stats(d, tau, tile), log_u, tau, gamma, rho)
        ctx.meta = meta
        ctx.save_for_backward(anchors, cands, positives, tau, shift, s, tau_grad)
        ctx.mark_non_differentiable(log_u_new, tau_grad)
        return value, log_u_new, tau_grad

    @staticmethod
    def backward(ctx, g_value, _g_log_u, _g_tau_grad):
        anchors, cands, positives, tau, shift, s, tau_grad = ctx.saved_tensors
        _, _, tile, d = ctx.meta
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
def sogclr_direction_tiled(direction: Direction, tau, log_u, *, gamma: float, rho: float, tile_size=None):
    """One direction without the (n, K) logits; ``tile_size``: int or (rows, cols)."""
    tile = resolve_tile(tile_size, direction.anchors.device)
    # the tensors go through apply (autograd sees them); the rest rides along in meta
    meta = (gamma, rho, tile, direction._replace(anchors=None, cands=None, positives=None))
    return _SogCLRDirection.apply(direction.anchors, direction.cands, direction.positives, tau, log_u, meta)


# ----------------------------------------------------------------------------- symmetric, one product per tile


def _shared_mask(r0: int, r1: int, c0: int, c1: int, neg_mask, device) -> torch.Tensor | None:
    """Excluded (query, key) pairs of a tile of the symmetric loss: the diagonal and ``neg_mask``."""
    ex = None
    if max(r0, c0) < min(r1, c1):
        ex = torch.arange(r0, r1, device=device)[:, None] == torch.arange(c0, c1, device=device)[None, :]
    if neg_mask is not None:
        masked = neg_mask_tile(neg_mask, torch.arange(r0, r1, device=device), torch.arange(c0, c1, device=device))
        ex = masked if ex is None else ex | masked
    return ex


def _shared_tile(q_op, k_op, tau, pos, r0, r1, c0, c1, neg_mask, cd):
    """One (query, key) tile's logits of both directions: ``(x_row, x_col, mask)`` (-inf where masked)."""
    prod = tile_mm(q_op, k_op.T, cd)
    ex = _shared_mask(r0, r1, c0, c1, neg_mask, prod.device)
    x_row = prod / tau[0, r0:r1, None] - pos[0, r0:r1, None]  # anchor q_i, negatives k_j
    x_col = prod / tau[1, None, c0:c1] - pos[1, None, c0:c1]  # anchor k_j, negatives q_i
    if ex is not None:
        x_row, x_col = x_row.masked_fill(ex, float("-inf")), x_col.masked_fill(ex, float("-inf"))
    return x_row, x_col, ex


class _SymmetricShared(torch.autograd.Function):
    """Both directions of the symmetric loss from ONE product per tile (one process).

    ``value, log_u_new, tau_grad = _SymmetricShared.apply(q, k, tau, log_u, meta)``, all (2, n):
    row 0 is images (q) against texts, row 1 texts against images. The tile ``q_r k_c^T``
    serves the rows' statistics (online over the column tiles) and the columns' (online over
    the row tiles); the backward recomputes it once and turns ``D = G P_row + G' P_col`` into
    ``dq`` and ``dk`` with two products, accumulated in fp32 and rounded once.
    """

    @staticmethod
    def forward(ctx, q, k, tau, log_u, meta):
        gamma, rho, tile, neg_mask = meta
        cd = compute_dtype(q.dtype)
        n = q.shape[0]
        pos = (q.to(cd) * k.to(cd)).sum(1)[None] / tau  # (2, n): the positive's logit per direction
        col_tiles = list(spans(n, tile[1]))
        cols = [Online.start(c1 - c0, cd, q.device) for c0, c1 in col_tiles]
        row_parts = []
        for r0, r1 in spans(n, tile[0]):
            q_op = matmul_operand(q[r0:r1])
            rows = Online.start(r1 - r0, cd, q.device)
            for t, (c0, c1) in enumerate(col_tiles):
                x_row, x_col, ex = _shared_tile(q_op, matmul_operand(k[c0:c1]), tau, pos, r0, r1, c0, c1, neg_mask, cd)
                rows = rows.add(x_row, ex, dim=1)
                cols[t] = cols[t].add(x_col, ex, dim=0)
            row_parts.append(rows.finish())
        out = [close_direction([torch.cat(p) for p in zip(*parts)], log_u[d], tau[d], gamma, rho)
               for d, parts in enumerate((row_parts, [c.finish() for c in cols]))]
        value, log_u_new, s, tau_grad, shift = (torch.stack(x) for x in zip(*out))
        ctx.meta = meta
        ctx.save_for_backward(q, k, tau, pos, shift, s, tau_grad)
        ctx.mark_non_differentiable(log_u_new, tau_grad)
        return value, log_u_new, tau_grad

    @staticmethod
    def backward(ctx, g_value, _g_log_u, _g_tau_grad):
        q, k, tau, pos, shift, s, tau_grad = ctx.saved_tensors
        _, _, tile, neg_mask = ctx.meta
        cd = compute_dtype(q.dtype)
        n = q.shape[0]
        g = g_value.to(cd)
        low = (lambda t: t.to(q.dtype)) if uses_low_precision_matmul(q) else (lambda t: t)
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        dk = torch.zeros(k.shape, dtype=cd, device=q.device)
        for r0, r1 in spans(n, tile[0]):
            q_op = matmul_operand(q[r0:r1])
            for c0, c1 in spans(n, tile[1]):
                k_op = matmul_operand(k[c0:c1])
                x_row, x_col, _ = _shared_tile(q_op, k_op, tau, pos, r0, r1, c0, c1, neg_mask, cd)
                # d loss / d (q_i . k_j): P_row weighted by the image's G, P_col by the text's
                d = low(g[0, r0:r1, None] * torch.exp(x_row - shift[0, r0:r1, None])
                        + g[1, None, c0:c1] * torch.exp(x_col - shift[1, None, c0:c1]))
                dq[r0:r1] += tile_mm(d, k_op, cd)
                dk[c0:c1] += tile_mm(d.T, q_op, cd)
        # the positive's logit q_i . k_i enters both directions with weight -G s
        on_pos = (g * s).sum(0)[:, None]
        dq -= on_pos * k.to(cd)
        dk -= on_pos * q.to(cd)
        d_tau = g * tau_grad if ctx.needs_input_grad[2] else None
        return dq.to(q.dtype), dk.to(k.dtype), d_tau, None, None


@_dispatch.register("sogclr_symmetric", "tiled")
def sogclr_symmetric_tiled(q, k, tau, log_u, *, gamma: float, rho: float, neg_mask=None, tile_size=None):
    """Both directions of the symmetric loss in one process: ``(value, log_u, tau_grad)``, each (2, n)."""
    tile = resolve_tile(tile_size, q.device)
    return _SymmetricShared.apply(q, k, tau, log_u, (gamma, rho, tile, neg_mask))
