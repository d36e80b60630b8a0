"""Partitions and communities: planted structure recovered, size guarantees, determinism, bad input."""

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp

from batchlab.datasets.synthetic import gaussian_mixture
from batchlab.errors import BatchlabInputError
from batchlab.index import knn
from batchlab.samplers.communities import (
    adjusted_rand_index,
    detect_communities,
    partition_graph,
    partition_quality,
    repair_sizes,
)
from batchlab.samplers.graph import rank_window_graph, to_networkx


def planted_graph(n_blocks, block, degree_in=12, degree_out=1, seed=0):
    """SBM-like sparse graph: ~degree_in random neighbours inside each block, ~degree_out outside."""
    rng = np.random.default_rng(seed)
    n = n_blocks * block
    labels = np.repeat(np.arange(n_blocks), block)
    rows = np.repeat(np.arange(n), degree_in + degree_out)
    inside = labels[:, None] * block + rng.integers(0, block, (n, degree_in))
    outside = rng.integers(0, n, (n, degree_out))
    cols = np.concatenate([inside, outside], axis=1).ravel()
    keep = rows != cols
    a = sp.csr_matrix((np.ones(keep.sum(), np.float32), (rows[keep], cols[keep])), shape=(n, n))
    a = ((a + a.T) > 0).astype(np.float32)
    return sp.csr_matrix(a), labels


def assert_sizes_within_one(groups, k):
    sizes = np.bincount(groups)
    assert sizes.min() >= k - 1 and sizes.max() <= k + 1, (sizes.min(), sizes.max())


def test_metis_recovers_planted_blocks_of_size_k():
    graph, labels = planted_graph(40, 32)
    groups = partition_graph(graph, 32, method="metis", seed=0)
    assert_sizes_within_one(groups, 32)
    assert adjusted_rand_index(labels, groups) > 0.9


@pytest.mark.parametrize("method, backend", [("louvain", "igraph"), ("leiden", "igraph"), ("louvain", "networkx")])
def test_modularity_methods_recover_planted_communities(method, backend):
    graph, labels = planted_graph(8, 100, seed=1)
    found = detect_communities(graph, method=method, backend=backend, seed=0)
    assert adjusted_rand_index(labels, found) > 0.9
    # the same graph partitioned to K=25: groups stay inside the planted communities
    groups = partition_graph(graph, 25, method=method, backend=backend, seed=0)
    assert_sizes_within_one(groups, 25)
    purity = np.mean([np.bincount(labels[groups == g]).max() / (groups == g).sum() for g in np.unique(groups)])
    assert purity > 0.9


def test_end_to_end_from_embeddings_groups_stay_in_clusters():
    x, y = gaussian_mixture(1024, 32, 4, sigma=0.5, seed=0)  # clusters of 256 > the window's 60
    scores, ids = knn(x, 60, kind="torch", progress=False)
    graph = rank_window_graph(ids, scores, window=(10, 60))
    groups = partition_graph(graph, 32, seed=0)
    assert_sizes_within_one(groups, 32)
    purity = np.mean([np.bincount(y.numpy()[groups == g]).max() / (groups == g).sum() for g in np.unique(groups)])
    assert purity > 0.95


@pytest.mark.parametrize("method", ["metis", "louvain", "leiden"])
def test_same_seed_same_groups(method):
    graph, _ = planted_graph(20, 30, degree_in=6, degree_out=3, seed=2)
    a = partition_graph(graph, 30, method=method, seed=3)
    b = partition_graph(graph, 30, method=method, seed=3)
    np.testing.assert_array_equal(a, b)


def test_networkx_graph_input_uses_networkx_louvain():
    graph, labels = planted_graph(4, 50, seed=3)
    nx_graph = to_networkx(graph)
    a = detect_communities(nx_graph, seed=5)
    b = detect_communities(graph, backend="networkx", seed=5)
    np.testing.assert_array_equal(a, b)
    groups = partition_graph(nx_graph, 50, method="louvain", seed=5)
    assert adjusted_rand_index(labels, groups) > 0.9


@pytest.mark.parametrize("seed", range(6))
def test_repair_sizes_guarantee_on_arbitrary_labels(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1100, 3000)), int(rng.integers(8, 33))
    # a mix of huge, medium, tiny and singleton communities
    cuts = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(5, 200)), replace=False))
    labels = np.zeros(n, dtype=np.int64)
    labels[cuts] = 1
    labels = np.cumsum(labels)[rng.permutation(n)]
    groups = repair_sizes(labels, k, position=rng.permutation(n))
    assert groups.shape == (n,)
    assert_sizes_within_one(groups, k)
    assert np.array_equal(np.unique(groups), np.arange(groups.max() + 1))


def test_repair_keeps_groups_that_already_fit_and_splits_along_the_order():
    labels = np.array([0] * 10 + [1] * 11 + [2] * 20)  # K=10: keep 0 and 1, split 2 into two runs
    groups = repair_sizes(labels, 10, position=np.arange(41))
    assert len(set(groups[:10])) == 1 and len(set(groups[10:21])) == 1
    assert sorted(np.bincount(groups).tolist()) == [10, 10, 10, 11]
    assert len(set(groups[21:31])) == 1 and len(set(groups[31:])) == 1


def test_small_n_falls_back_to_balanced_groups_with_a_warning():
    graph, _ = planted_graph(1, 100, seed=0)
    with pytest.warns(UserWarning, match="too small"):
        groups = partition_graph(graph, 32, method="louvain")
    sizes = np.bincount(groups)
    assert sizes.sum() == 100 and sizes.max() - sizes.min() <= 1 and len(sizes) == 3


def test_isolated_nodes_and_empty_graph_are_placed():
    graph, _ = planted_graph(10, 32, seed=4)
    lil = graph.tolil()
    lil[:40, :] = 0
    lil[:, :40] = 0  # 40 isolated nodes
    graph = lil.tocsr()
    graph.eliminate_zeros()
    for method in ("metis", "louvain"):
        groups = partition_graph(graph, 32, method=method)
        assert_sizes_within_one(groups, 32)
    empty = sp.csr_matrix((320, 320), dtype=np.float32)
    for method in ("metis", "louvain", "leiden"):
        assert_sizes_within_one(partition_graph(empty, 32, method=method), 32)


def test_partition_quality_matches_networkx():
    graph, labels = planted_graph(6, 40, degree_out=2, seed=5)
    quality = partition_quality(graph, labels)
    nx_graph = to_networkx(graph)
    communities = [set(np.flatnonzero(labels == c).tolist()) for c in range(6)]
    assert quality["modularity"] == pytest.approx(nx.community.modularity(nx_graph, communities), abs=1e-6)
    cut = sum(1 for u, v in nx_graph.edges if labels[u] != labels[v])
    assert quality["edge_cut"] == pytest.approx(cut)
    assert quality["n_groups"] == 6 and quality["size_min"] == quality["size_max"] == 40


def test_adjusted_rand_index_reference_values():
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    # hand computation: contingency [[1,1],[1,1]] -> index 0, expected 2*2/6, max 2
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx((0 - 4 / 6) / (2 - 4 / 6))
    rng = np.random.default_rng(0)
    assert abs(adjusted_rand_index(rng.integers(0, 5, 5000), rng.integers(0, 5, 5000))) < 0.01


def test_bad_input():
    graph, _ = planted_graph(2, 20)
    with pytest.raises(BatchlabInputError, match="larger than the number of examples"):
        partition_graph(graph, 41)
    with pytest.raises(BatchlabInputError, match="symmetric"):
        partition_graph(sp.triu(graph).tocsr(), 10)
    with pytest.raises(BatchlabInputError, match="dense"):
        partition_graph(graph.toarray(), 10)
    with pytest.raises(BatchlabInputError, match="method"):
        partition_graph(graph, 10, method="spectral")
    with pytest.raises(BatchlabInputError, match="Leiden"):
        detect_communities(graph, method="leiden", backend="networkx")
    with pytest.raises(BatchlabInputError, match="backend"):
        partition_graph(graph, 10, method="metis", backend="igraph")
    with pytest.raises(BatchlabInputError, match="group_size"):
        partition_graph(graph, 0)


def test_metis_ufactor_still_meets_the_size_guarantee():
    graph, labels = planted_graph(30, 32, degree_out=3, seed=6)
    groups = partition_graph(graph, 32, metis_ufactor=150, seed=0)
    assert_sizes_within_one(groups, 32)
    assert adjusted_rand_index(labels, groups) > 0.8


def assert_exact_sizes(groups, k):
    """N // K groups of exactly K, plus one remainder group of N % K (the last id) when K does not divide N."""
    sizes = np.bincount(groups)
    n = groups.size
    expected = [k] * (n // k) + ([n % k] if n % k else [])
    assert sizes.tolist() == expected, (sizes.min(), sizes.max(), len(sizes))


@pytest.mark.parametrize("seed", range(6))
def test_repair_sizes_exact_on_arbitrary_labels(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(40, 3000)), int(rng.integers(2, 33))  # includes N < K (K - 1), where +-1 fails
    cuts = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(1, 30)), replace=False))
    labels = np.zeros(n, dtype=np.int64)
    labels[cuts] = 1
    labels = np.cumsum(labels)[rng.permutation(n)]
    assert_exact_sizes(repair_sizes(labels, k, position=rng.permutation(n), exact=True), k)


def test_exact_sizes_move_few_examples_from_the_within_one_groups():
    graph, labels = planted_graph(40, 32, seed=2)
    loose = partition_graph(graph, 30, seed=0)  # 43 METIS parts of 29..30 for 1280 = 42 * 30 + 20
    exact = partition_graph(graph, 30, seed=0, exact=True)
    assert_exact_sizes(exact, 30)
    assert (np.bincount(loose) != 30).sum() > 1  # the test needs sizes to repair
    # same partition up to the moved examples: each group keeps all but a few of its members
    assert adjusted_rand_index(loose, exact) > 0.85
    kept = [np.bincount(exact[loose == g]).max() for g in np.unique(loose)]
    assert np.mean(np.bincount(loose)[np.unique(loose)] - np.array(kept)) <= 2


def test_exact_sizes_with_a_remainder_and_isolated_nodes():
    graph, _ = planted_graph(10, 32, seed=4)
    lil = graph.tolil()
    lil[:40, :] = 0
    lil[:, :40] = 0
    graph = lil.tocsr()
    graph.eliminate_zeros()
    for method in ("metis", "louvain"):
        assert_exact_sizes(partition_graph(graph, 30, method=method, exact=True), 30)  # 320 = 10 * 30 + 20
