"""Cluster batches: balanced 2-means, faiss k-means, ClusterBatchSampler, TAS-Balanced."""

from __future__ import annotations

import math

import pytest
import torch

from batchlab.datasets.synthetic import gaussian_mixture
from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.samplers import ClusterBatchSampler, TASBalancedBatchSampler, balanced_kmeans
from batchlab.samplers.clusters import kmeans
from batchlab.samplers.tas import balanced_margin_choice


# -- the sampler contract, shared with test_hard_negatives.py --------------------------
def assert_sampler_contract(make, n: int, *, epoch: int = 0) -> None:
    """Determinism, epochs differ, exact len, coverage, mid-epoch resume, rank split.

    ``make(**kw)`` builds the sampler under test with extra keyword arguments
    (``seed``, ``num_replicas``, ``rank``, ``drop_last``) over ``n`` examples.
    """
    a, b = make(seed=3), make(seed=3)
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    plan = list(a)
    assert plan == list(b), "same seed and epoch must give the same plan"
    assert len(plan) == len(a)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(n)), "every example exactly once per epoch"
    assert all(len(batch) == a.batch_size for batch in plan[:-1])

    c = make(seed=3)
    c.set_epoch(epoch + 1)
    assert list(c) != plan, "a new epoch must reshuffle"
    d = make(seed=4)
    d.set_epoch(epoch)
    assert list(d) != plan, "another seed must give another plan"

    # mid-epoch resumption: state after k batches -> fresh sampler -> the rest
    k = len(plan) // 2
    e = make(seed=3)
    e.set_epoch(epoch)
    it = iter(e)
    head = [next(it) for _ in range(k)]
    state = e.state_dict()
    f = make(seed=3)
    f.load_state_dict(state)
    assert head + list(f) == plan

    # rank split: the ranks' equal slices put together are the global batch, lengths agree;
    # an odd n cannot split evenly without drop_last, and is refused at construction
    split = {}
    if n % 2:
        with pytest.raises(BatchlabInputError, match="equal, non-empty shares"):
            make(seed=3, num_replicas=2, rank=1)
        split = {"drop_last": True}
    ranks = [make(seed=3, num_replicas=2, rank=r, **split) for r in range(2)]
    for r in ranks:
        r.set_epoch(epoch)
    slices = [list(r) for r in ranks]
    whole = [batch for batch in plan if len(batch) == a.batch_size] if split else plan
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    assert [s0 + s1 for s0, s1 in zip(*slices)] == whole
    assert all(len(s0) == len(s1) > 0 for s0, s1 in zip(*slices))

    # drop_last drops only a short final batch
    g = make(seed=3, drop_last=True)
    g.set_epoch(epoch)
    full = [batch for batch in plan if len(batch) == a.batch_size]
    assert list(g) == full and len(g) == len(full)


def purity(labels: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of points whose cluster's majority planted label is their own."""
    table = torch.zeros(int(labels.max()) + 1, int(truth.max()) + 1, dtype=torch.long)
    table.index_put_((labels, truth), torch.ones_like(labels), accumulate=True)
    return float(table.max(1).values.sum()) / len(labels)


@pytest.fixture(scope="module")
def planted():
    # 16 well-separated clusters of exactly 32 points (gaussian_mixture balances labels)
    return gaussian_mixture(512, 16, 16, sigma=0.3, seed=0)


# -- balanced 2-means ----------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(10, 3), (100, 7), (64, 64), (37, 1), (1000, 125), (1001, 126)])
def test_balanced_kmeans_sizes_are_exact(n, k, gen):
    x = torch.randn(n, 8, generator=gen)
    labels = balanced_kmeans(x, k, seed=1)
    sizes = torch.bincount(labels, minlength=k)
    assert labels.shape == (n,) and labels.dtype == torch.long
    assert len(sizes) == k
    # cluster j has n // k + (j < n % k) members: sizes differ by at most one
    expected = torch.tensor([n // k + (j < n % k) for j in range(k)])
    assert torch.equal(sizes, expected)


def reference_balanced_split(x: torch.Tensor, seed: int, iters: int = 10) -> torch.Tensor:
    """One balanced spherical 2-means split written plainly (pyxclib's b_kmeans_dense loop)."""
    x = torch.nn.functional.normalize(x.float(), dim=1)
    n = len(x)
    u = torch.rand(2, 1, generator=torch.Generator().manual_seed(seed))  # the draws balanced_kmeans makes
    first = min(int(u[0, 0] * n), n - 1)
    second = (first + 1 + min(int(u[1, 0] * (n - 1)), n - 2)) % n
    c0, c1 = x[first], x[second]
    n_left = n - n // 2  # leaf 0 takes the extra point
    previous = None
    for _ in range(iters):
        order = torch.argsort(x @ (c0 - c1), descending=True, stable=True)
        left = torch.zeros(n, dtype=torch.bool)
        left[order[:n_left]] = True
        if previous is not None and torch.equal(left, previous):
            break
        previous = left
        c0 = torch.nn.functional.normalize(x[left].sum(0), dim=0)
        c1 = torch.nn.functional.normalize(x[~left].sum(0), dim=0)
    return (~left).long()


@pytest.mark.parametrize("n", [2, 3, 51, 200])
def test_balanced_kmeans_split_matches_plain_reference(n, gen):
    x = torch.randn(n, 6, generator=gen)
    assert torch.equal(balanced_kmeans(x, 2, seed=7), reference_balanced_split(x, seed=7))


def test_projections_in_chunks_match_one_pass(gen):
    from batchlab.samplers.clusters import _projections

    xs, direction = torch.randn(50, 8, generator=gen), torch.randn(3, 8, generator=gen)
    seg_id = torch.randint(0, 3, (50,), generator=gen)
    expected = (xs * direction[seg_id]).sum(1)
    torch.testing.assert_close(_projections(xs, direction, seg_id, chunk=7), expected)


def test_balanced_kmeans_recovers_planted_clusters(planted):
    x, y = planted
    labels = balanced_kmeans(x, 16, seed=0)
    # 16 = 2^4 planted clusters of equal size: the halving tree can find them exactly;
    # a little slack for an unlucky initial pair at one node
    assert purity(labels, y) >= 0.95


def test_balanced_kmeans_beats_random_and_is_deterministic(gen):
    x, y = gaussian_mixture(600, 16, 6, seed=5)
    a, b = balanced_kmeans(x, 12, seed=2), balanced_kmeans(x, 12, seed=2)
    assert torch.equal(a, b)
    random_labels = torch.randperm(600, generator=gen) % 12
    assert purity(a, y) > 0.9 > purity(random_labels, y) + 0.5


def test_balanced_kmeans_bad_input():
    with pytest.raises(BatchlabInputError, match="empty"):
        balanced_kmeans(torch.empty(0, 4), 1)
    with pytest.raises(BatchlabInputError, match="non-finite"):
        balanced_kmeans(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), 1)
    with pytest.raises(BatchlabInputError, match="larger than the number of examples"):
        balanced_kmeans(torch.randn(5, 3), 6)
    with pytest.raises(BatchlabInputError, match=r"\(N, d\)"):
        balanced_kmeans(torch.randn(5), 2)
    with pytest.raises(BatchlabInputError, match="n_clusters"):
        balanced_kmeans(torch.randn(5, 3), 0)


def test_faiss_kmeans_recovers_planted_clusters(planted):
    x, y = planted
    a, b = kmeans(x, 32, seed=0), kmeans(x, 32, seed=0)
    assert torch.equal(a, b), "faiss k-means is seeded"
    # two centroids per planted cluster: pure clusters (with K = 16 exactly, random-init
    # k-means typically merges two planted clusters somewhere: purity 0.81-0.88 over seeds)
    assert purity(a, y) >= 0.9
    assert purity(kmeans(x, 16, seed=0), y) > 0.7


# -- ClusterBatchSampler -------------------------------------------------------------
def test_cluster_sampler_contract(planted):
    x, _ = planted
    x = x[:200]
    make = lambda **kw: ClusterBatchSampler(x, 16, cluster_size=8, **kw)  # noqa: E731
    assert_sampler_contract(make, 200)


def test_cluster_sampler_contract_on_a_scheduled_epoch(planted):
    x, _ = planted
    make = lambda **kw: ClusterBatchSampler(x[:90], 8, cluster_size={0: 1, 2: 4}, method="kmeans", **kw)  # noqa: E731
    assert_sampler_contract(make, 90, epoch=2)


def test_cluster_batches_are_single_planted_clusters(planted):
    x, y = planted
    sampler = ClusterBatchSampler(x, 32, cluster_size=32, seed=0)
    labels = sampler.cluster_labels()
    assert torch.equal(torch.bincount(labels), torch.full((16,), 32))
    batches = list(sampler)
    # clusters are exactly 32 = batch size, so every batch is one whole cluster ...
    assert all(len(set(labels[b].tolist())) == 1 for b in batches)
    # ... and (planted structure recovered) nearly always one planted label
    single = sum(len(set(y[b].tolist())) == 1 for b in batches)
    assert single >= 14
    # random batches almost never are
    random = ClusterBatchSampler(x, 32, cluster_size=1, seed=0)
    assert sum(len(set(y[b].tolist())) == 1 for b in random) == 0


def test_cluster_size_schedule(planted):
    x, _ = planted
    sampler = ClusterBatchSampler(x, 32, cluster_size={0: 1, 2: 4, 4: 16}, seed=0)
    assert torch.equal(sampler.cluster_labels(epoch=0), torch.arange(512))
    for epoch, size in [(1, 1), (2, 4), (3, 4), (4, 16), (9, 16)]:
        assert sampler.cluster_size_for_epoch(epoch) == size
        assert set(torch.bincount(sampler.cluster_labels(epoch=epoch)).tolist()) == {size}

    by_callable = ClusterBatchSampler(x, 32, cluster_size=lambda e: 2 ** (e // 2), seed=0)
    assert by_callable.cluster_size_for_epoch(5) == 4
    # not a divisor: ceil(N / c) clusters of at most c members, within one of each other
    odd = ClusterBatchSampler(x, 32, cluster_size=10, seed=0)
    sizes = torch.bincount(odd.cluster_labels())
    assert len(sizes) == math.ceil(512 / 10) and set(sizes.tolist()) <= {9, 10}

    bad = ClusterBatchSampler(x, 32, cluster_size=lambda e: 0 if e else 1)
    bad.set_epoch(1)
    with pytest.raises(BatchlabInputError, match="schedule gave 0"):
        len(bad)
    with pytest.raises(BatchlabInputError, match="schedule value"):
        ClusterBatchSampler(x, 32, cluster_size={0: 0})
    with pytest.raises(BatchlabInputError, match="empty"):
        ClusterBatchSampler(x, 32, cluster_size={})


def test_refresh_reclusters_and_guards_resumption(planted):
    x, _ = planted
    other = gaussian_mixture(512, 16, 16, seed=9)[0]
    sampler = ClusterBatchSampler(x, 32, cluster_size=8, seed=0)
    before = sampler.cluster_labels().clone()
    it = iter(sampler)
    next(it)
    with pytest.raises(BatchlabInputError, match="mid-epoch"):
        sampler.refresh(other)
    state = sampler.state_dict()
    list(it)  # finish the epoch
    sampler.refresh(other)
    assert sampler.refreshes == 1
    assert not torch.equal(sampler.cluster_labels(), before)
    with pytest.raises(StaleArtifactError, match="clustering"):
        sampler.load_state_dict(state)
    # a sampler rebuilt from the same embeddings resumes the saved state exactly
    again = ClusterBatchSampler(x, 32, cluster_size=8, seed=0)
    again.load_state_dict(state)
    assert len(list(again)) == len(again) - 1
    with pytest.raises(BatchlabInputError, match="rows"):
        sampler.refresh(other[:10])


def test_embeddings_can_come_later(planted):
    x, _ = planted
    sampler = ClusterBatchSampler(None, 32, num_examples=512, cluster_size={0: 1, 1: 8}, seed=0)
    assert sorted(i for b in sampler for i in b) == list(range(512))
    sampler.set_epoch(1)
    with pytest.raises(BatchlabInputError, match="refresh"):
        list(sampler)
    sampler.refresh(x)
    assert set(torch.bincount(sampler.cluster_labels()).tolist()) == {8}
    with pytest.raises(BatchlabInputError, match="num_examples"):
        ClusterBatchSampler(None, 32)
    with pytest.raises(BatchlabInputError, match="does not match"):
        ClusterBatchSampler(x, 32, num_examples=10)


def test_one_row_and_bad_input(planted):
    x, _ = planted
    assert list(ClusterBatchSampler(x[:1], 1, cluster_size=4)) == [[0]]
    with pytest.raises(BatchlabInputError, match="empty"):
        ClusterBatchSampler(torch.empty(0, 8), 4)
    with pytest.raises(BatchlabInputError, match="non-finite"):
        ClusterBatchSampler(torch.tensor([[float("nan"), 0.0]] * 4), 2)
    with pytest.raises(BatchlabInputError, match="larger than the number of examples"):
        ClusterBatchSampler(x[:10], 16)
    with pytest.raises(BatchlabInputError, match="method"):
        ClusterBatchSampler(x, 16, method="spectral")
    with pytest.raises(BatchlabInputError, match="cluster_size"):
        ClusterBatchSampler(x, 16, cluster_size=0)
    with pytest.raises(BatchlabInputError, match="num_replicas"):
        ClusterBatchSampler(x, 15, num_replicas=2, rank=0)


# -- TAS-Balanced --------------------------------------------------------------------
def test_tas_contract(planted):
    x, _ = planted
    make = lambda **kw: TASBalancedBatchSampler(x[:300], 20, n_clusters=6, clusters_per_batch=2, method="balanced", **kw)  # noqa: E731
    assert_sampler_contract(make, 300)


@pytest.mark.parametrize("per_batch", [1, 2])
@pytest.mark.parametrize("method", ["balanced", "kmeans"])
def test_tas_batches_come_from_few_topics(planted, per_batch, method):
    x, y = planted
    sampler = TASBalancedBatchSampler(x, 16, n_clusters=16, clusters_per_batch=per_batch, method=method, seed=0)
    batches = list(sampler)
    labels = sampler.cluster_labels()
    within = sum(len(set(labels[b].tolist())) <= per_batch for b in batches)
    if method == "balanced":
        # clusters of exactly 32 = 2 batches: no cluster ever spills into another's batch
        assert within == len(batches)
    else:
        # k-means sizes are not multiples of the share: the clusters' leftovers (here
        # 13 + 3 + 4 + 12 points) meet in a few mixed batches at the end
        assert within >= len(batches) - 4
        assert all(len(set(labels[b].tolist())) <= per_batch for b in batches[: len(batches) - 4])
    topics = sum(len(set(y[b].tolist())) <= per_batch for b in batches)
    # k-means (K = 16, random init) merges some planted pairs, so fewer batches are one topic
    assert topics >= (0.8 if method == "balanced" else 0.3) * len(batches)
    random = [b for b in ClusterBatchSampler(x, 16, cluster_size=1, seed=0)]
    assert sum(len(set(y[b].tolist())) <= per_batch for b in random) == 0


def test_balanced_margin_choice_is_uniform_over_bins():
    # 90 pairs with margins in the lowest tenth, one pair in each of the 9 other tenths:
    # balanced sampling draws each tenth about equally (uniform would pick bin 0 90% of the time)
    row = torch.cat([torch.rand(90, generator=torch.Generator().manual_seed(0)) * 0.09, torch.arange(1, 10) / 10 + 0.05])
    margins = row.repeat(4000, 1)
    picks = balanced_margin_choice(margins, n_bins=10, generator=torch.Generator().manual_seed(1))
    bins = (margins[0, picks] * 10).long().clamp(max=9)
    freq = torch.bincount(bins, minlength=10).double() / len(picks)
    # binomial std at p=0.1, n=4000 is 0.0047; 0.02 is > 4 standard deviations
    assert (freq - 0.1).abs().max() < 0.02
    # the mask excludes padding: only columns 90.. may be picked
    mask = torch.zeros(4000, 99, dtype=torch.bool)
    mask[:, 90:] = True
    picks = balanced_margin_choice(margins, mask, generator=torch.Generator().manual_seed(1))
    assert int(picks.min()) >= 90


def test_tas_pairs_for(planted):
    x, _ = planted
    margins = torch.randn(512, 30, generator=torch.Generator().manual_seed(0))
    sampler = TASBalancedBatchSampler(x, 32, n_clusters=8, teacher_margins=margins, method="balanced", seed=0)
    batch = next(iter(sampler))
    first = sampler.pairs_for(batch)
    assert first.shape == (32,) and int(first.min()) >= 0 and int(first.max()) < 30
    assert torch.equal(first, sampler.pairs_for(batch, epoch=0)), "deterministic per epoch"
    copy = TASBalancedBatchSampler(x, 32, n_clusters=8, teacher_margins=margins, method="balanced", seed=0)
    assert torch.equal(copy.pairs_for(batch), first), "a copy of the sampler (e.g. in a dataset) agrees"
    assert not torch.equal(sampler.pairs_for(range(512), epoch=1), sampler.pairs_for(range(512), epoch=0))
    with pytest.raises(BatchlabInputError, match="outside"):
        sampler.pairs_for([512])


def test_tas_bad_input(planted):
    x, _ = planted
    with pytest.raises(BatchlabInputError, match="rows"):
        TASBalancedBatchSampler(x, 32, teacher_margins=torch.randn(10, 3), method="balanced")
    with pytest.raises(BatchlabInputError, match="non-finite"):
        TASBalancedBatchSampler(x, 32, teacher_margins=torch.full((512, 3), float("nan")), method="balanced")
    empty_row = torch.ones(512, 3, dtype=torch.bool)
    empty_row[7] = False
    with pytest.raises(BatchlabInputError, match="no candidate pair"):
        TASBalancedBatchSampler(x, 32, teacher_margins=torch.randn(512, 3), pair_mask=empty_row, method="balanced")
    with pytest.raises(BatchlabInputError, match="shaped like"):
        TASBalancedBatchSampler(x, 32, teacher_margins=torch.randn(512, 3), pair_mask=torch.ones(512, 4, dtype=torch.bool))
    with pytest.raises(BatchlabInputError, match="without teacher_margins"):
        TASBalancedBatchSampler(x, 32, pair_mask=empty_row)
    with pytest.raises(BatchlabInputError, match="needs teacher_margins"):
        TASBalancedBatchSampler(x, 32, method="balanced").pairs_for([0])
    with pytest.raises(BatchlabInputError, match="n_clusters"):
        TASBalancedBatchSampler(x, 32, n_clusters=513)
    with pytest.raises(BatchlabInputError, match="clusters_per_batch"):
        TASBalancedBatchSampler(x, 4, clusters_per_batch=5)
    state = TASBalancedBatchSampler(x, 32, n_clusters=8, method="balanced").state_dict()
    with pytest.raises(BatchlabInputError, match="clusters_per_batch"):
        TASBalancedBatchSampler(x, 32, n_clusters=8, clusters_per_batch=2, method="balanced").load_state_dict(state)
