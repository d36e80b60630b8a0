"""Tiled SigLIP: ``impl="tiled"`` of :func:`batchlab.losses.siglip`.

Every pair is an independent term, so with a scalar upstream gradient (``mean``/``sum``)
the forward pass computes the loss AND all gradients in one tiled pass (3 products per
tile instead of 4) and keeps only the O(N d) gradients; ``reduction="none"`` needs the
upstream per-row weights, so its backward recomputes the tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchlab.losses import _dispatch
from batchlab.losses._common import compute_dtype
from batchlab.losses.siglip import reduce_siglip
from batchlab.losses.tiled.engine import Pairs, extra_backward, extra_logits, pairs_for, resolve_tile, sigmoid_block


@dataclass(frozen=True)
class SigmoidSpec:
    pairs: Pairs
    reduction: str
    tile: tuple[int, int]


def _sigmoid_pass(q, k, extra, scale, bias, spec: SigmoidSpec, row_coef, need_v: bool):
    """Per-row loss and (with ``row_coef``) ``(U, V, dscale, dbias, d_extra)`` over all tiles."""
    out = sigmoid_block(q, k, scale, bias, spec.pairs, row_coef=row_coef, need_v=need_v, tile=spec.tile)
    per_row, U, dscale, dbias, d_extra = out.per_row, out.U, out.dscale, out.dbias, None
    if extra is not None and extra.shape[1]:
        E = extra_logits(q, extra, scale) + bias  # every extra negative is a y = -1 term
        per_row = per_row + F.softplus(E).sum(1)
        if row_coef is not None:
            dE = torch.sigmoid(E) * row_coef[:, None]
            U_add, d_extra = extra_backward(q, extra, scale, dE)
            U = U + U_add
            dscale = dscale + (q.to(U.dtype) * U_add).sum()
            dbias = dbias + dE.sum()
            d_extra = d_extra.to(extra.dtype)
    return per_row, (U, out.V, dscale, dbias, d_extra)


class SigmoidContrastive(torch.autograd.Function):
    """``loss = SigmoidContrastive.apply(q, k, extra, scale, bias, spec)``."""

    @staticmethod
    def forward(ctx, q, k, extra, scale, bias, spec: SigmoidSpec):
        cd = compute_dtype(q.dtype)
        n = q.shape[0]
        # one pass with the gradients of a unit upstream weight per row; scaled in backward
        ctx.eager = spec.reduction != "none" and any(ctx.needs_input_grad[:5])
        unit = torch.ones(n, device=q.device, dtype=cd) if ctx.eager else None
        per_row, grads = _sigmoid_pass(q, k, extra, scale, bias, spec, unit, ctx.needs_input_grad[1])
        ctx.spec = spec
        if ctx.eager:
            U, V, dscale, dbias, d_extra = grads
            ctx.save_for_backward(q, k, scale, U, V, dscale, dbias, d_extra)
        else:
            ctx.save_for_backward(q, k, extra, scale, bias)
        return reduce_siglip(per_row, spec.reduction)

    @staticmethod
    def backward(ctx, g):
        spec: SigmoidSpec = ctx.spec
        if ctx.eager:  # the forward's gradients were for a unit weight per row: scale them
            q, k, scale, U, V, dscale, dbias, d_extra = ctx.saved_tensors
            w = g.to(U.dtype) / (q.shape[0] if spec.reduction == "mean" else 1)
            dscale, dbias = dscale * w, dbias * w
            d_extra = None if d_extra is None else (d_extra * w).to(d_extra.dtype)
        else:
            q, k, extra, scale, bias = ctx.saved_tensors
            w = 1.0
            _, (U, V, dscale, dbias, d_extra) = _sigmoid_pass(
                q, k, extra, scale, bias, spec, g.to(compute_dtype(q.dtype)), ctx.needs_input_grad[1]
            )
        # one multiply straight into the output dtype's temporary (U, V are O(N d) fp32)
        dq = (U * (w * scale)).to(q.dtype) if ctx.needs_input_grad[0] else None
        dk = (V * (w * scale)).to(k.dtype) if V is not None and ctx.needs_input_grad[1] else None
        return dq, dk, d_extra, dscale, dbias, None


@_dispatch.register("siglip", "tiled")
def siglip_tiled(q, k, scale, bias, *, targets, pos_mask, extra_negatives, neg_mask, reduction, tile_size=None):
    """SigLIP without the (N, M) logits; ``tile_size``: int or (rows, cols)."""
    spec = SigmoidSpec(pairs_for(q, targets, pos_mask, neg_mask), reduction,
                       resolve_tile(tile_size, q.device))
    return SigmoidContrastive.apply(q, k, extra_negatives, scale, bias, spec), None
