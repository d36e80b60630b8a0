"""Tiled NT-Xent: ``impl="tiled"`` of :func:`batchlab.losses.nt_xent`.

The V*N embeddings are both the queries and the keys of a one-way InfoNCE whose
positives share an example index (other views) and whose diagonal (self) is removed;
the same tensor enters as ``q`` and ``k``, so autograd adds the two gradients.
"""

from __future__ import annotations

import torch

from batchlab.losses import _dispatch
from batchlab.losses._common import LSE
from batchlab.losses.nt_xent import reduce_views
from batchlab.losses.tiled.engine import Pairs, resolve_tile
from batchlab.losses.tiled.softmax import LSESpec, run_lse


@_dispatch.register("nt_xent", "tiled")
def nt_xent_tiled(views, scale, *, reduction, tile_size=None):
    """NT-Xent over (V, N, d) views without the (VN, VN) logits."""
    v, n, d = views.shape
    z = views.reshape(v * n, d)
    example = torch.arange(v * n, device=views.device) % n
    spec = LSESpec(
        pairs=Pairs(row_labels=example, col_labels=example, exclude_self=True),
        symmetric=False, reduction="none", tile=resolve_tile(tile_size, views.device),
    )
    per_anchor, lse, _ = run_lse(z, z, None, scale, spec)
    return reduce_views(per_anchor, v, n, reduction), LSE(lse, None)
