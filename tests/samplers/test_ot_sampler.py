"""OTPlanSampler (torchcfm call shape) and W-CFM weights."""

import numpy as np
import pytest
import torch

from batchlab.errors import BatchlabInputError
from batchlab.samplers import OTPlanSampler, couple, wcfm_weights
from batchlab.samplers.ot import costs


def data(gen, n=48, d=2):
    return torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen) + 3.0


@pytest.mark.parametrize("method", ["exact", "sinkhorn", "unbalanced", "partial"])
def test_sample_plan_without_replacement_is_a_permutation(gen, method):
    x0, x1 = data(gen)
    a, b = OTPlanSampler(method=method).sample_plan(x0, x1, replace=False)
    assert torch.equal(a, x0)  # x0 rows keep their order
    # every x1 row appears exactly once
    idx = torch.cdist(b, x1).argmin(1)
    assert sorted(idx.tolist()) == list(range(48))


def test_sample_plan_exact_matches_couple(gen):
    x0, x1 = data(gen)
    _, b = OTPlanSampler("exact").sample_plan(x0, x1)
    assert torch.equal(b, x1[couple(x0, x1)])


def test_sample_plan_with_replacement_draws_from_the_plan(gen):
    x0, x1 = data(gen)
    ot = OTPlanSampler("exact", generator=torch.Generator().manual_seed(0))
    a, b = ot.sample_plan(x0, x1, replace=True)
    assert a.shape == x0.shape and b.shape == x1.shape
    perm = couple(x0, x1)
    i = torch.cdist(a, x0).argmin(1)
    j = torch.cdist(b, x1).argmin(1)
    assert torch.equal(perm[i], j)  # every drawn pair is a pair of the exact plan


def test_sample_plan_with_labels(gen):
    x0, x1 = data(gen)
    y0, y1 = torch.arange(48) % 3, torch.arange(48) % 3
    ot = OTPlanSampler("exact")
    a, b, ya, yb = ot.sample_plan_with_labels(x0, x1, y0, y1)
    j = torch.cdist(b, x1).argmin(1)
    assert torch.equal(ya, y0) and torch.equal(yb, y1[j])
    _, _, none0, yb2 = ot.sample_plan_with_labels(x0, x1, None, y1)
    assert none0 is None and torch.equal(yb2, yb)
    # C2OT: labels in the cost
    c2 = OTPlanSampler("exact", condition_weight=1e3)
    _, _, ya, yb = c2.sample_plan_with_labels(x0, x1, y0, y1[torch.randperm(48, generator=gen)])
    assert torch.equal(ya, yb)


def test_get_map_sample_map_and_trajectory(gen):
    x0, x1 = data(gen, n=16)
    ot = OTPlanSampler("sinkhorn", reg=0.1, generator=torch.Generator().manual_seed(0))
    pi = ot.get_map(x0, x1)
    assert isinstance(pi, np.ndarray) and pi.shape == (16, 16)
    assert pi.sum() == pytest.approx(1.0, rel=1e-4)
    i, j = ot.sample_map(pi, 10)
    assert i.shape == (10,) and j.shape == (10,)
    X = torch.randn(16, 3, 2, generator=gen)
    traj = OTPlanSampler("exact").sample_trajectory(X)
    assert traj.shape == (16, 3, 2)
    for t in range(3):  # each time slice is a reordering of that time's points
        assert np.allclose(np.sort(traj[:, t], axis=0), np.sort(X[:, t].numpy(), axis=0))
    with pytest.raises(BatchlabInputError, match="method"):
        OTPlanSampler("emd")


def test_wcfm_weights_follow_the_gibbs_kernel(gen):
    x0, x1 = data(gen, n=64)
    w = wcfm_weights(x0, x1, eps=2.0)
    c = costs.pairwise_cost(x0, x1).diagonal()
    ref = torch.exp(-c / 2.0)
    assert torch.allclose(w, ref / ref.mean(), rtol=1e-4)
    assert float(w.mean()) == pytest.approx(1.0)
    flat = wcfm_weights(x0, x1, eps=1e9)
    assert torch.allclose(flat, torch.ones(64), atol=1e-6)
    auto = wcfm_weights(x0, x1)  # eps = std of the pair costs
    assert torch.argsort(auto).tolist() == torch.argsort(-c).tolist()
    with pytest.raises(BatchlabInputError):
        wcfm_weights(x0, x1[:10])
    with pytest.raises(BatchlabInputError):
        wcfm_weights(x0, x1, eps=0.0)
    with pytest.raises(BatchlabInputError, match="non-finite"):
        wcfm_weights(x0, torch.full_like(x1, float("nan")))


def test_normalize_cost_and_extra_couple_kwargs(gen):
    x0, x1 = data(gen, n=40)
    a, b = OTPlanSampler("exact", normalize_cost=True).sample_plan(x0, x1)
    # normalising the cost by its max does not change the optimal permutation
    assert torch.equal(b, x1[couple(x0, x1)])
    _, b2 = OTPlanSampler("knn", knn_k=3, generator=torch.Generator().manual_seed(0)).sample_plan(x0, x1)
    idx = torch.cdist(b2, x1).argmin(1)
    assert sorted(idx.tolist()) == list(range(40))


def test_knn_with_conditions_runs_on_the_dense_cost(gen):
    x0, x1 = data(gen, n=64)
    y = torch.arange(64) % 2
    perm = couple(x0, x1, "knn", knn_k=8, condition=(y, y), condition_weight=1e3,
                  generator=torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(64))
    # with 8 random partners a same-label one is almost always among them
    assert float((y == y[perm]).float().mean()) > 0.8
