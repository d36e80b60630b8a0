"""HardNegativeBatchSampler: mined negatives of an anchor meet it in its batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchlab.datasets.synthetic import gaussian_mixture
from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.samplers import HardNegativeBatchSampler
from batchlab.samplers.hard_negatives import pair_colocation_rate

try:  # the shared sampler-contract checks; module name depends on whether tests/samplers is a package
    from test_clusters import assert_sampler_contract
except ImportError:  # pragma: no cover
    from tests.samplers.test_clusters import assert_sampler_contract


def knn_negatives(x: torch.Tensor, m: int) -> torch.Tensor:
    """Exact top-m neighbours of each row, itself excluded (a stand-in for mining)."""
    sim = x @ x.T
    sim.fill_diagonal_(-torch.inf)
    return sim.topk(m, dim=1).indices


@pytest.fixture(scope="module")
def planted():
    return gaussian_mixture(600, 16, 20, sigma=0.3, seed=0)


def test_contract(planted):
    x, _ = planted
    ids = knn_negatives(x[:250], 5)
    make = lambda **kw: HardNegativeBatchSampler(ids, 20, **kw)  # noqa: E731
    assert_sampler_contract(make, 250)


def test_neighbourhoods_are_kept_together_and_capped(planted):
    x, y = planted
    ids = knn_negatives(x, 8)
    sampler = HardNegativeBatchSampler(ids, 32, max_neighbourhood_fraction=0.25, seed=0)
    assert sampler.neighbourhood_cap == 8
    groups = sampler.plan_groups(torch.Generator().manual_seed(0))
    assert sorted(i for g in groups for i in g) == list(range(600))
    for group in groups:
        assert len(group) <= 8
        # a neighbourhood is its anchor followed by (some of) the anchor's own negatives
        assert set(group[1:]) <= set(ids[group[0]].tolist())
    # most (anchor, negative) pairs meet; random batches give about (B - 1) / (N - 1) = 5%
    batches = list(sampler)
    rate = pair_colocation_rate(batches, ids)
    random_rate = pair_colocation_rate(list(HardNegativeBatchSampler(ids, 32, max_neighbourhood_fraction=1 / 32)), ids)
    assert random_rate < 0.1
    assert rate > 4 * random_rate
    # the negatives are from the anchor's planted cluster, so batches are topical
    same_label = np.mean([len(set(y[b].tolist())) for b in batches[:-1]])
    assert same_label < 10  # random batches of 32 over 20 labels hold about 16 labels


def test_more_hops_grow_neighbourhoods_up_to_the_cap(planted):
    x, _ = planted
    ids = knn_negatives(x, 4)
    one = HardNegativeBatchSampler(ids, 64, max_neighbourhood_fraction=0.25, hops=1, seed=0)
    two = HardNegativeBatchSampler(ids, 64, max_neighbourhood_fraction=0.25, hops=2, seed=0)
    groups = two.plan_groups(torch.Generator().manual_seed(0))
    assert 5 < max(len(g) for g in groups) <= 16  # one hop holds at most 1 + 4; the cap is 16
    for group in groups:
        a = group[0]
        ball = set(ids[a].tolist()) | {int(j) for n in ids[a].tolist() for j in ids[n].tolist()}
        assert set(group[1:]) <= ball
    assert pair_colocation_rate(list(two), ids) > pair_colocation_rate(list(one), ids)
    with pytest.raises(BatchlabInputError, match="hops"):
        HardNegativeBatchSampler(ids, 64, hops=0)
    with pytest.raises(BatchlabInputError, match="hops"):
        one.load_state_dict(two.state_dict())


def test_whole_blocks_when_uncapped():
    # blocks of 16 whose members list each other: with no cap, each batch is one block
    block = torch.arange(64) // 16
    ids = torch.stack([torch.tensor([j for j in range(64) if block[j] == block[i] and j != i]) for i in range(64)])
    batches = list(HardNegativeBatchSampler(ids, 16, max_neighbourhood_fraction=1.0, seed=1))
    assert all(len(set(block[b].tolist())) == 1 for b in batches)
    assert pair_colocation_rate(batches, ids) == 1.0
    # capped at a quarter of the batch, no seed group can bring in its whole block
    capped = HardNegativeBatchSampler(ids, 16, max_neighbourhood_fraction=0.25, seed=1)
    assert max(len(g) for g in capped.plan_groups(torch.Generator().manual_seed(1))) == 4


def test_accepts_arrays_padding_self_ids_and_mined_objects():
    rows = np.array([[1, -1], [0, 1], [3, -1], [-1, -1]])  # row 1 lists itself
    a = HardNegativeBatchSampler(rows, 2, max_neighbourhood_fraction=1.0, seed=0)
    assert sorted(i for b in a for i in b) == [0, 1, 2, 3]

    class Mined:  # duck-typed stand-in for mine_hard_negatives' result
        negative_ids = torch.from_numpy(rows)

    b = HardNegativeBatchSampler(Mined(), 2, max_neighbourhood_fraction=1.0, seed=0)
    assert list(a) == list(b)
    assert sorted(sorted(batch) for batch in a) == [[0, 1], [2, 3]]


def test_bad_input():
    good = torch.tensor([[1], [0], [3], [2]])
    with pytest.raises(BatchlabInputError, match=r"shape \(N, m\)"):
        HardNegativeBatchSampler(torch.tensor([1, 0, 3, 2]), 2)
    with pytest.raises(BatchlabInputError, match="integer"):
        HardNegativeBatchSampler(good.float(), 2)
    with pytest.raises(BatchlabInputError, match=r"\[-1, 4\)"):
        HardNegativeBatchSampler(torch.tensor([[1], [0], [4], [2]]), 2)
    with pytest.raises(BatchlabInputError, match=r"\[-1, 4\)"):
        HardNegativeBatchSampler(torch.tensor([[1], [-2], [3], [2]]), 2)
    with pytest.raises(BatchlabInputError, match="empty"):
        HardNegativeBatchSampler(torch.empty(0, 3, dtype=torch.long), 2)
    with pytest.raises(BatchlabInputError, match="larger than the number of examples"):
        HardNegativeBatchSampler(good, 8)
    with pytest.raises(BatchlabInputError, match="max_neighbourhood_fraction"):
        HardNegativeBatchSampler(good, 2, max_neighbourhood_fraction=0)
    with pytest.raises(BatchlabInputError, match="tensor or array"):
        HardNegativeBatchSampler([[1], [0]], 2)
    # a state from a differently configured sampler is refused
    state = HardNegativeBatchSampler(good, 2, seed=0).state_dict()
    with pytest.raises(BatchlabInputError, match="seed"):
        HardNegativeBatchSampler(good, 2, seed=1).load_state_dict(state)
    with pytest.raises(BatchlabInputError, match="max_neighbourhood_fraction"):
        HardNegativeBatchSampler(good, 2, seed=0, max_neighbourhood_fraction=1.0).load_state_dict(state)
    with pytest.raises(StaleArtifactError, match="other negative_ids"):
        HardNegativeBatchSampler(torch.tensor([[2], [3], [0], [1]]), 2, seed=0).load_state_dict(state)
