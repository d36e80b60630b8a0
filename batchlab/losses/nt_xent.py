"""NT-Xent (SimCLR) with two or more views.

``views`` (V, N, d) holds V augmented views of N examples. All V*N embeddings are
compared with each other (intra- and cross-view negatives); an embedding's positives
are the other V-1 views of the same example, and it is never compared with itself:

    loss_a = logsumexp_{b != a} L_ab  -  mean_{p in P(a)} L_ap,   L = s * z @ z.T

With V=2 this is SimCLR's 2N-view loss; with more views the positives are averaged
as in poly-view contrastive learning (the "L_out" form of multi-positive InfoNCE).
"""

from __future__ import annotations

import torch

from batchlab._checks import check_embeddings
from batchlab.errors import BatchlabInputError
from batchlab.losses import _dispatch
from batchlab.losses._common import LSE, check_options, checks_for, compute_dtype, prepare_rows, prepare_scalar
from batchlab.losses._distributed_hook import run_distributed, use_distributed


def nt_xent(
    views: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    reduction: str = "mean",
    return_lse: bool = False,
    normalize: bool = False,
    impl: str = "auto",
    distributed: str = "none",
    group=None,
    check_inputs: bool | None = None,
    **impl_options,
):
    """NT-Xent over ``views`` (V, N, d), V >= 2.

    For V > 2 an anchor's positives share one term (their logits averaged, the other
    positives kept in the denominator); pytorch-metric-learning's ``NTXentLoss`` makes
    one term per positive pair: :mod:`batchlab.compat.pytorch_metric_learning`.
    lightly's ``NTXentLoss(temperature)(out0, out1)``: :mod:`batchlab.compat.lightly`.

    Parameters
    ----------
    views : Tensor (V, N, d)
        V views of N examples, L2-normalised.
    logit_scale : Tensor () or float
        1 / temperature (SimCLR's temperature 0.5 is ``logit_scale=2``).
    reduction : "mean" | "sum" | "none"
        ``none`` returns (V, N) per-embedding losses; ``mean`` averages all V*N.
    normalize, impl, distributed, check_inputs :
        As in :func:`~batchlab.losses.info_nce`.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> views = F.normalize(torch.randn(2, 8, 16), dim=-1)
    >>> nt_xent(views, 2.0).shape
    torch.Size([])
    """
    check_options(reduction, impl, distributed, return_lse=return_lse, normalize=normalize)
    check = checks_for(views, check_inputs)
    check_embeddings("views", views, ndim=3, finite=False)
    if views.shape[0] < 2:
        raise BatchlabInputError(f"views must hold at least 2 views (shape (V>=2, N, d)), got V={views.shape[0]}")
    views = prepare_rows("views", views, normalize=normalize, check=check)
    scale = prepare_scalar("logit_scale", logit_scale, views, check=check)
    if use_distributed(distributed, group):
        _dispatch.check_known_options("nt_xent", impl_options)  # the strategies pass them on unread
        return run_distributed("nt_xent", distributed, group, views, scale, reduction=reduction,
                               return_lse=return_lse, impl=impl, **impl_options)
    v, n, _ = views.shape
    fn = _dispatch.resolve("nt_xent", impl, v * n, v * n, views.device)
    loss, lse = fn(views, scale, reduction=reduction, **_dispatch.accepted_options(fn, impl_options, impl))
    return (loss, lse) if return_lse else loss


def nt_xent_positive_mask(v: int, n: int, device: torch.device) -> torch.Tensor:
    """(V*N, V*N) bool: same example, different view (reference only)."""
    example = torch.arange(v * n, device=device) % n
    same = example[:, None] == example[None, :]
    return same & ~torch.eye(v * n, dtype=torch.bool, device=device)


def reduce_views(per_anchor: torch.Tensor, v: int, n: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_anchor.reshape(v, n)
    return per_anchor.mean() if reduction == "mean" else per_anchor.sum()


@_dispatch.register("nt_xent", "reference")
def nt_xent_reference(views, scale, *, reduction):
    """Exact NT-Xent over the materialised (V*N, V*N) logits."""
    dtype = compute_dtype(views.dtype)
    v, n, d = views.shape
    z = views.reshape(v * n, d).to(dtype)
    logits = scale * (z @ z.T)
    self_mask = torch.eye(v * n, dtype=torch.bool, device=views.device)
    pos = nt_xent_positive_mask(v, n, views.device).to(dtype)
    lse = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1)
    per_anchor = lse - (logits * pos).sum(1) / (v - 1)
    return reduce_views(per_anchor, v, n, reduction), LSE(lse, None)
