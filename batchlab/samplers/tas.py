"""TAS-Balanced: topic-aware query batches with balanced-margin pair sampling.

Hofstätter et al., "Efficiently Teaching an Effective Dense Retriever with Balanced
Topic Aware Sampling" (SIGIR 2021): cluster the training queries once (k-means on
query embeddings from a baseline model), build each batch from ``n`` random clusters,
and for each query pick its (positive, negative) pair *balanced over the teacher
margin*: split the query's range of margins ``score(pos) - score(neg)`` into ``h``
bins, pick a non-empty bin uniformly, then a pair inside it, so pairs with rare
margins are drawn as often as common ones.

Example
-------
>>> from batchlab.datasets.synthetic import gaussian_mixture
>>> q, topic = gaussian_mixture(400, 16, 8, seed=0)
>>> margins = torch.randn(400, 20, generator=torch.Generator().manual_seed(0))
>>> sampler = TASBalancedBatchSampler(q, batch_size=32, n_clusters=8, teacher_margins=margins)
>>> batch = next(iter(sampler))
>>> sampler.pairs_for(batch).shape   # the chosen candidate pair (column of margins) per query
torch.Size([32])
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from batchlab._checks import check_embeddings, check_positive_int
from batchlab.errors import BatchlabInputError
from batchlab.samplers.base import _check_index
from batchlab.samplers.clusters import _ClusteredSampler

logger = logging.getLogger(__name__)

_PAIR_SEED_SALT = 0x7A5B  # keeps the pair generator's stream apart from the batch plan's


def pair_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s pair choice: (seed, epoch, salt) mixed by numpy's SeedSequence.

    A sum such as ``(seed + epoch) * c`` would give seed 0 at epoch 1 the pairs of seed 1
    at epoch 0; the SeedSequence hash keeps every (seed, epoch) apart.

    >>> pair_seed(0, 1) != pair_seed(1, 0)
    True
    """
    state = np.random.SeedSequence([int(seed), int(epoch), _PAIR_SEED_SALT]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> 1)  # torch seeds must fit in a signed 64-bit integer


def balanced_margin_choice(
    margins: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    n_bins: int = 10,
    generator: torch.Generator | None = None,
    chunk_rows: int = 65536,
) -> torch.Tensor:
    """For each row, pick one candidate column balanced over the margin range (TAS-Balanced).

    Row ``i``'s valid margins span ``[min_i, max_i]``; that range is cut into
    ``n_bins`` equal bins, a non-empty bin is drawn uniformly, then a valid column in
    it uniformly. A row whose margins are all equal falls in one bin (uniform choice).

    Parameters
    ----------
    margins:
        ``(N, P)`` finite teacher margins ``score(pos) - score(neg)`` per candidate pair.
    mask:
        Optional ``(N, P)`` bool, True where a candidate exists (padding is False). Every
        row needs at least one True.
    n_bins:
        ``h`` in the paper (10).
    generator:
        Seeded generator (CPU).
    chunk_rows:
        Rows processed at once (bounds memory at ``chunk_rows * P`` floats).

    Returns
    -------
    torch.Tensor
        ``(N,)`` int64 column index of the chosen pair per row.

    Example
    -------
    >>> m = torch.tensor([[0.0, 0.1, 0.2, 5.0]])
    >>> g = torch.Generator().manual_seed(0)
    >>> picks = torch.stack([balanced_margin_choice(m, n_bins=2, generator=g) for _ in range(1000)])
    >>> round(float((picks == 3).float().mean()), 1)   # the lone large margin: half the draws
    0.5
    """
    check_embeddings("margins", margins)
    check_positive_int("n_bins", n_bins)
    n, p = margins.shape
    if mask is None:
        mask = torch.ones(n, p, dtype=torch.bool)
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool or tuple(mask.shape) != (n, p):
        raise BatchlabInputError(f"mask must be a bool tensor of shape {(n, p)} like margins, got {mask.dtype} {tuple(mask.shape)}")
    empty = ~mask.any(1)
    if bool(empty.any()):
        raise BatchlabInputError(
            f"{int(empty.sum())} row(s) of the mask have no candidate pair (first: row {int(empty.nonzero()[0])}); "
            "every query needs at least one (positive, negative) pair"
        )
    out = torch.empty(n, dtype=torch.long)
    for start in range(0, n, chunk_rows):
        m = margins[start : start + chunk_rows].detach().float().cpu()
        v = mask[start : start + chunk_rows].cpu()
        lo = torch.where(v, m, torch.inf).min(1, keepdim=True).values
        hi = torch.where(v, m, -torch.inf).max(1, keepdim=True).values
        width = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
        bins = ((m - lo) / width * n_bins).long().clamp(0, n_bins - 1)
        bins = torch.where(v, bins, n_bins)  # invalid candidates go to an overflow bin
        counts = torch.zeros(len(m), n_bins + 1).scatter_add_(1, bins, torch.ones_like(m))[:, :n_bins]
        chosen_bin = torch.multinomial((counts > 0).float(), 1, generator=generator)
        in_bin = (bins == chosen_bin).float()
        out[start : start + len(m)] = torch.multinomial(in_bin, 1, generator=generator)[:, 0]
    return out


class TASBalancedBatchSampler(_ClusteredSampler):
    """Topic-aware batches: each batch draws its queries from ``clusters_per_batch`` clusters.

    The queries are clustered once (k-means, as in the paper, or balanced 2-means).
    Each epoch, every cluster's queries are shuffled; a batch picks
    ``clusters_per_batch`` clusters at random (with probability proportional to the
    queries they have left) among those that can still fill a whole share, and takes
    an equal share from each. Clusters' leftovers (fewer than a share) meet in a few
    mixed batches at the end of the epoch. Every query appears exactly once per epoch.

    With ``teacher_margins``, :meth:`pairs_for` gives each query's balanced-margin
    pair choice for the epoch (see :func:`balanced_margin_choice`); the choice depends
    only on ``(seed, epoch)``, so a dataset holding a copy of the sampler can call it.

    Parameters
    ----------
    query_embeddings:
        ``(N, d)`` query embeddings from a baseline model.
    batch_size:
        Global batch size.
    n_clusters:
        Number of topic clusters; default ``max(1, N // 200)`` (the paper: 2,000 clusters
        for 400K queries, and the count "did not matter").
    clusters_per_batch:
        ``n`` in the paper (1 at batch size 32).
    teacher_margins:
        Optional ``(N, P)`` margins ``score(pos) - score(neg)`` of each query's ``P``
        candidate pairs; ``pair_mask`` ``(N, P)`` bool marks the real ones.
    n_bins:
        ``h``, bins of the margin range (10 in the paper).
    method:
        ``"kmeans"`` (faiss, as in the paper) or ``"balanced"`` (pure torch).
    drop_last, seed, num_replicas, rank, progress:
        As in :class:`~batchlab.samplers.clusters.ClusterBatchSampler`.

    Example
    -------
    >>> from batchlab.datasets.synthetic import gaussian_mixture
    >>> q, topic = gaussian_mixture(400, 16, 8, seed=0)
    >>> sampler = TASBalancedBatchSampler(q, batch_size=25, n_clusters=8, method="balanced")
    >>> len(set(topic[next(iter(sampler))].tolist())) <= 2
    True
    """

    def __init__(
        self,
        query_embeddings: torch.Tensor,
        batch_size: int,
        *,
        n_clusters: int | None = None,
        clusters_per_batch: int = 1,
        teacher_margins: torch.Tensor | None = None,
        pair_mask: torch.Tensor | None = None,
        n_bins: int = 10,
        method: str = "kmeans",
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        progress: bool = False,
    ) -> None:
        if query_embeddings is None:
            raise BatchlabInputError("TASBalancedBatchSampler needs query_embeddings (N, d) to cluster")
        super().__init__(
            query_embeddings,
            batch_size=batch_size,
            method=method,
            drop_last=drop_last,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
            progress=progress,
        )
        n = self.num_examples
        self.n_clusters = max(1, n // 200) if n_clusters is None else check_positive_int("n_clusters", n_clusters)
        if self.n_clusters > n:
            raise BatchlabInputError(f"n_clusters ({self.n_clusters}) is larger than the number of queries ({n})")
        self.clusters_per_batch = check_positive_int("clusters_per_batch", clusters_per_batch)
        if self.clusters_per_batch > self.batch_size:
            raise BatchlabInputError(
                f"clusters_per_batch ({clusters_per_batch}) exceeds batch_size ({batch_size}); each cluster "
                "needs at least one query in the batch"
            )
        self.n_bins = check_positive_int("n_bins", n_bins)
        self.teacher_margins = None
        self.pair_mask = None
        if teacher_margins is not None:
            check_embeddings("teacher_margins", teacher_margins)
            if teacher_margins.shape[0] != n:
                raise BatchlabInputError(
                    f"teacher_margins has {teacher_margins.shape[0]} rows but there are {n} queries; give one row "
                    "of candidate-pair margins per query"
                )
            self.teacher_margins = teacher_margins.detach()
            if pair_mask is not None:
                pair_mask = torch.as_tensor(pair_mask)
                if pair_mask.dtype != torch.bool or pair_mask.shape != teacher_margins.shape:
                    raise BatchlabInputError(
                        f"pair_mask must be a bool tensor shaped like teacher_margins {tuple(teacher_margins.shape)}, "
                        f"got {pair_mask.dtype} {tuple(pair_mask.shape)}"
                    )
                empty = ~pair_mask.any(1)
                if bool(empty.any()):
                    raise BatchlabInputError(
                        f"{int(empty.sum())} queries have no candidate pair in pair_mask (first: query "
                        f"{int(empty.nonzero()[0])}); drop those queries or give them a pair"
                    )
            self.pair_mask = pair_mask
        elif pair_mask is not None:
            raise BatchlabInputError("pair_mask was given without teacher_margins")
        self._pairs_cache: tuple[int, torch.Tensor] | None = None
        self._margins_hash: str | None = None

    def n_clusters_for_epoch(self, epoch: int) -> int:
        return self.n_clusters

    def plan_epoch(self, generator: torch.Generator) -> list[list[int]]:
        labels = self.cluster_labels(self.epoch)
        n_labels = int(labels.max()) + 1
        # each cluster's members in a random order: a queue per cluster
        perm = torch.randperm(len(labels), generator=generator)
        grouped = perm[torch.argsort(labels[perm], stable=True)]
        sizes = torch.bincount(labels, minlength=n_labels)
        starts = (torch.cumsum(sizes, 0) - sizes).tolist()
        grouped = grouped.tolist()
        remaining = sizes.clone().double()
        taken = [0] * n_labels
        batches = []
        left = len(grouped)
        while left:
            want = min(self.batch_size, left)
            batch: list[int] = []
            first = True
            while len(batch) < want:
                need = want - len(batch)
                target = self.clusters_per_batch if first else 1
                # prefer clusters that can still fill a whole share, so batches stay pure
                # and the clusters' leftovers meet in a few mixed batches at the end
                full = remaining >= -(-need // target)
                weights = remaining * full if int(full.sum()) >= target else remaining
                n_pick = min(target, int((weights > 0).sum()))
                picks = torch.multinomial(weights, n_pick, replacement=False, generator=generator).tolist()
                # equal shares of what the batch still needs; the first picks get the remainder
                share, extra = divmod(need, n_pick)
                for i, c in enumerate(picks):
                    quota = min(share + (i < extra), int(remaining[c]))
                    s = starts[c] + taken[c]
                    batch.extend(grouped[s : s + quota])
                    taken[c] += quota
                    remaining[c] -= quota
                first = False
            left -= len(batch)
            batches.append(batch)
        return batches

    def pairs_for(self, batch: list[int] | torch.Tensor, epoch: int | None = None) -> torch.Tensor:
        """The balanced-margin pair (column of ``teacher_margins``) chosen for each query.

        Parameters
        ----------
        batch:
            Query indices (a batch this sampler yielded, or any subset).
        epoch:
            Default: the sampler's current epoch.

        Returns
        -------
        torch.Tensor
            ``(len(batch),)`` int64 columns; ``candidate_pairs[q, col]`` in your own
            ``(N, P, 2)`` table gives the (positive, negative) ids.
        """
        if self.teacher_margins is None:
            raise BatchlabInputError("pairs_for needs teacher_margins; build the sampler with teacher_margins=(N, P) margins")
        epoch = self.epoch if epoch is None else _check_index("epoch", epoch)
        if self._pairs_cache is None or self._pairs_cache[0] != epoch:
            g = torch.Generator().manual_seed(pair_seed(self.seed, epoch))
            choice = balanced_margin_choice(self.teacher_margins, self.pair_mask, n_bins=self.n_bins, generator=g)
            self._pairs_cache = (epoch, choice)
        index = torch.as_tensor(batch, dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_examples):
            raise BatchlabInputError(f"batch holds query ids outside [0, {self.num_examples})")
        return self._pairs_cache[1][index]

    def margins_fingerprint(self, epoch: int | None = None) -> str:
        """A short content hash of what :meth:`pairs_for` chooses from (margins, mask, ``n_bins``), computed once."""
        if self._margins_hash is None:
            if self.teacher_margins is None:
                self._margins_hash = "none"
            else:
                margins = self.teacher_margins.detach().float().cpu().contiguous()
                h = hashlib.sha1(f"{tuple(margins.shape)} n_bins={self.n_bins}".encode())
                h.update(margins.numpy().tobytes())
                if self.pair_mask is not None and not bool(self.pair_mask.all()):  # all True = no mask
                    h.update(self.pair_mask.cpu().contiguous().numpy().tobytes())
                self._margins_hash = h.hexdigest()[:16]
        return self._margins_hash

    RESUME_SETTINGS = ("n_clusters", "clusters_per_batch")
    # pairs_for's choice too: a state from other teacher margins would resume into other pairs
    RESUME_DATA = {**_ClusteredSampler.RESUME_DATA, "margins": ("margins_fingerprint", "teacher margins")}
