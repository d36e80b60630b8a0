"""MixedBatchSampler: part of every batch from a structured sampler, the rest uniformly random."""

from __future__ import annotations

import pytest
import torch

from batchlab.errors import BatchlabInputError
from batchlab.samplers import HardNegativeBatchSampler, MixedBatchSampler

try:  # the shared sampler-contract checks; module name depends on whether tests/samplers is a package
    from test_clusters import assert_sampler_contract
except ImportError:  # pragma: no cover
    from tests.samplers.test_clusters import assert_sampler_contract

N = 103  # not a multiple of the batch size: the leftovers go in a last, random batch


def partners(n: int) -> torch.Tensor:
    """Each example's one mined negative is its neighbour in pairs (0, 1), (2, 3), ..."""
    ids = torch.arange(n) ^ 1
    ids[ids >= n] = -1
    return ids.unsqueeze(1)


def mixed(batch_size=16, mix_random=0.5, seed=0, **kw):
    structured = batch_size - round(mix_random * batch_size)
    base = HardNegativeBatchSampler(partners(N), structured, max_neighbourhood_fraction=1.0, seed=seed, drop_last=True)
    return MixedBatchSampler(base, N, batch_size=batch_size, mix_random=mix_random, seed=seed, **kw)


def test_contract():
    assert_sampler_contract(lambda **kw: mixed(**kw), N)


def test_first_part_is_a_structured_batch_the_rest_is_random():
    sampler = mixed(batch_size=16, mix_random=0.25)
    plan = sampler.global_batches()
    base = sampler.base.global_batches()
    assert len(plan) == N // 16 + 1 and all(len(b) == 16 for b in plan[:-1]) and len(plan[-1]) == N % 16
    assert [b[:12] for b in plan[:-1]] == base[: N // 16]
    # the structured parts keep every pair together; the random parts split most pairs
    def together(parts):
        return sum(i ^ 1 in part for part in parts for i in part) / sum(len(p) for p in parts)

    assert together([b[:12] for b in plan[:-1]]) == 1.0
    assert together([b[12:] for b in plan[:-1]]) < 0.5
    # every epoch the random parts are new
    sampler.set_epoch(1)
    assert [b[12:] for b in sampler.global_batches()] != [b[12:] for b in plan]


def test_random_parts_do_not_replay_the_base_stream():
    from batchlab.recipes import RandomBatchSampler

    base = RandomBatchSampler(N, 8, seed=5, drop_last=True)  # seeded like the mixed sampler
    plan = MixedBatchSampler(base, N, batch_size=16, mix_random=0.5, seed=5).global_batches()
    steps = N // 16
    later = base.global_batches()[steps : 2 * steps]  # what the base's own permutation puts next
    assert [b[8:] for b in plan[:steps]] != later


def test_no_random_share_gives_the_structured_batches():
    sampler = mixed(batch_size=16, mix_random=0.0)
    plan = sampler.global_batches()
    assert plan[: N // 16] == sampler.base.global_batches()[: N // 16]
    assert sorted(i for b in plan for i in b) == list(range(N))


def test_bad_settings_are_refused():
    base = HardNegativeBatchSampler(partners(N), 16, seed=0)
    for share in (1.0, -0.1):
        with pytest.raises(BatchlabInputError, match="mix_random must be in"):
            MixedBatchSampler(base, N, batch_size=16, mix_random=share)
    with pytest.raises(BatchlabInputError, match="batch_size=8"):
        MixedBatchSampler(base, N, batch_size=16, mix_random=0.5)
    state = mixed(mix_random=0.5).state_dict()
    with pytest.raises(BatchlabInputError, match="mix_random"):
        mixed(mix_random=0.25).load_state_dict(state)
