"""Inner-product nearest-neighbour search over teacher embeddings.

:class:`EmbeddingIndex` wraps faiss (flat, IVF, HNSW) on the CPU and a blocked
matrix product + ``topk`` in torch (on the GPU, or on the CPU without faiss). It
is the one place batchlab turns ``(N, d)`` embeddings into ``(ids, scores)`` of
neighbours; mining, clusters and B3 communities all go through it.

Memory stays bounded: queries are streamed in blocks of ``batch_size`` rows and,
on the torch path, the corpus is cut into chunks so that one block of scores holds
at most ``block_bytes``; no ``N x N`` matrix is ever built.

Conventions
-----------
* ``search`` returns ``(scores, ids)``: ``float32 (Q, k)`` sorted descending and
  ``int64 (Q, k)``. Where fewer than ``k`` neighbours exist (``k > N``, or an
  approximate index finds fewer), ids are ``-1`` and scores ``-inf``.
* Equal scores within a returned row are ordered by id, and the exact kinds keep the lowest
  ids where equal scores straddle the k-th place: the same ids for every kind, chunking and
  block size (deterministic with duplicates).
* ``exclude_self=True`` assumes query row ``i`` *is* indexed row ``i`` (or the row
  given by ``query_ids[i]``) and removes that id, not "the top hit", so duplicate
  vectors are handled: a copy of the query is still a neighbour.
* Results live on the embeddings' device for the torch path (CUDA stays CUDA) and
  on the CPU for the faiss kinds.

faiss is imported lazily and never on the CUDA path (the GPU image has no faiss).

Example
-------
>>> import torch
>>> x = torch.nn.functional.normalize(torch.randn(100, 8, generator=torch.Generator().manual_seed(0)), dim=1)
>>> index = EmbeddingIndex(x, kind="flat", progress=False)
>>> scores, ids = index.search(x, 5, exclude_self=True)
>>> scores.shape, bool((ids != torch.arange(100)[:, None]).all())
(torch.Size([100, 5]), True)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchlab._checks import check_choice, check_positive_int
from batchlab.errors import BatchlabInputError, StaleArtifactError

logger = logging.getLogger(__name__)

KINDS = ("auto", "flat", "torch", "ivf", "ivf-gemm", "hnsw")
METRICS = ("ip", "cosine")
FORMAT_VERSION = 1
ARTIFACT_KIND = "embedding-index"  # manifest kind of a saved index (batchlab._artifacts)
_ARTIFACT_FILES = ("meta.json", "index.faiss", "ivfgemm.npz", "embeddings.npy")  # what an older save() wrote

# Rows per block when converting / normalising / hashing / adding to faiss (bounded copies).
_ROW_BLOCK = 65536


def _faiss():
    """Import faiss lazily with an error that says how to get it."""
    try:
        import faiss  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise BatchlabInputError(
            "this index kind needs faiss, which is not installed; `pip install faiss-cpu`, "
            "or use kind='torch' (exact search by matrix product, works on CPU and CUDA)"
        ) from exc
    return faiss


def faiss_available() -> bool:
    """True when ``import faiss`` works (cached after the first call)."""
    global _FAISS_OK
    if _FAISS_OK is None:
        try:
            import faiss  # noqa: F401, PLC0415

            _FAISS_OK = True
        except ImportError:
            _FAISS_OK = False
    return _FAISS_OK


_FAISS_OK: bool | None = None

#: faiss keeps its k-means seed in a C int: larger seeds raise OverflowError inside faiss
_FAISS_SEED_LIMIT = 2**31


def faiss_seed(seed: int) -> int:
    """``seed`` (any non-negative int, e.g. a sampler's ``[0, 2**32)`` seed) as faiss's k-means seed.

    Unchanged below ``2**31``, so existing clusterings stay as they were; folded modulo
    ``2**31`` above (two seeds ``2**31`` apart then share a clustering, not an error).

    >>> faiss_seed(7), faiss_seed(2**31 + 7)
    (7, 7)
    """
    return int(seed) % _FAISS_SEED_LIMIT


def as_tensor(name: str, x: Any) -> torch.Tensor:
    """A numpy array or torch tensor ``(N, d)`` as a torch tensor, without copying when possible.

    Checks shape, dtype and finiteness (in row blocks, so a 1M-row matrix never
    needs a second full-size boolean copy). Raises :class:`BatchlabInputError`.
    """
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise BatchlabInputError(f"{name} must hold floats (float16/32/64), got numpy dtype {x.dtype}")
        if x.dtype == np.float16 or x.dtype == np.float32 or x.dtype == np.float64:
            import warnings

            with warnings.catch_warnings():
                # read-only arrays (np.load(mmap_mode="r")) are fine: we never write to them
                warnings.simplefilter("ignore", UserWarning)
                x = torch.from_numpy(x)
        else:
            x = torch.from_numpy(x.astype(np.float32))
    if not isinstance(x, torch.Tensor):
        raise BatchlabInputError(f"{name} must be a numpy array or torch.Tensor of shape (N, d), got {type(x).__name__}")
    if x.dim() != 2:
        raise BatchlabInputError(f"{name} must have shape (N, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise BatchlabInputError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise BatchlabInputError(
            f"{name} is empty (shape {tuple(x.shape)}); search needs at least one row of at least one dimension"
        )
    for start in range(0, x.shape[0], _ROW_BLOCK):
        block = x[start : start + _ROW_BLOCK]
        if not bool(torch.isfinite(block).all()):
            bad = int((~torch.isfinite(block)).any(dim=1).nonzero()[0, 0]) + start
            raise BatchlabInputError(
                f"{name} contains NaN or Inf (first in row {bad}); check the encoder output before indexing"
            )
    return x.detach()


def content_hash(x: torch.Tensor) -> str:
    """blake2b of the C-order bytes of ``x`` plus its shape and dtype (streamed in row blocks).

    Equal for equal values in the same dtype, whatever the device or memory layout; the
    same values in another dtype hash differently (hashing the native bytes, without a
    conversion, halves the work for float16 inputs: ~1 s per GB on one core).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}".encode())
    for start in range(0, x.shape[0], _ROW_BLOCK):
        block = x[start : start + _ROW_BLOCK].detach().to("cpu").contiguous()
        h.update(block.view(torch.uint8).numpy())
    return h.hexdigest()


def _as_numpy_f32(block: torch.Tensor, normalize: bool) -> np.ndarray:
    block = block.detach().to("cpu", torch.float32)
    if normalize:
        block = torch.nn.functional.normalize(block, dim=1)
    return np.ascontiguousarray(block.numpy())


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, *, leave: bool = False):
    """A tqdm bar over ``total`` queries, or a no-op one when disabled or tqdm is missing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415
    except ImportError:  # e.g. a bare GPU image
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="q", leave=leave)


def order_ties_by_id(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by score descending, equal scores by id ascending (-1 padding last).

    Makes results deterministic across kinds and block sizes when vectors repeat.
    """
    big = torch.iinfo(torch.int64).max
    order = torch.sort(torch.where(ids < 0, torch.full_like(ids, big), ids), dim=1, stable=True).indices
    scores, ids = torch.gather(scores, 1, order), torch.gather(ids, 1, order)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return torch.gather(scores, 1, order), torch.gather(ids, 1, order)


def _topk_lowest_ids(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(s, k, dim=1)`` where equal scores at the k-th place go to the lowest columns.

    ``torch.topk`` picks among tied scores at the boundary arbitrarily (it depends on the
    width of ``s``, hence on the chunking), so duplicate vectors made exact search return
    other ids for another ``block_bytes`` or kind. Rows with such a tie (rare outside
    duplicates) keep every score above the k-th plus the first tied columns. Values come
    back unsorted within the k; callers sort with :func:`order_ties_by_id`.
    """
    vals, pos = torch.topk(s, k, dim=1)
    kth = vals[:, -1:]
    tied = (s == kth).sum(1) > (vals == kth).sum(1)
    if bool(tied.any()):
        tied_rows = tied.nonzero().squeeze(1)
        step = max(1, (1 << 24) // s.shape[1])  # bounded temporaries (~64 MiB each) however many rows tie
        for r0 in range(0, tied_rows.numel(), step):
            r = tied_rows[r0 : r0 + step]
            sr, kr = s[r], kth[r]
            eq = sr == kr
            need = k - (sr > kr).sum(1, keepdim=True)
            sel = (sr > kr) | (eq & (torch.cumsum(eq, 1, dtype=torch.int32) <= need))
            pos_r = sel.nonzero()[:, 1].view(-1, k)  # exactly k per row, row-major
            pos[r] = pos_r
            vals[r] = torch.gather(sr, 1, pos_r)
    return vals, pos


def exact_search(
    corpus: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    *,
    exclude_ids: torch.Tensor | None = None,
    block_bytes: int = 1 << 29,
    batch_size: int = 16384,
    normalize: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products by blocked matrix product + ``topk`` (torch only).

    Parameters
    ----------
    corpus : (N, d) tensor, on the device where the work runs (CPU or CUDA).
    queries : (Q, d) tensor; moved to ``corpus.device`` block by block.
    k : neighbours per query; ids beyond ``N`` are ``-1`` with score ``-inf``.
    exclude_ids : (Q,) int64 or None. Corpus id to drop from row ``i`` (``-1``: none).
    block_bytes : cap on one block of float32 scores (query rows x corpus chunk).
    normalize : L2-normalise both sides (cosine).

    Returns
    -------
    scores : float32 (Q, k), descending. ids : int64 (Q, k).

    Never builds a ``Q x N`` matrix: queries go in blocks of ``batch_size`` rows and the
    corpus in chunks, keeping a running top-k per query.
    """
    device = corpus.device
    n = corpus.shape[0]
    num_q = queries.shape[0]
    kk = min(k, n)
    # compute dtype: the corpus' own (fp16/bf16 on the GPU are the fast path), float32 on CPU
    dtype = corpus.dtype if device.type == "cuda" else torch.float32
    qb = max(1, min(batch_size, num_q))
    chunk = max(kk, min(n, block_bytes // (4 * qb)))
    if chunk < n and chunk < 4 * kk:
        # a chunk must be larger than k for the running merge to be worth it; shrink the query block
        chunk = min(n, 4 * kk)
        qb = max(1, block_bytes // (4 * chunk))
    out_scores = torch.full((num_q, k), float("-inf"), dtype=torch.float32, device=device)
    out_ids = torch.full((num_q, k), -1, dtype=torch.int64, device=device)
    corpus_c = corpus.to(dtype)
    if normalize:
        corpus_c = torch.nn.functional.normalize(corpus_c, dim=1)
    bar = progress_bar(num_q, "exact search", progress)
    for q0 in range(0, num_q, qb):
        q = queries[q0 : q0 + qb].to(device=device, dtype=dtype)
        if normalize:
            q = torch.nn.functional.normalize(q, dim=1)
        rows = q.shape[0]
        best_s = torch.full((rows, kk), float("-inf"), dtype=torch.float32, device=device)
        best_i = torch.full((rows, kk), -1, dtype=torch.int64, device=device)
        excl = None if exclude_ids is None else exclude_ids[q0 : q0 + rows].to(device)
        for c0 in range(0, n, chunk):
            s = (q @ corpus_c[c0 : c0 + chunk].T).float()
            if excl is not None:
                local = excl - c0
                hit = (local >= 0) & (local < s.shape[1])
                if bool(hit.any()):
                    r = hit.nonzero().squeeze(1)
                    s[r, local[r]] = float("-inf")
            top = min(kk, s.shape[1])
            cs, ci = _topk_lowest_ids(s, top)
            ci = ci + c0
            if c0 == 0 and top == kk:
                best_s, best_i = cs, ci
            else:
                # the running top-k is small (2k columns): a full (score, id) sort keeps, among
                # equal scores at the boundary, the smallest ids whatever the chunking
                ms, mi = order_ties_by_id(torch.cat([best_s, cs], 1), torch.cat([best_i, ci], 1))
                best_s, best_i = ms[:, :kk].contiguous(), mi[:, :kk].contiguous()
            del s
        best_i = torch.where(torch.isneginf(best_s), torch.full_like(best_i, -1), best_i)
        best_s, best_i = order_ties_by_id(best_s, best_i)
        out_scores[q0 : q0 + rows, :kk] = best_s
        out_ids[q0 : q0 + rows, :kk] = best_i
        bar.update(rows)
    bar.close()
    return out_scores, out_ids


class EmbeddingIndex:
    """Inner-product kNN index over ``(N, d)`` embeddings: exact or approximate.

    Parameters
    ----------
    embeddings : (N, d) numpy array or torch tensor (CPU or CUDA), finite.
        Kept by reference (not copied) for exact search, recall checks and hashing.
    kind : ``"auto"`` | ``"flat"`` | ``"torch"`` | ``"ivf"`` | ``"ivf-gemm"`` | ``"hnsw"``.
        ``flat``: exact (faiss ``IndexFlatIP`` on CPU; torch on CUDA or without faiss).
        ``torch``: exact blocked matmul + topk in torch, never imports faiss.
        ``ivf``: faiss IVF (fp16 storage, ``nlist`` lists, ``nprobe`` probed).
        ``ivf-gemm``: the same IVF search (k-means lists, ``nprobe`` probed, exact scores)
        with each list scanned by one matrix product per query block (pure torch, no
        copy of the vectors; see ``batchlab bench mining`` for its speed against ``ivf``).
        ``hnsw``: faiss HNSW graph (``hnsw_m`` links, ``ef_search``).
        ``auto``: exact below ``auto_threshold`` rows (and always on CUDA), ``ivf-gemm``
        above, and after building it measures recall@10 against exact search on a
        sample (logged, in ``info["recall@10"]``).
    metric : ``"ip"`` (raw inner product) or ``"cosine"`` (rows and queries L2-normalised).
    nlist, nprobe : IVF lists (default ``4 sqrt(N)`` for ``ivf``, ``sqrt(N)`` for
        ``ivf-gemm``, at most ``N / 39``) and lists probed (default ``max(16, nlist // 64)``,
        ``max(8, nlist // 128)`` for ``ivf-gemm``; see ``target_recall``).
    hnsw_m, ef_search : HNSW links per node and search beam (default ``max(64, 2k)``).
    auto_threshold : number of rows from which ``auto`` builds an approximate index.
    target_recall : for approximate kinds, raise ``nprobe`` / ``ef_search`` after building
        until recall@10 on a sample reaches this (:meth:`tune`; mining tunes at its own depth).
    check_recall : with ``kind="auto"`` and an approximate result, measure recall@10 on a
        sample after building (costs one exact search of 1,000 queries).
    block_bytes : cap on one block of float32 scores on the torch path (default 512 MiB
        on CPU, 2 GiB on CUDA).
    progress : tqdm bars for builds and long searches.
    seed : seeds the IVF training sample and the recall sample.

    Attributes
    ----------
    kind : the resolved kind (never ``"auto"``).
    info : build facts (times, resolved parameters, measured recall).

    Example
    -------
    >>> import torch
    >>> x = torch.nn.functional.normalize(torch.randn(500, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    >>> idx = EmbeddingIndex(x, kind="torch", progress=False)
    >>> s, i = idx.search(x[:3], 4)
    >>> i[:, 0].tolist()
    [0, 1, 2]
    """

    def __init__(
        self,
        embeddings: Any,
        *,
        kind: str = "auto",
        metric: str = "ip",
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int = 32,
        ef_search: int | None = None,
        auto_threshold: int = 200_000,
        target_recall: float | None = None,
        check_recall: bool = True,
        block_bytes: int | None = None,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        check_choice("kind", kind, KINDS)
        check_choice("metric", metric, METRICS)
        check_positive_int("hnsw_m", hnsw_m)
        check_positive_int("auto_threshold", auto_threshold)
        for name, v in (("nlist", nlist), ("nprobe", nprobe), ("ef_search", ef_search), ("block_bytes", block_bytes)):
            if v is not None:
                check_positive_int(name, v)
        self.embeddings = as_tensor("embeddings", embeddings)
        self.metric = metric
        self.progress = progress
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise BatchlabInputError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.auto_threshold = auto_threshold
        self.device = self.embeddings.device
        self.block_bytes = block_bytes or ((1 << 31) if self.device.type == "cuda" else (1 << 29))
        self._hash: str | None = None
        self._faiss_index = None
        n, d = self.embeddings.shape
        self.requested_kind = kind
        self.kind = self._resolve_kind(kind, n)
        self.nlist = self._default_nlist(n, self.kind) if nlist is None else nlist
        if self.kind in ("ivf", "ivf-gemm") and self.nlist > n:
            raise BatchlabInputError(f"nlist={self.nlist} is larger than the number of rows {n}; use nlist <= N / 39")
        if nprobe is None:
            nprobe = max(8, self.nlist // 128) if self.kind == "ivf-gemm" else max(16, self.nlist // 64)
        self.nprobe = min(nprobe, self.nlist)
        if target_recall is not None and not 0.0 < target_recall <= 1.0:
            raise BatchlabInputError(f"target_recall must be in (0, 1], got {target_recall}")
        self.target_recall = target_recall
        self.info: dict[str, Any] = {"n": n, "d": d, "kind": self.kind}
        self._exact_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.exact_fallback = False  # set by tune() when IVF cannot reach the target cheaply
        t0 = time.perf_counter()
        if self.kind in ("flat", "ivf", "hnsw"):
            self._build_faiss()
        elif self.kind == "ivf-gemm":
            self._build_ivfgemm()
        self.info["build_s"] = time.perf_counter() - t0
        logger.info("EmbeddingIndex(%s, N=%d, d=%d) built in %.2fs", self.kind, n, d, self.info["build_s"])
        if self.approximate and target_recall is not None:
            self.tune(k=min(10, n), target_recall=target_recall)
        elif kind == "auto" and self.approximate and check_recall:
            k = min(10, n)
            r = self.recall(k=k, sample=1000)
            self.info[f"recall@{k}"] = r
            logger.info("EmbeddingIndex auto -> %s: recall@%d vs exact on a sample = %.3f", self.kind, k, r)

    # ------------------------------------------------------------------ build
    def _resolve_kind(self, kind: str, n: int) -> str:
        on_cuda = self.device.type == "cuda"
        if kind == "auto":
            if on_cuda:
                return "torch"  # exact on the GPU is fast (1M x 1M x 768 in ~15 s); no faiss there
            if n < self.auto_threshold:
                return "flat" if faiss_available() else "torch"
            # IVF lists scanned by matrix products: ~5x faster than faiss' IVF scan on CPU at
            # the same recall (batchlab bench mining), and needs no faiss
            return "ivf-gemm"
        if kind == "flat" and (on_cuda or not faiss_available()):
            return "torch"
        return kind

    @staticmethod
    def _default_nlist(n: int, kind: str = "ivf") -> int:
        # faiss IVF: ~4 sqrt(N) lists; ivf-gemm: ~sqrt(N) lists (fewer, larger lists make
        # larger matrix products and a cheaper coarse assignment). At least 39 rows per list.
        per = 4 if kind == "ivf" else 1
        return int(max(1, min(per * math.sqrt(n), n // 39)))

    @property
    def approximate(self) -> bool:
        """True for IVF, IVF-GEMM and HNSW (results may miss true neighbours)."""
        return self.kind in ("ivf", "ivf-gemm", "hnsw")

    def _build_ivfgemm(self) -> None:
        from batchlab import _ivfgemm  # noqa: PLC0415

        t0 = time.perf_counter()
        self._centroids = _ivfgemm.train_centroids(self.embeddings, self.nlist, seed=faiss_seed(self.seed))
        self.info["train_s"] = time.perf_counter() - t0
        assign = _ivfgemm.assign_lists(self.embeddings, self._centroids, 1, normalize=self._normalize).squeeze(1)
        self._layout = _ivfgemm.ListLayout(assign, self.nlist)
        self.info["nlist"] = self.nlist

    @property
    def _normalize(self) -> bool:
        return self.metric == "cosine"

    def _unit_norm(self) -> bool:
        """Whether every row has unit norm (then L2 search ranks like inner product)."""
        if self._normalize:
            return True
        x = self.embeddings
        for start in range(0, x.shape[0], _ROW_BLOCK):
            norms = x[start : start + _ROW_BLOCK].float().norm(dim=1)
            if float((norms - 1).abs().max()) > 1e-3:
                return False
        return True

    def _build_faiss(self) -> None:
        faiss = _faiss()
        n, d = self.embeddings.shape
        if self.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif self.kind == "ivf":
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, d, self.nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
            )
            index.cp.seed = faiss_seed(self.seed)
            index.cp.niter = 10
            # 64 points per list is enough for good centroids; more only costs k-means time
            n_train = min(n, 64 * self.nlist)
            g = torch.Generator().manual_seed(self.seed)
            sample = torch.randperm(n, generator=g)[:n_train].sort().values
            t0 = time.perf_counter()
            index.train(_as_numpy_f32(self.embeddings[sample], self._normalize))
            self.info["train_s"] = time.perf_counter() - t0
            self.info["nlist"] = self.nlist
        else:  # hnsw
            # faiss' HNSW builds ~30x slower with inner product than with L2 (faiss#4756);
            # for unit-norm rows L2 ranks identically (|a-b|^2 = 2 - 2 a.b), so use it then.
            self._hnsw_l2 = self._unit_norm()
            metric = faiss.METRIC_L2 if self._hnsw_l2 else faiss.METRIC_INNER_PRODUCT
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, metric)
            self.info["hnsw_metric"] = "l2-on-unit-norm" if self._hnsw_l2 else "ip"
        bar = progress_bar(n, f"building {self.kind} index", self.progress)
        for start in range(0, n, _ROW_BLOCK):
            block = _as_numpy_f32(self.embeddings[start : start + _ROW_BLOCK], self._normalize)
            index.add(block)
            bar.update(block.shape[0])
        bar.close()
        self._faiss_index = index

    # ----------------------------------------------------------------- search
    def search(
        self,
        queries: Any,
        k: int,
        *,
        exclude_self: bool = False,
        query_ids: Any = None,
        batch_size: int = 16384,
        progress: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` neighbours of each query by inner product.

        Parameters
        ----------
        queries : (Q, d) numpy array or tensor.
        k : neighbours per query (>= 1). ``k > N`` is allowed: the missing columns are
            id ``-1`` / score ``-inf``.
        exclude_self : drop each query's own id from its results. Query row ``i`` is
            indexed row ``query_ids[i]`` (default ``i``, which needs ``Q == N``). Ids,
            not scores, are excluded, so duplicates of the query stay neighbours.
        query_ids : (Q,) ints, the indexed id of each query (for ``exclude_self`` when the
            queries are a subset of the index; ``-1`` = not in the index).
        batch_size : query rows per block (bounds memory).
        progress : tqdm bar; defaults to the index's ``progress``.

        Returns
        -------
        scores : float32 (Q, k), descending per row. ids : int64 (Q, k), ``-1`` padded.
        """
        check_positive_int("k", k)
        check_positive_int("batch_size", batch_size)
        q = as_tensor("queries", queries)
        n, d = self.embeddings.shape
        if q.shape[1] != d:
            raise BatchlabInputError(f"queries have dimension {q.shape[1]} but the index has dimension {d}")
        progress = self.progress if progress is None else progress
        exclude = None
        if query_ids is not None:
            exclude = torch.as_tensor(np.asarray(query_ids) if not isinstance(query_ids, torch.Tensor) else query_ids)
            exclude = exclude.to(torch.int64).reshape(-1)
            if exclude.shape[0] != q.shape[0]:
                raise BatchlabInputError(
                    f"query_ids has {exclude.shape[0]} entries but there are {q.shape[0]} queries; give one id per query"
                )
            if exclude.numel() and (int(exclude.max()) >= n or int(exclude.min()) < -1):
                raise BatchlabInputError(f"query_ids must be in [-1, {n}) (indexed ids, -1 = not indexed)")
            if not exclude_self:
                raise BatchlabInputError("query_ids only has an effect with exclude_self=True; pass exclude_self=True")
        elif exclude_self:
            if q.shape[0] != n:
                raise BatchlabInputError(
                    f"exclude_self=True with {q.shape[0]} queries but {n} indexed rows: query row i must be "
                    "indexed row i; pass query_ids=<the indexed id of each query> when the queries are a subset"
                )
            exclude = torch.arange(n)
        if self.kind in ("ivf", "ivf-gemm") and not self.exact_fallback:
            return self._ivf_search_filled(q, k, exclude, batch_size, progress)
        if self.kind == "torch" or self.exact_fallback:
            return exact_search(
                self.embeddings,
                q,
                k,
                exclude_ids=exclude,
                block_bytes=self.block_bytes,
                batch_size=batch_size,
                normalize=self._normalize,
                progress=progress,
            )
        return self._faiss_search(q, k, exclude, batch_size, progress)

    def _ivf_search_filled(self, q, k, exclude, batch_size, progress):
        """IVF search; rows whose probed lists held fewer than k candidates (small lists, few
        probes) are searched again with twice the probes, so ``-1`` only means the index
        has fewer than k rows (after exclusions)."""
        search = self._ivfgemm_search if self.kind == "ivf-gemm" else self._faiss_search
        scores, ids = search(q, k, exclude, batch_size, progress)
        n = self.embeddings.shape[0]
        # neighbours each row can have: k, or fewer when the index is smaller (one less where an
        # id is excluded; query_ids -1 excludes nothing)
        full = torch.full((q.shape[0],), n, dtype=torch.int64)
        if exclude is not None:
            full -= (exclude.cpu() >= 0).to(torch.int64)
        full = full.clamp(max=k).to(ids.device)
        original = self.nprobe
        try:
            while self.nprobe < self.nlist:
                short = ((ids >= 0).sum(dim=1) < full).nonzero().squeeze(1)
                if short.numel() == 0:
                    break
                self.nprobe = min(self.nlist, 2 * self.nprobe)  # for these rows only
                rows = short.cpu()
                ex = None if exclude is None else exclude[rows]
                s2, i2 = search(q[rows.to(q.device)], k, ex, batch_size, False)
                scores[short], ids[short] = s2.to(scores.device), i2.to(ids.device)
        finally:
            self.nprobe = original
        return scores, ids

    def _ivfgemm_search(self, q, k, exclude, batch_size, progress):
        from batchlab import _ivfgemm  # noqa: PLC0415

        n = self.embeddings.shape[0]
        kk = min(k, n)
        # large query blocks: every block gathers each probed list once
        block = max(batch_size, 65536)
        out_s = torch.full((q.shape[0], k), float("-inf"), dtype=torch.float32, device=self.device)
        out_i = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=self.device)
        bar = progress_bar(q.shape[0], "ivf-gemm search", progress)
        for q0 in range(0, q.shape[0], block):
            qb = q[q0 : q0 + block]
            e = None if exclude is None else exclude[q0 : q0 + block].to(self.device)
            s, i = _ivfgemm.search_block(self.embeddings, self._centroids, self._layout, qb, kk, self.nprobe,
                                         exclude=e, normalize=self._normalize)
            s, i = order_ties_by_id(s, i)
            out_s[q0 : q0 + qb.shape[0], :kk] = s
            out_i[q0 : q0 + qb.shape[0], :kk] = i
            bar.update(qb.shape[0])
        bar.close()
        return out_s, out_i

    def _faiss_search(self, q, k, exclude, batch_size, progress):
        index = self._faiss_index
        n = self.embeddings.shape[0]
        extra = 1 if exclude is not None else 0
        # flat: one column more shows whether equal scores straddle the k-th place (faiss picks
        # among them arbitrarily); such rows are searched again by exact_search, which keeps the
        # lowest ids, so flat and torch return the same ids for duplicate vectors
        kk = min(k + extra + (1 if self.kind == "flat" else 0), n)
        if self.kind == "ivf":
            index.nprobe = min(self.nprobe, self.nlist)
        elif self.kind == "hnsw":
            index.hnsw.efSearch = max(self.ef_search or 64, 2 * kk)
        num_q = q.shape[0]
        out_s = torch.full((num_q, k), float("-inf"), dtype=torch.float32)
        out_i = torch.full((num_q, k), -1, dtype=torch.int64)
        bar = progress_bar(num_q, f"{self.kind} search", progress)
        for q0 in range(0, num_q, batch_size):
            block = _as_numpy_f32(q[q0 : q0 + batch_size], self._normalize)
            dist, ids = index.search(block, kk)
            s = torch.from_numpy(dist)
            i = torch.from_numpy(ids).to(torch.int64)
            if self.kind == "hnsw" and self._hnsw_l2:
                s = 1.0 - s / 2.0  # squared L2 between unit vectors -> inner product
            s = torch.where(i < 0, torch.full_like(s, float("-inf")), s)
            if exclude is not None:
                e = exclude[q0 : q0 + block.shape[0]]
                own = i == e[:, None]
                # push the own id (and missing slots) to the end, keep the order of the rest
                key = own.to(torch.int64) * 2 + (i < 0).to(torch.int64)
                order = torch.sort(key, dim=1, stable=True).indices
                i = torch.gather(i, 1, order)
                s = torch.gather(s, 1, order)
                own_sorted = torch.gather(own, 1, order)
                i = torch.where(own_sorted, torch.full_like(i, -1), i)
                s = torch.where(own_sorted, torch.full_like(s, float("-inf")), s)
            s, i = order_ties_by_id(s, i)
            take = min(k, i.shape[1])
            if self.kind == "flat" and take < i.shape[1]:
                tied = (torch.isfinite(s[:, take]) & (s[:, take] == s[:, take - 1])).nonzero().squeeze(1)
                if tied.numel():
                    rows = q[q0 : q0 + block.shape[0]][tied]
                    ex = None if exclude is None else exclude[q0 : q0 + block.shape[0]][tied]
                    s_t, i_t = exact_search(self.embeddings, rows, take, exclude_ids=ex, block_bytes=self.block_bytes,
                                            normalize=self._normalize)
                    s, i = s.clone(), i.clone()
                    s[tied, :take], i[tied, :take] = s_t, i_t
            out_s[q0 : q0 + block.shape[0], :take] = s[:, :take]
            out_i[q0 : q0 + block.shape[0], :take] = i[:, :take]
            bar.update(block.shape[0])
        bar.close()
        return out_s, out_i

    # ----------------------------------------------------------------- recall
    def _exact_sample(self, queries: Any, k: int, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sampled query rows (S, d), exact top-k ids (S, k)), cached per (queries, sample, k)."""
        q = self.embeddings if queries is None else as_tensor("queries", queries)
        cache = self._exact_cache
        if cache is not None and cache[0] is q and cache[1] == sample and cache[3].shape[1] >= k:
            return cache[2], cache[3][:, :k]
        g = torch.Generator().manual_seed(self.seed + 1)
        rows = torch.randperm(q.shape[0], generator=g)[: min(sample, q.shape[0])].sort().values
        qs = q[rows.to(q.device)]
        # the exact reference costs sample x N x d: compute a few extra columns so later
        # recall@k' for k' <= 64 reuses it
        kk = max(k, min(64, self.embeddings.shape[0]))
        _, exact = exact_search(self.embeddings, qs, kk, normalize=self._normalize, block_bytes=self.block_bytes)
        self._exact_cache = (q, sample, qs, exact)
        return qs, exact[:, :k]

    def recall(self, queries: Any = None, k: int = 10, sample: int = 1000) -> float:
        """Mean recall@k of this index against exact search, on a seeded sample of queries.

        ``queries`` defaults to the indexed embeddings themselves. Recall is the fraction
        of the exact top-``k`` ids (``-1`` padding excluded) that this index returns.
        Exact kinds return 1.0 without searching (they are the reference). The exact
        results for the sample are cached, so repeated calls (``tune``) pay for them once.
        """
        check_positive_int("k", k)
        check_positive_int("sample", sample)
        if not self.approximate or self.exact_fallback:
            return 1.0
        qs, exact = self._exact_sample(queries, k, sample)
        _, approx = self.search(qs, k, progress=False)
        hits, total = 0, 0
        for a, e in zip(approx.tolist(), exact.tolist()):
            truth = {x for x in e if x >= 0}
            hits += len(truth.intersection(a))
            total += len(truth)
        return hits / max(total, 1)

    def tune(self, k: int, target_recall: float = 0.95, *, queries: Any = None, sample: int = 1000,
             start: int | None = None, max_steps: int = 12) -> float:
        """Double ``nprobe`` (IVF kinds) or ``ef_search`` (HNSW) until recall@k on a sample of
        ``queries`` reaches ``target_recall`` (or the search is exhaustive); returns the recall.

        The search cost grows about linearly with ``nprobe``, so this finds the cheapest
        setting (within a factor 2) that meets the target on this data. When a quarter of
        the lists is not enough (data without cluster structure), the index switches to
        exact search (``exact_fallback``), which is then cheaper. ``start`` sets the
        first value tried (default: the current one, so tuning never lowers it). One exact
        search of the sample is paid once; each step is one approximate search of it.
        """
        check_positive_int("k", k)
        if not 0.0 < target_recall <= 1.0:
            raise BatchlabInputError(f"target_recall must be in (0, 1], got {target_recall}")
        if not self.approximate:
            return 1.0
        if start is not None:
            check_positive_int("start", start)
            if self.kind == "hnsw":
                self.ef_search = start
            else:
                self.nprobe = min(start, self.nlist)
        t0 = time.perf_counter()
        for _ in range(max_steps):
            r = self.recall(queries, k=k, sample=sample)
            logger.info("tune %s: nprobe=%s ef_search=%s recall@%d=%.4f", self.kind, self.nprobe, self.ef_search, k, r)
            if r >= target_recall:
                break
            if self.kind == "hnsw":
                current = max(self.ef_search or 64, 2 * k)
                if current >= 4096:
                    break
                self.ef_search = min(4096, 2 * current)
            else:
                # probing more than a quarter of the lists costs more than exact search (measured:
                # ivf-gemm probing every list is ~3x slower than exact on unclustered data)
                limit = max(1, self.nlist // 4)
                if self.nprobe >= limit:
                    logger.warning(
                        "%s: recall@%d=%.3f < %.3f with %d of %d lists probed; the data has too little cluster "
                        "structure for IVF, so this index now searches exactly", self.kind, k, r, target_recall,
                        self.nprobe, self.nlist)
                    self.exact_fallback = True
                    r = 1.0
                    break
                self.nprobe = min(limit, 2 * self.nprobe)
        self.info["tuned"] = {"k": k, "target_recall": target_recall, "recall": r, "nprobe": self.nprobe,
                              "ef_search": self.ef_search, "exact_fallback": self.exact_fallback,
                              "seconds": time.perf_counter() - t0}
        self.info[f"recall@{k}"] = r
        if r < target_recall:
            logger.warning("%s index reaches recall@%d=%.3f < target %.3f at its widest setting", self.kind, k, r,
                           target_recall)
        return r

    # ------------------------------------------------------------- save/load
    @property
    def content_hash(self) -> str:
        """Hash of the indexed embeddings (computed once, streamed)."""
        if self._hash is None:
            self._hash = content_hash(self.embeddings)
        return self._hash

    def params(self) -> dict[str, Any]:
        """The build parameters (what :meth:`save` records)."""
        return {
            "kind": self.kind,
            "requested_kind": self.requested_kind,
            "metric": self.metric,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "hnsw_m": self.hnsw_m,
            "ef_search": self.ef_search,
            "auto_threshold": self.auto_threshold,
            "target_recall": self.target_recall,
            "exact_fallback": self.exact_fallback,
            "seed": self.seed,
            "n": int(self.embeddings.shape[0]),
            "d": int(self.embeddings.shape[1]),
        }

    def save(self, path: str | Path) -> Path:
        """Write the index to directory ``path``: ``meta.json`` (build params, content hash)
        plus ``index.faiss`` for faiss kinds, ``ivfgemm.npz`` for ``ivf-gemm`` or
        ``embeddings.npy`` for the torch kind, and ``manifest.json`` (N, d, a hash of each file).

        The directory is written beside ``path`` and swapped in whole (:mod:`batchlab._artifacts`):
        a killed writer leaves the previous index intact, and no file of an older index survives.
        """
        from batchlab._artifacts import write_directory

        n, d = (int(v) for v in self.embeddings.shape)
        meta = {"format_version": FORMAT_VERSION, "params": self.params(), "content_hash": self.content_hash, "info": self.info}
        with write_directory(path, kind=ARTIFACT_KIND, n=n, d=d, owned=_ARTIFACT_FILES) as tmp:
            if self._faiss_index is not None:
                _faiss().write_index(self._faiss_index, str(tmp / "index.faiss"))
                meta["hnsw_l2"] = bool(getattr(self, "_hnsw_l2", False))
            elif self.kind == "ivf-gemm":
                assign = torch.empty(len(self), dtype=torch.int64, device=self._layout.perm.device)
                for list_id in range(self.nlist):
                    assign[self._layout.ids(list_id)] = list_id
                np.savez(tmp / "ivfgemm.npz", centroids=self._centroids.cpu().numpy(), assignment=assign.cpu().numpy())
            else:
                np.save(tmp / "embeddings.npy", self.embeddings.detach().cpu().float().numpy())
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, embeddings: Any = None, *, progress: bool = True) -> "EmbeddingIndex":
        """Load an index written by :meth:`save`.

        Every file is checked against the directory's manifest first (a swapped
        ``embeddings.npy``, a truncated ``index.faiss``, a missing or extra file are a
        :class:`StaleArtifactError`). ``embeddings`` (optional) are the rows the index is
        meant to cover; their content hash must equal the saved one, else
        :class:`StaleArtifactError`. Without them, exact search and ``recall`` use the
        vectors stored with the index.
        """
        from batchlab._artifacts import open_directory

        path = Path(path)
        rebuild = "rebuild it with EmbeddingIndex(embeddings, ...).save(path)"
        if not (path / "meta.json").exists() and not (path / "manifest.json").exists():
            raise BatchlabInputError(f"{path} is not a saved EmbeddingIndex (no meta.json); write one with index.save(path)")
        with open_directory(path, kind=ARTIFACT_KIND, what="saved EmbeddingIndex", rebuild=rebuild) as art:
            # one consistent, hash-checked snapshot of the files
            meta = art.json("meta.json")
            manifest, files = art.manifest, set(art.manifest["files"])
            faiss_bytes = art.file("index.faiss").read() if "index.faiss" in art else None
            lists = art.npz("ivfgemm.npz", ("centroids", "assignment")) if "ivfgemm.npz" in art else None
            stored = art.npy("embeddings.npy") if "embeddings.npy" in art and embeddings is None else None
        try:
            p = meta["params"]
            saved_hash = meta["content_hash"]
            n, d = int(p["n"]), int(p["d"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StaleArtifactError(f"{path}/meta.json is incomplete ({type(exc).__name__}: {exc}); {rebuild}") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise StaleArtifactError(f"{path} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        if (n, d) != (manifest["n"], manifest["d"]):
            raise StaleArtifactError(f"{path}: meta.json says ({n}, {d}), the manifest ({manifest['n']}, {manifest['d']}); {rebuild}")
        self = cls.__new__(cls)
        self.metric, self.progress, self.seed = p["metric"], progress, p["seed"]
        self.hnsw_m, self.ef_search, self.auto_threshold = p["hnsw_m"], p["ef_search"], p["auto_threshold"]
        self.kind, self.requested_kind, self.nlist, self.nprobe = p["kind"], p["requested_kind"], p["nlist"], p["nprobe"]
        self.info = meta.get("info", {})
        self.target_recall = p.get("target_recall")
        self.exact_fallback = p.get("exact_fallback", False)
        self._faiss_index = None
        self._exact_cache = None
        if embeddings is not None:
            emb = as_tensor("embeddings", embeddings)
            h = content_hash(emb) if tuple(emb.shape) == (n, d) else "(not computed: other shape)"
            if h != saved_hash:
                raise StaleArtifactError(
                    f"the embeddings given (shape {tuple(emb.shape)}) do not match the ones index {path} was built "
                    f"from (shape ({n}, {d})); content hash {h} != {saved_hash}. Rebuild the index"
                )
        else:
            emb = None
        needs = {"index.faiss": self.kind in ("flat", "ivf", "hnsw"), "ivfgemm.npz": self.kind == "ivf-gemm",
                 "embeddings.npy": self.kind not in ("flat", "ivf", "hnsw", "ivf-gemm")}
        for name, wanted in needs.items():
            if wanted != (name in files):
                raise StaleArtifactError(f"{path}: a {self.kind} index {'needs' if wanted else 'has no'} {name}; {rebuild}")
        if faiss_bytes is not None:
            faiss = _faiss()
            try:
                self._faiss_index = faiss.deserialize_index(np.frombuffer(faiss_bytes, dtype=np.uint8))
            except RuntimeError as exc:  # hash-checked above, so only a foreign file written with its manifest
                raise StaleArtifactError(f"{path}/index.faiss is not a faiss index ({exc}); {rebuild}") from exc
            del faiss_bytes
            if (self._faiss_index.ntotal, self._faiss_index.d) != (n, d):
                raise StaleArtifactError(
                    f"{path}/index.faiss holds ({self._faiss_index.ntotal}, {self._faiss_index.d}) vectors, "
                    f"expected ({n}, {d}); {rebuild}"
                )
            self._hnsw_l2 = meta.get("hnsw_l2", False)
            if emb is None and self.kind != "ivf":  # flat and HNSW store their vectors
                emb = torch.from_numpy(self._faiss_index.reconstruct_n(0, n))
        elif lists is not None:
            self._centroids = torch.from_numpy(lists["centroids"])
            assignment = torch.from_numpy(lists["assignment"])
            if (tuple(self._centroids.shape) != (self.nlist, d) or tuple(assignment.shape) != (n,)
                    or int(assignment.min()) < 0 or int(assignment.max()) >= self.nlist):
                raise StaleArtifactError(f"{path}/ivfgemm.npz does not fit a ({n}, {d}) index of {self.nlist} lists; {rebuild}")
        elif emb is None:
            emb = torch.from_numpy(stored)
            if tuple(emb.shape) != (n, d):  # its bytes were checked against the manifest above
                raise StaleArtifactError(f"{path}/embeddings.npy has shape {tuple(emb.shape)}, expected ({n}, {d}); {rebuild}")
        if emb is None:
            raise BatchlabInputError(
                f"index {path} ({self.kind}) does not keep the original vectors; pass embeddings= to load it"
            )
        if self.kind == "ivf-gemm":
            from batchlab._ivfgemm import ListLayout  # noqa: PLC0415

            self._centroids = self._centroids.to(emb.device)
            self._layout = ListLayout(assignment.to(emb.device), self.nlist)
        self.embeddings = emb
        self.device = emb.device
        self.block_bytes = (1 << 31) if self.device.type == "cuda" else (1 << 29)
        self._hash = saved_hash
        return self

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def __repr__(self) -> str:
        n, d = self.embeddings.shape
        extra = f", nlist={self.nlist}, nprobe={self.nprobe}" if self.kind in ("ivf", "ivf-gemm") else ""
        return f"EmbeddingIndex(kind={self.kind!r}, n={n}, d={d}, metric={self.metric!r}{extra})"


def knn(embeddings: Any, k: int, *, exclude_self: bool = True, batch_size: int = 16384, **index_kwargs: Any):
    """Self-kNN: the ``k`` nearest indexed rows of every row (itself excluded by id).

    Returns ``(scores, ids)`` as :meth:`EmbeddingIndex.search`; ``index_kwargs`` go to
    :class:`EmbeddingIndex` (``kind``, ``metric``, ``nprobe``, ``progress``, ...).

    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    >>> s, i = knn(x, 3, kind="torch", progress=False)
    >>> i.tolist()   # two other rows, then padding because only two exist
    [[1, 2, -1], [0, 2, -1], [1, 0, -1]]
    """
    index = EmbeddingIndex(embeddings, **index_kwargs)
    return index.search(index.embeddings, k, exclude_self=exclude_self, batch_size=batch_size)
