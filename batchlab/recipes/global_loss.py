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
#: bimodal defaults (tau 0.01, rho 6) are for CLIP at scale; a tiny text model trained from
#: scratch starts at CLIP's 0.07 (where ContrastiveHead starts too), and rho is LibAUC's
#: unimodal 0.3. On a first visit d loss / d tau_i = rho - KL(P_i || uniform) over the batch's
#: negatives, so rho above log(batch - 1) drives every tau to tau_min. Measured on codesearch
#: (2,000 pairs, batch 64, 3 epochs, CPU, seed 0; recall@1 / MRR): InfoNCE 0.084 / 0.152;
#: SogCLR tau 0.07: 0.080 / 0.153 (tau 0.05: 0.060 / 0.113); iSogCLR rho 0.3 in [0.02, 0.2]:
#: 0.078 / 0.151 (tau median 0.096); rho 1.0: 0.076 / 0.150; LibAUC-like rho 6 in [0.01, 0.1]:
#: 0.052 / 0.095 (every tau at 0.01). One seed: differences of 0.005 are noise.
RECIPE_OPTIONS = {"mode": "symmetric", "tau": 0.07}
RECIPE_ISOGCLR_OPTIONS = {"tau_min": 0.02, "tau_max": 0.2, "rho": 0.3}


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
