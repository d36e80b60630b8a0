"""Decoupled contrastive learning (DCL) and its weighted variant (DCLW).

DCL (Yeh et al., 2022) removes the positive from InfoNCE's denominator:

    loss_i = -w_i * mean_{p in P_i} L_ip  +  logsumexp_{j not in P_i} L_ij

with ``L = s * q @ k.T``. Plain DCL has ``w_i = 1``. DCLW weights the positive term by
the von Mises-Fisher weighting ``w_i = 2 - N * softmax_i(c_i / sigma)``, where
``c_i`` is the cosine similarity of query i to its positive(s) (the mean when there
are several) and the softmax runs over the batch. The weights are treated as
constants (no gradient flows through them), as in lightly's ``DCLWLoss``.
The symmetric loss averages the query->key and key->query directions.
"""

from __future__ import annotations

import math

import torch

from batchlab.errors import BatchlabInputError
from batchlab.losses import _dispatch
from batchlab.losses._common import (
    LSE,
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
from batchlab.losses.infonce import check_no_masked_positive, materialize_neg_mask, reduce_loss


def dcl(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    weighted: bool = False,
    sigma: float = 0.5,
    symmetric: bool = True,
    targets: torch.Tensor | None = None,
    pos_mask: torch.Tensor | None = None,
    extra_negatives: torch.Tensor | None = None,
    neg_mask: NegMask = None,
    reduction: str = "mean",
    return_lse: bool = False,
    normalize: bool = False,
    impl: str = "auto",
    distributed: str = "none",
    group=None,
    check_inputs: bool | None = None,
    **impl_options,
):
    """Decoupled contrastive loss (DCL), or DCLW with ``weighted=True``.

    This is the two-tower form: query i's negatives are the other keys (N-1). lightly's
    ``DCLLoss``/``DCLWLoss`` are SimCLR's form (both views, 2N-2 negatives) and take a
    temperature: :mod:`batchlab.compat.lightly` reproduces them on this function.

    Parameters are those of :func:`~batchlab.losses.info_nce`, plus ``weighted`` (DCLW)
    and ``sigma`` (its temperature, default 0.5 as in the paper). Each query needs at
    least one negative: N=1 without ``extra_negatives`` is refused, and so is the symmetric
    loss of one pair (a key has no negative: extra negatives belong to the queries). With the
    data checks on, so is a ``neg_mask`` / ``pos_mask`` that leaves a query or a key none.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> q, k = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
    >>> dcl(q, k, 10.0, weighted=True).shape
    torch.Size([])
    """
    check_options(reduction, impl, distributed, weighted=weighted, symmetric=symmetric, return_lse=return_lse,
                  normalize=normalize)
    if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and 0 < sigma < math.inf):
        raise BatchlabInputError(f"sigma (DCLW's temperature) must be a finite positive number, got {sigma!r}")
    check = checks_for(q, check_inputs)
    q, k = prepare_pair(q, k, normalize=normalize, check=check)
    scale = prepare_scalar("logit_scale", logit_scale, q, check=check)
    extra_negatives = check_extra_negatives(extra_negatives, q, check=check, normalize=normalize)
    options = dict(weighted=weighted, sigma=float(sigma), symmetric=symmetric, targets=targets,
                   pos_mask=pos_mask, extra_negatives=extra_negatives, neg_mask=neg_mask, reduction=reduction)
    if use_distributed(distributed, group):
        _dispatch.check_known_options("dcl", impl_options)  # the strategies pass them on unread
        return run_distributed("dcl", distributed, group, q, k, scale, return_lse=return_lse, impl=impl,
                               **options, **impl_options)
    n, m = q.shape[0], k.shape[0]
    if symmetric and n != m:
        raise BatchlabInputError(
            f"the symmetric loss needs as many keys as queries, got {n} and {m}; pass symmetric=False"
        )
    has_extra = extra_negatives is not None and extra_negatives.shape[1] > 0
    if m < 2 and not has_extra:
        raise BatchlabInputError(
            "DCL removes the positive from the denominator, so each query needs at least one negative; "
            f"got {m} key(s) and no extra_negatives"
        )
    if symmetric and n < 2:
        raise BatchlabInputError(
            "the symmetric DCL's key->query direction removes each key's positive, so with 1 pair a key has no "
            "negative (extra_negatives belong to the queries only); pass symmetric=False, or at least 2 pairs"
        )
    options["targets"], options["pos_mask"] = prepare_positives(
        n, m, q.device, targets=targets, pos_mask=pos_mask, need_columns=symmetric, check=check
    )
    options["neg_mask"] = check_neg_mask(neg_mask, n, m, q.device, check=check)
    fn = _dispatch.resolve("dcl", impl, n, m, q.device, q.dtype)
    loss, lse = fn(q, k, scale, **options, **_dispatch.accepted_options(fn, impl_options, impl))
    if check:  # a neg_mask or pos_mask can leave a query (or a key) no negative: its loss would be -inf
        check_has_negatives(lse.row)
        if lse.col is not None:
            check_has_negatives(lse.col, "key(s)")
    return (loss, lse) if return_lse else loss


def check_has_negatives(lse: torch.Tensor, what: str = "query(ies)") -> None:
    """A query (or, symmetric, a key) whose negatives were all masked has an empty denominator (loss -inf)."""
    empty = torch.isneginf(lse).nonzero().flatten()
    if empty.numel():
        fix = "" if what == "query(ies)" else " (the symmetric loss's key->query direction); pass symmetric=False"
        raise BatchlabInputError(
            f"{empty.numel()} {what} have no negative left after neg_mask / pos_mask (first: {int(empty[0])}); "
            f"DCL needs at least one negative per {what.split('(')[0]}{fix}"
        )


def dclw_weights(positive_cosine: torch.Tensor, sigma: float) -> torch.Tensor:
    """DCLW's weights ``2 - N * softmax(c / sigma)`` for (N,) positive cosines, without gradient."""
    c = positive_cosine.detach()
    return 2 - c.shape[0] * torch.softmax(c / sigma, dim=0)


@_dispatch.register("dcl", "reference")
def dcl_reference(q, k, scale, *, weighted, sigma, symmetric, targets, pos_mask, extra_negatives, neg_mask,
                  reduction):
    """Exact DCL/DCLW over the materialised (N, M) logits."""
    dtype = compute_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    cos = q.to(dtype) @ k.to(dtype).T
    logits = scale * cos
    pos = positive_mask(n, m, q.device, targets, pos_mask)
    neg = materialize_neg_mask(neg_mask, n, m, q.device)
    check_no_masked_positive(pos, neg)
    removed = pos if neg is None else pos | neg
    denom = logits.masked_fill(removed, float("-inf"))
    pos_f = pos.to(dtype)
    row_pos = (logits * pos_f).sum(1) / pos_f.sum(1)
    row_terms = denom
    if extra_negatives is not None and extra_negatives.shape[1]:
        extra = scale * torch.einsum("nd,nmd->nm", q.to(dtype), extra_negatives.to(dtype))
        row_terms = torch.cat([denom, extra], dim=1)
    row_lse = torch.logsumexp(row_terms, dim=1)
    w_row = dclw_weights((cos * pos_f).sum(1) / pos_f.sum(1), sigma) if weighted else 1.0
    row_loss = row_lse - w_row * row_pos
    col_loss = col_lse = None
    if symmetric:
        col_pos = (logits * pos_f).sum(0) / pos_f.sum(0)
        col_lse = torch.logsumexp(denom, dim=0)
        w_col = dclw_weights((cos * pos_f).sum(0) / pos_f.sum(0), sigma) if weighted else 1.0
        col_loss = col_lse - w_col * col_pos
    return reduce_loss(row_loss, col_loss, reduction), LSE(row_lse, col_lse)
