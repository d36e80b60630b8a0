"""The recipes' head for losses with per-example state: SogCLR and iSogCLR.

:class:`~batchlab.recipes._loop.ContrastiveHead` computes a loss from the batch's
embeddings alone; SogCLR/iSogCLR also need the batch's dataset ids (to read and update
each example's moving-average denominator and temperature). :class:`GlobalContrastiveHead`
has the head's call (``head(q, k, neg_mask)``, ``head.scale()``) and learns the ids from
the recipe's ``encode(indices)``, which the training loop calls with the batch's indices
right before the loss (after JEST/CoLM chose them). Its state is a buffer of the head, so
checkpoints save it and ``resume`` restores it.

>>> head = global_contrastive_head("isogclr", num_examples=100)
>>> encode = head.track(lambda indices: (q_of(indices), k_of(indices)))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from batchlab.errors import BatchlabInputError
from batchlab.losses.sogclr import SogCLRLoss

GLOBAL_LOSSES = ("sogclr", "isogclr")

#: The recipes' settings (symmetric query <-> document, each side its own u and tau). LibAUC's
#: bimodal defaults start at tau = 0.01 for CLIP at scale; a tiny model trained from scratch
#: starts nearer CLIP's 0.07, so the recipes start at 0.05 and let iSogCLR move within
#: [0.01, 0.1]. rho = 6 is LibAUC's bimodal radius (a KL budget; log of 5.6k pairs is 8.6).
RECIPE_OPTIONS = {"mode": "symmetric", "tau": 0.05}
RECIPE_ISOGCLR_OPTIONS = {"tau_min": 0.01, "tau_max": 0.1, "rho": 6.0}


def global_contrastive_head(loss: Any, num_examples: int, *, impl: str = "auto") -> "GlobalContrastiveHead | None":
    """The head for ``loss`` when it is ``"sogclr"``, ``"isogclr"`` or a :class:`SogCLRLoss`; else None."""
    if isinstance(loss, SogCLRLoss):
        if loss.num_examples != num_examples:
            raise BatchlabInputError(
                f"the SogCLR loss holds state for {loss.num_examples} examples but the training set has {num_examples}"
            )
        return GlobalContrastiveHead(loss)
    if not isinstance(loss, str) or loss not in GLOBAL_LOSSES:
        return None
    isogclr = loss == "isogclr"
    options = {**RECIPE_OPTIONS, **(RECIPE_ISOGCLR_OPTIONS if isogclr else {})}
    return GlobalContrastiveHead(SogCLRLoss(num_examples, isogclr=isogclr, impl=impl, **options))


class GlobalContrastiveHead(nn.Module):
    """``ContrastiveHead``'s call around a :class:`~batchlab.losses.SogCLRLoss` (no learnable scale)."""

    def __init__(self, loss_fn: SogCLRLoss) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self._ids: torch.Tensor | None = None

    def track(self, encode: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
        """Wrap the recipe's ``encode(indices)`` so that the head knows the batch's ids."""

        def tracked(indices: torch.Tensor):
            self._ids = torch.as_tensor(indices, dtype=torch.long)
            return encode(indices)

        return tracked

    def scale(self) -> torch.Tensor:
        """``1 / tau`` (the initial temperature): the logit scale a selector scores the batch with."""
        return torch.tensor(1.0 / self.loss_fn.tau_init)

    def forward(self, q: torch.Tensor, k: torch.Tensor, neg_mask: Any = None) -> torch.Tensor:
        if self._ids is None or self._ids.shape[0] != q.shape[0]:
            raise BatchlabInputError(
                "SogCLR needs the batch's dataset ids: wrap the recipe's encode with head.track(encode) "
                "(the embedding cache, which encodes without it, is not supported)"
            )
        return self.loss_fn(q, k, self._ids, neg_mask=neg_mask)
