"""Tiled InfoNCE / CLIP: ``impl="tiled"`` of :func:`batchlab.losses.info_nce`."""

from __future__ import annotations

from batchlab.losses import _dispatch
from batchlab.losses._common import LSE
from batchlab.losses.tiled.engine import pairs_for, resolve_tile
from batchlab.losses.tiled.softmax import LSESpec, run_lse


@_dispatch.register("info_nce", "tiled")
def info_nce_tiled(q, k, scale, *, symmetric, targets, pos_mask, extra_negatives, neg_mask, reduction,
                   tile_size=None):
    """InfoNCE without the (N, M) logits; ``tile_size``: int or (rows, cols), default per device."""
    spec = LSESpec(
        pairs=pairs_for(q, targets, pos_mask, neg_mask),
        symmetric=symmetric, reduction=reduction, tile=resolve_tile(tile_size, q.device),
    )
    loss, row_lse, col_lse = run_lse(q, k, extra_negatives, scale, spec)
    return loss, LSE(row_lse, col_lse)
