"""Tiled DCL / DCLW: ``impl="tiled"`` of :func:`batchlab.losses.dcl`.

The InfoNCE engine with the positives removed from every denominator; DCLW's weights
(``dclw_weights`` of the reference, constants) come from the positive cosines that the
forward pass sums anyway.
"""

from __future__ import annotations

from batchlab.losses import _dispatch
from batchlab.losses._common import LSE
from batchlab.losses.tiled.engine import pairs_for, resolve_tile
from batchlab.losses.tiled.softmax import LSESpec, run_lse


@_dispatch.register("dcl", "tiled")
def dcl_tiled(q, k, scale, *, weighted, sigma, symmetric, targets, pos_mask, extra_negatives, neg_mask,
              reduction, tile_size=None):
    """DCL/DCLW without the (N, M) logits; ``tile_size``: int or (rows, cols)."""
    spec = LSESpec(
        pairs=pairs_for(q, targets, pos_mask, neg_mask),
        symmetric=symmetric, reduction=reduction, tile=resolve_tile(tile_size, q.device),
        exclude_positives=True, weighted=weighted, sigma=sigma,
    )
    loss, row_lse, col_lse = run_lse(q, k, extra_negatives, scale, spec)
    return loss, LSE(row_lse, col_lse)
