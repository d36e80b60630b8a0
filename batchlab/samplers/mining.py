"""Offline hard-negative mining from teacher embeddings.

For every query (anchor), rank the corpus by a teacher's inner product, drop the
query's own positives (and, given texts or ids, everything that duplicates them),
keep a rank window ``[range_min, range_max)`` as the false-negative guard, apply the
positive-aware score filters, and sample ``num_negatives`` negatives from what
survives (the first ones, or a seeded random subset).

Conventions (read these before comparing with sentence-transformers)
--------------------------------------------------------------------
* **Ranks are counted after exclusions.** ``range_min=30`` skips the 30 best
  candidates that are neither a positive, the anchor itself, nor a duplicate of one.
* **The positive score is the smallest positive score** of the query (the strictest
  choice: a negative must sit below *every* positive by the margin).
* **absolute_margin m:** keep ``score <= pos - m``.
* **relative_margin r:** keep ``score <= pos - r * |pos|``. For a positive ``pos`` this
  is NV-Retriever's "TopK-PercPos" (``r = 0.05`` keeps ``score <= 0.95 pos``); unlike
  ``score <= (1 - r) * pos`` (sentence-transformers#3819) it stays a *lower* bound
  below the positive when ``pos < 0``, instead of flipping above it.
* **max_score / min_score:** keep ``min_score <= score <= max_score``.
* All filters combine with AND. Missing slots are id ``-1`` with score ``-inf``.

Memory stays bounded: queries are processed in blocks of ``batch_size`` rows, and for
each block only ``(batch_size, depth)`` candidates are held, ``depth = range_max +``
the number of excluded ids; the output itself is ``(Q, num_negatives)``.

Example
-------
>>> import torch
>>> from batchlab.datasets.synthetic import gaussian_mixture
>>> x, labels = gaussian_mixture(200, 16, 10, seed=0)
>>> mined = mine_hard_negatives(x, x, [[i] for i in range(200)], num_negatives=3, progress=False)
>>> mined.negative_ids.shape
torch.Size([200, 3])
>>> bool((mined.negative_ids != torch.arange(200)[:, None]).all())   # own positive excluded
True
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch

from batchlab._checks import check_choice, check_positive_int
from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.index import EmbeddingIndex, as_tensor, content_hash, order_ties_by_id, progress_bar

logger = logging.getLogger(__name__)

SAMPLING = ("top", "random")
FORMAT_VERSION = 2  # 2: n, d, num_corpus and a hash of every array (1 had none)


def teacher_hash(query_embeddings: torch.Tensor, corpus_embeddings: torch.Tensor) -> str:
    """One hash for the (queries, corpus) teacher embeddings a mining run used."""
    h = hashlib.blake2b(digest_size=16)
    h.update(content_hash(query_embeddings).encode())
    h.update(content_hash(corpus_embeddings).encode())
    return h.hexdigest()


@dataclass
class MinedNegatives:
    """Result of :func:`mine_hard_negatives`.

    Attributes
    ----------
    negative_ids : int64 (Q, num_negatives); corpus ids, ``-1`` where fewer survived.
        Row ``i`` belongs to query (anchor) ``i``; within a row, descending teacher score.
    scores : float32 (Q, num_negatives); teacher scores, ``-inf`` where the id is ``-1``.
    positive_scores : float32 (Q,); the smallest positive score of each query (the one
        the margins use), ``nan`` for a query without positives.
    num_candidates : int64 (Q,); how many candidates survived window and filters before
        sampling (shows how tight the filters are).
    params : the hyper-parameters of the run.
    teacher_hash : hash of the query and corpus embeddings the run used ("" when
        ``hash_inputs=False``).
    info : timings of the run (index build, search + filtering, hashing), in seconds.
    """

    negative_ids: torch.Tensor
    scores: torch.Tensor
    positive_scores: torch.Tensor
    num_candidates: torch.Tensor
    params: dict[str, Any] = field(default_factory=dict)
    teacher_hash: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        return int(self.negative_ids.shape[0])

    def as_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat ``(anchor_ids, negative_ids, scores)`` of every mined pair (``-1`` slots dropped).

        A dataset indexes them directly: pair ``p`` is (query ``anchor_ids[p]``, corpus item
        ``negative_ids[p]``) with teacher score ``scores[p]``.
        """
        valid = self.negative_ids >= 0
        anchors = torch.arange(self.num_queries, device=valid.device)[:, None].expand_as(valid)
        return anchors[valid], self.negative_ids[valid], self.scores[valid]

    def summary(self) -> dict[str, float]:
        """Fill rate and mean scores (what the CLI prints)."""
        valid = self.negative_ids >= 0
        filled = int(valid.sum())
        return {
            "queries": self.num_queries,
            "negatives_per_query": int(self.negative_ids.shape[1]),
            "filled_fraction": filled / max(1, valid.numel()),
            "queries_short": int((valid.sum(1) < valid.shape[1]).sum()),
            "mean_negative_score": float(self.scores[valid].mean()) if filled else float("nan"),
            "mean_positive_score": float(torch.nanmean(self.positive_scores.float())) if self.num_queries else float("nan"),
        }

    _ARRAYS = ("negative_ids", "scores", "positive_scores", "num_candidates")

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` file with the arrays, the hyper-parameters and the teacher hash.

        Written atomically (a temporary file beside ``path``, fsynced, renamed over it): a
        killed writer leaves the previous file intact. The file records ``n`` (queries),
        ``d`` (negatives per query), the corpus size and a hash of every array, which
        :meth:`load` checks.
        """
        from batchlab._artifacts import array_hash, atomic_file

        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        arrays = {name: getattr(self, name).detach().cpu().numpy() for name in self._ARRAYS}
        num_corpus = self.params.get("num_corpus")
        meta = {"format_version": FORMAT_VERSION, "params": self.params, "teacher_hash": self.teacher_hash,
                "info": self.info, "n": self.num_queries, "d": int(self.negative_ids.shape[1]),
                "num_corpus": None if num_corpus is None else int(num_corpus),
                "arrays": {name: array_hash(a) for name, a in arrays.items()}}
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays, meta=np.array(json.dumps(meta, default=str)))
        return path

    @classmethod
    def load(cls, path: str | Path, query_embeddings: Any = None, corpus_embeddings: Any = None) -> "MinedNegatives":
        """Read a file written by :meth:`save`, checking it before trusting it.

        Refused with :class:`StaleArtifactError`: a truncated or corrupt file, an array
        whose hash differs from the one saved with it, arrays whose shapes disagree
        (``(Q, k)`` ids and scores, ``(Q,)`` positive scores and candidate counts),
        negative ids outside ``[-1, num_corpus)``; and, with both embeddings given, other
        teacher embeddings than the ones mined from (row counts, then the teacher hash).
        """
        from batchlab._artifacts import array_hash, read_npz

        path = Path(path)
        again = "mine again with `batchlab mine` or mine_hard_negatives(...).save(path)"
        if (query_embeddings is None) != (corpus_embeddings is None):
            raise BatchlabInputError("give both query_embeddings and corpus_embeddings to check the teacher hash, or neither")
        raw = read_npz(path, ("meta", *cls._ARRAYS), what="mined-negatives", rebuild=again)
        try:
            meta = json.loads(str(raw["meta"]))
            version, saved = meta.get("format_version"), meta.get("arrays")
        except (ValueError, AttributeError) as exc:
            raise StaleArtifactError(f"{path}: unreadable metadata ({exc}); {again}") from exc
        if version != FORMAT_VERSION or not isinstance(saved, dict):
            raise StaleArtifactError(
                f"{path} has format version {version}, expected {FORMAT_VERSION} (with array hashes); {again}"
            )
        for name in cls._ARRAYS:
            if saved.get(name) != array_hash(raw[name]):
                raise StaleArtifactError(f"{path}: array {name!r} does not match the hash saved with it; {again}")
        ids, scores, pos, cand = (raw[name] for name in cls._ARRAYS)
        q = meta.get("n")
        if ids.ndim != 2 or ids.shape[0] != q or scores.shape != ids.shape or pos.shape != (q,) or cand.shape != (q,):
            raise StaleArtifactError(
                f"{path}: arrays disagree on the number of queries (saved n={q}): negative_ids {ids.shape}, scores "
                f"{scores.shape}, positive_scores {pos.shape}, num_candidates {cand.shape}; {again}"
            )
        num_corpus = meta.get("num_corpus")
        if ids.size and (int(ids.min()) < -1 or (num_corpus is not None and int(ids.max()) >= num_corpus)):
            raise StaleArtifactError(
                f"{path}: negative_ids hold values in [{int(ids.min())}, {int(ids.max())}], outside [-1, {num_corpus}); "
                f"{again}"
            )
        out = cls(*(torch.from_numpy(raw[name]) for name in cls._ARRAYS), params=meta.get("params", {}),
                  teacher_hash=meta.get("teacher_hash", ""), info=meta.get("info", {}))
        if query_embeddings is not None:
            if not out.teacher_hash:
                raise StaleArtifactError(f"{path} was mined with hash_inputs=False: no teacher hash to check against")
            qe = as_tensor("query_embeddings", query_embeddings)
            ce = as_tensor("corpus_embeddings", corpus_embeddings)
            if qe.shape[0] != q or (num_corpus is not None and ce.shape[0] != num_corpus):
                raise StaleArtifactError(
                    f"{path} was mined for {q} queries and {num_corpus} corpus rows, but the embeddings given have "
                    f"{qe.shape[0]} and {ce.shape[0]} rows; {again}"
                )
            h = teacher_hash(qe, ce)
            if h != out.teacher_hash:
                raise StaleArtifactError(
                    f"{path} was mined from other teacher embeddings (hash {out.teacher_hash}, these hash {h}); mine again"
                )
        return out


# --------------------------------------------------------------------------- inputs
def positives_csr(positive_ids: Any, num_queries: int, num_corpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise ``positive_ids`` to CSR ``(indptr (Q+1,), indices (P,))`` int64 tensors.

    Accepts a sequence of per-query lists (or ints), a 1-D array (one positive per
    query) or a 2-D array padded with ``-1``. Duplicated ids within a query are kept
    once. Raises :class:`BatchlabInputError` on a length mismatch or an id outside
    ``[0, num_corpus)``.
    """
    if isinstance(positive_ids, (torch.Tensor, np.ndarray)):
        arr = torch.as_tensor(np.asarray(positive_ids.cpu() if isinstance(positive_ids, torch.Tensor) else positive_ids))
        if arr.dtype.is_floating_point or arr.dtype == torch.bool:
            raise BatchlabInputError(f"positive_ids must hold integer corpus ids, got dtype {arr.dtype}")
        if arr.dim() == 1:
            arr = arr[:, None]
        if arr.dim() != 2:
            raise BatchlabInputError(f"positive_ids as an array must be (Q,) or (Q, P) padded with -1, got shape {tuple(arr.shape)}")
        if arr.numel() and int(arr.min()) < -1:
            raise BatchlabInputError("positive_ids: -1 is the only negative value allowed (padding)")
        if arr.shape[0] != num_queries:
            raise BatchlabInputError(
                f"positive_ids has {arr.shape[0]} entries but there are {num_queries} queries; give one entry per query row"
            )
        # vectorised (1M queries in milliseconds): sort each row, drop padding and repeats
        arr = torch.sort(arr.to(torch.int64), dim=1).values
        keep = arr >= 0
        keep[:, 1:] &= arr[:, 1:] != arr[:, :-1]
        indices = arr[keep]
        if indices.numel() and int(indices.max()) >= num_corpus:
            raise BatchlabInputError(
                f"positive id {int(indices.max())} is outside the corpus [0, {num_corpus}); ids must index corpus rows"
            )
        indptr = torch.zeros(num_queries + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(keep.sum(1), 0)
        return indptr, indices
    else:
        try:
            lists = [[int(p)] if isinstance(p, (int, np.integer)) else [int(v) for v in p] for p in positive_ids]
        except TypeError as exc:
            raise BatchlabInputError(
                "positive_ids must be a list with one list of corpus ids per query (or one int per query)"
            ) from exc
    if len(lists) != num_queries:
        raise BatchlabInputError(
            f"positive_ids has {len(lists)} entries but there are {num_queries} queries; give one entry per query row"
        )
    lengths, flat = [], []
    for row in lists:
        row = list(dict.fromkeys(row))
        lengths.append(len(row))
        flat.extend(row)
    indices = torch.tensor(flat, dtype=torch.int64)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_corpus):
        bad = int(indices[(indices < 0) | (indices >= num_corpus)][0])
        raise BatchlabInputError(f"positive id {bad} is outside the corpus [0, {num_corpus}); ids must index corpus rows")
    indptr = torch.zeros(num_queries + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return indptr, indices


def _key_ids(keys: Sequence[Hashable], dedup_key: Callable | None, table: dict) -> torch.Tensor:
    """Map each key (after ``dedup_key``) to a small int; equal keys get equal ints."""
    out = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        key = dedup_key(key) if dedup_key is not None else key
        out[i] = table.setdefault(key, len(table))
    return torch.from_numpy(out)


def _padded(indptr: torch.Tensor, indices: torch.Tensor, q0: int, q1: int, fill: int = -1) -> torch.Tensor:
    """Rows ``q0:q1`` of a CSR matrix as a ``(q1-q0, max_len)`` tensor padded with ``fill``."""
    start, stop = indptr[q0:q1], indptr[q0 + 1 : q1 + 1]
    lengths = stop - start
    width = int(lengths.max()) if lengths.numel() else 0
    out = torch.full((q1 - q0, max(width, 1)), fill, dtype=torch.int64)
    if width:
        col = torch.arange(width)[None, :]
        mask = col < lengths[:, None]
        out[mask] = indices[(start[:, None] + col)[mask]]
    return out


def _uniform_keys(seed: int, query_ids: torch.Tensor, width: int) -> torch.Tensor:
    """Counter-based uniform numbers in [0, 1) for (query id, slot): the same for a query
    whatever the block size or device (splitmix64 on ``seed, query, slot``)."""
    with np.errstate(over="ignore"):
        q = query_ids.cpu().numpy().astype(np.uint64)[:, None]
        s = np.arange(width, dtype=np.uint64)[None, :]
        z = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15) + q * np.uint64(0xBF58476D1CE4E5B9) + s
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) / float(1 << 53))


def _check_number(name: str, value: float | None, *, minimum: float | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BatchlabInputError(f"{name} must be a finite number or None, got {value!r}")
    if minimum is not None and value < minimum:
        raise BatchlabInputError(f"{name} must be >= {minimum}, got {value}")


# --------------------------------------------------------------------------- mining
def mine_hard_negatives(
    query_embeddings: Any,
    corpus_embeddings: Any,
    positive_ids: Any,
    *,
    num_negatives: int,
    range_min: int = 0,
    range_max: int | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    sampling: str = "top",
    seed: int = 0,
    query_ids: Any = None,
    corpus_texts: Sequence[Hashable] | None = None,
    query_texts: Sequence[Hashable] | None = None,
    dedup_key: Callable[[Hashable], Hashable] | None = None,
    index: EmbeddingIndex | None = None,
    index_kwargs: dict[str, Any] | None = None,
    target_recall: float | None = 0.95,
    batch_size: int = 4096,
    progress: bool = True,
    hash_inputs: bool = True,
) -> MinedNegatives:
    """Mine ``num_negatives`` hard negatives per query from a teacher's embeddings.

    Parameters
    ----------
    query_embeddings : (Q, d) numpy array or tensor (CPU or CUDA); the anchors.
    corpus_embeddings : (N, d); the candidates. May be the same tensor as the queries.
    positive_ids : one entry per query: a list of corpus ids (several allowed, may be
        empty when no positive-aware filter is set), an int, or a (Q,) / (Q, P) array
        padded with -1. Positives are never returned as negatives.
    num_negatives : negatives per query.
    range_min, range_max : keep candidates of rank ``range_min <= r < range_max`` after
        exclusions (rank 0 = hardest). Default ``range_max``: ``range_min + num_negatives``
        for plain ``top`` sampling, ``range_min + 10 * num_negatives`` when a score filter
        is set or ``sampling="random"`` (room for the filters / the draw).
    absolute_margin, relative_margin, max_score, min_score : score filters (see module doc;
        the relative margin is ``score <= pos - r * |pos|``, correct for negative ``pos``).
    sampling : ``"top"`` (best survivors) or ``"random"`` (seeded uniform subset of the
        survivors; the draw for a query depends only on ``seed`` and its row).
    seed : seed of the random sampling.
    query_ids : (Q,) corpus id of each query when the queries are corpus items
        (``-1`` = not in the corpus); that id is excluded. When the query and corpus
        embeddings are the same object and this is None, it defaults to ``arange(Q)``.
    corpus_texts, query_texts : optional texts (or any hashable ids) per corpus item /
        query. A corpus item whose key equals the key of one of the query's positives or
        of the query itself is excluded, and a query keeps at most one negative per key.
    dedup_key : optional function applied to every text before comparing
        (e.g. ``str.casefold``).
    index : a prebuilt :class:`EmbeddingIndex` over the corpus; else one is built with
        ``index_kwargs`` (``kind="auto"``: exact below 200k rows, ``ivf-gemm`` above; on CUDA
        exact). Candidates from faiss ``ivf`` (fp16 lists) are re-scored exactly before filtering.
    target_recall : with an approximate index, :meth:`EmbeddingIndex.tune` it first (more
        probes) until its recall at the mining depth on 1,000 of these queries reaches this;
        the achieved recall is in ``info``. ``None``: use the index as it is.
    batch_size : queries per block (memory is O(batch_size * depth)).
    progress : tqdm bar over queries.
    hash_inputs : hash the query and corpus embeddings into ``teacher_hash`` (streams all of
        them once: about 1 s per GB on a CPU core; turn off for throwaway runs).

    Returns
    -------
    MinedNegatives

    Raises
    ------
    BatchlabInputError : empty / non-finite embeddings, dimension or length mismatch,
        positive ids outside the corpus, a window that can hold no candidate, a
        positive-aware filter with a query that has no positive.
    """
    q_emb = as_tensor("query_embeddings", query_embeddings)
    same = corpus_embeddings is query_embeddings
    c_emb = q_emb if same else as_tensor("corpus_embeddings", corpus_embeddings)
    num_q, d = q_emb.shape
    num_c = c_emb.shape[0]
    if c_emb.shape[1] != d:
        raise BatchlabInputError(f"query_embeddings have dimension {d} but corpus_embeddings have {c_emb.shape[1]}")
    check_positive_int("num_negatives", num_negatives)
    check_positive_int("range_min", range_min, minimum=0)
    check_positive_int("batch_size", batch_size)
    check_choice("sampling", sampling, SAMPLING)
    for name, v, lo in (("absolute_margin", absolute_margin, None), ("relative_margin", relative_margin, 0.0),
                        ("max_score", max_score, None), ("min_score", min_score, None)):
        _check_number(name, v, minimum=lo)
    if target_recall is not None and not (isinstance(target_recall, (int, float)) and 0 < target_recall <= 1):
        raise BatchlabInputError(f"target_recall must be in (0, 1] or None, got {target_recall!r}")
    positive_aware = absolute_margin is not None or relative_margin is not None
    filtered = positive_aware or max_score is not None or min_score is not None
    if range_max is None:
        range_max = range_min + num_negatives * (10 if (filtered or sampling == "random") else 1)
    else:
        check_positive_int("range_max", range_max)
    if range_max <= range_min:
        raise BatchlabInputError(
            f"the rank window [range_min={range_min}, range_max={range_max}) is empty; use range_max > range_min"
        )
    if range_min >= num_c:
        raise BatchlabInputError(
            f"range_min={range_min} skips every candidate: the corpus has only {num_c} items; lower range_min"
        )
    if range_max - range_min < num_negatives:
        logger.warning("the window [%d, %d) holds fewer than num_negatives=%d; rows will be -1 padded",
                       range_min, range_max, num_negatives)

    indptr, pos_flat = positives_csr(positive_ids, num_q, num_c)
    n_pos = indptr[1:] - indptr[:-1]
    if positive_aware and bool((n_pos == 0).any()):
        bad = int((n_pos == 0).nonzero()[0, 0])
        raise BatchlabInputError(
            f"query {bad} has no positive, but absolute_margin/relative_margin compare against the positive score; "
            "give every query a positive or drop the margins"
        )
    if query_ids is None and same:
        self_ids = torch.arange(num_q)
    elif query_ids is not None:
        self_ids = torch.as_tensor(np.asarray(query_ids.cpu() if isinstance(query_ids, torch.Tensor) else query_ids)).to(torch.int64).reshape(-1)
        if self_ids.shape[0] != num_q:
            raise BatchlabInputError(f"query_ids has {self_ids.shape[0]} entries but there are {num_q} queries")
        if self_ids.numel() and (int(self_ids.min()) < -1 or int(self_ids.max()) >= num_c):
            raise BatchlabInputError(f"query_ids must be corpus ids in [0, {num_c}) or -1")
    else:
        self_ids = None

    corpus_keys = query_keys = None
    if corpus_texts is not None:
        if len(corpus_texts) != num_c:
            raise BatchlabInputError(f"corpus_texts has {len(corpus_texts)} entries but the corpus has {num_c} rows")
        table: dict = {}
        corpus_keys = _key_ids(corpus_texts, dedup_key, table)
        if query_texts is not None:
            if len(query_texts) != num_q:
                raise BatchlabInputError(f"query_texts has {len(query_texts)} entries but there are {num_q} queries")
            query_keys = _key_ids(query_texts, dedup_key, table)
    elif query_texts is not None:
        raise BatchlabInputError("query_texts needs corpus_texts (duplicates are found by comparing the two)")

    index_kwargs = dict(index_kwargs or {})
    metric = index_kwargs.get("metric", "ip") if index is None else index.metric
    info: dict[str, Any] = {"index_build_s": 0.0}
    built_here = index is None
    if index is None:
        index_kwargs.setdefault("progress", progress)
        index_kwargs.setdefault("seed", seed)
        index_kwargs.setdefault("check_recall", target_recall is None)  # tuned below instead
        t0 = time.perf_counter()
        index = EmbeddingIndex(c_emb, **index_kwargs)
        info["index_build_s"] = time.perf_counter() - t0
    elif len(index) != num_c or index.embeddings.shape[1] != d:
        raise BatchlabInputError(
            f"the index covers {len(index)} rows of dimension {index.embeddings.shape[1]}, but the corpus is ({num_c}, {d})"
        )
    if index.approximate and target_recall is not None:
        # tune at the depth mining searches, on these queries (not the corpus rows)
        depth = min(num_c, range_max + int(n_pos.max()) + (1 if self_ids is not None else 0))
        t0 = time.perf_counter()
        # an index built here starts from one probe; a given index keeps its setting as the floor
        index.tune(depth, target_recall=target_recall, queries=q_emb, start=1 if built_here else None)
        info["index_tune_s"] = time.perf_counter() - t0
    info.update({f"index_{k}": v for k, v in index.info.items() if k.startswith(("recall", "tuned"))})
    device = index.device if index.kind in ("torch", "ivf-gemm") else torch.device("cpu")
    if index.kind == "ivf-gemm":
        # every search call gathers each probed list once: large blocks amortise it
        batch_size = max(batch_size, 65536)

    params = {
        "num_negatives": num_negatives, "range_min": range_min, "range_max": range_max,
        "absolute_margin": absolute_margin, "relative_margin": relative_margin, "max_score": max_score,
        "min_score": min_score, "sampling": sampling, "seed": seed, "metric": metric,
        "index": index.params(), "num_queries": num_q, "num_corpus": num_c,
        "dedup": corpus_texts is not None, "conventions": "ranks after exclusions; pos = min positive score; "
        "relative: score <= pos - r*|pos|",
    }
    out_ids = torch.full((num_q, num_negatives), -1, dtype=torch.int64)
    out_scores = torch.full((num_q, num_negatives), float("-inf"), dtype=torch.float32)
    pos_scores = torch.full((num_q,), float("nan"), dtype=torch.float32)
    n_cand = torch.zeros(num_q, dtype=torch.int64)

    t_mine = time.perf_counter()
    bar = progress_bar(num_q, "mining hard negatives", progress, leave=True)
    for q0 in range(0, num_q, batch_size):
        q1 = min(num_q, q0 + batch_size)
        block = _MiningBlock(
            q0, q1, q_emb, c_emb, index, device, metric,
            positives=_padded(indptr, pos_flat, q0, q1).to(device),
            self_ids=None if self_ids is None else self_ids[q0:q1].to(device),
            corpus_keys=corpus_keys,
            query_keys=None if query_keys is None else query_keys[q0:q1],
        )
        ids, scores, cand, pos = block.run(
            num_negatives, range_min, range_max, absolute_margin, relative_margin, max_score, min_score, sampling, seed
        )
        out_ids[q0:q1], out_scores[q0:q1], n_cand[q0:q1], pos_scores[q0:q1] = ids.cpu(), scores.cpu(), cand.cpu(), pos.cpu()
        bar.update(q1 - q0)
    bar.close()
    short = int(((out_ids >= 0).sum(1) < num_negatives).sum())
    if short:
        logger.warning("%d of %d queries have fewer than %d negatives after the window and filters (-1 padded)",
                       short, num_q, num_negatives)
    info["mine_s"] = time.perf_counter() - t_mine
    t0 = time.perf_counter()
    digest = teacher_hash(q_emb, c_emb) if hash_inputs else ""
    info["hash_s"] = time.perf_counter() - t0
    return MinedNegatives(out_ids, out_scores, pos_scores, n_cand, params, digest, info)


class _MiningBlock:
    """The work for one block of queries: search, exclude, window, filter, sample."""

    def __init__(self, q0, q1, q_emb, c_emb, index, device, metric, *, positives, self_ids, corpus_keys, query_keys):
        """``positives`` (b, P) padded with -1; ``self_ids`` (b,) or None; ``corpus_keys`` (N,) and
        ``query_keys`` (b,) integer text keys or None."""
        self.q0, self.q1 = q0, q1
        self.positives, self.self_ids = positives, self_ids
        self.corpus_keys, self.query_keys = corpus_keys, query_keys
        self.q = q_emb[q0:q1].to(device=device, dtype=torch.float32)
        self.c_emb, self.index, self.device = c_emb, index, device
        self.normalize = metric == "cosine"
        if self.normalize:
            self.q = torch.nn.functional.normalize(self.q, dim=1)

    def _exact_scores(self, ids: torch.Tensor) -> torch.Tensor:
        """Exact q . c for candidate ids (b, K); -inf where id is -1."""
        s = torch.empty(ids.shape, dtype=torch.float32, device=self.device)
        # gather at most ~32M floats of candidate rows at a time (bounded memory)
        step = max(1, (1 << 25) // max(1, ids.shape[1] * self.q.shape[1]))
        for r0 in range(0, ids.shape[0], step):
            sub = ids[r0 : r0 + step].clamp(min=0).to(self.c_emb.device)
            rows = self.c_emb[sub].to(device=self.device, dtype=torch.float32)
            if self.normalize:
                rows = torch.nn.functional.normalize(rows, dim=-1)
            s[r0 : r0 + step] = torch.einsum("bd,bkd->bk", self.q[r0 : r0 + step], rows)
        return torch.where(ids < 0, torch.full_like(s, float("-inf")), s)

    def _excluded(self, ids: torch.Tensor) -> torch.Tensor:
        excl = ids < 0
        if self.positives.shape[1]:
            excl |= (ids[:, :, None] == self.positives[:, None, :]).any(-1)
        if self.self_ids is not None:
            excl |= ids == self.self_ids[:, None]
        if self.corpus_keys is not None:
            keys = self.corpus_keys[ids.clamp(min=0).cpu()].to(self.device)
            pkeys = self.corpus_keys[self.positives.clamp(min=0).cpu()].to(self.device)
            pkeys = torch.where(self.positives < 0, torch.full_like(pkeys, -1), pkeys)
            excl |= (keys[:, :, None] == pkeys[:, None, :]).any(-1)
            if self.query_keys is not None:
                excl |= keys == self.query_keys.to(self.device)[:, None]
            # at most one candidate per key: drop later (lower-ranked) repeats among the kept ones
            keys = torch.where(excl, -2 - torch.arange(keys.shape[1], device=self.device)[None, :].expand_as(keys), keys)
            sorted_keys, order = torch.sort(keys, dim=1, stable=True)
            repeat = torch.zeros_like(excl)
            repeat[:, 1:] = sorted_keys[:, 1:] == sorted_keys[:, :-1]
            excl |= torch.zeros_like(excl).scatter(1, order, repeat)
        return excl

    def _search(self, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, ids = self.index.search(self.q if self.device.type == "cuda" else self.q.cpu(), depth, progress=False)
        ids = ids.to(self.device)
        if self.index.kind == "ivf":
            # faiss IVF stores fp16 vectors: re-score exactly so that margins compare like with like
            # (ivf-gemm scores the original vectors; HNSW stores float32)
            scores, ids = order_ties_by_id(self._exact_scores(ids), ids)
        return scores.to(self.device), ids

    def run(self, num_negatives, range_min, range_max, abs_m, rel_m, max_score, min_score, sampling, seed):
        n_corpus = len(self.index)
        extra = self.positives.shape[1] + (1 if self.self_ids is not None else 0)
        depth = min(n_corpus, range_max + extra)
        scores, ids = self._search(depth)
        excl = self._excluded(ids)
        # key-based exclusions can eat the window: search deeper for the rows that ran short
        while self.corpus_keys is not None and depth < n_corpus:
            kept = (~excl).sum(1)
            short = (kept < range_max) & (ids[:, -1] >= 0)
            if not bool(short.any()):
                break
            depth = min(n_corpus, depth * 2)
            scores, ids = self._search(depth)
            excl = self._excluded(ids)

        pos = self.positives
        pos_s = self._exact_scores(pos)  # -inf where padding
        has_pos = pos[:, 0] >= 0
        pos_min = torch.where(pos >= 0, pos_s, torch.full_like(pos_s, float("inf"))).min(1).values
        pos_min = torch.where(has_pos, pos_min, torch.full_like(pos_min, float("nan")))

        rank = torch.cumsum((~excl).to(torch.int64), 1) - 1
        keep = ~excl & (rank >= range_min) & (rank < range_max)
        if abs_m is not None or rel_m is not None:
            # a candidate that duplicates a positive scores exactly pos, but the search's product and
            # the positive's dot product round differently: scores within float32 rounding of the
            # bound (16 sqrt(d) 2^-24 |q| |c|) count as equal to it, so `<=` keeps them for every
            # kind and block size
            slack = 16 * math.sqrt(self.q.shape[1]) * 2.0**-24
            if not self.normalize:
                rows = self.c_emb[pos.clamp(min=0).to(self.c_emb.device)].to(device=self.device, dtype=torch.float32)
                norms = torch.where(pos >= 0, rows.norm(dim=-1), torch.zeros((), device=self.device))
                slack = slack * self.q.norm(dim=1) * norms.max(dim=1).values
            bound = pos_min + slack
        if abs_m is not None:
            keep &= scores <= (bound - abs_m)[:, None]
        if rel_m is not None:
            keep &= scores <= (bound - rel_m * pos_min.abs())[:, None]
        if max_score is not None:
            keep &= scores <= max_score
        if min_score is not None:
            keep &= scores >= min_score
        n_keep = keep.sum(1)

        if sampling == "top":
            order_key = torch.where(keep, torch.arange(keep.shape[1], device=self.device, dtype=torch.float64)[None, :],
                                    torch.full(keep.shape, float("inf"), dtype=torch.float64, device=self.device))
        else:
            u = _uniform_keys(seed, torch.arange(self.q0, self.q1), keep.shape[1]).to(self.device)
            # a candidate's draw is tied to its rank slot after exclusions, so a deeper search does not change it
            slot = rank.clamp(min=0)
            u = torch.gather(u, 1, slot)
            order_key = torch.where(keep, u, torch.full_like(u, float("inf")))
        take = min(num_negatives, keep.shape[1])
        chosen_key, chosen = torch.topk(order_key, take, dim=1, largest=False, sorted=True)
        chosen, _ = torch.sort(chosen, dim=1)  # back to rank order (descending score)
        valid = torch.gather(keep, 1, chosen)
        out_ids = torch.full((self.q1 - self.q0, num_negatives), -1, dtype=torch.int64, device=self.device)
        out_s = torch.full((self.q1 - self.q0, num_negatives), float("-inf"), dtype=torch.float32, device=self.device)
        # valid slots come first in rank order: move them to the front
        front = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        chosen, valid = torch.gather(chosen, 1, front), torch.gather(valid, 1, front)
        sel_ids = torch.gather(ids, 1, chosen)
        sel_s = torch.gather(scores, 1, chosen).float()
        out_ids[:, :take] = torch.where(valid, sel_ids, torch.full_like(sel_ids, -1))
        out_s[:, :take] = torch.where(valid, sel_s, torch.full_like(sel_s, float("-inf")))
        return out_ids, out_s, n_keep, pos_min.float()
