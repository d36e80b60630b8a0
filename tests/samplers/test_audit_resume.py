"""Audit of the sampler contract at its edges: resume points, foreign states, tiny datasets, loaders.

Complements ``test_contract.py`` (random configurations, in-process resume) and
``test_resume.py`` (real loaders): resuming at ``consumed=0`` and ``consumed=len`` for every
family; a state loaded into a sampler that records the same settings but builds another plan
(a dataset size a sampler does not record); datasets of one example and smaller than a batch;
``DataLoader`` with persistent workers and a larger ``prefetch_factor`` across epochs;
``StatefulDataLoader`` with persistent workers.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from batchlab.errors import BatchlabInputError
from batchlab.recipes import RandomBatchSampler
from batchlab.samplers import GlobalBatchSampler, ShardedBatchSampler

try:
    from test_contract import FAMILIES, make_factory
except ImportError:  # pragma: no cover
    from tests.samplers.test_contract import FAMILIES, make_factory


def build(family, n, batch, **kw):
    make, _ = make_factory(family, n, batch, data_seed=2, group_size=2 if batch % 2 == 0 else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # communities of other sizes warn; not under test here
        return make(**kw)


def epoch_of(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_at_the_first_and_after_the_last_batch(family):
    n, batch, kw = 12, 4, dict(seed=3, num_replicas=2, rank=1)
    s = build(family, n, batch, **kw)
    full, following = epoch_of(s, 1), epoch_of(build(family, n, batch, **kw), 2)
    s.set_epoch(1)
    it = iter(s)
    next(it)  # one batch received, then a fresh pass of the loader: consumed counts from it
    it = iter(s)
    for consumed, rest in ((0, full), (len(full), [])):
        if consumed:
            [next(it) for _ in range(consumed)]
        state = json.loads(json.dumps(s.state_dict(consumed=consumed)))
        t = build(family, n, batch, **kw)
        t.load_state_dict(state)
        t.set_epoch(1)  # the usual resume loop: the saved epoch keeps the loaded position
        assert list(t) == rest, consumed
        assert epoch_of(t, 2) == following  # and the next epoch starts clean
    # a state saved at the end of epoch 1, loaded after set_epoch(2) (StatefulDataLoader's order)
    u = build(family, n, batch, **kw)
    u.set_epoch(2)
    u.load_state_dict(state)
    assert list(u) == following


class Unrecorded(GlobalBatchSampler):
    """A sampler whose plan depends on a size it leaves out of RESUME_SETTINGS (like RandomBatchSampler)."""

    def __init__(self, n, batch_size, **kw):
        super().__init__(batch_size=batch_size, **kw)
        self.n = n

    def plan_epoch(self, generator):
        return [c.tolist() for c in torch.randperm(self.n, generator=generator).split(self.batch_size)]


@pytest.mark.parametrize(
    "make",
    [
        lambda n: Unrecorded(n, 4, seed=1),
        lambda n: RandomBatchSampler(n, 4, seed=1),
        lambda n: ShardedBatchSampler(RandomBatchSampler(n, 4, seed=1), num_replicas=2, rank=0),
    ],
    ids=["subclass", "random", "sharded"],
)
def test_a_state_of_another_dataset_size_is_refused_not_misresumed(make):
    s = make(20)
    it = iter(s)
    next(it), next(it)
    state = s.state_dict()
    make(20).load_state_dict(state)  # the same sampler resumes
    for other in (24, 21):  # more batches, and the same number of batches (6) with other members
        # the plan hash catches a sampler that does not record its size; RandomBatchSampler names it
        with pytest.raises(BatchlabInputError, match=r"another plan (.* \(\d+ batches, hash .*dataset size|"
                                                     r"than this sampler: num_examples=20 in the state)"):
            make(other).load_state_dict(state)


def test_a_state_without_a_plan_hash_still_loads_with_a_warning():
    s = RandomBatchSampler(20, 4, seed=1)
    it = iter(s)
    head = [next(it), next(it)]
    state = {k: v for k, v in s.state_dict().items() if k != "plan"}  # a state from an older batchlab
    t = RandomBatchSampler(20, 4, seed=1)
    with pytest.warns(UserWarning, match="has no plan"):
        t.load_state_dict(state)
    assert head + list(t) == epoch_of(RandomBatchSampler(20, 4, seed=1), 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_one_example_dataset_gives_one_batch_of_it(family):
    s = build(family, 1, 1, seed=5)
    assert len(s) == 1 and list(s) == [[0]]
    s.set_epoch(3)
    assert list(s) == [[0]]
    for world in (2, 4):  # one example cannot be split over ranks: refused, saying why
        with pytest.raises(BatchlabInputError, match="equal, non-empty shares|is larger than"):
            build(family, 1, world, num_replicas=world, rank=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(family):
    # test_contract draws batch sizes that are multiples of the world size only
    with pytest.raises(BatchlabInputError, match=r"batch_size \(6\) is the global batch and must be divisible by "
                                                  r"num_replicas \(4\); use a multiple of 4"):
        build(family, 24, 6, num_replicas=4, rank=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dataset_smaller_than_a_batch(family):
    """One short batch of every example, or a refusal that says what to change; never an empty epoch."""
    _, refuses = make_factory(family, 3, 4, data_seed=2)
    if refuses:
        with pytest.raises(BatchlabInputError, match=r"batch_size \(4\) is larger than the number of examples"):
            build(family, 3, 4)
    else:
        batches = list(build(family, 3, 4))
        assert len(batches) == 1 and sorted(batches[0]) == [0, 1, 2]
    with pytest.raises(BatchlabInputError, match="empty|larger than"):
        build(family, 3, 4, drop_last=True)


def _received(loader):
    return [x.tolist() for (x,) in loader]


def test_dataloader_with_persistent_workers_and_deep_prefetch_resumes_across_epochs():
    n = 22
    make = lambda: RandomBatchSampler(n, 4, seed=5)  # noqa: E731
    expected = [epoch_of(make(), e) for e in range(3)]
    loader_of = lambda s: DataLoader(TensorDataset(torch.arange(n)), batch_sampler=s, num_workers=2,  # noqa: E731
                                     persistent_workers=True, prefetch_factor=3)
    s = make()
    loader = loader_of(s)
    s.set_epoch(0)
    assert _received(loader) == expected[0]
    s.set_epoch(1)
    head = []
    for x, in loader:
        head.append(x.tolist())
        if len(head) == 2:
            break
    assert s.state_dict()["batches_yielded"] > 2  # the workers fetched ahead
    t = make()
    t.load_state_dict(s.state_dict(consumed=2))
    loader = loader_of(t)
    t.set_epoch(1)
    assert head + _received(loader) == expected[1]
    t.set_epoch(2)
    assert _received(loader) == expected[2]  # the reused workers get a clean next epoch


def test_stateful_dataloader_with_persistent_workers_resumes_mid_epoch():
    n = 18
    make = lambda: RandomBatchSampler(n, 4, seed=2)  # noqa: E731
    expected = [b for e in range(2) for b in epoch_of(make(), e)]
    loader_of = lambda s: StatefulDataLoader(TensorDataset(torch.arange(n)), batch_sampler=s,  # noqa: E731
                                             num_workers=2, persistent_workers=True)
    s, state, got = make(), None, []
    loader = loader_of(s)
    for epoch in range(2):
        s.set_epoch(epoch)
        for step, (x,) in enumerate(loader):
            got.append(x.tolist())
            if (epoch, step) == (1, 1):
                state = loader.state_dict()
    assert got == expected
    t = make()
    loader = loader_of(t)
    loader.load_state_dict(state)
    t.set_epoch(1)
    assert expected[: len(expected) // 2 + 2] + _received(loader) == expected


def test_a_state_is_refused_when_the_negatives_or_pairs_handed_out_beside_the_batches_would_differ():
    """TAS's pairs_for and B3++'s extra_negatives_for depend on data the plan does not: recorded too."""
    from batchlab.errors import StaleArtifactError
    from batchlab.samplers import CommunityBatchSampler, TASBalancedBatchSampler

    g = torch.Generator().manual_seed(0)
    x, margins = torch.randn(16, 4, generator=g), [torch.randn(16, 5, generator=g) for _ in range(2)]

    def tas(m=0, **kw):
        return TASBalancedBatchSampler(x, 4, n_clusters=2, method="balanced", teacher_margins=margins[m], **kw)

    state = tas().state_dict()
    tas().load_state_dict(state)
    with pytest.raises(StaleArtifactError, match="other teacher margins"):
        tas(m=1).load_state_dict(state)
    with pytest.raises(StaleArtifactError, match="other teacher margins"):
        tas(n_bins=3).load_state_dict(state)
    assert not torch.equal(tas().pairs_for(range(16)), tas(m=1).pairs_for(range(16)))  # what resuming would change

    groups = torch.arange(16) // 2
    ids = [torch.randint(0, 16, (16, 4), generator=g) for _ in range(2)]

    def community(window=0, h=1):
        return CommunityBatchSampler(None, 4, group_size=2, groups=groups, neighbours=(None, ids[window]),
                                     rank_window=(0, 4), extra_negatives=h)

    state = community().state_dict()
    community().load_state_dict(state)
    with pytest.raises(BatchlabInputError, match="extra_negatives=1 in the state but extra_negatives=2 here"):
        community(h=2).load_state_dict(state)
    with pytest.raises(StaleArtifactError, match="other rank-window neighbours"):
        community(window=1).load_state_dict(state)
