"""Cluster batches: examples that sit close together in embedding space share a batch.

Two ways to cluster, one sampler:

* :func:`balanced_kmeans` — NGAME's balanced hierarchical 2-means. Every node is split
  into two halves by projecting its points onto the direction between its two
  (spherical) 2-means centroids, so leaf sizes are exact: they differ by at most one.
  All nodes of one tree level are split at once (vectorised torch), on the device
  the embeddings live on.
* :func:`kmeans` — plain spherical k-means through faiss (sizes are not balanced).

:class:`ClusterBatchSampler` shuffles the clusters, concatenates them and cuts the
result into batches (NGAME, Dahiya et al., WSDM 2023). The cluster size can grow on a
schedule (larger clusters, harder in-batch negatives), and :meth:`refresh` re-clusters
from the current model's embeddings between epochs. TAS-Balanced topic batches live in
:mod:`batchlab.samplers.tas` and share the clustering machinery here.

Example
-------
>>> from batchlab.datasets.synthetic import gaussian_mixture
>>> x, y = gaussian_mixture(256, 16, 8, seed=0)
>>> sampler = ClusterBatchSampler(x, batch_size=32, cluster_size={0: 1, 2: 8}, seed=0)
>>> len(sampler), sorted(int(s) for s in sampler.cluster_labels(epoch=2).bincount().unique())
(8, [8])
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from batchlab._checks import check_choice, check_embeddings, check_positive_int
from batchlab.errors import BatchlabInputError
from batchlab.index import faiss_seed
from batchlab.samplers.base import GlobalBatchSampler

logger = logging.getLogger(__name__)

CLUSTER_METHODS = ("balanced", "kmeans")


# -- clustering ---------------------------------------------------------------------
def _check_n_clusters(n_clusters: int, n: int) -> int:
    check_positive_int("n_clusters", n_clusters)
    if n_clusters > n:
        raise BatchlabInputError(
            f"n_clusters ({n_clusters}) is larger than the number of examples ({n}); "
            f"use at most {n} clusters (or a larger cluster size)"
        )
    return n_clusters


def _segment_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions covered by the segments ``[start, start + length)`` and each position's segment id."""
    seg_id = torch.repeat_interleave(torch.arange(len(starts), device=starts.device), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    positions = starts[seg_id] + torch.arange(len(seg_id), device=starts.device) - offsets[seg_id]
    return positions, seg_id


def _projections(xs: torch.Tensor, direction: torch.Tensor, seg_id: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """``score[t] = xs[t] . direction[seg_id[t]]``, in row chunks (no second (T, d) temporary)."""
    score = torch.empty(len(xs), device=xs.device)
    for start in range(0, len(xs), chunk):
        rows = slice(start, start + chunk)
        score[rows] = torch.einsum("td,td->t", xs[rows], direction[seg_id[rows]])
    return score


def balanced_kmeans(
    embeddings: torch.Tensor,
    n_clusters: int,
    *,
    iters: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Balanced hierarchical spherical 2-means (NGAME / pyxclib ``b_kmeans_dense``).

    The embeddings are L2-normalised (clustering is by cosine similarity). A node
    holding the leaves ``[lo, lo + k)`` is split into ``k // 2`` and ``k - k // 2`` leaves:
    two random members seed two centroids, points are ranked by their projection on
    ``c_left - c_right`` and the top share goes left, centroids are re-estimated, until
    the split stops changing (at most ``iters`` rounds). Every node of a level is split
    in one batched pass.

    Parameters
    ----------
    embeddings:
        ``(N, d)`` floating tensor, finite. Any device; the work stays there.
    n_clusters:
        ``K`` in ``[1, N]``; any integer, not only powers of two.
    iters:
        Maximum 2-means rounds per level.
    seed:
        Seeds the choice of initial centroids (CPU generator, so CPU and GPU agree).
    progress:
        Show a tqdm bar over tree levels.

    Returns
    -------
    torch.Tensor
        ``(N,)`` int64 labels in ``[0, K)``; cluster ``j`` has ``N // K + (j < N % K)``
        members, so sizes differ by at most one.

    Notes
    -----
    Cost: ``ceil(log2 K)`` levels of at most ``iters`` rounds, each O(N d) plus two
    sorts of N keys, so it grows with log K where k-means grows with K. Memory: a
    normalised float32 copy of the embeddings and one permuted copy per level.

    Example
    -------
    >>> x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    >>> balanced_kmeans(x, 3).bincount().tolist()
    [4, 3, 3]
    """
    check_embeddings("embeddings", embeddings)
    n, d = embeddings.shape
    k_total = _check_n_clusters(n_clusters, n)
    check_positive_int("iters", iters)
    device = embeddings.device
    x = F.normalize(embeddings.float(), dim=1)
    g = torch.Generator().manual_seed(int(seed))

    # leaf j gets base + (j < extra) points; leaf_cum[j] = points in leaves [0, j)
    base, extra = divmod(n, k_total)
    j = torch.arange(k_total + 1, device=device)
    leaf_cum = j * base + j.clamp(max=extra)

    order = torch.arange(n, device=device)  # points laid out segment by segment
    seg_start = torch.zeros(1, dtype=torch.long, device=device)
    seg_len = torch.full((1,), n, dtype=torch.long, device=device)
    seg_k = torch.full((1,), k_total, dtype=torch.long, device=device)
    seg_leaf = torch.zeros(1, dtype=torch.long, device=device)

    levels = math.ceil(math.log2(k_total)) if k_total > 1 else 0
    from tqdm.auto import tqdm

    for _ in tqdm(range(levels), desc="balanced 2-means", unit="level", disable=not progress):
        split = seg_k > 1
        keep = [t[~split] for t in (seg_start, seg_len, seg_k, seg_leaf)]
        s_start, s_len, s_k, s_leaf = (t[split] for t in (seg_start, seg_len, seg_k, seg_leaf))
        n_seg = len(s_start)
        k_left = s_k // 2
        n_left = leaf_cum[s_leaf + k_left] - leaf_cum[s_leaf]

        pos, seg_id = _segment_ranges(s_start, s_len)
        members = order[pos]
        xs = x[members]  # (T, d), grouped by segment
        offsets = torch.cumsum(s_len, 0) - s_len
        # two distinct random members per segment seed the centroids
        u = torch.rand(2, n_seg, generator=g).to(device)
        first = (u[0] * s_len).long().clamp(max=s_len - 1)
        second = (first + 1 + (u[1] * (s_len - 1)).long().clamp(max=s_len - 2)) % s_len
        centroids = torch.stack([xs[offsets + first], xs[offsets + second]], dim=1)  # (S, 2, d)

        previous = None
        for _ in range(iters):
            direction = centroids[:, 0] - centroids[:, 1]
            score = _projections(xs, direction, seg_id)
            # sort by score (descending) inside each segment: two stable sorts = lexsort
            ranked = torch.argsort(score, descending=True, stable=True)
            ranked = ranked[torch.argsort(seg_id[ranked], stable=True)]
            rank_in_seg = torch.empty_like(ranked)
            rank_in_seg[ranked] = torch.arange(len(ranked), device=device) - offsets[seg_id[ranked]]
            left = rank_in_seg < n_left[seg_id]
            if previous is not None and torch.equal(left, previous):
                break
            previous = left
            side = seg_id * 2 + (~left).long()
            sums = torch.zeros(2 * n_seg, d, device=device).index_add_(0, side, xs)
            centroids = F.normalize(sums.view(n_seg, 2, d), dim=-1)
        order[pos] = members[ranked]  # left half first, then right half, per segment

        seg_start = torch.cat([keep[0], s_start, s_start + n_left])
        seg_len = torch.cat([keep[1], n_left, s_len - n_left])
        seg_k = torch.cat([keep[2], k_left, s_k - k_left])
        seg_leaf = torch.cat([keep[3], s_leaf, s_leaf + k_left])

    labels = torch.empty(n, dtype=torch.long, device=device)
    pos, seg_id = _segment_ranges(seg_start, seg_len)
    labels[order[pos]] = seg_leaf[seg_id]
    return labels


def kmeans(embeddings: torch.Tensor, n_clusters: int, *, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Spherical k-means through faiss (``faiss.Kmeans``, seeded); sizes are not balanced.

    Parameters
    ----------
    embeddings:
        ``(N, d)`` floating tensor; L2-normalised here (cosine clustering). Copied to CPU.
    n_clusters:
        ``K`` in ``[1, N]``.
    iters, seed:
        faiss ``niter`` and ``seed``.

    Returns
    -------
    torch.Tensor
        ``(N,)`` int64 labels in ``[0, K)`` (the nearest centroid of each row; some
        clusters may be empty).

    Notes
    -----
    Cost O(iters N K d) on the CPU: fine for TAS-style topic counts (thousands), too
    slow for NGAME-style small clusters at large N (K = N / 32); use
    :func:`balanced_kmeans` there.

    Example
    -------
    >>> x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    >>> kmeans(x, 4).shape
    torch.Size([100])
    """
    check_embeddings("embeddings", embeddings)
    n, d = embeddings.shape
    k = _check_n_clusters(n_clusters, n)
    check_positive_int("iters", iters)
    try:
        import faiss
    except ImportError as err:  # the GPU image has no faiss
        raise BatchlabInputError(
            "method='kmeans' needs faiss (pip install faiss-cpu); use method='balanced' "
            "(pure torch) where faiss is not installed"
        ) from err
    import numpy as np

    x = np.ascontiguousarray(F.normalize(embeddings.detach().float(), dim=1).cpu().numpy())
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    # min_points_per_centroid=1 silences faiss's "too few points" warning for small N;
    # max_points_per_centroid bounds the training sample (faiss's default subsampling).
    km = faiss.Kmeans(d, k, niter=iters, seed=faiss_seed(seed), spherical=True, verbose=False, min_points_per_centroid=1)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return torch.from_numpy(assign[:, 0].astype(np.int64))


def cluster(embeddings: torch.Tensor, n_clusters: int, *, method: str = "balanced", seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Labels ``(N,)`` from :func:`balanced_kmeans` (``method="balanced"``) or :func:`kmeans` (``"kmeans"``)."""
    check_choice("method", method, CLUSTER_METHODS)
    start = time.perf_counter()
    if method == "balanced":
        labels = balanced_kmeans(embeddings, n_clusters, seed=seed, progress=progress)
    else:
        labels = kmeans(embeddings, n_clusters, seed=seed)
    logger.info("%s clustering of %d rows into %d clusters: %.2f s", method, len(labels), n_clusters, time.perf_counter() - start)
    return labels.cpu()


def labels_fingerprint(labels: torch.Tensor) -> str:
    """A short content hash of a clustering (``(N,)`` labels), stored in sampler states."""
    data = labels.detach().to(torch.int64).cpu().contiguous().numpy().tobytes()
    return hashlib.sha1(data).hexdigest()[:16]


# -- shared sampler machinery ---------------------------------------------------------
class _ClusteredSampler(GlobalBatchSampler):
    """Embeddings, clustering cache, ``refresh`` and a clustering hash in the state.

    Subclasses say how many clusters an epoch uses (:meth:`n_clusters_for_epoch`).
    The clustering is a deterministic function of (embeddings, ``n_clusters``, method,
    seed), cached per ``n_clusters``; ``state_dict`` stores its hash, and
    ``load_state_dict`` refuses a state whose clustering differs from this sampler's
    (for example one saved before a :meth:`refresh` with other embeddings).
    """

    def __init__(
        self,
        embeddings: torch.Tensor | None,
        *,
        batch_size: int,
        num_examples: int | None = None,
        method: str = "balanced",
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, drop_last=drop_last, seed=seed, num_replicas=num_replicas, rank=rank)
        self.method = check_choice("method", method, CLUSTER_METHODS)
        self.progress = bool(progress)
        self._embeddings: torch.Tensor | None = None
        self._labels_cache: dict[int, torch.Tensor] = {}
        self._fingerprints: dict[int, str] = {}  # per n_clusters: state_dict() runs once per batch
        self.refreshes = 0
        if embeddings is None:
            if num_examples is None:
                raise BatchlabInputError(
                    "give the embeddings to cluster, or num_examples when the first epochs use "
                    "singleton clusters (cluster size 1) and refresh(embeddings) comes later"
                )
            self.num_examples = check_positive_int("num_examples", num_examples)
        else:
            check_embeddings("embeddings", embeddings)
            if num_examples is not None and num_examples != embeddings.shape[0]:
                raise BatchlabInputError(
                    f"num_examples ({num_examples}) does not match embeddings rows ({embeddings.shape[0]}); "
                    "leave num_examples out when you pass embeddings"
                )
            self.num_examples = embeddings.shape[0]
            self._embeddings = embeddings.detach()
        if self.batch_size > self.num_examples:
            raise BatchlabInputError(
                f"batch_size ({self.batch_size}) is larger than the number of examples "
                f"({self.num_examples}); use batch_size <= {self.num_examples}"
            )
        self.check_num_examples(self.num_examples)

    # -- what subclasses write --------------------------------------------------------
    def n_clusters_for_epoch(self, epoch: int) -> int:
        raise NotImplementedError

    # -- clustering ---------------------------------------------------------------------
    def refresh(self, embeddings: torch.Tensor) -> None:
        """Re-cluster from new embeddings (e.g. the current model's), between epochs.

        Call it after an epoch has finished and before the next ``__iter__``. Calling it
        mid-epoch would change the rest of the epoch's batches, so it raises. States
        saved before a refresh no longer load (their clustering hash differs).
        """
        check_embeddings("embeddings", embeddings)
        if embeddings.shape[0] != self.num_examples:
            raise BatchlabInputError(
                f"refresh got {embeddings.shape[0]} rows but the sampler covers {self.num_examples} "
                "examples; embed the whole dataset, in dataset order"
            )
        if 0 < self._position < len(self):
            raise BatchlabInputError(
                f"refresh() called mid-epoch ({self._position} of {len(self)} batches done); call it "
                "between epochs, after the last batch of an epoch"
            )
        self._embeddings = embeddings.detach()
        self._labels_cache.clear()
        self._fingerprints.clear()
        self._plan_cache = None
        self.refreshes += 1

    def cluster_labels(self, epoch: int | None = None) -> torch.Tensor:
        """``(N,)`` int64 cluster labels used by ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else int(epoch)
        k = self.n_clusters_for_epoch(epoch)
        n = self.num_examples
        if k == n:  # singletons: no clustering (NGAME's random-batch warm-up)
            return torch.arange(n)
        if k == 1:
            return torch.zeros(n, dtype=torch.long)
        if k not in self._labels_cache:
            if self._embeddings is None:
                raise BatchlabInputError(
                    f"epoch {epoch} uses {k} clusters but the sampler has no embeddings yet; call "
                    "refresh(embeddings) before that epoch"
                )
            self._labels_cache[k] = cluster(self._embeddings, k, method=self.method, seed=self.seed, progress=self.progress)
        return self._labels_cache[k]

    def clustering_fingerprint(self, epoch: int | None = None) -> str:
        """Hash of :meth:`cluster_labels` for ``epoch`` (what ``state_dict`` records), cached."""
        epoch = self.epoch if epoch is None else int(epoch)
        k = self.n_clusters_for_epoch(epoch)
        if k not in self._fingerprints:
            self._fingerprints[k] = labels_fingerprint(self.cluster_labels(epoch))
        return self._fingerprints[k]

    # a state saved before a refresh (other embeddings) is refused
    RESUME_DATA = {"clustering": ("clustering_fingerprint", "embeddings' clustering")}


def _resolve_schedule(cluster_size: int | Mapping[int, int] | Callable[[int], int]) -> Callable[[int], int]:
    if callable(cluster_size):
        return cluster_size
    if isinstance(cluster_size, Mapping):
        if not cluster_size:
            raise BatchlabInputError("cluster_size schedule is empty; give e.g. {0: 1, 10: 2, 20: 4}")
        for epoch, size in cluster_size.items():
            check_positive_int("cluster_size schedule epoch", epoch, minimum=0)
            check_positive_int("cluster_size schedule value", size)
        steps = sorted(cluster_size.items())

        def schedule(epoch: int) -> int:
            size = 1  # before the first scheduled epoch: singleton clusters = random batches
            for start, value in steps:
                if epoch >= start:
                    size = value
            return size

        return schedule
    check_positive_int("cluster_size", cluster_size)
    return lambda epoch: cluster_size


class ClusterBatchSampler(_ClusteredSampler):
    """Batches of whole clusters (NGAME): shuffle the clusters, concatenate, cut into batches.

    Points in one cluster are near each other, so the in-batch negatives are harder
    than in a random batch; a larger cluster size gives harder negatives (and more
    false negatives). NGAME starts with singleton clusters (random batches) and doubles
    the cluster size on a schedule, re-clustering with the current encoder.

    Parameters
    ----------
    embeddings:
        ``(N, d)`` teacher or current-model embeddings, in dataset order; ``None`` with
        ``num_examples`` when the first epochs use ``cluster_size=1`` and embeddings come
        later through :meth:`refresh`. The sampler keeps a reference (no copy).
    batch_size:
        Global batch size (split across ranks).
    cluster_size:
        An int, a schedule ``{first_epoch: size}`` (epochs before the first key use size
        1), or a callable ``epoch -> size``. An epoch with size ``c`` uses
        ``K = ceil(N / c)`` clusters, so clusters have at most ``c`` members; with
        ``method="balanced"`` sizes are ``N // K`` or ``N // K + 1`` (exactly ``c`` when
        ``c`` divides ``N``).
    method:
        ``"balanced"`` (:func:`balanced_kmeans`, exact sizes, pure torch) or ``"kmeans"``
        (:func:`kmeans`, faiss, unbalanced).
    num_examples:
        Dataset size when ``embeddings`` is None.
    drop_last, seed, num_replicas, rank:
        As in :class:`~batchlab.samplers.base.GlobalBatchSampler`. The clustering is
        seeded with ``seed``; the order of clusters and of points inside them with
        ``seed + epoch``.
    progress:
        Progress bar while clustering.

    Notes
    -----
    Every example appears exactly once per epoch. A rank gets a contiguous slice of
    each global batch, so a cluster mostly stays on one rank. :meth:`refresh` between
    epochs re-clusters; ``state_dict`` stores a hash of the clustering so a state from
    before a refresh is refused instead of silently resuming into different batches.

    Example
    -------
    >>> from batchlab.datasets.synthetic import gaussian_mixture
    >>> x, y = gaussian_mixture(512, 16, 16, seed=0)
    >>> sampler = ClusterBatchSampler(x, batch_size=32, cluster_size=32, seed=0)
    >>> batch = next(iter(sampler))
    >>> len(batch), len(set(y[batch].tolist())) <= 2
    (32, True)
    """

    def __init__(
        self,
        embeddings: torch.Tensor | None,
        batch_size: int,
        *,
        cluster_size: int | Mapping[int, int] | Callable[[int], int] = 1,
        method: str = "balanced",
        num_examples: int | None = None,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(
            embeddings,
            batch_size=batch_size,
            num_examples=num_examples,
            method=method,
            drop_last=drop_last,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
            progress=progress,
        )
        self._schedule = _resolve_schedule(cluster_size)
        self.cluster_size_for_epoch(0)  # validate early

    def cluster_size_for_epoch(self, epoch: int) -> int:
        """The scheduled cluster size of ``epoch``."""
        size = self._schedule(int(epoch))
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise BatchlabInputError(f"cluster_size schedule gave {size!r} for epoch {epoch}; expected an integer >= 1")
        return size

    def n_clusters_for_epoch(self, epoch: int) -> int:
        return min(self.num_examples, math.ceil(self.num_examples / self.cluster_size_for_epoch(epoch)))

    def plan_epoch(self, generator: torch.Generator) -> list[list[int]]:
        labels = self.cluster_labels(self.epoch)
        n = len(labels)
        # random order inside clusters, then a random order of clusters (both vectorised)
        perm = torch.randperm(n, generator=generator)
        n_labels = int(labels.max()) + 1
        cluster_rank = torch.empty(n_labels, dtype=torch.long)
        cluster_rank[torch.randperm(n_labels, generator=generator)] = torch.arange(n_labels)
        order = perm[torch.argsort(cluster_rank[labels[perm]], stable=True)]
        return [chunk.tolist() for chunk in order.split(self.batch_size)]
