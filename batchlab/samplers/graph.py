"""B3's sparse mutual rank-window graph, built from ranked neighbours.

B3 ("Breaking the Batch Barrier", arXiv 2505.11293) lets a teacher rank every
example's neighbours, keeps ranks ``p .. p+m`` (the top ``p`` are skipped because
they are likely false negatives: duplicates or paraphrases of the positive), and
keeps an edge ``i - j`` only when ``j`` is in ``i``'s window *and* ``i`` is in
``j``'s. The result is a sparse, symmetric graph whose dense regions are sets of
examples that are hard negatives for one another.

The graph is a :class:`scipy.sparse.csr_matrix` of shape ``(N, N)`` with float32
weights, a zero diagonal and both directions of every edge stored. It is never
dense: building it costs ``O(N m log(N m))`` time and ``O(N m)`` memory.

Example
-------
>>> import torch
>>> from batchlab.datasets.synthetic import gaussian_mixture
>>> x, _ = gaussian_mixture(400, 16, 4, seed=0)
>>> scores, ids = (x @ x.T).fill_diagonal_(-2).topk(40, dim=1)
>>> g = rank_window_graph(ids, scores, window=(5, 40))
>>> g.shape, bool((g != g.T).nnz == 0)
((400, 400), True)
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from batchlab._checks import check_choice, check_embeddings
from batchlab.errors import BatchlabInputError

if TYPE_CHECKING:  # scipy and networkx are imported lazily (import batchlab stays fast)
    import networkx
    import scipy.sparse

logger = logging.getLogger(__name__)

WEIGHTS = ("similarity", "rank")


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise BatchlabInputError(f"{name} must have shape (N, k) (ranked neighbours per row), got shape {x.shape}")
    return x


def clamp_window(window: tuple[int, int], n: int, *, available: int | None = None) -> tuple[int, int]:
    """Check a rank window ``(start, stop)`` and clamp ``stop`` to what ``n`` examples allow.

    An example has at most ``n - 1`` neighbours (itself excluded); ``available``
    overrides that count (the columns of a neighbour table that lists them all). A
    ``stop`` beyond it is clamped with a warning; a ``start`` that leaves an empty
    window is an error, because the false-negative guard ``start`` would then
    swallow every neighbour.

    >>> clamp_window((30, 130), 1000)
    (30, 130)
    """
    try:
        start, stop = (int(v) for v in window)
    except (TypeError, ValueError):
        raise BatchlabInputError(f"rank_window must be a pair (start, stop) of ints, got {window!r}") from None
    if start < 0 or stop <= start:
        raise BatchlabInputError(
            f"rank_window=({start}, {stop}) is empty or negative; expected 0 <= start < stop, "
            "e.g. (30, 130): skip the 30 nearest neighbours, keep the next 100"
        )
    limit = n - 1 if available is None else available
    if stop > limit:
        if start >= limit:
            raise BatchlabInputError(
                f"rank_window=({start}, {stop}) needs more than {start} neighbours per example, but only "
                f"{limit} are available (N={n} examples). Pass a smaller window, e.g. "
                f"rank_window=({max(0, limit // 4)}, {limit}), or use more examples"
            )
        warnings.warn(
            f"rank_window=({start}, {stop}) reaches beyond the {limit} neighbours available (N={n} examples); "
            f"using ({start}, {limit}) instead",
            stacklevel=3,
        )
        stop = limit
    return start, stop


def rank_window_graph(
    neighbour_ids: torch.Tensor | np.ndarray,
    neighbour_scores: torch.Tensor | np.ndarray | None = None,
    *,
    window: tuple[int, int] = (30, 130),
    weights: str = "similarity",
    num_nodes: int | None = None,
) -> "scipy.sparse.csr_matrix":
    """The mutual rank-window graph of B3 from each example's ranked neighbours.

    Parameters
    ----------
    neighbour_ids:
        ``(N, k)`` integer ids of each example's neighbours, best first, as returned
        by :func:`batchlab.index.knn` with ``exclude_self=True``. Row ``i`` belongs to
        example ``i``. Ids ``< 0`` (faiss's "no neighbour") and ``i`` itself are ignored.
    neighbour_scores:
        ``(N, k)`` similarities matching ``neighbour_ids``; needed for
        ``weights="similarity"``.
    window:
        ``(p, p + m)``: keep the neighbours at 0-based ranks ``p .. p+m-1``
        (B3: ``(30, 130)``). ``p`` is the false-negative guard. ``k`` must be at
        least ``p + m``; a window beyond ``N - 1`` is clamped with a warning.
    weights:
        ``"similarity"``: the mean of the two directions' scores; ``"rank"``: the
        mean of ``(stop - rank) / (stop - start)`` over the two directions (1 for
        the first rank in the window, ``1/m`` for the last).
    num_nodes:
        Number of nodes; default ``N`` (rows of ``neighbour_ids``).

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(N, N)`` float32, symmetric, zero diagonal, sorted indices. Examples without
        a mutual edge are isolated nodes (empty rows), never dropped.
    """
    import scipy.sparse as sp

    weights = check_choice("weights", weights, WEIGHTS)
    ids = _as_numpy(neighbour_ids, "neighbour_ids")
    n_rows, k = ids.shape
    if not np.issubdtype(ids.dtype, np.integer):
        raise BatchlabInputError(f"neighbour_ids must hold integer ids, got dtype {ids.dtype}")
    n = n_rows if num_nodes is None else int(num_nodes)
    if n < n_rows:
        raise BatchlabInputError(f"num_nodes={n} is smaller than the {n_rows} rows of neighbour_ids")
    if n_rows and (ids.max(initial=-1) >= n):
        raise BatchlabInputError(f"neighbour_ids holds id {int(ids.max())} but there are only {n} nodes")
    start, stop = clamp_window(window, n, available=max(k, n - 1))
    if k < stop:
        if k < n - 1:  # the search stopped short of the window: more neighbours exist
            raise BatchlabInputError(
                f"neighbour_ids has {k} neighbours per row but window=({start}, {stop}) needs {stop}; "
                f"search with k >= {stop}"
            )
        start, stop = clamp_window((start, stop), n, available=k)  # every neighbour is listed
    if weights == "similarity":
        if neighbour_scores is None:
            raise BatchlabInputError('weights="similarity" needs neighbour_scores; pass them or use weights="rank"')
        scores = _as_numpy(neighbour_scores, "neighbour_scores")
        if scores.shape != ids.shape:
            raise BatchlabInputError(
                f"neighbour_scores has shape {scores.shape} but neighbour_ids has shape {ids.shape}; they must match"
            )
        w = scores[:, start:stop].astype(np.float32)
        if not np.isfinite(w).all():
            raise BatchlabInputError("neighbour_scores contains NaN or Inf in the rank window")
    else:
        ranks = np.arange(start, stop, dtype=np.float32)
        w = np.broadcast_to((stop - ranks) / (stop - start), (n_rows, stop - start))
    index_dtype = np.int32 if n < 2**31 - 1 else np.int64
    cols = ids[:, start:stop]
    keep = (cols >= 0) & (cols != np.arange(n_rows)[:, None])
    indptr = np.zeros(n + 1, dtype=np.int64)
    indptr[1 : n_rows + 1] = np.cumsum(keep.sum(axis=1))
    indptr[n_rows + 1 :] = indptr[n_rows]
    indices = cols[keep].astype(index_dtype)
    w = np.asarray(w, dtype=np.float64)[keep]
    n_directed = indices.size
    del cols, keep

    # Everything below is scipy's compiled sparse kernels, O(E) memory, never N x N.
    # The directed window matrix A (row i holds i's window); an id listed twice in a
    # row counts once (sum_duplicates sums, so divide by the multiplicity).
    directed = sp.csr_matrix((w, indices.copy(), indptr.copy()), shape=(n, n))
    directed.sum_duplicates()
    if directed.nnz < n_directed:  # rare (approximate indexes): count and divide
        multiplicity = sp.csr_matrix((np.ones(n_directed), indices, indptr), shape=(n, n))
        multiplicity.sum_duplicates()
        directed.data /= multiplicity.data
        del multiplicity
    del indices
    # Shift weights to >= 1 so that no product below turns an edge into an implicit zero.
    low = float(directed.data.min()) if directed.nnz else 0.0
    directed.data += 1.0 - low
    reverse = directed.T.tocsr()  # (i, j) present iff j -> i is an edge
    reverse.data[:] = 1.0
    forward = directed.multiply(reverse).tocsr()  # w(i -> j) where both directions exist
    del directed, reverse
    forward.sort_indices()
    backward = forward.T.tocsr()  # w(j -> i) at (i, j): the same (symmetric) pattern
    backward.sort_indices()
    assert np.array_equal(forward.indptr, backward.indptr) and np.array_equal(forward.indices, backward.indices)
    graph = forward
    graph.data = ((forward.data + backward.data) / 2 + (low - 1.0)).astype(np.float32)  # mean of both
    del backward
    isolated = int((np.diff(graph.indptr) == 0).sum())
    logger.info(
        "rank-window graph: %d nodes, %d mutual edges (of %d directed), %d isolated, window (%d, %d)",
        n, graph.nnz // 2, n_directed, isolated, start, stop,
    )
    return graph


def rank_neighbours(
    embeddings: torch.Tensor,
    k: int,
    *,
    targets: torch.Tensor | None = None,
    **index_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's ``k`` best-ranked neighbours by the teacher, through :mod:`batchlab.index`.

    Without ``targets``: a self-kNN of ``embeddings``, each example itself excluded.
    With ``targets`` (B3's setting: a teacher ranks the *targets* ``y`` for each query
    ``x``, pairs sharing a row index): the targets are indexed and searched with the
    queries, each query's own positive target excluded.

    Returns ``(scores float32 (N, k), ids int64 (N, k))``, best first.
    """
    from batchlab.index import EmbeddingIndex, knn

    check_embeddings("embeddings", embeddings)
    if targets is None:
        return knn(embeddings, k, exclude_self=True, **index_kwargs)
    check_embeddings("targets", targets)
    if targets.shape != embeddings.shape:
        raise BatchlabInputError(
            f"targets must pair with the queries row by row: shape {tuple(targets.shape)} vs queries "
            f"{tuple(embeddings.shape)}; row i of both is one (query, positive target) pair"
        )
    index = EmbeddingIndex(targets, **index_kwargs)
    return index.search(embeddings, k, exclude_self=True)


def knn_graph(
    embeddings: torch.Tensor,
    *,
    targets: torch.Tensor | None = None,
    window: tuple[int, int] = (30, 130),
    weights: str = "similarity",
    return_neighbours: bool = False,
    **index_kwargs: Any,
):
    """Teacher embeddings -> B3's mutual rank-window graph, through :mod:`batchlab.index`.

    Parameters
    ----------
    embeddings:
        ``(N, d)`` teacher embeddings (L2-normalised for cosine similarity); the queries
        when ``targets`` is given.
    targets:
        Optional ``(N, d)`` teacher embeddings of each query's positive target (B3 ranks
        targets for each query); see :func:`rank_neighbours`.
    window, weights:
        As in :func:`rank_window_graph`; the window is clamped to ``N - 1`` with a warning.
    return_neighbours:
        Also return the ``(N, k)`` ``(scores, ids)`` of the search (used for B3++'s
        extra negatives and saved by ``batchlab build-batches``).
    **index_kwargs:
        Passed to :class:`batchlab.index.EmbeddingIndex` (``kind``, ``progress``, ...).

    Returns
    -------
    graph or (graph, (scores, ids))

    >>> from batchlab.datasets.synthetic import gaussian_mixture
    >>> x, _ = gaussian_mixture(300, 16, 3, seed=0)
    >>> knn_graph(x, window=(5, 30)).shape
    (300, 300)
    """
    check_embeddings("embeddings", embeddings)
    n = embeddings.shape[0]
    if n < 2:
        raise BatchlabInputError(f"a neighbour graph needs at least 2 examples, got N={n}")
    start, stop = clamp_window(window, n)
    scores, ids = rank_neighbours(embeddings, stop, targets=targets, **index_kwargs)
    graph = rank_window_graph(ids, scores, window=(start, stop), weights=weights, num_nodes=n)
    return (graph, (scores, ids)) if return_neighbours else graph


def to_networkx(graph: "scipy.sparse.spmatrix") -> "networkx.Graph":
    """The CSR graph as an undirected weighted ``networkx.Graph`` (nodes ``0 .. N-1``, attribute ``weight``).

    Meant for small graphs and for users' own analyses: networkx stores every edge
    as Python objects (about 1 KB each).

    >>> import scipy.sparse as sp
    >>> g = to_networkx(sp.csr_matrix(([1.0, 1.0], ([0, 1], [1, 0])), shape=(3, 3)))
    >>> g.number_of_nodes(), g.number_of_edges()
    (3, 1)
    """
    import networkx as nx

    return nx.from_scipy_sparse_array(graph, edge_attribute="weight")


def from_networkx(graph: "networkx.Graph", weight: str = "weight") -> "scipy.sparse.csr_matrix":
    """A networkx graph whose nodes are ``0 .. N-1`` as a symmetric float32 CSR matrix."""
    import networkx as nx
    import scipy.sparse as sp

    n = graph.number_of_nodes()
    if set(graph.nodes) != set(range(n)):
        raise BatchlabInputError(
            "the networkx graph's nodes must be the dataset indices 0 .. N-1; relabel them with "
            "networkx.convert_node_labels_to_integers(graph) and keep the mapping"
        )
    if graph.is_directed():
        raise BatchlabInputError("expected an undirected networkx graph; use graph.to_undirected()")
    matrix = nx.to_scipy_sparse_array(graph, nodelist=range(n), weight=weight, dtype=np.float32, format="csr")
    coo = sp.coo_matrix(matrix)
    off_diagonal = coo.row != coo.col  # self-loops carry no pairing information
    matrix = sp.csr_matrix(
        (coo.data[off_diagonal], (coo.row[off_diagonal], coo.col[off_diagonal])), shape=(n, n), dtype=np.float32
    )
    matrix.sort_indices()
    return matrix
