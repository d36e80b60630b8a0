"""Resumption through real loaders, and the resume/rank-split cases of issue 15.

A ``DataLoader`` with workers takes batches from the sampler ahead of the training loop;
``state_dict(consumed=k)`` records what the loop received. torchdata's
``StatefulDataLoader`` calls ``state_dict()`` as each batch leaves the sampler and keeps
the one that matches what the loop received, so ``loader.state_dict()`` works as is.
Worker counts 0 and 2, tiny datasets, no persistent workers.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.recipes import RandomBatchSampler
from batchlab.samplers import (
    ClusterBatchSampler,
    CommunityBatchSampler,
    HardNegativeBatchSampler,
    JointExampleSelector,
    MixedBatchSampler,
    TASBalancedBatchSampler,
)
from batchlab.samplers.tas import pair_seed


def community(n, batch, **kw):
    groups = torch.randperm(n, generator=torch.Generator().manual_seed(0)).numpy() // 2
    return CommunityBatchSampler(None, batch, group_size=2, groups=groups, **kw)


def expected(make, epoch):
    s = make()
    s.set_epoch(epoch)
    return [torch.as_tensor(b) for b in s]


def received(loader):
    return [x for (x,) in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("make", [lambda: RandomBatchSampler(50, 4, seed=1), lambda: community(50, 4, seed=1)])
def test_dataloader_with_workers_resumes_from_what_the_loop_received(make):
    data = TensorDataset(torch.arange(50))
    sampler = make()
    sampler.set_epoch(1)
    head = []
    for step, (x,) in enumerate(DataLoader(data, batch_sampler=sampler, num_workers=2)):
        head.append(x)
        if step + 1 == 10:
            break
    assert sampler.state_dict()["batches_yielded"] > 10  # the workers fetched ahead
    state = sampler.state_dict(consumed=10)
    assert state["batches_yielded"] == 10
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    rest = received(DataLoader(data, batch_sampler=resumed, num_workers=2))
    assert same(head + rest, expected(make, 1))
    with pytest.raises(BatchlabInputError, match="handed out only"):
        resumed.state_dict(consumed=len(rest) + 1)


def test_a_fully_prefetched_short_epoch_neither_resets_nor_replays():
    data = TensorDataset(torch.arange(6))
    make = lambda: RandomBatchSampler(6, 2, seed=0)  # noqa: E731
    sampler = make()
    loader = DataLoader(data, batch_sampler=sampler, num_workers=2)
    first = next(iter(loader))[0]
    assert sampler.state_dict()["batches_yielded"] == 3  # all 3 batches already taken by the workers
    state = sampler.state_dict(consumed=1)
    resumed = make()
    resumed.load_state_dict(state)
    assert same([first] + received(DataLoader(data, batch_sampler=resumed, num_workers=2)), expected(make, 0))
    # a finished epoch records its end (before: 0, which replayed the epoch on resume)
    assert resumed.state_dict()["batches_yielded"] == 3


def _stateful_run(make, workers, n, stop, epochs=2, resume_from=None, start_epoch=0):
    sampler = make()
    loader = StatefulDataLoader(TensorDataset(torch.arange(n)), batch_sampler=sampler, num_workers=workers)
    if resume_from is not None:
        loader.load_state_dict(resume_from)
    got, state = [], None
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        for step, (x,) in enumerate(loader):
            got.append(x)
            if (epoch, step + 1) == stop:
                state = loader.state_dict()
    return got, state


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    "make, n, stops",
    [
        (lambda: RandomBatchSampler(22, 4, seed=3), 22, [2, 6]),  # 6 batches; 6 = saved on the last batch
        (lambda: RandomBatchSampler(6, 2, seed=3), 6, [1]),  # fully prefetched by 2 workers
        (lambda: community(24, 8, seed=3, num_replicas=2, rank=1), 24, [2]),
    ],
)
def test_stateful_dataloader_resumes_exactly(workers, make, n, stops):
    everything = expected(make, 0) + expected(make, 1)
    for stop in stops:
        head, state = _stateful_run(make, workers, n, stop=(0, stop))
        assert same(head, everything)
        rest, _ = _stateful_run(make, workers, n, stop=None, resume_from=state)
        assert same(everything[:stop] + rest, everything), stop


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_state_saved_after_an_epoch_resumes_the_next(workers):
    """Saved after the inner loop (the loader is finished); the resumed loop starts at epoch 1 and
    calls set_epoch(1) *before* the loader restores the sampler: epoch 1 runs, epoch 0 is not replayed."""
    make = lambda: RandomBatchSampler(10, 4, seed=2)  # noqa: E731
    sampler = make()
    loader = StatefulDataLoader(TensorDataset(torch.arange(10)), batch_sampler=sampler, num_workers=workers)
    received(loader)
    state = loader.state_dict()
    rest, _ = _stateful_run(make, workers, 10, stop=None, epochs=3, resume_from=state, start_epoch=1)
    assert same(rest, expected(make, 1) + expected(make, 2))


# -- the cases of issue 15 ------------------------------------------------------------------
def test_an_abandoned_iterator_does_not_shift_the_epoch():
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    s = ClusterBatchSampler(x, 32, cluster_size=8)
    next(iter(s))
    s.set_epoch(0)
    assert (len(s), len(list(s))) == (8, 8)
    it = iter(s)
    next(it)
    assert len(list(s)) == 8  # a new iter() starts a clean pass even with `it` still open
    assert s.state_dict()["batches_yielded"] == 8


def test_a_loaded_position_survives_set_epoch_of_its_epoch_only():
    make = lambda: RandomBatchSampler(20, 4, seed=0)  # noqa: E731
    s = make()
    s.set_epoch(2)
    it = iter(s)
    head = [next(it), next(it)]
    state = s.state_dict()
    t = make()
    t.load_state_dict(state)
    t.set_epoch(2)
    assert same([torch.as_tensor(b) for b in head + list(t)], expected(make, 2))
    u = make()
    u.load_state_dict(state)
    u.set_epoch(3)  # another epoch: the loaded position is dropped, epoch 3 from its start
    assert len(list(u)) == 5


@pytest.mark.parametrize("n, batch, world", [(3, 2, 2), (65, 64, 4), (10, 4, 4)])
def test_rank_split_never_hands_out_an_empty_share(n, batch, world):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(BatchlabInputError, match="equal, non-empty shares") as err:
        ClusterBatchSampler(x, batch, num_replicas=world, rank=world - 1)
    below = n - n % world
    assert f"e.g. {below} or {below + world}" in str(err.value)  # the sizes that work
    ranks = [ClusterBatchSampler(x, batch, num_replicas=world, rank=r, drop_last=True) for r in range(world)]
    shares = [[len(b) for b in s] for s in ranks]
    assert all(share == shares[0] for share in shares) and all(k == batch // world for k in shares[0])


def test_split_settings_that_would_silently_duplicate_or_misalign_are_refused():
    from torch.utils.data import BatchSampler, SequentialSampler

    from batchlab.samplers import ShardedBatchSampler

    with pytest.raises(BatchlabInputError, match="without rank"):  # every process would be rank 0
        RandomBatchSampler(20, 4, num_replicas=2)
    with pytest.raises(BatchlabInputError, match="drop_last must be True or False"):
        RandomBatchSampler(20, 4, drop_last="False")
    uneven = BatchSampler(SequentialSampler(range(10)), batch_size=3, drop_last=False)  # last batch: 1
    with pytest.raises(BatchlabInputError, match="equal, non-empty shares"):
        ShardedBatchSampler(BatchSampler(SequentialSampler(range(9)), 3, False), num_replicas=2, rank=0)
    with pytest.raises(BatchlabInputError, match="equal, non-empty shares"):
        ShardedBatchSampler(uneven, num_replicas=3, rank=0)
    even = BatchSampler(SequentialSampler(range(9)), batch_size=3, drop_last=False)
    assert [len(b) for b in ShardedBatchSampler(even, num_replicas=3, rank=2)] == [1, 1, 1]


def test_community_refuses_a_state_of_other_groups_or_drop_last():
    n, k = 256, 16
    groups = [(torch.randperm(n, generator=torch.Generator().manual_seed(s)) // k).numpy() for s in (1, 2)]
    a = CommunityBatchSampler(None, 64, group_size=k, groups=groups[0])
    next(iter(a))
    state = a.state_dict()
    with pytest.raises(StaleArtifactError, match="other groups"):
        CommunityBatchSampler(None, 64, group_size=k, groups=groups[1]).load_state_dict(state)
    with pytest.raises(BatchlabInputError, match="drop_last=False in the state but drop_last=True here"):
        CommunityBatchSampler(None, 64, group_size=k, groups=groups[0], drop_last=True).load_state_dict(state)
    with pytest.raises(BatchlabInputError, match="every epoch would be empty"):
        CommunityBatchSampler(None, 512, group_size=k, groups=groups[0], drop_last=True)


def test_mixed_refuses_a_state_whose_base_differs():
    g = torch.Generator().manual_seed(0)
    negatives = [torch.randint(0, 64, (64, 2), generator=g) for _ in range(2)]

    def mixed(neg=0, base_seed=0):
        base = HardNegativeBatchSampler(negatives[neg], 8, seed=base_seed)
        return MixedBatchSampler(base, 64, batch_size=16, mix_random=0.5, seed=0)

    state = mixed().state_dict()
    mixed().load_state_dict(state)
    with pytest.raises(StaleArtifactError, match="base.negatives"):
        mixed(neg=1).load_state_dict(state)
    with pytest.raises(BatchlabInputError, match="base.seed=0 in the state but base.seed=1 here"):
        mixed(base_seed=1).load_state_dict(state)
    with pytest.raises(BatchlabInputError, match="covers 64 examples but num_examples=60"):
        MixedBatchSampler(HardNegativeBatchSampler(negatives[0], 8), 60, batch_size=16, mix_random=0.5)


def test_states_with_bad_positions_are_refused():
    s = RandomBatchSampler(20, 4)
    for bad, match in (({**s.state_dict(), "batches_yielded": 6}, "epoch has 5"),
                       ({**s.state_dict(), "batches_yielded": -1}, "non-negative"),
                       ({**s.state_dict(), "epoch": 1.5}, "non-negative integer")):
        with pytest.raises(BatchlabInputError, match=match):
            RandomBatchSampler(20, 4).load_state_dict(bad)
    with pytest.raises(BatchlabInputError, match="non-negative integer"):
        s.set_epoch(-1)
    with pytest.raises(BatchlabInputError, match="seed"):
        RandomBatchSampler(20, 4, seed=2**32)


def test_tas_pair_seeds_do_not_collide():
    assert len({pair_seed(s, e) for s in range(40) for e in range(40)}) == 1600
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    margins = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    t0, t1 = (TASBalancedBatchSampler(x, 16, n_clusters=4, teacher_margins=margins, method="balanced", seed=s)
              for s in (0, 1))
    assert not torch.equal(t0.pairs_for(range(64), epoch=1), t1.pairs_for(range(64), epoch=0))


def test_jest_refuses_a_negative_step():
    with pytest.raises(BatchlabInputError, match=r"state\['step'\] must be a non-negative integer"):
        JointExampleSelector().load_state_dict({"seed": 0, "step": -5})


def loader_sweep(count: int, seed: int = 0) -> dict:
    """Offline: ``count`` random resumes through real loaders (DataLoader with ``consumed=``, or
    StatefulDataLoader), 0 or 2 workers; returns the lost / repeated / differing batch counts."""
    from collections import Counter

    import numpy as np

    try:
        from test_contract import FAMILIES, group_size_for, make_factory
    except ImportError:  # pragma: no cover
        from tests.samplers.test_contract import FAMILIES, group_size_for, make_factory

    rng, tally = np.random.default_rng(seed), {"run": 0, "refused": 0, "lost": 0, "repeated": 0, "differ": 0}
    for _ in range(count):
        world = int(rng.choice([1, 2]))
        n, batch = int(rng.integers(2, 61)), world * int(rng.integers(1, 7))
        family, epoch = str(rng.choice(FAMILIES)), int(rng.integers(3))
        build, _ = make_factory(family, n, batch, data_seed=int(rng.integers(1000)),
                                group_size=group_size_for(batch, int(rng.integers(100))))
        kw = dict(seed=int(rng.integers(2**32)), drop_last=bool(rng.integers(2)), num_replicas=world,
                  rank=int(rng.integers(world)))
        make = lambda: build(**kw)  # noqa: E731
        try:
            full = expected(make, epoch) + expected(make, epoch + 1)
        except BatchlabInputError:
            tally["refused"] += 1
            continue
        tally["run"] += 1
        stateful, workers = bool(rng.integers(2)), int(rng.choice([0, 2]))
        stop = int(rng.integers(len(full) // 2 + 1))
        data = TensorDataset(torch.arange(n))
        loader_of = (lambda s: StatefulDataLoader(data, batch_sampler=s, num_workers=workers)) if stateful else \
            (lambda s: DataLoader(data, batch_sampler=s, num_workers=workers))
        sampler = make()
        loader = loader_of(sampler)
        sampler.set_epoch(epoch)
        head = []
        if stop:
            for x, in loader:
                head.append(x)
                if len(head) == stop:  # saved right after receiving batch `stop`
                    break
        state = loader.state_dict() if stateful else sampler.state_dict(consumed=len(head))
        sampler = make()
        loader = loader_of(sampler)
        if stateful:
            loader.load_state_dict(state)
        else:
            sampler.load_state_dict(state)
        rest = []
        for e in (epoch, epoch + 1):
            sampler.set_epoch(e)
            rest += received(loader)
        got = Counter(int(i) for b in head + rest for i in b)
        want = Counter(int(i) for b in full for i in b)  # two epochs: every example twice
        tally["lost"] += sum((want - got).values())
        tally["repeated"] += sum((got - want).values())
        if not same(head + rest, full):
            tally["differ"] += 1
            print("differs:", family, n, batch, kw, "epoch", epoch, "stop", stop,
                  "StatefulDataLoader" if stateful else "DataLoader", "workers", workers)
    return tally


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    print(loader_sweep(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
