"""The fine-tuning recipe's loss of one batch: MNRL / MNSRL, one-way DCL, SogCLR / iSogCLR, MoCHi, CoLM weights.

:func:`make_batch_loss` returns ``batch_loss(q, keys, mask, ids, weights, generator)``: ``q`` the batch's
``(N, d)`` normalised queries, ``keys`` its ``(N + N * m, d)`` normalised documents then mined negatives,
``mask`` the guide's ``(N, N + N * m)`` negative mask or None, ``ids`` the pairs' ``(N,)`` dataset indices
(the global losses' state), ``weights`` CoLM's ``(N,)`` per-query weights or None, and MoCHi's generator;
plus the SogCLR / iSogCLR module holding the per-example state (None for the other losses).

Example
-------
>>> import torch, torch.nn.functional as F
>>> from batchlab.recipes.batch_losses import make_batch_loss
>>> batch_loss, state = make_batch_loss("mnrl", scale=20.0, num_examples=8)
>>> q, k = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
>>> batch_loss(q, k, None, torch.arange(4), None, None).shape, state
(torch.Size([]), None)
"""

from __future__ import annotations

from typing import Any

import torch

from batchlab.errors import BatchlabInputError
from batchlab.samplers.mixing import check_mix_options

LOSSES = ("mnrl", "mnsrl", "dcl", "sogclr", "isogclr")
#: ``loss_options`` of the global losses: ``gamma`` (weight of the new batch in u's moving average; 1: none)
#: and ``rescale`` (multiply the loss by ``scale`` = 1 / tau, so that its gradient is DCL's, not tau times it)
GLOBAL_LOSS_OPTIONS = ("gamma", "rescale")
#: MoCHi (Kalantidis et al. 2020) scaled to a batch: mix the 16 hardest of a query's in-batch negatives into
#: 16 synthetic negatives, plus 8 mixes of the query itself with one of them (query weight below 0.5).
#: The paper's ImageNet settings (N=1024, s=1024, s'=256 from a 16k queue) shrink with the 63 negatives here.
MOCHI_DEFAULTS = {"num_hardest": 16, "num_synthetic": 16, "mix_query": 8, "query_weight_max": 0.5}


def _mochi_options(mochi) -> dict[str, Any] | None:
    if mochi is None or mochi is False:
        return None
    if mochi is True:
        return dict(MOCHI_DEFAULTS)
    if not isinstance(mochi, dict):
        raise BatchlabInputError(f"mochi must be None, True or a dict of {sorted(MOCHI_DEFAULTS)}, got {type(mochi).__name__}")
    unknown = sorted(set(mochi) - set(MOCHI_DEFAULTS))
    if unknown:
        raise BatchlabInputError(f"mochi got unknown option(s) {unknown}; it takes {sorted(MOCHI_DEFAULTS)}")
    options = {**MOCHI_DEFAULTS, **mochi}
    # mix_hard_negatives' ranges, checked here so that a bad value is refused before any model loads
    check_mix_options(options["num_hardest"], options["num_synthetic"], options["mix_query"],
                      options["query_weight_max"], owner="mochi's ")
    if options["num_synthetic"] == 0 and options["mix_query"] == 0:
        raise BatchlabInputError("mochi with num_synthetic=0 and mix_query=0 synthesises no negative; leave one above 0")
    return options


def mochi_negatives(q: torch.Tensor, keys: torch.Tensor, options: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """MoCHi's synthetic negatives ``(N, s + s', d)`` for a batch: each query mixes its hardest keys other
    than its own positive (key ``i`` for query ``i``; keys past ``N`` are mined negatives), detached.

    The same as :func:`~batchlab.samplers.mixing.mix_hard_negatives` with the keys as a shared bank
    and ``targets=arange(N)`` (tested), through its per-query form, which reads nothing back to the host.
    """
    from batchlab.samplers.mixing import mix_hard_negatives

    n, m = q.shape[0], keys.shape[0]
    cols = torch.arange(m - 1, device=keys.device)
    others = cols[None, :] + (cols[None, :] >= torch.arange(n, device=keys.device)[:, None]).long()  # (N, M-1), no positive
    return mix_hard_negatives(q, keys.detach()[others], generator=generator, **options)


def _loss_options(loss: str, loss_options) -> dict[str, Any]:
    if loss_options is None:
        return {}
    if not isinstance(loss_options, dict):
        raise BatchlabInputError(f"loss_options must be None or a dict, got {type(loss_options).__name__}")
    if loss_options and loss not in ("sogclr", "isogclr"):
        raise BatchlabInputError(f"loss_options {sorted(loss_options)} apply to loss='sogclr' or 'isogclr' only, not {loss!r}")
    unknown = sorted(set(loss_options) - set(GLOBAL_LOSS_OPTIONS))
    if unknown:
        raise BatchlabInputError(f"loss_options got unknown key(s) {unknown}; it takes {list(GLOBAL_LOSS_OPTIONS)}")
    if not isinstance(loss_options.get("rescale", False), bool):
        raise BatchlabInputError(f"loss_options['rescale'] must be True or False, got {loss_options['rescale']!r}")
    return dict(loss_options)


def make_batch_loss(loss: str, *, scale: float, num_examples: int, loss_options: dict[str, Any] | None = None,
                    mochi: Any = None, device: str | torch.device = "cpu"):
    """The recipe's loss of one batch, as :func:`finetune` computes it: ``(batch_loss, global_loss)``.

    ``batch_loss(q, keys, mask, ids, weights, generator)`` takes the batch's normalised query and key
    embeddings (keys past ``N`` are mined negatives), the guide's negative mask (or None), the pairs'
    dataset indices (the global losses' state), per-query weights (or None) and MoCHi's generator;
    ``global_loss`` is the SogCLR / iSogCLR module holding the per-example state (None for the others).
    ``"dcl"`` is one-way DCL (InfoNCE without the positive in the denominator) at the same scale.
    """
    from batchlab.losses import dcl, info_nce

    options = _loss_options(loss, loss_options)
    mochi_options = _mochi_options(mochi)
    global_loss = None
    factor = 1.0
    if loss in ("sogclr", "isogclr"):  # one-way SogCLR / iSogCLR at MNRL's temperature (1 / scale); state by dataset id
        from batchlab.losses.sogclr import SogCLRLoss
        from batchlab.recipes.global_loss import RECIPE_ISOGCLR_OPTIONS

        extra = dict(RECIPE_ISOGCLR_OPTIONS) if loss == "isogclr" else {}
        if extra:
            extra["tau_min"] = min(extra["tau_min"], 1.0 / scale)
            extra["tau_max"] = max(extra["tau_max"], 1.0 / scale)
        if "gamma" in options:
            extra["gamma"] = options["gamma"]
        factor = float(scale) if options.get("rescale") else 1.0
        global_loss = SogCLRLoss(int(num_examples), mode="one_way", tau=1.0 / scale, isogclr=loss == "isogclr",
                                 **extra).to(device)

    def batch_loss(q: torch.Tensor, keys: torch.Tensor, mask, ids: torch.Tensor, weights, generator) -> torch.Tensor:
        if global_loss is not None:
            value = global_loss(q, keys, ids.to(q.device), neg_mask=mask)
            return value * factor if factor != 1.0 else value
        extra = mochi_negatives(q, keys, mochi_options, generator) if mochi_options else None
        if loss == "dcl":
            fn = lambda **kw: dcl(q, keys, scale, symmetric=False, neg_mask=mask, extra_negatives=extra, **kw)  # noqa: E731
        else:
            fn = lambda **kw: info_nce(q, keys, scale, symmetric=loss == "mnsrl", neg_mask=mask,  # noqa: E731
                                       extra_negatives=extra, **kw)
        if weights is None:
            return fn()
        return (fn(reduction="none") * weights).mean()

    return batch_loss, global_loss
