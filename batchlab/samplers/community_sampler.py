"""B3 batches: each batch is ``batch_size / group_size`` random communities of hard negatives.

B3 ("Breaking the Batch Barrier", arXiv 2505.11293): a teacher ranks every
example's neighbours; the mutual rank-window graph (ranks ``p .. p+m``, so the
``p`` nearest, likely false negatives, are skipped) is partitioned with METIS into
groups of ``K``; each epoch, every batch takes ``|B| / K`` groups at random. B3++
adds ``h`` extra negatives per example, shared by the whole batch, drawn with
probability proportional to how often each candidate appears in the batch
members' rank windows (:meth:`CommunityBatchSampler.extra_negatives_for`).

Example
-------
>>> from batchlab.datasets.synthetic import gaussian_mixture
>>> x, _ = gaussian_mixture(2048, 32, 16, seed=0)
>>> sampler = CommunityBatchSampler(x, 256, group_size=32, rank_window=(10, 60), seed=0)
>>> len(sampler), sorted(i for b in sampler for i in b) == list(range(2048))
(8, True)
"""

from __future__ import annotations

import hashlib
import logging
import warnings
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from batchlab._checks import check_embeddings, check_positive_int
from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.samplers.base import GlobalBatchSampler

logger = logging.getLogger(__name__)


class CommunityBatchSampler(GlobalBatchSampler):
    """Batches of ``batch_size / group_size`` random B3 communities, every example once per epoch.

    Parameters
    ----------
    embeddings:
        ``(N, d)`` teacher embeddings (L2-normalised for cosine), or a pair ``(queries,
        targets)`` of ``(N, d)`` teacher embeddings of paired data: then, as in B3, each
        query ranks all targets but its own positive. May be ``None`` when ``neighbours``
        or ``groups`` is given.
    batch_size:
        The global batch ``|B|``; a multiple of ``group_size`` (a batch is whole groups)
        and of ``num_replicas``.
    group_size:
        ``K``, examples per community (B3: 32). The partition is asked for groups of
        exactly ``K`` plus at most one remainder group of ``N % K`` (``exact=True`` in
        :func:`~batchlab.samplers.communities.partition_graph`), so every full batch is
        ``batch_size / K`` whole groups drawn at random each epoch, and the last batch
        holds the groups left over plus the remainder group. ``drop_last`` drops that
        batch; so that it is not always the same ``N % K`` examples, the remainder group
        trades members with one random full group each epoch (one full batch then holds
        that mixed group). Groups of other sizes (``groups=`` from
        elsewhere, e.g. ``K +- 1`` artifacts, or ``partition_kwargs={"exact": False}``)
        still work, with a warning: the shuffled groups are then concatenated and cut
        into batches of ``batch_size``, so a group can straddle two batches. Either way
        every batch but the last has exactly ``batch_size`` examples.
    rank_window:
        ``(p, p + m)``: neighbours at 0-based ranks ``p .. p+m-1`` form the graph (B3:
        ``(30, 130)``; ``p`` guards against false negatives). Clamped to ``N - 1`` with a warning.
    method:
        ``"metis"`` (B3), ``"louvain"`` or ``"leiden"`` (see :func:`~batchlab.samplers.communities.partition_graph`).
    seed:
        Seeds the partition and each epoch's group order (``seed + epoch``).
    drop_last, num_replicas, rank:
        As in :class:`~batchlab.samplers.base.GlobalBatchSampler`: rank ``r`` gets the
        ``r``-th contiguous slice of each global batch.
    extra_negatives:
        ``h`` (B3++: 5): :meth:`extra_negatives_for` draws ``h * len(batch)`` shared hard
        negatives per batch. Keeps the ``(N, m)`` window ids in memory (int32).
    weights, backend, resolution:
        Edge weights (``"similarity"`` or ``"rank"``), community backend and resolution.
    neighbours:
        Precomputed ``(scores, ids)`` of shape ``(N, k)``, ``k >= p + m``, self excluded
        (from :func:`batchlab.index.knn`); skips the search.
    groups:
        Precomputed ``(N,)`` group ids (e.g. from ``batchlab build-batches``); skips
        the search and the partition.
    index_kwargs:
        Passed to :class:`batchlab.index.EmbeddingIndex` (``kind``, ``nprobe``, ...).
    partition_kwargs:
        Passed to :func:`~batchlab.samplers.communities.partition_graph` (``use_weights``,
        ``metis_ufactor``).
    progress:
        Progress bars for the kNN search (the partition is one library call; its time is logged).

    Attributes
    ----------
    groups : np.ndarray (N,) int64 group id of each example.
    whole_groups : bool, True when every group has ``K`` members but at most one smaller
        remainder group, so every full batch is ``batch_size / K`` whole groups.
    graph : scipy.sparse.csr_matrix or None, the mutual rank-window graph.
    window_ids : np.ndarray (N, m) or None, the rank-window neighbours (kept for B3++).
    """

    def __init__(
        self,
        embeddings: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
        batch_size: int,
        *,
        group_size: int = 32,
        rank_window: tuple[int, int] = (30, 130),
        method: str = "metis",
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        extra_negatives: int = 0,
        weights: str = "similarity",
        backend: str | None = None,
        resolution: float = 1.0,
        neighbours: tuple[Any, Any] | None = None,
        groups: Any = None,
        index_kwargs: dict[str, Any] | None = None,
        partition_kwargs: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, drop_last=drop_last, seed=seed, num_replicas=num_replicas, rank=rank)
        self.group_size = check_positive_int("group_size", group_size)
        self.extra_negatives = check_positive_int("extra_negatives", extra_negatives, minimum=0)
        if self.batch_size % self.group_size:
            raise BatchlabInputError(
                f"batch_size ({self.batch_size}) must be a multiple of group_size ({self.group_size}): "
                f"a B3 batch is batch_size / group_size whole groups. Use e.g. batch_size="
                f"{max(1, round(self.batch_size / self.group_size)) * self.group_size} or a group_size that divides it"
            )
        self.method = method
        self.graph = None
        self.window_ids: np.ndarray | None = None
        self.rank_window = tuple(rank_window)
        if groups is not None:
            self.groups = self._check_groups(groups)
            if neighbours is not None:
                self._keep_window(neighbours, self.groups.size)
        else:
            index_kwargs = {"progress": progress, **(index_kwargs or {})}
            partition_kwargs = {"backend": backend, "resolution": resolution, "exact": True, **(partition_kwargs or {})}
            self.groups = self._build(embeddings, neighbours, weights, index_kwargs, partition_kwargs)
        self.num_examples = int(self.groups.size)
        self.check_num_examples(self.num_examples)
        self._groups_hash: str | None = None
        self._window_hash: str | None = None
        if self.extra_negatives and self.window_ids is None:
            raise BatchlabInputError(
                "extra_negatives > 0 needs each example's rank-window neighbours: pass embeddings or "
                "neighbours=(scores, ids), not only groups"
            )
        order = np.argsort(self.groups, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(self.groups))])
        self._members = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        sizes = np.array([m.size for m in self._members])
        self.whole_groups = bool((sizes == self.group_size).sum() >= sizes.size - 1 and sizes.max() <= self.group_size)
        if not self.whole_groups:
            warnings.warn(
                f"groups have {sizes.min()}..{sizes.max()} members, not exactly group_size={self.group_size} "
                "(but one smaller remainder group), so batches cannot be whole groups: some groups will "
                "straddle two batches. Build the groups with partition_graph(..., exact=True) or "
                "repair_sizes(..., exact=True), as `batchlab build-batches` does",
                stacklevel=2,
            )

    # -- construction ------------------------------------------------------------
    def _check_groups(self, groups: Any) -> np.ndarray:
        groups = np.asarray(groups.cpu() if isinstance(groups, torch.Tensor) else groups)
        if groups.ndim != 1 or groups.size == 0 or not np.issubdtype(groups.dtype, np.integer) or groups.min() < 0:
            raise BatchlabInputError(
                f"groups must be a non-empty (N,) array of non-negative int group ids, got shape "
                f"{groups.shape} and dtype {groups.dtype}"
            )
        if self.group_size > groups.size:
            raise BatchlabInputError(
                f"group_size={self.group_size} is larger than N={groups.size}; use group_size <= {groups.size}"
            )
        if int(groups.max()) >= groups.size:  # sparse labels (e.g. 1e12): renumber 0..G-1, never bincount them
            groups = np.unique(groups, return_inverse=True)[1].reshape(-1)
        return groups.astype(np.int64)

    def _keep_window(self, neighbours: tuple[Any, Any], n: int) -> None:
        from batchlab.samplers.graph import clamp_window

        ids = neighbours[1]
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
        if ids.ndim != 2 or ids.shape[0] != n:
            raise BatchlabInputError(f"neighbour ids must have shape ({n}, k), got {ids.shape}")
        if ids.size and (int(ids.min()) < -1 or int(ids.max()) >= n):
            raise BatchlabInputError(
                f"neighbour ids must be example ids in [0, {n}) (or -1 for none), got values in "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already warned when the graph was built
            start, stop = clamp_window(self.rank_window, n)
        self.window_ids = np.ascontiguousarray(ids[:, start:stop], dtype=np.int32 if n < 2**31 else np.int64)

    def _build(self, embeddings, neighbours, weights, index_kwargs, partition_kwargs) -> np.ndarray:
        from batchlab.samplers.communities import partition_graph
        from batchlab.samplers.graph import clamp_window, rank_neighbours, rank_window_graph

        if neighbours is None:
            if embeddings is None:
                raise BatchlabInputError("pass embeddings, neighbours=(scores, ids), or groups")
            queries, targets = embeddings if isinstance(embeddings, (tuple, list)) else (embeddings, None)
            check_embeddings("embeddings", queries)
            n = queries.shape[0]
            if self.group_size > n:
                raise BatchlabInputError(
                    f"group_size={self.group_size} is larger than the number of examples N={n}; use group_size <= N"
                )
            _, stop = clamp_window(self.rank_window, n)
            neighbours = rank_neighbours(queries, stop, targets=targets, **index_kwargs)
        scores, ids = neighbours
        n = ids.shape[0]
        if self.group_size > n:
            raise BatchlabInputError(
                f"group_size={self.group_size} is larger than the number of examples N={n}; use group_size <= N"
            )
        self.graph = rank_window_graph(ids, scores, window=self.rank_window, weights=weights, num_nodes=n)
        if scores is not None:
            s = scores.float() if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores))
            finite = s[torch.isfinite(s)]
            if finite.numel() and float(finite.max() - finite.min()) < 1e-6:
                warnings.warn(
                    "all neighbour similarities are equal (identical embeddings?): ranks are ties, so "
                    "the communities are arbitrary and the batches no harder than random ones",
                    stacklevel=3,
                )
        if self.extra_negatives:
            self._keep_window((scores, ids), n)
        return partition_graph(self.graph, self.group_size, method=self.method, seed=self.seed, **partition_kwargs)

    @classmethod
    def from_artifacts(
        cls,
        directory: str | Path,
        batch_size: int,
        *,
        embeddings: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> "CommunityBatchSampler":
        """Load the groups (and window ids, for B3++) written by ``batchlab build-batches``.

        When ``embeddings`` is given, its content hash must match the teacher hash the
        artifacts were built from. Every file is checked against the directory's manifest
        (:func:`~batchlab.samplers.communities.load_artifacts`); any mismatch, missing file
        or out-of-range id is a :class:`~batchlab.errors.StaleArtifactError`.
        """
        from batchlab.samplers.communities import load_artifacts

        meta, groups, window = load_artifacts(directory, embeddings=embeddings)
        neighbours = None
        if window is not None:
            p = int(meta["rank_window"][0])
            # the stored columns are ranks p .. p+m-1: pad the first p so rank indices line up
            neighbours = (None, np.concatenate([np.full((window.shape[0], p), -1, window.dtype), window], axis=1))
        kwargs.setdefault("group_size", int(meta["group_size"]))
        kwargs.setdefault("rank_window", tuple(meta["rank_window"]))
        if "method" in meta:  # not one of the keys save_artifacts requires: the default otherwise
            kwargs.setdefault("method", meta["method"])
        return cls(None, batch_size, groups=groups, neighbours=neighbours, **kwargs)

    # -- the plan ----------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self._members)

    def plan_epoch(self, generator: torch.Generator) -> list[list[int]]:
        """Shuffle the groups; each batch is ``batch_size / K`` of them, the remainder group last.

        With groups of other sizes (no :attr:`whole_groups`): concatenate the shuffled
        groups and cut into global batches of ``batch_size``.
        """
        if not self.whole_groups:
            perm = torch.randperm(self.num_groups, generator=generator).numpy()
            order = np.concatenate([self._members[g] for g in perm]).tolist()
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        full = [m for m in self._members if m.size == self.group_size]
        remainder = [m for m in self._members if m.size < self.group_size]
        per_batch = self.batch_size // self.group_size
        if remainder and self.drop_last and full:
            # The remainder group always ends in the dropped last batch: without this, the
            # same N % K examples would never be seen. Each epoch it trades places with
            # random members of one random full group, so the dropped ones vary.
            j = int(torch.randint(len(full), (1,), generator=generator))
            pool = np.concatenate([full[j], remainder[0]])
            pool = pool[torch.randperm(pool.size, generator=generator).numpy()]
            full = full[:j] + [pool[: self.group_size]] + full[j + 1 :]
            remainder = [pool[self.group_size :]]
        perm = torch.randperm(len(full), generator=generator).tolist()
        batches = [[full[g] for g in perm[i : i + per_batch]] for i in range(0, len(full), per_batch)]
        if remainder:
            if batches and len(batches[-1]) < per_batch:
                batches[-1].extend(remainder)
            else:
                batches.append(remainder)
        return [np.concatenate(b).tolist() for b in batches]

    # -- B3++ --------------------------------------------------------------------
    def extra_negatives_for(self, batch: Sequence[int], *, exclude: Sequence[int] | None = None) -> torch.Tensor:
        """B3++'s shared hard negatives for one batch: ``h * len(batch)`` dataset ids.

        Candidate ``j`` is drawn (without replacement) with probability proportional to
        the number of batch members whose rank window contains ``j``; members of the
        batch (and ``exclude``) are never drawn. Fewer are returned when the windows hold
        fewer candidates. Deterministic: the draw depends only on ``seed``, the current
        epoch and the set of ids in ``batch``, so every rank gets the same answer for
        the same batch. Pass the *global* batch (or each rank its slice, which shards
        the pool across ranks).

        Returns
        -------
        torch.LongTensor ``(h * len(batch),)`` at most.

        >>> from batchlab.datasets.synthetic import gaussian_mixture
        >>> x, _ = gaussian_mixture(512, 16, 4, seed=0)
        >>> s = CommunityBatchSampler(x, 64, group_size=16, rank_window=(5, 40), extra_negatives=2)
        >>> batch = next(iter(s)); neg = s.extra_negatives_for(batch)
        >>> neg.shape, bool(set(neg.tolist()).isdisjoint(batch))
        (torch.Size([128]), True)
        """
        if self.window_ids is None or self.extra_negatives == 0:
            raise BatchlabInputError("this sampler was built with extra_negatives=0; pass extra_negatives=h (B3++: 5)")
        members = np.asarray(batch, dtype=np.int64)
        if members.ndim != 1 or members.size == 0 or members.min() < 0 or members.max() >= self.num_examples:
            raise BatchlabInputError(f"batch must be a non-empty list of dataset ids in [0, {self.num_examples})")
        candidates = self.window_ids[members].ravel()
        ids, counts = np.unique(candidates[candidates >= 0], return_counts=True)
        banned = members if exclude is None else np.concatenate([members, np.asarray(exclude, dtype=np.int64)])
        keep = ~np.isin(ids, banned)
        ids, counts = ids[keep], counts[keep]
        wanted = min(self.extra_negatives * members.size, ids.size)
        if wanted == 0:
            return torch.zeros(0, dtype=torch.int64)
        key = zlib.crc32(np.sort(members).tobytes(), zlib.crc32(np.int64([self.seed, self.epoch]).tobytes()))
        generator = torch.Generator().manual_seed(key)
        picked = torch.multinomial(torch.as_tensor(counts, dtype=torch.float64), wanted, generator=generator)
        return torch.as_tensor(ids[picked.numpy()], dtype=torch.int64)

    # -- resumption ----------------------------------------------------------------
    def groups_fingerprint(self, epoch: int | None = None) -> str:
        """A short content hash of :attr:`groups` (every epoch's plan depends on them), computed once."""
        if self._groups_hash is None:
            data = np.ascontiguousarray(self.groups, dtype=np.int64).tobytes()
            self._groups_hash = hashlib.sha1(data).hexdigest()[:16]
        return self._groups_hash

    def window_fingerprint(self, epoch: int | None = None) -> str:
        """A short content hash of the rank-window ids B3++ draws from ("none" without extra_negatives), computed once."""
        if self._window_hash is None:
            if not self.extra_negatives or self.window_ids is None:
                self._window_hash = "none"
            else:
                h = hashlib.sha1(str(self.window_ids.shape).encode())
                h.update(np.ascontiguousarray(self.window_ids, dtype=np.int64).tobytes())
                self._window_hash = h.hexdigest()[:16]
        return self._window_hash

    # extra_negatives and the window: extra_negatives_for's draws, resumed from another state, would differ
    RESUME_SETTINGS = ("group_size", "num_examples", "num_groups", "extra_negatives")
    RESUME_DATA = {"groups": ("groups_fingerprint", "groups"), "window": ("window_fingerprint", "rank-window neighbours")}


def batch_similarity_stats(
    embeddings: torch.Tensor,
    batches: Sequence[Sequence[int]],
    labels: torch.Tensor | np.ndarray | None = None,
    *,
    top_k: int = 10,
) -> dict[str, float]:
    """How hard a set of batches is for a contrastive loss, by the teacher's similarities.

    * ``mean_negative_similarity``: the mean of ``x_i . x_j`` over ordered pairs ``i != j``
      of a batch, ``(|sum x|^2 - sum |x|^2) / (b (b - 1))`` (``O(b d)``). With ``|B| / K``
      groups per batch, only ``(K - 1) / (|B| - 1)`` of these pairs are group mates, so
      this mean moves little.
    * ``top_k_negative_similarity``: for each anchor, the mean similarity of its ``top_k``
      most similar batch mates (the negatives that dominate a low-temperature softmax),
      averaged over anchors; one ``b x b`` product per batch.
    * ``same_label_rate`` (with ``labels``): the share of ordered pairs with equal labels,
      i.e. false negatives where labels mean "the same item".

    All are averaged over batches with at least two members.

    >>> x = torch.eye(4)[[0, 0, 1, 1]]
    >>> stats = batch_similarity_stats(x, [[0, 1], [2, 3]], labels=np.array([0, 0, 1, 1]), top_k=1)
    >>> stats["mean_negative_similarity"], stats["top_k_negative_similarity"], stats["same_label_rate"]
    (1.0, 1.0, 1.0)
    """
    check_embeddings("embeddings", embeddings)
    check_positive_int("top_k", top_k)
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels))
    sims, tops, same = [], [], []
    for batch in batches:
        b = len(batch)
        if b < 2:
            continue
        index = torch.as_tensor(list(batch), dtype=torch.int64, device=embeddings.device)
        x = embeddings.index_select(0, index).float()
        total = x.double().sum(0)
        sims.append(float((total.square().sum() - x.double().square().sum()) / (b * (b - 1))))
        gram = x @ x.T
        gram.fill_diagonal_(-float("inf"))
        tops.append(float(gram.topk(min(top_k, b - 1), dim=1).values.mean()))
        if labels is not None:
            counts = torch.unique(labels[index.cpu()], return_counts=True)[1].double()
            same.append(float((counts.square().sum() - b) / (b * (b - 1))))
    if not sims:
        raise BatchlabInputError("batch_similarity_stats needs at least one batch with two or more members")
    return {
        "mean_negative_similarity": float(np.mean(sims)),
        "top_k_negative_similarity": float(np.mean(tops)),
        "top_k": top_k,
        "same_label_rate": float(np.mean(same)) if same else None,
        "batches": len(sims),
    }
