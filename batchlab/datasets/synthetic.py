"""Small synthetic data with planted structure, so the right answer is known in tests."""

from __future__ import annotations

import torch

from batchlab._checks import check_positive_int


def gaussian_mixture(
    n: int,
    d: int,
    n_clusters: int,
    *,
    sigma: float = 0.3,
    seed: int = 0,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points around ``n_clusters`` random unit centres in ``d`` dimensions.

    Returns ``(embeddings, labels)`` of shapes ``(n, d)`` (float32, L2-normalised when
    ``normalize``) and ``(n,)`` (int64, balanced: cluster sizes differ by at most one).
    ``sigma`` is the per-coordinate noise relative to a unit centre spread over ``d``
    coordinates (so ``sigma=0.3`` keeps clusters well separated at any ``d``).

    >>> x, y = gaussian_mixture(100, 16, 5, seed=0)
    >>> x.shape, int(y.max()) + 1
    (torch.Size([100, 16]), 5)
    """
    check_positive_int("n", n)
    check_positive_int("d", d)
    check_positive_int("n_clusters", n_clusters)
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_clusters, d, generator=g), dim=1)
    labels = torch.arange(n) % n_clusters
    labels = labels[torch.randperm(n, generator=g)]
    x = centres[labels] + sigma * torch.randn(n, d, generator=g) / d**0.5
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    return x, labels
