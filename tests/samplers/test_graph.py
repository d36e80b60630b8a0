"""The mutual rank-window graph against a dense brute-force reference."""

import numpy as np
import pytest
import torch

from batchlab.datasets.synthetic import gaussian_mixture
from batchlab.errors import BatchlabInputError
from batchlab.index import knn
from batchlab.samplers.graph import (
    clamp_window,
    from_networkx,
    knn_graph,
    rank_window_graph,
    to_networkx,
)


def dense_neighbours(x, k):
    """Exact ranked neighbours, self excluded (test reference; dense is fine at this size)."""
    sims = x @ x.T
    sims.fill_diagonal_(-float("inf"))
    return sims.topk(k, dim=1)


def reference_graph(ids, scores, start, stop, weights):
    """Edge i-j iff j in window(i) and i in window(j); weight = mean of both directions."""
    n = ids.shape[0]
    directed = {}
    for i in range(n):
        for r in range(start, stop):
            j = int(ids[i, r])
            if j < 0 or j == i or (i, j) in directed:
                continue
            directed[(i, j)] = float(scores[i, r]) if weights == "similarity" else (stop - r) / (stop - start)
    dense = np.zeros((n, n), dtype=np.float64)
    for (i, j), w in directed.items():
        if (j, i) in directed:
            dense[i, j] = (w + directed[(j, i)]) / 2
    return dense


@pytest.mark.parametrize("weights", ["similarity", "rank"])
def test_matches_dense_reference(weights):
    x, _ = gaussian_mixture(240, 16, 6, sigma=0.6, seed=1)
    scores, ids = dense_neighbours(x, 50)
    graph = rank_window_graph(ids, scores, window=(7, 50), weights=weights)
    expected = reference_graph(ids.numpy(), scores.numpy(), 7, 50, weights)
    # float32 weights vs a float64 reference: 1e-6 covers the rounding of one mean
    np.testing.assert_allclose(graph.toarray(), expected, atol=1e-6)
    assert graph.nnz > 0 and graph.dtype == np.float32
    assert (graph != graph.T).nnz == 0 and graph.diagonal().sum() == 0


def test_ignores_self_padding_and_duplicate_ids():
    # node 0 lists itself, a -1 pad and node 1 twice; 1 lists 0; 2 lists 0 (not mutual)
    ids = np.array([[0, -1, 1, 1], [0, 2, -1, -1], [0, 1, -1, -1]])
    scores = np.array([[1.0, -np.inf, 0.5, 0.5], [0.5, 0.1, -np.inf, -np.inf], [0.2, 0.1, -np.inf, -np.inf]])
    # scores outside the window's valid ids may be -inf: only kept edges' scores must be finite
    graph = rank_window_graph(ids, np.nan_to_num(scores, neginf=0.0), window=(0, 4))
    dense = graph.toarray()
    assert dense[0, 1] == dense[1, 0] == pytest.approx(0.5)
    assert dense[1, 2] == dense[2, 1] == pytest.approx(0.1)
    assert dense[0, 2] == 0 and dense.diagonal().sum() == 0


def test_isolated_nodes_are_kept_as_empty_rows():
    ids = np.array([[1, 2], [2, 0], [1, 0], [0, 1]])  # node 3 points at 0, 1; nobody points back
    graph = rank_window_graph(ids, None, window=(0, 2), weights="rank")
    assert graph.shape == (4, 4)
    assert graph[3].nnz == 0 and graph[:, 3].nnz == 0


def test_knn_graph_equals_graph_of_knn():
    x, _ = gaussian_mixture(300, 16, 5, seed=2)
    graph, (scores, ids) = knn_graph(x, window=(5, 40), return_neighbours=True, kind="torch", progress=False)
    ref_scores, ref_ids = knn(x, 40, kind="torch", progress=False)
    expected = rank_window_graph(ref_ids, ref_scores, window=(5, 40))
    assert (graph != expected).nnz == 0
    assert ids.shape == (300, 40)


def test_small_n_clamps_window_with_warning():
    x, _ = gaussian_mixture(60, 8, 3, seed=0)
    with pytest.warns(UserWarning, match="using \\(30, 59\\)"):
        graph = knn_graph(x, kind="torch", progress=False)  # default window (30, 130)
    assert graph.shape == (60, 60) and graph.nnz > 0


def test_window_swallowing_everything_is_an_error():
    with pytest.raises(BatchlabInputError, match="smaller window"):
        clamp_window((30, 130), 20)
    x, _ = gaussian_mixture(20, 8, 2, seed=0)
    with pytest.raises(BatchlabInputError, match="rank_window"):
        knn_graph(x, kind="torch", progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=(5, 3)), "empty"),
        (dict(window=(0, 60)), "k >= 60"),
        (dict(weights="cosine"), "weights"),
        (dict(neighbour_scores=None), "needs neighbour_scores"),
        (dict(neighbour_scores=np.zeros((100, 7))), "must match"),
        (dict(neighbour_ids=np.zeros((100, 40))), "integer ids"),
        (dict(neighbour_ids=np.full((100, 40), 100)), "only 100 nodes"),
        (dict(neighbour_ids=np.zeros(40, dtype=np.int64)), "shape"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(neighbour_ids=np.zeros((100, 40), dtype=np.int64), neighbour_scores=np.zeros((100, 40)), window=(5, 40))
    args.update(kwargs)
    with pytest.raises(BatchlabInputError, match=match):
        rank_window_graph(args.pop("neighbour_ids"), args.pop("neighbour_scores"), **args)


def test_networkx_round_trip_and_bad_labels():
    x, _ = gaussian_mixture(120, 8, 3, seed=3)
    scores, ids = dense_neighbours(x, 30)
    graph = rank_window_graph(ids, scores, window=(3, 30))
    nx_graph = to_networkx(graph)
    assert nx_graph.number_of_edges() == graph.nnz // 2
    back = from_networkx(nx_graph)
    np.testing.assert_allclose(back.toarray(), graph.toarray())
    import networkx as nx

    with pytest.raises(BatchlabInputError, match="convert_node_labels_to_integers"):
        from_networkx(nx.relabel_nodes(nx_graph, {0: "a"}))
    with pytest.raises(BatchlabInputError, match="undirected"):
        from_networkx(nx.DiGraph(nx_graph))


def test_torch_and_numpy_inputs_agree(gen):
    x = torch.nn.functional.normalize(torch.randn(80, 8, generator=gen), dim=1)
    scores, ids = dense_neighbours(x, 20)
    a = rank_window_graph(ids, scores, window=(2, 20))
    b = rank_window_graph(ids.numpy(), scores.numpy(), window=(2, 20))
    assert (a != b).nnz == 0


def test_query_target_ranking_excludes_each_positive(gen):
    from batchlab.samplers.graph import rank_neighbours

    q = torch.nn.functional.normalize(torch.randn(200, 16, generator=gen), dim=1)
    t = torch.nn.functional.normalize(q + 0.3 * torch.randn(200, 16, generator=gen), dim=1)
    scores, ids = rank_neighbours(q, 30, targets=t, kind="torch", progress=False)
    sims = q @ t.T
    sims.fill_diagonal_(-float("inf"))  # B3: a query ranks every target but its own positive
    ref_scores, _ = sims.topk(30, dim=1)
    torch.testing.assert_close(scores, ref_scores)  # scores, not ids: ties may order either way
    assert not (ids == torch.arange(200)[:, None]).any()
    graph = knn_graph(q, targets=t, window=(3, 30), kind="torch", progress=False)
    assert (graph != graph.T).nnz == 0
    with pytest.raises(BatchlabInputError, match="pair with the queries"):
        rank_neighbours(q, 30, targets=t[:100])
