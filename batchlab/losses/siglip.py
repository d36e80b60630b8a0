"""SigLIP: the pairwise sigmoid loss.

With logits ``L = s * q @ k.T + b`` and labels ``y_ij = +1`` for positives and ``-1``
otherwise, the loss is ``-sum_ij log sigmoid(y_ij L_ij) / N`` (open_clip's
``SigLipLoss`` normalises by the number of queries N). Every pair is an independent
term, so there is no normaliser: tiles need no log-sum-exp statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchlab.losses import _dispatch
from batchlab.losses._common import (
    NegMask,
    check_extra_negatives,
    check_neg_mask,
    check_options,
    checks_for,
    compute_dtype,
    positive_mask,
    prepare_pair,
    prepare_positives,
    prepare_scalar,
)
from batchlab.losses._distributed_hook import run_distributed, use_distributed
from batchlab.losses.infonce import check_no_masked_positive, materialize_neg_mask


def siglip(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    targets: torch.Tensor | None = None,
    pos_mask: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
    neg_mask: NegMask = None,
    reduction: str = "mean",
    normalize: bool = False,
    impl: str = "auto",
    distributed: str = "none",
    group=None,
    check_inputs: bool | None = None,
    **impl_options,
):
    """Pairwise sigmoid loss (SigLIP) with learnable scale and bias.

    Parameters
    ----------
    q, k : Tensor (N, d), (M, d)
        L2-normalised embeddings.
    logit_scale, logit_bias : Tensor () or float
        ``s`` and ``b`` in ``s * q @ k.T + b``; tensors receive gradients.
    targets, pos_mask :
        Positives as in :func:`~batchlab.losses.info_nce` (default: the diagonal).
    extra_negatives : Tensor (N, m, d), optional
        Extra negatives per query, each one more ``y = -1`` term of that query.
    neg_mask :
        Pairs left out of the loss (known false negatives), in the forms ``info_nce`` accepts.
    reduction : "mean" | "sum" | "none"
        ``mean`` = total / N (open_clip's convention); ``none`` = per-query sums (N,).
    normalize, impl, distributed, check_inputs :
        As in :func:`~batchlab.losses.info_nce`.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> q, k = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
    >>> siglip(q, k, torch.tensor(10.0), torch.tensor(-10.0)).shape
    torch.Size([])
    """
    check_options(reduction, impl, distributed, normalize=normalize)
    check = checks_for(q, check_inputs)
    q, k = prepare_pair(q, k, normalize=normalize, check=check)
    scale = prepare_scalar("logit_scale", logit_scale, q, check=check)
    bias = prepare_scalar("logit_bias", logit_bias, q, check=check)
    extra_negatives = check_extra_negatives(extra_negatives, q, check=check, normalize=normalize)
    if use_distributed(distributed, group):
        _dispatch.check_known_options("siglip", impl_options)  # the strategies pass them on unread
        return run_distributed(
            "siglip", distributed, group, q, k, scale, bias, targets=targets, pos_mask=pos_mask,
            extra_negatives=extra_negatives, neg_mask=neg_mask, reduction=reduction, impl=impl, **impl_options,
        )
    n, m = q.shape[0], k.shape[0]
    targets, pos_mask = prepare_positives(n, m, q.device, targets=targets, pos_mask=pos_mask, need_columns=False,
                                          check=check)
    neg_mask = check_neg_mask(neg_mask, n, m, q.device, check=check)
    fn = _dispatch.resolve("siglip", impl, n, m, q.device, q.dtype)
    loss, _ = fn(q, k, scale, bias, targets=targets, pos_mask=pos_mask, extra_negatives=extra_negatives,
                 neg_mask=neg_mask, reduction=reduction, **_dispatch.accepted_options(fn, impl_options, impl))
    return loss


def reduce_siglip(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    n = per_row.shape[0]
    return {"mean": lambda: per_row.sum() / n, "sum": per_row.sum, "none": lambda: per_row}[reduction]()


@_dispatch.register("siglip", "reference")
def siglip_reference(q, k, scale, bias, *, targets, pos_mask, extra_negatives, neg_mask, reduction):
    """Exact SigLIP over the materialised (N, M) logits."""
    dtype = compute_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    logits = scale * (q.to(dtype) @ k.to(dtype).T) + bias
    pos = positive_mask(n, m, q.device, targets, pos_mask)
    neg = materialize_neg_mask(neg_mask, n, m, q.device)
    check_no_masked_positive(pos, neg)
    labels = pos.to(dtype) * 2 - 1
    terms = -F.logsigmoid(labels * logits)
    if neg is not None:
        terms = terms.masked_fill(neg, 0.0)
    per_row = terms.sum(1)
    if extra_negatives is not None and extra_negatives.shape[1]:
        extra = scale * torch.einsum("nd,nmd->nm", q.to(dtype), extra_negatives.to(dtype)) + bias
        per_row = per_row + (-F.logsigmoid(-extra)).sum(1)
    return reduce_siglip(per_row, reduction), None
