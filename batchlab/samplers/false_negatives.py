"""Guided false-negative masking (GISTEmbed, Solatorio 2024, arXiv 2402.16829).

A guide model (often a larger, frozen encoder) embeds the batch too. For query ``i``
with positive key ``t_i``, any other key ``j`` that the guide scores *higher than the
positive* (minus a margin) is probably a false negative, and is removed from query
``i``'s denominator:

* ``strategy="absolute"``: mask ``j`` when ``g(i, j) > g(i, t_i) - margin``;
* ``strategy="relative"``: mask ``j`` when ``g(i, j) > g(i, t_i) - margin * |g(i, t_i)|``.
  For a positive guide score this equals sentence-transformers' ``g_pos * (1 - margin)``;
  with ``|.|`` the threshold stays *below* the positive score when that score is
  negative (the same sign convention as :func:`~batchlab.samplers.mine_hard_negatives`).

``g`` is the cosine similarity of the guide embeddings. The true positive ``t_i`` is
never masked (the losses reject a mask that removes a positive), whatever the margin.
A score within float32 rounding above the threshold (``16 sqrt(d) 2^-24``) counts as
equal to it: a key that duplicates the positive scores exactly the positive's score, but a
tile's matrix product and the positive's dot product round differently, so without this the
duplicate was masked or not by the tile's shape; now never (at margin 0), in every tile.

The result is a :class:`GuidedNegativeMask`, a callable ``fn(rows, cols) -> BoolTensor``
over *global* batch indices, which is one of the ``neg_mask`` forms every batchlab loss
accepts: the tiled engine asks for one tile at a time, so no ``N x M`` tensor is built.
``materialize()`` gives the dense mask for small batches.

Example
-------
>>> import torch, torch.nn.functional as F
>>> from batchlab.losses import info_nce
>>> g = torch.Generator().manual_seed(0)
>>> q, k = F.normalize(torch.randn(6, 8, generator=g), dim=1), F.normalize(torch.randn(6, 8, generator=g), dim=1)
>>> guide = F.normalize(torch.randn(6, 4, generator=g), dim=1)
>>> mask = guided_negative_mask(guide, guide, margin=0.1)
>>> mask.materialize().diagonal().any().item()   # positives are protected
False
>>> loss = info_nce(q, k, 10.0, symmetric=False, neg_mask=mask)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from batchlab._checks import check_choice, check_embeddings
from batchlab.errors import BatchlabInputError

STRATEGIES = ("absolute", "relative")


class GuidedNegativeMask:
    """Callable negative mask from guide embeddings (see the module docs).

    Parameters
    ----------
    guide_q : (N, d) guide embeddings of the queries (normalised here).
    guide_k : (M, d) guide embeddings of the keys.
    margin : float; ``>= 0`` for ``"relative"``.
    strategy : ``"absolute"`` | ``"relative"``.
    targets : (N,) int, index of each query's positive key; default ``arange(N)``.

    Calling ``mask(rows, cols)`` with LongTensors of global indices returns the
    ``(len(rows), len(cols))`` bool tile (True = remove from the denominator), on
    ``rows.device``; the guide tensors are moved there once and cached.
    """

    def __init__(self, guide_q: torch.Tensor, guide_k: torch.Tensor, *, margin: float = 0.0,
                 strategy: str = "absolute", targets: Any = None) -> None:
        check_embeddings("guide_q", guide_q)
        check_embeddings("guide_k", guide_k)
        check_choice("strategy", strategy, STRATEGIES)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise BatchlabInputError(f"margin must be a finite number, got {margin!r}")
        if strategy == "relative" and margin < 0:
            raise BatchlabInputError(f"a relative margin is a fraction >= 0, got {margin}")
        if guide_q.shape[1] != guide_k.shape[1]:
            raise BatchlabInputError(
                f"guide_q and guide_k must have the same dimension, got {tuple(guide_q.shape)} and {tuple(guide_k.shape)}"
            )
        n, m = guide_q.shape[0], guide_k.shape[0]
        if targets is None:
            if m < n:
                raise BatchlabInputError(f"without targets, query i's positive is key i, so need M >= N (got N={n}, M={m})")
            targets = torch.arange(n, device=guide_q.device)
        targets = torch.as_tensor(targets, device=guide_q.device)
        if targets.dtype not in (torch.int64, torch.int32) or tuple(targets.shape) != (n,):
            raise BatchlabInputError(f"targets must be an integer tensor of shape ({n},), got {targets.dtype} {tuple(targets.shape)}")
        if n and (int(targets.min()) < 0 or int(targets.max()) >= m):
            raise BatchlabInputError(f"targets must index keys in [0, {m})")
        self.margin, self.strategy = float(margin), strategy
        self.shape = (n, m)
        gq = torch.nn.functional.normalize(guide_q.detach().float(), dim=1)
        gk = torch.nn.functional.normalize(guide_k.detach().float(), dim=1)
        self.targets = targets.long()
        pos = (gq * gk[self.targets]).sum(1)
        self.positive_scores = pos
        threshold = pos - self.margin if strategy == "absolute" else pos - self.margin * pos.abs()
        # float32 rounding of a d-term dot product of unit vectors (see the module doc)
        self.threshold = threshold + 16 * math.sqrt(gq.shape[1]) * 2.0**-24
        self._tensors = {gq.device: (gq, gk, self.targets, self.threshold)}

    def _on(self, device: torch.device):
        if device not in self._tensors:
            self._tensors[device] = tuple(t.to(device) for t in next(iter(self._tensors.values())))
        return self._tensors[device]

    def __call__(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        gq, gk, targets, threshold = self._on(rows.device)
        cols = cols.to(rows.device)
        tile = (gq[rows] @ gk[cols].T) > threshold[rows, None]
        # never remove the true positive, even when the margin puts it above the threshold
        return tile & (cols[None, :] != targets[rows, None])

    def materialize(self, block: int = 4096) -> torch.Tensor:
        """The dense ``(N, M)`` bool mask (for small batches and the reference losses)."""
        n, m = self.shape
        device = next(iter(self._tensors))
        cols = torch.arange(m, device=device)
        parts = [self(torch.arange(r0, min(n, r0 + block), device=device), cols) for r0 in range(0, n, block)]
        return torch.cat(parts) if parts else torch.zeros(0, m, dtype=torch.bool, device=device)

    def count(self, block: int = 4096) -> int:
        """Number of masked (query, key) pairs, computed tile by tile (no N x M tensor)."""
        n, m = self.shape
        device = next(iter(self._tensors))
        total = 0
        for r0 in range(0, n, block):
            rows = torch.arange(r0, min(n, r0 + block), device=device)
            for c0 in range(0, m, block):
                total += int(self(rows, torch.arange(c0, min(m, c0 + block), device=device)).sum())
        return total

    def __repr__(self) -> str:
        return f"GuidedNegativeMask(N={self.shape[0]}, M={self.shape[1]}, margin={self.margin}, strategy={self.strategy!r})"


def guided_negative_mask(guide_q: torch.Tensor, guide_k: torch.Tensor, *, margin: float = 0.0,
                         strategy: str = "absolute", targets: Any = None) -> GuidedNegativeMask:
    """GISTEmbed false-negative mask from guide embeddings; pass it as ``neg_mask=`` to a loss.

    Parameters
    ----------
    guide_q : (N, d) guide-model embeddings of the queries of the batch.
    guide_k : (M, d) guide-model embeddings of the keys (global batch, under distributed).
    margin : how far below the positive's guide score a key may be and still be masked.
    strategy : ``"absolute"`` (``g > g_pos - margin``) or ``"relative"``
        (``g > g_pos - margin * |g_pos|``).
    targets : (N,) positive key index per query; default ``arange(N)``.

    Returns
    -------
    GuidedNegativeMask : callable ``fn(rows, cols) -> BoolTensor``; ``.materialize()`` for
    the dense ``(N, M)`` mask, ``.count()`` for the number of masked pairs.
    """
    return GuidedNegativeMask(guide_q, guide_k, margin=margin, strategy=strategy, targets=targets)
