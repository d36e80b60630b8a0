"""Offline teachers for batch construction: a lexical TF-IDF teacher (no model, no download).

Batch samplers (communities, clusters, hard negatives) need teacher embeddings that
say which examples look alike. :class:`TfidfTeacher` gives them from the text alone:
scikit-learn's ``TfidfVectorizer`` over identifier-aware words (``snake_case`` and
``camelCase`` split by :func:`analyze`; sublinear tf, smoothed idf, L2 rows), reduced to
``dim`` dense dimensions with scikit-learn's ``TruncatedSVD`` (LSA) so that faiss and the
samplers can use them.

The other teacher the recipes support is the model itself: its own embeddings from
an earlier epoch (``teacher="model"`` in :func:`~batchlab.recipes.train_dual_encoder`).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import torch

from batchlab.errors import BatchlabInputError

_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_STOP = frozenset("a an and are as at be by for from if in is it of on or the to this that with self".split())


def analyze(text: str) -> list[str]:
    """Lower-case words, with identifiers split at ``_`` and case changes.

    >>> analyze("Return the getNodeID of self.parse_args")
    ['return', 'get', 'node', 'id', 'parse', 'args']
    """
    return [w for w in (m.lower() for m in _WORD.findall(text)) if len(w) > 1 and w not in _STOP]


class TfidfTeacher:
    """TF-IDF + LSA text embeddings, fitted on a corpus (scikit-learn underneath).

    Parameters
    ----------
    dim:
        Dimensions kept by the truncated SVD (capped by the vocabulary and corpus sizes).
    min_df:
        Words in fewer documents than this are dropped.
    seed:
        Seed of the randomised SVD (the embeddings are deterministic given it).

    Example
    -------
    >>> teacher = TfidfTeacher(dim=2).fit(["parse the file", "parse a string", "draw a circle"])
    >>> teacher.embed(["parse it"]).shape
    torch.Size([1, 2])
    """

    def __init__(self, dim: int = 256, *, min_df: int = 1, seed: int = 0) -> None:
        if dim < 1:
            raise BatchlabInputError(f"TfidfTeacher: dim must be >= 1, got {dim}")
        self.dim, self.min_df, self.seed = int(dim), int(min_df), int(seed)
        self.vocabulary: dict[str, int] | None = None

    def fit(self, texts: Sequence[str]) -> "TfidfTeacher":
        """Learn the vocabulary, idf weights and the SVD basis from ``texts``."""
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        if len(texts) == 0:
            raise BatchlabInputError("TfidfTeacher.fit: no texts; pass the training texts (a non-empty list of str)")
        self._vectorizer = TfidfVectorizer(analyzer=analyze, min_df=self.min_df, sublinear_tf=True, dtype=np.float32)
        try:
            matrix = self._vectorizer.fit_transform(list(texts))
        except ValueError:  # scikit-learn: "empty vocabulary" / "no terms remain"
            raise BatchlabInputError(f"TfidfTeacher.fit: no word occurs in at least min_df={self.min_df} texts") from None
        self.vocabulary = dict(self._vectorizer.vocabulary_)
        self.idf = torch.from_numpy(self._vectorizer.idf_.astype(np.float32))
        k = min(self.dim, min(matrix.shape) - 1) if min(matrix.shape) > 1 else 1
        # signs are fixed by scikit-learn (svd_flip), so the embeddings do not flip between runs
        svd = TruncatedSVD(n_components=k, n_iter=5, random_state=self.seed).fit(matrix)
        self.components = torch.from_numpy(svd.components_.T.astype(np.float32).copy())  # (V, k)
        return self

    def transform(self, texts: Sequence[str]) -> torch.Tensor:
        """Sparse ``(len(texts), V)`` TF-IDF matrix (sublinear tf, L2-normalised rows)."""
        if self.vocabulary is None:
            raise BatchlabInputError("TfidfTeacher: call fit(texts) before transform or embed")
        coo = self._vectorizer.transform(list(texts)).tocoo()
        index = torch.from_numpy(np.stack([coo.row, coo.col]).astype(np.int64)) if coo.nnz else torch.zeros(2, 0, dtype=torch.long)
        values = torch.from_numpy(coo.data.astype(np.float32))
        return torch.sparse_coo_tensor(index, values, coo.shape, check_invariants=False).coalesce()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Dense L2-normalised ``(len(texts), dim)`` embeddings (rows with no known word are zero)."""
        dense = torch.sparse.mm(self.transform(texts), self.components)
        return torch.nn.functional.normalize(dense, dim=1)


class TeacherViews:
    """The teacher embeddings a sampler may need, in dataset order.

    Parameters
    ----------
    pairs : Tensor (N, d)
        One L2-normalised embedding per training example (query and document together).
    queries, documents : Tensor (N, d), optional
        The two sides separately (for mining query -> document hard negatives, and as
        JEST's reference model); default: ``pairs`` for both.
    sparse : tuple of three sparse Tensors (N, V), optional
        Exact (pairs, queries, documents) TF-IDF rows. When given, :meth:`neighbours`
        ranks with them instead of the dense (LSA) views, which lose much of TF-IDF's
        precision on code (on codesearch's test split recall@1 drops from 0.27 to 0.15).
    groups : sequence of N labels, optional
        A group per example (codesearch: its module). ``neighbours(..., cross_group=True)``
        then ranks only examples of other groups.
    device : str or torch.device, optional
        Where :meth:`neighbours` computes its similarities (default ``"cpu"``); results
        always come back on the CPU. On a GPU the exact ranking of 50,000 examples takes
        seconds instead of minutes.
    """

    def __init__(
        self,
        pairs: torch.Tensor,
        queries: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
        *,
        sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        groups: Sequence[Any] | torch.Tensor | None = None,
        device: str | torch.device = "cpu",
    ):
        self.pairs = pairs
        self.queries = pairs if queries is None else queries
        self.documents = pairs if documents is None else documents
        self.sparse = sparse
        self.groups = None if groups is None else _group_ids(groups, len(pairs))
        self.device = torch.device(device)
        # neighbours() is deterministic and costs O(N^2): samplers built for several seeds share it
        self._neighbour_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.pairs.shape[0]

    def neighbours(
        self, k: int, *, between: str = "pairs", block: int = 512, cross_group: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k`` ``(scores, ids)``, both ``(N, k)``, each row's own example excluded.

        ``between="pairs"`` ranks examples by their pair embeddings (B3's graph, clusters);
        ``"query_document"`` ranks every example's document for each query (hard negatives).
        ``cross_group=True`` ranks only examples whose group (see ``groups``) differs
        from the row's own. Blocked: memory stays ``block x N``. Computed once per
        argument set and then returned from a cache (treat the tensors as read-only).
        """
        if between not in ("pairs", "query_document"):
            raise BatchlabInputError(f"between must be 'pairs' or 'query_document', got {between!r}")
        n = len(self)
        if not 0 < k < n:
            raise BatchlabInputError(f"k must be in [1, {n - 1}] (N - 1 other examples), got {k}")
        if cross_group:
            if self.groups is None:
                raise BatchlabInputError("cross_group=True needs TeacherViews(..., groups=labels), one label per example")
            largest = int(torch.bincount(self.groups).max())
            if k > n - largest:
                raise BatchlabInputError(
                    f"cross_group=True: the largest group holds {largest} of {n} examples, so only {n - largest} "
                    f"are sure to be outside a row's group; ask for k <= {n - largest}"
                )
        key = (k, between, block, cross_group)
        if key not in self._neighbour_cache:
            self._neighbour_cache[key] = self._rank(k, between, block, cross_group)
        return self._neighbour_cache[key]

    def _rank(self, k: int, between: str, block: int, cross_group: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n, dev = len(self), self.device
        side = 0 if between == "pairs" else 1
        if self.sparse is not None:
            rows, cols = self.sparse[side], self.sparse[0 if side == 0 else 2]
        else:
            rows, cols = (self.pairs, self.pairs) if side == 0 else (self.queries, self.documents)
        rows, cols = rows.to(dev), cols.to(dev)
        groups = None if self.groups is None else self.groups.to(dev)
        scores_out = torch.empty(n, k)
        ids_out = torch.empty(n, k, dtype=torch.long)
        for start in range(0, n, block):
            idx = torch.arange(start, min(start + block, n), device=dev)
            if self.sparse is not None:
                block_rows = rows.index_select(0, idx).to_dense()
                scores = torch.sparse.mm(cols, block_rows.T).T  # (b, N)
            else:
                scores = rows[idx].float() @ cols.float().T
            scores[torch.arange(len(idx), device=dev), idx] = float("-inf")  # never its own example
            if cross_group:
                scores[groups[idx].unsqueeze(1) == groups.unsqueeze(0)] = float("-inf")
            top = scores.topk(k, dim=1)
            scores_out[start : start + len(idx)], ids_out[start : start + len(idx)] = top.values.cpu(), top.indices.cpu()
        return scores_out, ids_out

    def rows(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(queries, documents)`` teacher rows of ``indices``, as :meth:`neighbours` scores them
        (the exact TF-IDF rows when the views have them): a guide for false-negative masks."""
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        if self.sparse is not None:
            return self.sparse[1].index_select(0, indices).to_dense(), self.sparse[2].index_select(0, indices).to_dense()
        return self.queries[indices], self.documents[indices]

    def positive_scores(self) -> torch.Tensor:
        """``(N,)``: each query's score with its own document, as :meth:`neighbours` scores them."""
        if self.sparse is not None:
            return torch.sparse.sum(self.sparse[1] * self.sparse[2], dim=1).to_dense().reshape(-1)
        return (self.queries.float() * self.documents.float()).sum(dim=1)


def _group_ids(groups: Sequence[Any] | torch.Tensor, n: int) -> torch.Tensor:
    """``(N,)`` int64 ids, one per distinct label, in order of first appearance."""
    if len(groups) != n:
        raise BatchlabInputError(f"groups must hold one label per example ({n}), got {len(groups)}")
    labels = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
    ids: dict[Any, int] = {}
    return torch.tensor([ids.setdefault(label, len(ids)) for label in labels], dtype=torch.long)


def tfidf_views(
    queries: Sequence[str],
    documents: Sequence[str],
    *,
    dim: int = 256,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
    device: str | torch.device = "cpu",
) -> TeacherViews:
    """Fit a :class:`TfidfTeacher` on both sides of the pairs and return its :class:`TeacherViews`.

    The dense views are the LSA embeddings; :meth:`TeacherViews.neighbours` ranks with
    the exact sparse TF-IDF rows. ``groups``: one label per pair (e.g. its module), for
    ``neighbours(..., cross_group=True)``. ``device``: where neighbours are ranked.

    >>> views = tfidf_views(["parse a file", "draw a circle"], ["def parse(f):", "def circle(r):"], dim=2)
    >>> views.pairs.shape, views.queries.shape
    (torch.Size([2, 2]), torch.Size([2, 2]))
    """
    teacher = TfidfTeacher(dim, seed=seed).fit(list(queries) + list(documents))
    q, d = teacher.embed(queries), teacher.embed(documents)
    sq, sd = teacher.transform(queries), teacher.transform(documents)
    # a pair's sparse row: the normalised sum of its two sides
    sp = (sq + sd).coalesce()
    norms = torch.sparse.sum(sp * sp, dim=1).to_dense().sqrt().clamp_min(1e-12)
    sp = torch.sparse_coo_tensor(sp.indices(), sp.values() / norms[sp.indices()[0]], sp.shape, check_invariants=False).coalesce()
    return TeacherViews(torch.nn.functional.normalize(q + d, dim=1), q, d, sparse=(sp, sq, sd), groups=groups,
                        device=device)
