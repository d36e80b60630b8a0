"""The autograd Function shared by the softmax family (InfoNCE/CLIP, DCL/DCLW, NT-Xent).

Forward: one tiled pass for the row/column log-sum-exp and the positive cosines
(O(N + M) saved); backward: one tiled pass that recomputes each tile and
accumulates ``U = G @ k`` and ``V = G.T @ q`` (see :mod:`.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchlab.losses._common import compute_dtype
from batchlab.losses.dcl import dclw_weights
from batchlab.losses.infonce import reduce_loss
from batchlab.losses.tiled.engine import (
    LSECoefficients,
    Pairs,
    extra_backward,
    extra_logits,
    lse_block_backward,
    lse_block_forward,
)


@dataclass(frozen=True)
class LSESpec:
    """Everything about a softmax-family loss that is not a differentiable tensor."""

    pairs: Pairs
    symmetric: bool
    reduction: str
    tile: tuple[int, int]
    exclude_positives: bool = False  # DCL: positives leave the denominator
    weighted: bool = False  # DCLW
    sigma: float = 0.5


def direction_weights(g: torch.Tensor, reduction: str, symmetric: bool, n: int, m: int):
    """``(a, b)``: d loss / d row_loss_i (N,) and d loss / d col_loss_j (M,) (b None if one-way)."""
    half = 0.5 if symmetric else 1.0
    if reduction == "none":
        a = g * half
        return a, (a.clone() if symmetric else None)
    a = (g * half / (n if reduction == "mean" else 1)).expand(n)
    b = (g * half / (m if reduction == "mean" else 1)).expand(m) if symmetric else None
    return a, b


def _has_extra(extra: torch.Tensor | None) -> bool:
    return extra is not None and extra.shape[1] > 0


class LSEContrastive(torch.autograd.Function):
    """``loss, row_lse, col_lse = LSEContrastive.apply(q, k, extra, scale, spec)``."""

    @staticmethod
    def forward(ctx, q, k, extra, scale, spec: LSESpec):
        cd = compute_dtype(q.dtype)
        n, m = q.shape[0], k.shape[0]
        stats = lse_block_forward(
            q, k, scale, spec.pairs, need_col=spec.symmetric, exclude_positives=spec.exclude_positives,
            tile=spec.tile,
        )
        row_lse = stats.row_lse
        if _has_extra(extra):
            row_lse = torch.logaddexp(row_lse, torch.logsumexp(extra_logits(q, extra, scale), dim=1))
        n_row = spec.pairs.row_counts(n, q.device, cd)
        row_cos = stats.row_pos / n_row
        w_row = dclw_weights(row_cos, spec.sigma) if spec.weighted else torch.ones_like(row_cos)
        row_loss = row_lse - w_row * scale * row_cos
        col_lse = col_loss = w_col = n_col = None
        if spec.symmetric:
            col_lse = stats.col_lse
            n_col = spec.pairs.col_counts(m, q.device, cd)
            col_cos = stats.col_pos / n_col
            w_col = dclw_weights(col_cos, spec.sigma) if spec.weighted else torch.ones_like(col_cos)
            col_loss = col_lse - w_col * scale * col_cos
        loss = reduce_loss(row_loss, col_loss, spec.reduction)
        ctx.spec = spec
        ctx.save_for_backward(q, k, extra, scale, row_lse, col_lse, w_row / n_row,
                              None if w_col is None else w_col / n_col)
        col_out = col_lse if col_lse is not None else row_lse.new_empty(0)
        return loss, row_lse, col_out

    @staticmethod
    def backward(ctx, g, g_row_lse, g_col_lse):
        q, k, extra, scale, row_lse, col_lse, row_pos_w, col_pos_w = ctx.saved_tensors
        spec: LSESpec = ctx.spec
        cd = compute_dtype(q.dtype)
        n, m = q.shape[0], k.shape[0]
        a, b = direction_weights(g.to(cd), spec.reduction, spec.symmetric, n, m)
        alpha, beta = a * row_pos_w, None if b is None else b * col_pos_w
        # a returned LSE (z-loss, say) adds to the softmax terms only, not to the positive terms
        a = a + g_row_lse.to(cd)
        if b is not None:
            b = b + g_col_lse.to(cd)
        coef = LSECoefficients(a, alpha, b, beta)
        U, V = lse_block_backward(
            q, k, scale, spec.pairs, row_lse=row_lse, col_lse=col_lse, coef=coef,
            exclude_positives=spec.exclude_positives, need_v=ctx.needs_input_grad[1], tile=spec.tile,
        )
        d_extra = None
        if _has_extra(extra):
            dE = torch.exp(extra_logits(q, extra, scale) - row_lse[:, None]) * a[:, None]
            U_add, d_extra = extra_backward(q, extra, scale, dE)
            U += U_add
            d_extra = d_extra.to(extra.dtype)
        dscale = (q.to(cd) * U).sum() if ctx.needs_input_grad[3] else None
        # in place: at N = 1M, d = 512 an fp32 temporary of U is 2 GiB
        dq = U.mul_(scale).to(q.dtype) if ctx.needs_input_grad[0] else None
        dk = V.mul_(scale).to(k.dtype) if V is not None else None
        return dq, dk, d_extra, dscale, None


def run_lse(q, k, extra, scale, spec: LSESpec):
    """Apply :class:`LSEContrastive`; returns ``(loss, row_lse, col_lse or None)``."""
    loss, row_lse, col_lse = LSEContrastive.apply(q, k, extra, scale, spec)
    return loss, row_lse, (col_lse if spec.symmetric else None)
