"""The sampler contract, property-tested over random sizes, ranks, drop_last and resume points.

For every batchlab sampler family and a random configuration (N, global batch size,
1/2/4 ranks, drop_last, seed, epoch):

* construction is refused exactly when no equal, non-empty rank split or no batch exists;
* every rank has the same ``len()``; no rank ever gets an empty share, and the shares
  of a global batch are equal;
* every example comes exactly once per epoch across the ranks, or exactly the
  ``N % batch_size`` of the dropped short batch are missing with ``drop_last``;
* resuming from ``state_dict(consumed=k)`` after ``k`` received batches, with batches
  prefetched beyond ``k`` and an abandoned iterator before the pass, continues exactly
  as the uninterrupted epoch, and the next epoch starts clean.

Hypothesis runs a modest number of in-process examples (no worker processes: the
DataLoader and StatefulDataLoader checks are in ``test_resume.py``). The same checker runs
a larger offline sweep: ``python tests/samplers/test_contract.py 10000``.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlab.errors import BatchlabInputError
from batchlab.recipes import RandomBatchSampler
from batchlab.samplers import (
    ClusterBatchSampler,
    CommunityBatchSampler,
    HardNegativeBatchSampler,
    MixedBatchSampler,
    TASBalancedBatchSampler,
)

FAMILIES = ("random", "hard_negative", "cluster", "tas", "community", "mixed")


def make_factory(family: str, n: int, batch: int, *, data_seed: int, group_size: int = 1):
    """``(make(**kw), refuses)``: a builder of the family's sampler and its own size rule.

    ``refuses`` is True when the family refuses this (N, batch) whatever the split
    (batch or group larger than N).
    """
    g = torch.Generator().manual_seed(data_seed)
    if family == "random":
        return (lambda **kw: RandomBatchSampler(n, batch, **kw)), False
    if family == "hard_negative":
        ids = torch.randint(-1, n, (n, 2), generator=g)
        return (lambda **kw: HardNegativeBatchSampler(ids, batch, max_neighbourhood_fraction=0.5, **kw)), batch > n
    if family == "cluster":
        x = torch.randn(n, 4, generator=g)
        size = 1 + data_seed % 4
        return (lambda **kw: ClusterBatchSampler(x, batch, cluster_size=size, **kw)), batch > n
    if family == "tas":
        x = torch.randn(n, 4, generator=g)
        return (lambda **kw: TASBalancedBatchSampler(x, batch, n_clusters=min(n, 3), method="balanced", **kw)), batch > n
    if family == "community":
        groups = (torch.randperm(n, generator=g) // group_size).numpy()
        return (lambda **kw: CommunityBatchSampler(None, batch, group_size=group_size, groups=groups, **kw)), group_size > n
    if family == "mixed":
        share = 0.5 if batch > 1 else 0.0
        structured = batch - round(share * batch)

        def make(**kw):
            base = RandomBatchSampler(n, structured, seed=kw.get("seed", 0))
            return MixedBatchSampler(base, n, batch_size=batch, mix_random=share, **kw)

        return make, False
    raise ValueError(family)


def check_config(family, n, batch, world, drop_last, seed, epoch, stop_share, prefetch, abandon, data_seed,
                 group_size=1, stats=None):
    """Run one configuration; returns a Counter of contract violations (empty when all holds).

    ``stats`` (a Counter), if given, counts the configurations refused and checked.
    """
    bad, stats = Counter(), Counter() if stats is None else stats
    make, family_refuses = make_factory(family, n, batch, data_seed=data_seed, group_size=group_size)
    impossible = family_refuses or (drop_last and n < batch) or (not drop_last and world > 1 and n % world)
    common = dict(seed=seed, drop_last=drop_last, num_replicas=world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # communities of other sizes warn; not under test here
        try:
            ranks = [make(rank=r, **common) for r in range(world)]
            for s in ranks:
                s.set_epoch(epoch)
            lengths = [len(s) for s in ranks]
        except BatchlabInputError:
            stats["refused"] += 1
            if not impossible:
                bad["refused a possible configuration"] += 1
            return bad
        if impossible:
            bad["accepted an impossible configuration"] += 1
            return bad

        if len(set(lengths)) != 1:
            bad["len differs across ranks"] += 1
            return bad
        stats["checked"] += 1
        stats["batches checked"] += lengths[0] * world
        per_rank = [list(s) for s in ranks]
        total = lengths[0]
        if any(len(p) != total for p in per_rank):
            bad["len() is not the number of batches"] += 1
            return bad
        bad["empty batch"] += sum(len(p[i]) == 0 for p in per_rank for i in range(total))
        bad["unequal shares"] += sum(len({len(p[i]) for p in per_rank}) > 1 for i in range(total))
        plan = [sum((p[i] for p in per_rank), []) for i in range(total)]
        bad["short batch before the last"] += sum(len(b) != batch for b in plan[:-1])
        seen = [i for b in plan for i in b]
        bad["repeated"] += len(seen) - len(set(seen))
        allowed = n % batch if drop_last else 0
        bad["lost"] += abs(n - allowed - len(set(seen)))
        bad["out of range"] += sum(not 0 <= i < n for i in seen)

        # resume one rank: k batches received, `prefetch` more fetched ahead, maybe after an abandoned pass
        rank = seed % world
        s = make(rank=rank, **common)
        s.set_epoch(epoch)
        if abandon and total:
            next(iter(s))
        k = round(stop_share * total)
        it = iter(s)
        head = [next(it) for _ in range(min(total, k + prefetch))][:k]
        state = json.loads(json.dumps(s.state_dict(consumed=k)))  # plain values, as saved to disk
        t = make(rank=rank, **common)
        t.load_state_dict(state)
        t.set_epoch(epoch)  # the usual resume loop: set_epoch(saved epoch) keeps the position
        if head + list(t) != per_rank[rank]:
            bad["resume differs from the uninterrupted epoch"] += 1
        t.set_epoch(epoch + 1)
        fresh = make(rank=rank, **common)
        fresh.set_epoch(epoch + 1)
        if list(t) != list(fresh):
            bad["the epoch after a resume is not clean"] += 1
    return +bad  # drop zero counts


def group_size_for(batch: int, pick: int) -> int:
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    return divisors[pick % len(divisors)]


@st.composite
def configs(draw):
    family = draw(st.sampled_from(FAMILIES))
    world = draw(st.sampled_from([1, 2, 4]))
    batch = world * draw(st.integers(1, 6))
    return dict(
        family=family,
        n=draw(st.integers(1, 40)),
        batch=batch,
        world=world,
        drop_last=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
        epoch=draw(st.integers(0, 3)),
        stop_share=draw(st.floats(0, 1)),
        prefetch=draw(st.integers(0, 4)),
        abandon=draw(st.booleans()),
        data_seed=draw(st.integers(0, 1000)),
        group_size=group_size_for(batch, draw(st.integers(0, 10))),
    )


@settings(max_examples=80, deadline=None, derandomize=True)
@given(configs())
def test_sampler_contract(config):
    assert check_config(**config) == Counter(), config


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_on_a_split_with_a_short_last_batch(family):
    # N=30 over 2 ranks with batch 8: a last batch of 6 (3 per rank), resumed after prefetching
    config = dict(n=30, batch=8, world=2, drop_last=False, seed=7, epoch=1, stop_share=0.5, prefetch=2,
                  abandon=True, data_seed=3, group_size=4)
    assert check_config(family, **config) == Counter()


def sweep(count: int, seed: int = 0) -> Counter:
    """``count`` random configurations (larger than the hypothesis test's); the violations found."""
    rng = np.random.default_rng(seed)
    found, stats = Counter(), Counter()
    for _ in range(count):
        world = int(rng.choice([1, 2, 4]))
        batch = world * int(rng.integers(1, 13))
        config = dict(
            family=str(rng.choice(FAMILIES)), n=int(rng.integers(1, 97)), batch=batch, world=world,
            drop_last=bool(rng.integers(2)), seed=int(rng.integers(2**32)), epoch=int(rng.integers(4)),
            stop_share=float(rng.random()), prefetch=int(rng.integers(5)), abandon=bool(rng.integers(2)),
            data_seed=int(rng.integers(1000)), group_size=group_size_for(batch, int(rng.integers(100))),
        )
        bad = check_config(**config, stats=stats)
        if bad:
            print(config, dict(bad))
        found += bad
    print(dict(stats))
    return found


if __name__ == "__main__":
    torch.set_num_threads(1)
    n_configs = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    print(f"{n_configs} configurations:", dict(sweep(n_configs)) or "no violation")
