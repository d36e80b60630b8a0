"""IVF lists searched by matrix products: the ``"ivf-gemm"`` kind of :class:`~batchlab.index.EmbeddingIndex`.

Same recall as a faiss IVF-Flat index with the same lists and ``nprobe`` (each query
scans the lists of its ``nprobe`` nearest centroids), but the scan is reorganised per
list: for a block of queries, the queries probing list ``l`` are scored against the
rows of list ``l`` in one matrix product, and a running top-k per query is merged.
On a CPU, faiss scans lists one query at a time at ~3 GMAC/s per core; a matrix
product runs at ~20 GMAC/s per core, so this is ~5x faster at the same recall
(measured in ``batchlab bench mining``). Pure torch, so it also runs on CUDA.

Memory: the centroids ``(L, d)``, the list permutation ``(N,)``, and per query block
the ``(B, k)`` running results; list rows are gathered one list at a time.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def train_centroids(x: torch.Tensor, nlist: int, *, seed: int = 0, iters: int = 10, per_list: int = 64,
                    normalize: bool = True) -> torch.Tensor:
    """Spherical k-means centroids ``(nlist, d)`` float32 from a seeded sample of ``x``.

    Uses faiss' k-means on CPU when it is installed (a maintained, BLAS-backed Lloyd),
    otherwise a short torch Lloyd loop (CUDA, or no faiss). ``per_list`` training
    points per centroid bound the cost.
    """
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=g)[: min(n, per_list * nlist)].sort().values
    sample = x[rows.to(x.device)].float()
    if normalize:
        sample = _normalize(sample)
    if x.device.type == "cpu":
        try:
            import faiss  # noqa: PLC0415

            km = faiss.Kmeans(sample.shape[1], nlist, niter=iters, seed=seed, spherical=True, verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=per_list)
            km.train(sample.contiguous().numpy())
            return torch.from_numpy(km.centroids.copy())
        except ImportError:
            pass
    cent = sample[torch.randperm(sample.shape[0], generator=g)[:nlist].to(sample.device)].clone()
    for _ in range(iters):
        assign = assign_lists(sample, cent, 1).squeeze(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, sample)
        counts = torch.bincount(assign, minlength=nlist)
        empty = counts == 0
        cent = torch.where(empty[:, None], cent, _normalize(sums))
    return cent


def assign_lists(x: torch.Tensor, centroids: torch.Tensor, nprobe: int, *, block: int = 65536,
                 normalize: bool = False) -> torch.Tensor:
    """Indices ``(N, nprobe)`` of the ``nprobe`` highest-inner-product centroids of each row."""
    out = torch.empty(x.shape[0], nprobe, dtype=torch.int64, device=x.device)
    c = centroids.to(x.device)
    for s in range(0, x.shape[0], block):
        xb = x[s : s + block].float()
        if normalize:
            xb = _normalize(xb)
        out[s : s + block] = torch.topk(xb @ c.T, nprobe, dim=1).indices
    return out


class ListLayout:
    """Rows grouped by list: ``perm[offsets[l]:offsets[l+1]]`` are the ids in list ``l``."""

    def __init__(self, assignment: torch.Tensor, nlist: int):
        self.perm = torch.argsort(assignment, stable=True)
        counts = torch.bincount(assignment, minlength=nlist)
        self.offsets = torch.zeros(nlist + 1, dtype=torch.int64, device=assignment.device)
        self.offsets[1:] = torch.cumsum(counts, 0)
        self._bounds = self.offsets.tolist()

    def ids(self, list_id: int) -> torch.Tensor:
        return self.perm[self._bounds[list_id] : self._bounds[list_id + 1]]


def search_block(corpus: torch.Tensor, centroids: torch.Tensor, layout: ListLayout, q: torch.Tensor, k: int,
                 nprobe: int, *, exclude: torch.Tensor | None = None, normalize: bool = False):
    """Top-``k`` over the ``nprobe`` probed lists for one block of queries ``q`` (B, d).

    Returns ``(scores float32 (B, k), ids int64 (B, k))``, -inf / -1 where fewer found,
    *not* sorted within a row.
    """
    device = corpus.device
    b = q.shape[0]
    q = q.to(device=device, dtype=torch.float32)
    if normalize:
        q = _normalize(q)
    nlist = centroids.shape[0]
    probes = torch.topk(q @ centroids.to(device).T, min(nprobe, nlist), dim=1).indices
    p = probes.shape[1]
    flat_l = probes.reshape(-1)
    order = torch.argsort(flat_l, stable=True)
    flat_q = torch.arange(b, device=device).repeat_interleave(p)[order]
    counts = torch.bincount(flat_l, minlength=nlist).tolist()
    best_s = torch.full((b, k), float("-inf"), dtype=torch.float32, device=device)
    best_i = torch.full((b, k), -1, dtype=torch.int64, device=device)
    start = 0
    for list_id, count in enumerate(counts):
        if count == 0:
            continue
        qs = flat_q[start : start + count]
        start += count
        ids = layout.ids(list_id)
        if ids.numel() == 0:
            continue
        rows = corpus[ids].float()
        if normalize:
            rows = _normalize(rows)
        s = q[qs] @ rows.T
        if exclude is not None:
            s = s.masked_fill(ids[None, :] == exclude[qs][:, None], float("-inf"))
        # rows whose k-th best so far already beats every score of this list skip the selection
        cur_s = best_s[qs]
        hit = (s > cur_s.min(dim=1, keepdim=True).values).any(dim=1)
        if not bool(hit.all()):
            qs, s, cur_s = qs[hit], s[hit], cur_s[hit]
            if qs.numel() == 0:
                continue
        top = min(k, ids.numel())
        # unsorted selections: the caller sorts the final k once (order_ties_by_id)
        ts, ti = torch.topk(s, top, dim=1, sorted=False)
        cs = torch.cat([cur_s, ts], 1)
        ci = torch.cat([best_i[qs], ids[ti]], 1)
        ms, pos = torch.topk(cs, k, dim=1, sorted=False)
        best_s[qs] = ms
        best_i[qs] = torch.gather(ci, 1, pos)
    best_i = torch.where(torch.isneginf(best_s), torch.full_like(best_i, -1), best_i)
    return best_s, best_i
