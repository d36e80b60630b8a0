"""W-CFM (Weighted Conditional Flow Matching): Gibbs-kernel weights for random pairs, no solve."""

from __future__ import annotations

import torch

from batchlab.errors import BatchlabInputError
from batchlab.samplers.ot import costs as _costs
from batchlab.samplers.ot.couple import _check_batch


def wcfm_weights(
    x0: torch.Tensor,
    x1: torch.Tensor,
    *,
    eps: float | None = None,
    reg: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
) -> torch.Tensor:
    """Per-pair weights ``w_i = exp(-c(x0_i, x1_i) / eps)`` for the pairs as given.

    W-CFM (Calvo-Ordonez et al., 2025) multiplies each term of the CFM loss by this
    Gibbs kernel instead of solving mini-batch OT: in the large-batch limit that is
    the entropic OT coupling (up to a bias in the marginals that is small when eps
    is not too small). Cost O(n D), no n x n matrix.

    Parameters
    ----------
    x0, x1 : Tensor (n, ...)
        Independent (random) pairs: row ``i`` of each is one pair.
    eps : float, optional
        Absolute temperature. If None, ``reg * std`` of this batch's pair costs (the
        pair costs of random pairs are a sample of the cost matrix's entries).
    reg : float
        Relative temperature used when ``eps`` is None.
    cost : {"sqeuclidean", "euclidean", "cosine"}
    normalize : bool
        Scale the weights to mean 1 so the loss keeps its magnitude.

    Returns
    -------
    Tensor (n,), float32 (float64 for float64 inputs), no gradient.

    >>> x0, x1 = torch.zeros(3, 2), torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    >>> w = wcfm_weights(x0, x1, eps=1.0)
    >>> bool(w[0] > w[1] > w[2]), round(float(w.mean()), 6)
    (True, 1.0)
    """
    a, b = _check_batch("x0", x0), _check_batch("x1", x1)
    if a.shape[0] != b.shape[0]:
        raise BatchlabInputError(f"x0 and x1 must hold the same number of pairs, got {a.shape[0]} and {b.shape[0]}")
    if cost not in _costs.COSTS:
        raise BatchlabInputError(f"cost must be one of {_costs.COSTS}, got {cost!r}")
    fa, fb = _costs.flatten("x0", a), _costs.flatten("x1", b)
    if fa.shape[1] != fb.shape[1]:
        raise BatchlabInputError(f"x0 and x1 examples differ in size ({fa.shape[1]} vs {fb.shape[1]})")
    wd = torch.float64 if fa.dtype == torch.float64 else torch.float32
    idx = torch.arange(fa.shape[0], device=fa.device)
    c = _costs.pairwise_rowwise(fa.to(wd), fb.to(wd), idx, idx, cost)
    if eps is None:
        if not reg > 0:
            raise BatchlabInputError(f"reg must be > 0, got {reg!r}")
        sd = float(c.std()) if c.numel() > 1 else 0.0
        eps = reg * (sd if sd > 0 else 1.0)
    elif not eps > 0:
        raise BatchlabInputError(f"eps must be > 0, got {eps!r}")
    if not normalize:
        return torch.exp(-c / eps)  # the kernel itself, as documented
    # subtracting the minimum changes nothing after normalising and avoids underflow
    w = torch.exp(-(c - c.min()) / eps)
    return w / w.mean()
