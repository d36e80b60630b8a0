"""InfoNCE and the symmetric CLIP loss.

For queries ``q`` (N, d) and keys ``k`` (M, d) with unit rows and a scale ``s``
(``logit_scale``, the multiplier itself, as in open_clip), the logits are
``L = s * q @ k.T``. Query i's loss is

    loss_i = logsumexp_j L_ij  -  mean_{p in P_i} L_ip

where the log-sum-exp runs over every key not removed by ``neg_mask`` plus the
query's ``extra_negatives``, and ``P_i`` is its set of positives (``targets[i]``,
or the True entries of ``pos_mask[i]``; several positives as in poly-view / SupCon
"L_out"). The symmetric (CLIP) loss adds the same per key over the columns (extra
negatives belong to rows only) and averages the two directions.
"""

from __future__ import annotations

import torch

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
from batchlab.errors import BatchlabInputError


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
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
    """InfoNCE, one-way or symmetric (CLIP).

    Where open_clip's ``ClipLoss`` differs (any-norm features; ``gather_with_grad=False``
    keeps one rank's gradient once instead of batchlab's W times; ``local_loss``), use
    :class:`batchlab.compat.open_clip.ClipLoss`, which reproduces it on this function.

    Parameters
    ----------
    q, k : Tensor (N, d), (M, d)
        L2-normalised queries and keys (image and text features). Same device and dtype
        (fp32, bf16, fp16 or fp64); the loss accumulates in fp32 (fp64 for fp64).
    logit_scale : Tensor () or float
        The multiplier ``s`` in ``s * q @ k.T`` (open_clip's ``logit_scale.exp()``); a
        tensor receives a gradient.
    symmetric : bool
        Average the query->key and key->query losses (CLIP). Needs a positive for every key.
    targets : LongTensor (N,), optional
        Index of each query's positive key. Default ``arange(N)``.
    pos_mask : BoolTensor (N, M), optional
        Several positives per query (instead of ``targets``).
    extra_negatives : Tensor (N, m, d), optional
        Extra (hard) negatives per query, added to that query's denominator only.
    neg_mask : BoolTensor (N, M) | LongTensor (P, 2) | callable, optional
        Keys removed from a query's denominator (known false negatives). A callable
        ``fn(rows, cols) -> BoolTensor`` lets the tiled engine ask per tile.
    reduction : "mean" | "sum" | "none"
        ``"none"`` returns (N,) per-query losses; symmetric: ``(row_i + col_i) / 2``.
    return_lse : bool
        Also return :class:`~batchlab.losses.LSE` (row and column log-sum-exp).
    normalize : bool
        L2-normalise ``q``, ``k`` and ``extra_negatives`` first (zero rows are refused when the data checks run);
        otherwise every row is checked to have unit norm when the data checks run.
    impl : "auto" | "reference" | "tiled" | "triton"
        ``auto``: Triton on CUDA when available (small batches: one cuBLAS product and fused
        kernels; large: the streaming kernels), else tiled above 2048 x 2048 logits
        (``batchlab.losses._dispatch.AUTO_TILED_MIN_LOGITS``), else the reference.
    distributed : "none" | "allgather" | "ring" | "auto"
        Treat ``q``/``k`` as this rank's shard of a global batch (``group``).
    check_inputs : bool, optional
        Run the checks that read values (NaN/Inf, unit rows, index ranges). Default: on
        for CPU tensors, off on CUDA (each check would make the host wait for the GPU);
        the environment variable ``BATCHLAB_CHECK_INPUTS=1`` (or ``0``) overrides the default.
        Shapes, dtypes and devices are always checked. See docs/losses.md.

    Returns
    -------
    Tensor, or (Tensor, LSE) when ``return_lse``.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> q, k = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
    >>> loss = info_nce(q, k, torch.tensor(14.3, requires_grad=True))
    >>> loss.shape
    torch.Size([])
    """
    check_options(reduction, impl, distributed, symmetric=symmetric, return_lse=return_lse, normalize=normalize)
    check = checks_for(q, check_inputs)
    q, k = prepare_pair(q, k, normalize=normalize, check=check)
    scale = prepare_scalar("logit_scale", logit_scale, q, check=check)
    extra_negatives = check_extra_negatives(extra_negatives, q, check=check, normalize=normalize)
    if use_distributed(distributed, group):
        _dispatch.check_known_options("info_nce", impl_options)  # the strategies pass them on unread
        return run_distributed(
            "info_nce", distributed, group, q, k, scale,
            symmetric=symmetric, targets=targets, pos_mask=pos_mask, extra_negatives=extra_negatives,
            neg_mask=neg_mask, reduction=reduction, return_lse=return_lse, impl=impl, **impl_options,
        )
    n, m = q.shape[0], k.shape[0]
    if symmetric and n != m:
        raise BatchlabInputError(
            f"the symmetric loss needs as many keys as queries, got {n} queries and {m} keys; "
            "pass symmetric=False for extra keys"
        )
    targets, pos_mask = prepare_positives(n, m, q.device, targets=targets, pos_mask=pos_mask,
                                          need_columns=symmetric, check=check)
    neg_mask = check_neg_mask(neg_mask, n, m, q.device, check=check)
    fn = _dispatch.resolve("info_nce", impl, n, m, q.device, q.dtype)
    loss, lse = fn(
        q, k, scale, symmetric=symmetric, targets=targets, pos_mask=pos_mask,
        extra_negatives=extra_negatives, neg_mask=neg_mask, reduction=reduction,
        **_dispatch.accepted_options(fn, impl_options, impl),
    )
    return (loss, lse) if return_lse else loss


def materialize_neg_mask(neg_mask: NegMask, n: int, m: int, device: torch.device) -> torch.Tensor | None:
    """The dense (n, m) bool negative mask (reference implementations only)."""
    from batchlab.losses._common import neg_mask_tile

    if neg_mask is None:
        return None
    return neg_mask_tile(neg_mask, torch.arange(n, device=device), torch.arange(m, device=device))


def reduce_loss(per_row: torch.Tensor, per_col: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Combine per-row (and per-column) losses; the symmetric loss averages directions."""
    if per_col is None:
        return {"mean": per_row.mean, "sum": per_row.sum, "none": lambda: per_row}[reduction]()
    if reduction == "none":
        return (per_row + per_col) / 2
    if reduction == "sum":
        return (per_row.sum() + per_col.sum()) / 2
    return (per_row.mean() + per_col.mean()) / 2


def check_no_masked_positive(pos: torch.Tensor, neg: torch.Tensor | None) -> None:
    if neg is not None and bool((pos & neg).any()):
        i, j = (pos & neg).nonzero()[0].tolist()
        raise BatchlabInputError(
            f"neg_mask removes a positive (query {i}, key {j}); a false-negative mask must not cover positives"
        )


@_dispatch.register("info_nce", "reference")
def info_nce_reference(q, k, scale, *, symmetric, targets, pos_mask, extra_negatives, neg_mask, reduction):
    """Exact InfoNCE that materialises the (N, M) logits: the ground truth for every fast path."""
    dtype = compute_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    logits = scale * (q.to(dtype) @ k.to(dtype).T)
    pos = positive_mask(n, m, q.device, targets, pos_mask)
    neg = materialize_neg_mask(neg_mask, n, m, q.device)
    check_no_masked_positive(pos, neg)
    denom = logits if neg is None else logits.masked_fill(neg, float("-inf"))
    row_terms = denom
    if extra_negatives is not None and extra_negatives.shape[1]:
        extra = scale * torch.einsum("nd,nmd->nm", q.to(dtype), extra_negatives.to(dtype))
        row_terms = torch.cat([denom, extra], dim=1)
    pos_f = pos.to(dtype)
    pos_logits = logits * pos_f  # zero where not positive (avoids 0 * -inf)
    row_lse = torch.logsumexp(row_terms, dim=1)
    row_loss = row_lse - pos_logits.sum(1) / pos_f.sum(1)
    col_lse = col_loss = None
    if symmetric:
        col_lse = torch.logsumexp(denom, dim=0)
        col_loss = col_lse - pos_logits.sum(0) / pos_f.sum(0)
    return reduce_loss(row_loss, col_loss, reduction), LSE(row_lse, col_lse)
