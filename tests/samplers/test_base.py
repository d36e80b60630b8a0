"""The sampler contract (GlobalBatchSampler) and ShardedBatchSampler."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from batchlab.errors import BatchlabInputError
from batchlab.samplers.base import GlobalBatchSampler, ShardedBatchSampler


class Shuffled(GlobalBatchSampler):
    def __init__(self, n, batch_size, **kw):
        super().__init__(batch_size=batch_size, **kw)
        self.n = n

    def plan_epoch(self, generator):
        order = torch.randperm(self.n, generator=generator).tolist()
        return [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]


def test_exact_len_coverage_and_drop_last():
    s = Shuffled(10, 4, seed=3)
    batches = list(s)
    assert len(s) == len(batches) == 3
    assert sorted(sum(batches, [])) == list(range(10))
    d = Shuffled(10, 4, seed=3, drop_last=True)
    assert len(d) == 2 and all(len(b) == 4 for b in d)


def test_seed_and_epoch_determine_the_plan():
    a, b = Shuffled(20, 5, seed=1), Shuffled(20, 5, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(a) != list(Shuffled(20, 5, seed=2))


def test_mid_epoch_resumption_repeats_and_skips_nothing():
    full = Shuffled(23, 4, seed=5)
    full.set_epoch(2)
    expected = list(full)
    s = Shuffled(23, 4, seed=5)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    resumed = Shuffled(23, 4, seed=5)
    resumed.load_state_dict(state)
    assert head + list(resumed) == expected
    # after a finished epoch, iterating again replays the epoch from its start
    assert list(resumed) == expected


def test_resume_refuses_other_settings():
    state = Shuffled(10, 4, seed=1).state_dict()
    with pytest.raises(BatchlabInputError, match="seed"):
        Shuffled(10, 4, seed=2).load_state_dict(state)
    with pytest.raises(BatchlabInputError, match="batch_size"):
        Shuffled(10, 2, seed=1).load_state_dict(state)


def test_rank_split_rebuilds_the_global_batch():
    world = 3
    ranks = [Shuffled(21, 6, seed=0, num_replicas=world, rank=r) for r in range(world)]
    glob = Shuffled(21, 6, seed=0)
    per_rank = [list(r) for r in ranks]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(glob)
    for i, batch in enumerate(glob):
        assert sum((p[i] for p in per_rank), []) == batch
        assert all(len(p[i]) == len(batch) // world > 0 for p in per_rank)
    # 20 examples: the last global batch (2) cannot be split over 3 ranks; refused, never empty
    with pytest.raises(BatchlabInputError, match="equal, non-empty shares"):
        len(Shuffled(20, 6, seed=0, num_replicas=world, rank=2))
    assert len(Shuffled(20, 6, seed=0, num_replicas=world, rank=2, drop_last=True)) == 3


def test_bad_configuration():
    with pytest.raises(BatchlabInputError, match="divisible"):
        Shuffled(10, 5, num_replicas=2, rank=0)
    with pytest.raises(BatchlabInputError, match="rank"):
        Shuffled(10, 4, num_replicas=2, rank=2)
    with pytest.raises(BatchlabInputError, match="batch_size"):
        Shuffled(10, 0)


def test_sharded_batch_sampler_wraps_any_batch_sampler():
    inner = BatchSampler(SequentialSampler(range(10)), batch_size=4, drop_last=False)
    parts = [list(ShardedBatchSampler(inner, num_replicas=2, rank=r)) for r in range(2)]
    assert [a + b for a, b in zip(*parts)] == list(inner)
    tiny = BatchSampler(SequentialSampler(range(5)), batch_size=4, drop_last=False)
    with pytest.raises(BatchlabInputError, match="cannot be split"):
        list(ShardedBatchSampler(tiny, num_replicas=2, rank=0))
    with pytest.raises(BatchlabInputError, match="no state_dict"):
        ShardedBatchSampler(inner, num_replicas=2, rank=0).state_dict()
