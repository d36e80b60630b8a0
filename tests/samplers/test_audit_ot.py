"""Audit of the OT couplings where they claim exactness, and of OTPlanSampler.sample_map's inputs.

``test_ot.py`` checks the exact solvers against scipy on unit-scale data; here the data's
scale moves (the sparse solver shifted its weights by a fixed 1.0, which in float64 rounded
away costs far below 1), and ``sample_map`` is given plans it cannot draw from as asked.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from batchlab.errors import BatchlabInputError
from batchlab.samplers import OTPlanSampler, couple
from batchlab.samplers.ot import costs


@pytest.mark.parametrize("scale, dtype", [(1e-8, torch.float32), (1e-4, torch.float64), (1e3, torch.float32)])
def test_sparse_exact_solver_is_optimal_and_certified_at_any_data_scale(gen, scale, dtype):
    n, d = 300, 32  # above scipy's size: solver="auto" picks the sparse solver here
    x0, x1 = ((torch.randn(n, d, generator=gen) * scale).to(dtype) for _ in range(2))
    C = costs.pairwise_cost(x0, x1, "sqeuclidean").double().numpy()
    rows, cols = linear_sum_assignment(C)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "still violate optimality" would be a RuntimeWarning
        perm, info = couple(x0, x1, "exact", return_info=True)
    assert info["solver"] == "sparse" and info["certified"]
    assert sorted(perm.tolist()) == list(range(n))
    assert C[np.arange(n), perm.numpy()].sum() == pytest.approx(C[rows, cols].sum(), rel=1e-6)


def test_sample_map_draws_only_pairs_with_mass_or_refuses():
    ot = OTPlanSampler(generator=torch.Generator().manual_seed(0))
    pi = np.eye(4) / 4  # a permutation plan: four pairs with mass
    i, j = ot.sample_map(pi, 4, replace=False)
    assert sorted(zip(i.tolist(), j.tolist())) == [(k, k) for k in range(4)]
    i, j = ot.sample_map(pi, 9, replace=True)
    assert (i == j).all()
    with pytest.raises(BatchlabInputError, match=r"only 4; use batch_size <= 4 or replace=True"):
        ot.sample_map(pi, 5, replace=False)  # torch went on to draw pairs of zero mass
    for bad, size, match in (
        (pi, 0, "batch_size must be an integer >= 1"),
        (np.ones(4) / 4, 2, r"shape \(n, m\), got shape \(4,\)"),
        (np.array([[0.6, -0.1], [0.3, 0.2]]), 2, "non-negative"),
        (np.zeros((2, 2)), 1, "positive total"),
    ):
        with pytest.raises(BatchlabInputError, match=match):
            ot.sample_map(bad, size)


def test_wcfm_weights_without_normalising_are_the_gibbs_kernel():
    from batchlab.samplers import wcfm_weights

    x0, x1 = torch.zeros(3, 2), torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.5, 0.5]])
    cost = (x1 - x0).square().sum(1)
    # before: exp(-(c - min c) / eps), a batch-dependent multiple of the documented kernel
    torch.testing.assert_close(wcfm_weights(x0, x1, eps=1.5, normalize=False), torch.exp(-cost / 1.5))
    normalised = wcfm_weights(x0, x1, eps=1.5)
    torch.testing.assert_close(normalised, torch.exp(-cost / 1.5) / torch.exp(-cost / 1.5).mean())


@pytest.mark.parametrize(
    "kw, match",
    [({"reg": "0.1"}, "reg must be a number"), ({"reg": float("inf")}, "reg must be a finite number > 0"),
     ({"reg_m": None}, "reg_m must be a number"), ({"mass": True}, "mass must be a number"),
     ({"tol": -1.0}, "tol must be a finite number >= 0")],
)
def test_couple_refuses_options_that_are_not_usable_numbers(gen, kw, match):
    x0, x1 = torch.randn(6, 2, generator=gen), torch.randn(6, 2, generator=gen)
    with pytest.raises(BatchlabInputError, match=match):
        couple(x0, x1, "sinkhorn", **kw)
