"""Groups of exactly ``K`` (within one) from a similarity graph: METIS, Louvain, Leiden.

B3 partitions its mutual rank-window graph (:mod:`batchlab.samplers.graph`) with
METIS into balanced parts of ``K`` examples (min edge cut), and builds each batch
from ``|B| / K`` random parts. This module offers that partition and two
community-detection alternatives, all ending in the same size guarantee:

* ``method="metis"`` (default): ``pymetis.part_graph`` into ``round(N / K)`` parts;
* ``method="louvain"`` / ``"leiden"``: modularity communities from python-igraph
  (``community_multilevel`` / ``community_leiden``; about 20x faster than
  networkx's Louvain at the same modularity), or networkx's
  ``louvain_communities`` with ``backend="networkx"`` (the default when the graph
  is a ``networkx.Graph``). Communities have no size control, so
* :func:`repair_sizes` splits big communities and merges small ones along a
  locality order (reverse Cuthill-McKee, which places graph neighbours near each
  other) until every group has ``K - 1``, ``K`` or ``K + 1`` members. Nothing is
  dropped: isolated nodes are merged into groups like any other small piece.

Size guarantee: every group has ``K - 1 .. K + 1`` members whenever that is
possible, which it is as soon as ``N >= K * (K - 1)`` or so; for smaller ``N`` the
groups are balanced instead (``max(1, round(N / K))`` groups whose sizes differ by
at most one) and a warning says so. With ``exact=True`` (what the B3 sampler asks for)
every group has exactly ``K`` members but one remainder group of ``N % K``, for any
``N >= K``, so that ``|B| / K`` groups fill a batch exactly.

Example
-------
>>> from batchlab.datasets.synthetic import gaussian_mixture
>>> from batchlab.samplers.graph import rank_window_graph
>>> x, y = gaussian_mixture(640, 16, 4, seed=0)
>>> scores, ids = (x @ x.T).fill_diagonal_(-2).topk(60, dim=1)
>>> labels = partition_graph(rank_window_graph(ids, scores, window=(10, 60)), 32)
>>> sizes = np.bincount(labels); int(sizes.min()), int(sizes.max()), len(sizes)
(31, 33, 20)
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batchlab._checks import check_choice, check_positive_int
from batchlab.errors import BatchlabInputError

if TYPE_CHECKING:
    import scipy.sparse

logger = logging.getLogger(__name__)

METHODS = ("metis", "louvain", "leiden")
BACKENDS = ("igraph", "networkx")


# -- input ---------------------------------------------------------------------
def _is_networkx(graph: Any) -> bool:
    return type(graph).__module__.startswith("networkx")


def as_csr(graph: Any) -> "scipy.sparse.csr_matrix":
    """A symmetric float32 CSR matrix from a scipy sparse matrix/array or a networkx graph."""
    import scipy.sparse as sp

    if _is_networkx(graph):
        from batchlab.samplers.graph import from_networkx

        return from_networkx(graph)
    if not sp.issparse(graph):
        raise BatchlabInputError(
            f"graph must be a scipy sparse matrix (from rank_window_graph) or a networkx.Graph, "
            f"got {type(graph).__name__}; never pass a dense N x N matrix"
        )
    graph = sp.csr_matrix(graph, dtype=np.float32)
    if graph.shape[0] != graph.shape[1]:
        raise BatchlabInputError(f"graph must be square (N, N), got shape {graph.shape}")
    if graph.nnz and not np.isfinite(graph.data).all():
        raise BatchlabInputError("graph has NaN or Inf edge weights")
    if (graph != graph.T).nnz:
        raise BatchlabInputError(
            "graph must be symmetric (an undirected graph storing both directions); "
            "symmetrise it with (graph + graph.T) / 2"
        )
    graph.sort_indices()
    return graph


def _positive_weights(w: np.ndarray) -> np.ndarray:
    """Modularity and METIS need positive weights; a rare negative similarity becomes tiny."""
    if w.size and w.min() <= 0:
        logger.info("clipping %d non-positive edge weights to 1e-6", int((w <= 0).sum()))
        w = np.maximum(w, 1e-6)
    return w


# -- community detection (no size control) -------------------------------------
def _igraph_communities(graph, method: str, seed: int, resolution: float) -> np.ndarray:
    import igraph
    import scipy.sparse as sp

    upper = sp.triu(graph, k=1).tocoo()
    g = igraph.Graph(n=graph.shape[0], edges=np.column_stack([upper.row, upper.col]).tolist())
    g.es["weight"] = _positive_weights(upper.data.astype(np.float64))
    # igraph draws from a process-wide Python RNG (the `random` module by default):
    # seed a private one for this call and put the default back afterwards.
    igraph.set_random_number_generator(random.Random(seed))
    try:
        if method == "louvain":
            clustering = g.community_multilevel(weights="weight", resolution=resolution)
        else:
            clustering = g.community_leiden(
                objective_function="modularity", weights="weight", resolution=resolution, n_iterations=-1
            )
    finally:
        igraph.set_random_number_generator(random)
    return np.asarray(clustering.membership, dtype=np.int64)


def _networkx_communities(graph, nx_graph, seed: int, resolution: float) -> np.ndarray:
    import networkx as nx

    from batchlab.samplers.graph import to_networkx

    if nx_graph is None:
        nx_graph = to_networkx(graph)
    communities = nx.community.louvain_communities(nx_graph, weight="weight", resolution=resolution, seed=seed)
    labels = np.empty(graph.shape[0], dtype=np.int64)
    for c, members in enumerate(communities):
        labels[list(members)] = c
    return labels


def detect_communities(
    graph: Any,
    *,
    method: str = "louvain",
    backend: str | None = None,
    seed: int = 0,
    resolution: float = 1.0,
) -> np.ndarray:
    """Modularity communities (no size control): ``(N,)`` int64 labels ``0 .. C-1``.

    Parameters
    ----------
    graph:
        Symmetric scipy sparse ``(N, N)`` graph, or a ``networkx.Graph`` with nodes ``0 .. N-1``.
    method:
        ``"louvain"`` or ``"leiden"`` (modularity objective).
    backend:
        ``"igraph"`` (default for scipy graphs) or ``"networkx"`` (default for networkx
        graphs; Louvain only, about 20x slower).
    seed:
        Seeds the algorithm's random node order; same seed, same labels.
    resolution:
        Modularity resolution; larger gives smaller communities.

    >>> import scipy.sparse as sp
    >>> two_triangles = sp.csr_matrix(np.kron(np.eye(2), np.ones((3, 3))) - np.eye(6))
    >>> detect_communities(two_triangles).tolist()
    [0, 0, 0, 1, 1, 1]
    """
    method = check_choice("method", method, ("louvain", "leiden"))
    nx_graph = graph if _is_networkx(graph) else None
    backend = _resolve_backend(method, backend, nx_graph)
    return _detect(as_csr(graph), nx_graph, method, backend, seed, resolution)


def _resolve_backend(method: str, backend: str | None, nx_graph: Any) -> str:
    """igraph by default, networkx for a networkx graph; networkx has no Leiden."""
    backend = check_choice("backend", backend or ("networkx" if nx_graph is not None else "igraph"), BACKENDS)
    if backend == "networkx" and method == "leiden":
        raise BatchlabInputError(
            'networkx has no Leiden implementation of its own; use backend="igraph" or method="louvain"'
        )
    return backend


def _detect(csr, nx_graph, method: str, backend: str, seed: int, resolution: float) -> np.ndarray:
    """detect_communities on an already checked CSR graph (and the user's networkx graph, if any)."""
    start = time.perf_counter()
    if backend == "igraph":
        labels = _igraph_communities(csr, method, seed, resolution)
    else:
        labels = _networkx_communities(csr, nx_graph, seed, resolution)
    logger.info(
        "%s (%s): %d communities on %d nodes in %.2fs",
        method, backend, int(labels.max(initial=-1)) + 1, csr.shape[0], time.perf_counter() - start,
    )
    return labels


# -- METIS ---------------------------------------------------------------------
def _metis_parts(graph, n_parts: int, seed: int, use_weights: bool, ufactor: int | None = None) -> np.ndarray:
    import pymetis

    n = graph.shape[0]
    if n_parts == 1 or graph.nnz == 0:
        # METIS has nothing to cut: one part, or singletons that repair_sizes merges.
        return np.zeros(n, dtype=np.int64) if n_parts == 1 else np.arange(n, dtype=np.int64)
    eweights = None
    if use_weights:
        # METIS wants positive integer weights: map the float weights onto 1 .. 100.
        w = graph.data.astype(np.float64)
        low, high = w.min(), w.max()
        scaled = (w - low) / (high - low) if high > low else np.zeros_like(w)
        eweights = (1 + np.rint(99 * scaled)).astype(np.int64)
    options = pymetis.Options(seed=int(seed), **({} if ufactor is None else {"ufactor": int(ufactor)}))
    xadj, adjncy = graph.indptr.astype(np.int64), graph.indices.astype(np.int64)
    if hasattr(pymetis, "CSRAdjacency"):  # pymetis >= 2025.2; xadj/adjncy keywords are deprecated there
        _, parts = pymetis.part_graph(
            n_parts, pymetis.CSRAdjacency(xadj, adjncy), eweights=eweights, options=options
        )
    else:
        _, parts = pymetis.part_graph(n_parts, xadj=xadj, adjncy=adjncy, eweights=eweights, options=options)
    return np.asarray(parts, dtype=np.int64)


# -- size repair ---------------------------------------------------------------
def locality_order(graph) -> np.ndarray:
    """``(N,)`` position of each node in a reverse Cuthill-McKee order (graph neighbours get close positions)."""
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    perm = reverse_cuthill_mckee(graph, symmetric_mode=True)
    position = np.empty(graph.shape[0], dtype=np.int64)
    position[perm] = np.arange(graph.shape[0])
    return position


def _balanced_chunks(members: np.ndarray, n_chunks: int) -> list[np.ndarray]:
    return [c for c in np.array_split(members, n_chunks) if c.size]


def _exact_sizes(groups: list[np.ndarray], k: int, position: np.ndarray) -> list[np.ndarray]:
    """Make ``N // K`` groups of exactly ``K`` and, when ``N % K``, one remainder group of ``N % K``.

    The biggest groups keep their places: each keeps the members nearest its median in
    the locality order, the rest (and any group beyond the ones needed) go to a pool,
    and the pool, sorted by position, refills the short groups taken in order of their
    mean position, so every moved example lands near where it came from. On K +- 1
    groups this moves about one example per group that was not already K.
    """
    n = sum(int(g.size) for g in groups)
    full, rest = divmod(n, k)
    targets = [k] * full + ([rest] if rest else [])
    by_size = sorted(range(len(groups)), key=lambda i: -groups[i].size)  # stable: ties keep their order
    kept: list[np.ndarray] = []
    pool: list[np.ndarray] = []
    for j, i in enumerate(by_size):
        members = groups[i]
        if j >= len(targets):
            pool.append(members)
            continue
        if members.size > targets[j]:
            spread = np.abs(position[members] - np.median(position[members]))
            keep = np.zeros(members.size, dtype=bool)
            keep[np.argsort(spread, kind="stable")[: targets[j]]] = True
            pool.append(members[~keep])
            members = members[keep]
        kept.append(members)
    kept.extend(np.zeros(0, dtype=np.int64) for _ in targets[len(kept) :])
    stream = np.concatenate(pool) if pool else np.zeros(0, dtype=np.int64)
    stream = stream[np.argsort(position[stream], kind="stable")]
    short = [j for j in range(len(kept)) if kept[j].size < targets[j]]
    short.sort(key=lambda j: float(position[kept[j]].mean()) if kept[j].size else float("inf"))
    start = 0
    for j in short:
        need = targets[j] - kept[j].size
        kept[j] = np.concatenate([kept[j], stream[start : start + need]])
        start += need
    assert start == stream.size, "exact group sizes: the pool must refill the short groups exactly"
    return kept


def repair_sizes(
    labels: np.ndarray,
    group_size: int,
    *,
    position: np.ndarray,
    exact: bool = False,
) -> np.ndarray:
    """Turn any labelling into groups of ``group_size`` (within one, or exactly), dropping nothing.

    Parameters
    ----------
    labels:
        ``(N,)`` community labels (any non-negative ints).
    group_size:
        ``K``, the wanted group size.
    position:
        ``(N,)`` locality order (see :func:`locality_order`): big communities are cut
        into runs of consecutive positions, small ones are merged with the small
        ones nearest in this order.
    exact:
        ``False``: sizes ``K - 1 .. K + 1``, which keeps communities of ``K +- 1``
        whole. ``True``: ``N // K`` groups of exactly ``K`` plus, when ``K`` does not
        divide ``N``, one remainder group of ``N % K`` (the last group id), for any
        ``N >= K``: then ``|B| / K`` groups fill a batch of ``|B|`` exactly. Made from
        the ``K +- 1`` groups by moving about one example per group that is not ``K``
        to the nearest short group in the locality order.

    Returns
    -------
    np.ndarray
        ``(N,)`` int64 group ids ``0 .. G-1``; sizes in ``K-1 .. K+1`` when possible
        (see the module docstring), else balanced; with ``exact``, as described there.

    >>> repair_sizes(np.array([0] * 7 + [1, 2, 3]), 5, position=np.arange(10)).tolist()
    [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    >>> np.bincount(repair_sizes(np.array([0] * 6 + [1] * 6 + [2] + [3] * 4), 5, position=np.arange(17), exact=True)).tolist()
    [5, 5, 5, 2]
    """
    k = check_positive_int("group_size", group_size)
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.size
    if k > n:
        raise BatchlabInputError(f"group_size={k} is larger than the number of examples N={n}; use group_size <= N")
    order = np.lexsort((position, labels))  # by community, then by locality
    sizes = np.bincount(labels)
    bounds = np.concatenate([[0], np.cumsum(sizes[sizes > 0])])
    groups: list[np.ndarray] = []
    small: list[np.ndarray] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        members, s = order[a:b], int(b - a)
        if k - 1 <= s <= k + 1:
            groups.append(members)
            continue
        # split: q balanced runs of consecutive positions, if some q makes them all K +- 1
        q = max(1, s // k)
        if s > k + 1 and (k - 1) * q <= s <= (k + 1) * q:
            groups.extend(_balanced_chunks(members, q))
        elif s > k + 1 and (k - 1) * (q + 1) <= s <= (k + 1) * (q + 1):
            groups.extend(_balanced_chunks(members, q + 1))
        else:
            full = s // k
            groups.extend(members[i * k : (i + 1) * k] for i in range(full))
            if s - full * k:
                small.append(members[full * k :])
    # merge: the small pieces, nearest first in the locality order, cut into runs of K
    n_kept = len(groups)
    leftover = np.zeros(0, dtype=np.int64)
    if small:
        small.sort(key=lambda piece: float(position[piece].mean()))
        stream = np.concatenate(small)
        n_full = stream.size // k
        groups.extend(stream[i * k : (i + 1) * k] for i in range(n_full))
        leftover = stream[n_full * k :]
        if leftover.size >= k - 1 or (exact and leftover.size):
            groups.append(leftover)
            leftover = leftover[:0]
    if exact:
        groups = _exact_sizes(groups, k, position)
    elif leftover.size:
        # r < K-1 examples are left: either give one each to r groups that have room
        # (K+1 at most), or borrow K-1-r members, one from each of as many groups of
        # K or K+1, to make one more group of K-1; whichever moves fewer examples.
        # The last merged runs come first: they are the leftovers' neighbours in the order.
        nearby = [i for i in range(len(groups) - 1, n_kept - 1, -1)] + list(range(n_kept))
        receivers = [i for i in nearby if groups[i].size <= k]
        donors = sorted((i for i in nearby if groups[i].size >= k), key=lambda i: -groups[i].size)
        need = k - 1 - leftover.size
        give = len(receivers) >= leftover.size
        if give and (leftover.size <= need or len(donors) < need):
            for node, i in zip(leftover, receivers):
                groups[i] = np.append(groups[i], node)
            leftover = leftover[:0]
        elif len(donors) >= need:
            borrowed = [groups[i][-1] for i in donors[:need]]
            for i in donors[:need]:
                groups[i] = groups[i][:-1]
            groups.append(np.concatenate([leftover, np.asarray(borrowed, dtype=np.int64)]))
            leftover = leftover[:0]
    if leftover.size and not exact:
        # too few examples for K +- 1 everywhere: balanced groups along the same order
        n_groups = max(1, round(n / k))
        key = np.empty(n, dtype=np.int64)
        for g, members in enumerate(groups + [leftover]):
            key[members] = g
        groups = _balanced_chunks(np.lexsort((position, key)), n_groups)
        sizes_now = [g.size for g in groups]
        warnings.warn(
            f"N={n} is too small for groups of {k} +- 1; using {n_groups} balanced groups of "
            f"{min(sizes_now)}..{max(sizes_now)} examples",
            stacklevel=2,
        )
    out = np.empty(n, dtype=np.int64)
    for g, members in enumerate(groups):
        out[members] = g
    return out


# -- the entry point -----------------------------------------------------------
def partition_graph(
    graph: Any,
    group_size: int,
    *,
    method: str = "metis",
    backend: str | None = None,
    seed: int = 0,
    resolution: float = 1.0,
    use_weights: bool = True,
    metis_ufactor: int | None = None,
    exact: bool = False,
) -> np.ndarray:
    """Partition a graph into groups of ``group_size`` (within one, or exactly): B3's METIS step.

    Parameters
    ----------
    graph:
        Symmetric scipy sparse ``(N, N)`` graph (:func:`~batchlab.samplers.graph.rank_window_graph`)
        or a ``networkx.Graph`` with nodes ``0 .. N-1``.
    group_size:
        ``K``. Must be ``<= N``.
    method:
        ``"metis"`` (balanced min-cut parts; B3), ``"louvain"`` or ``"leiden"``
        (modularity communities, then :func:`repair_sizes`).
    backend:
        For Louvain/Leiden: ``"igraph"`` or ``"networkx"`` (see :func:`detect_communities`).
    seed:
        Seeds METIS / igraph / networkx; same seed, same groups.
    resolution:
        Modularity resolution (Louvain/Leiden only).
    use_weights:
        METIS: use the edge weights (mapped onto integers 1..100); else every edge counts 1.
    metis_ufactor:
        METIS's allowed imbalance in thousandths (METIS's default, 30, when ``None``). A
        looser balance (e.g. 100) lets METIS cut fewer edges and leaves more to
        :func:`repair_sizes`: on the planted 100k benchmark it lowered the cut fraction
        from 0.90 to 0.84 and raised top-10 batch hardness from 0.551 to 0.568, but doubled
        the same-item rate (3.7e-4 to 7.5e-4).
    exact:
        Groups of exactly ``K`` plus at most one remainder group of ``N % K`` (see
        :func:`repair_sizes`), so that ``|B| / K`` groups make a batch of ``|B|``:
        what :class:`~batchlab.samplers.CommunityBatchSampler` asks for.

    Returns
    -------
    np.ndarray
        ``(N,)`` int64 group ids ``0 .. G-1``.
    """
    method = check_choice("method", method, METHODS)
    k = check_positive_int("group_size", group_size)
    if method == "metis" and backend is not None:
        raise BatchlabInputError(f'backend={backend!r} applies to louvain/leiden only; METIS always uses pymetis')
    csr = as_csr(graph)
    n = csr.shape[0]
    if k > n:
        raise BatchlabInputError(
            f"group_size={k} is larger than the number of examples N={n}; use group_size <= N "
            "(B3 uses 32 for batches of 1024)"
        )
    start = time.perf_counter()
    if method == "metis":
        labels = _metis_parts(csr, max(1, round(n / k)), seed, use_weights, metis_ufactor)
    else:
        nx_graph = graph if _is_networkx(graph) else None
        labels = _detect(csr, nx_graph, method, _resolve_backend(method, backend, nx_graph), seed, resolution)
    detected = time.perf_counter()
    groups = repair_sizes(labels, k, position=locality_order(csr), exact=exact)
    logger.info(
        "%s: %d groups of %d..%d on %d nodes (partition %.2fs, size repair %.2fs)",
        method, int(groups.max()) + 1, int(np.bincount(groups).min()), int(np.bincount(groups).max()), n,
        detected - start, time.perf_counter() - detected,
    )
    return groups


# -- quality -------------------------------------------------------------------
def partition_quality(graph: Any, labels: np.ndarray) -> dict[str, float | int]:
    """Modularity, edge cut and group sizes of a labelling of ``graph``.

    Returns a dict: ``modularity`` (weighted, resolution 1), ``edge_cut`` (total weight
    of edges between groups), ``cut_fraction`` (share of edges between groups),
    ``n_groups``, ``size_min``, ``size_max``, ``isolated`` (nodes without edges).

    >>> import scipy.sparse as sp
    >>> g = sp.csr_matrix(np.kron(np.eye(2), np.ones((3, 3))) - np.eye(6))
    >>> round(partition_quality(g, np.array([0, 0, 0, 1, 1, 1]))["modularity"], 3)
    0.5
    """
    csr = as_csr(graph)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (csr.shape[0],):
        raise BatchlabInputError(f"labels must have shape ({csr.shape[0]},), got {labels.shape}")
    coo = csr.tocoo()
    same = labels[coo.row] == labels[coo.col]
    total = float(coo.data.sum())  # 2m: both directions stored
    sizes = np.bincount(labels)
    sizes = sizes[sizes > 0]
    if total > 0:
        degree = np.asarray(csr.sum(axis=1)).ravel()
        group_degree = np.bincount(labels, weights=degree)
        modularity = float(coo.data[same].sum()) / total - float((group_degree**2).sum()) / total**2
    else:
        modularity = 0.0
    return {
        "modularity": modularity,
        "edge_cut": float(coo.data[~same].sum()) / 2,
        "cut_fraction": float((~same).mean()) if coo.nnz else 0.0,
        "n_groups": int(sizes.size),
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "isolated": int((np.diff(csr.indptr) == 0).sum()),
    }


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index of two labellings (1 = identical up to renaming, about 0 = chance):
    scikit-learn's ``adjusted_rand_score``, with a batchlab error for labellings of different lengths.

    >>> adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([5, 5, 2, 2]))
    1.0
    """
    from sklearn.metrics import adjusted_rand_score

    a, b = np.asarray(labels_true).reshape(-1), np.asarray(labels_pred).reshape(-1)
    if a.shape != b.shape:
        raise BatchlabInputError(f"labellings differ in length: {a.shape} vs {b.shape}")
    return float(adjusted_rand_score(a, b))


# -- build-batches artifacts ---------------------------------------------------
ARTIFACT_KIND = "b3-batches"
# Every file a build directory has ever held: a manifest-less directory of only these
# (an older build, or one an interrupted writer left) may be replaced by a new build.
ARTIFACT_FILES = ("graph.npz", "groups.npy", "window_ids.npy", "meta.json", "summary.json")
_REBUILD = "rebuild the directory with `batchlab build-batches`"


def save_artifacts(
    directory: str | Path,
    *,
    groups: np.ndarray,
    meta: dict[str, Any],
    summary: dict[str, Any] | None = None,
    graph: Any = None,
    window_ids: np.ndarray | None = None,
) -> Path:
    """Write a ``build-batches`` directory atomically (see :mod:`batchlab._artifacts`).

    Files: ``groups.npy`` ``(N,)`` int64; ``meta.json`` (``meta``, which must hold
    ``n``, ``d``, ``group_size``, ``rank_window`` and ``teacher_hash``); and, when given,
    ``graph.npz`` (CSR), ``window_ids.npy`` ``(N, m)`` and ``summary.json``; plus
    ``manifest.json`` with N, d and the hash of each file. The whole directory is
    replaced: a file of an older build that this one does not write is gone.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "b3"
    >>> meta = {"n": 4, "d": 2, "group_size": 2, "rank_window": [0, 2], "method": "metis", "teacher_hash": "x"}
    >>> _ = save_artifacts(d, groups=np.array([0, 0, 1, 1]), meta=meta)
    >>> load_artifacts(d)[1].tolist()
    [0, 0, 1, 1]
    """
    import json

    import scipy.sparse as sp

    from batchlab._artifacts import write_directory

    n = int(meta["n"])
    with write_directory(directory, kind=ARTIFACT_KIND, n=n, d=meta.get("d"), owned=ARTIFACT_FILES) as tmp:
        np.save(tmp / "groups.npy", np.asarray(groups, dtype=np.int64))
        if graph is not None:
            sp.save_npz(tmp / "graph.npz", graph)
        if window_ids is not None:
            np.save(tmp / "window_ids.npy", window_ids)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if summary is not None:
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return Path(directory)


def _check_ids(name: str, ids: np.ndarray, n: int, path: Any, *, allow_missing: bool) -> None:
    """Integer ids in ``[0, n)`` (``-1`` allowed as padding when ``allow_missing``), else StaleArtifactError."""
    from batchlab.errors import StaleArtifactError

    if not np.issubdtype(ids.dtype, np.integer):
        raise StaleArtifactError(f"{path}: {name} must hold integer ids, got dtype {ids.dtype}; {_REBUILD}")
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < (-1 if allow_missing else 0) or high >= n:
            raise StaleArtifactError(
                f"{path}: {name} holds ids in [{low}, {high}], outside [{'-1' if allow_missing else '0'}, {n}) for "
                f"N={n} examples; {_REBUILD}"
            )


def load_artifacts(directory: str | Path, *, embeddings: Any = None) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """Read and check a ``build-batches`` directory: ``(meta, groups (N,), window_ids (N, m) or None)``.

    Refused with :class:`~batchlab.errors.StaleArtifactError` when any file is missing,
    extra, truncated or changed (manifest hashes), when ``groups`` / ``window_ids`` do
    not have ``N`` rows or hold ids outside ``[0, N)`` (window padding ``-1`` allowed),
    and, given ``embeddings``, when they are not the teacher embeddings the directory
    was built from (shape, then content hash).
    """
    from batchlab._artifacts import open_directory
    from batchlab.errors import StaleArtifactError

    directory = Path(directory)
    with open_directory(directory, kind=ARTIFACT_KIND, what="build-batches directory", rebuild=_REBUILD) as art:
        # one consistent, hash-checked snapshot of the files, whatever writers do meanwhile
        meta = art.json("meta.json")
        groups = art.npy("groups.npy")
        window = art.npy("window_ids.npy") if "window_ids.npy" in art else None
        manifest = art.manifest
    try:
        n, group_size, (start, stop) = int(meta["n"]), int(meta["group_size"]), map(int, meta["rank_window"])
        teacher = meta["teacher_hash"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StaleArtifactError(f"{directory}/meta.json is incomplete ({type(exc).__name__}: {exc}); {_REBUILD}") from exc
    if n != manifest["n"] or meta.get("d") != manifest["d"]:
        raise StaleArtifactError(
            f"{directory}: meta.json says N={n}, d={meta.get('d')} but the manifest N={manifest['n']}, "
            f"d={manifest['d']}; {_REBUILD}"
        )
    if embeddings is not None:
        from batchlab.index import as_tensor, content_hash

        x = as_tensor("embeddings", embeddings)
        if tuple(x.shape) != (n, meta.get("d")):
            raise StaleArtifactError(
                f"the artifacts in {directory} were built from ({n}, {meta.get('d')}) teacher embeddings, but these "
                f"have shape {tuple(x.shape)}; pass the embeddings they were built from, or {_REBUILD}"
            )
        actual = content_hash(x)
        if actual != teacher:
            raise StaleArtifactError(
                f"the artifacts in {directory} were built from embeddings with hash {teacher}, "
                f"but these embeddings hash to {actual}; {_REBUILD}"
            )
    if groups.shape != (n,):
        raise StaleArtifactError(f"{directory}/groups.npy has shape {groups.shape}, expected ({n},); {_REBUILD}")
    _check_ids("groups.npy", groups, n, directory, allow_missing=False)
    if group_size < 1 or group_size > n:
        raise StaleArtifactError(f"{directory}/meta.json: group_size={group_size} for N={n}; {_REBUILD}")
    if window is not None:
        if window.ndim != 2 or window.shape[0] != n or window.shape[1] > max(0, stop - start):
            raise StaleArtifactError(
                f"{directory}/window_ids.npy has shape {window.shape}, expected ({n}, <= {stop - start}) for rank "
                f"window [{start}, {stop}); {_REBUILD}"
            )
        _check_ids("window_ids.npy", window, n, directory, allow_missing=True)
    return meta, groups.astype(np.int64, copy=False), window
