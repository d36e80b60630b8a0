"""Retrieval metrics on a held-out split: recall@k and mean reciprocal rank.

Why not torchmetrics' ``RetrievalHitRate`` / ``RetrievalMRR`` (the same numbers when no
two documents tie; ``tests/test_recipes.py`` checks it against them): they take the whole
``N x M`` score matrix flattened with an index per entry (at 20,000 queries and documents,
2.4 GB of scores, query ids and targets at once, against ``block x M`` here), and they
break ties by sort order, where this counts a wrong document tied with the right one
against the query. sentence-transformers' ``InformationRetrievalEvaluator`` needs a
SentenceTransformer model, not embeddings.
"""

from __future__ import annotations

from typing import Sequence

import torch

from batchlab._checks import check_embeddings
from batchlab.errors import BatchlabInputError


def retrieval_metrics(
    queries: torch.Tensor,
    documents: torch.Tensor,
    *,
    query_labels: torch.Tensor | None = None,
    document_labels: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 10),
    block: int = 1024,
) -> dict[str, float]:
    """Recall@k and MRR of retrieving documents for queries by inner product.

    Parameters
    ----------
    queries, documents : Tensor (N, d), (M, d)
        Embeddings (normalise them first for cosine similarity).
    query_labels, document_labels : LongTensor (N,), (M,), optional
        Without labels, query ``i``'s only right answer is document ``i`` (needs ``N == M``).
        With labels, any document with the query's label is right (e.g. class retrieval).
    ks :
        The ``k`` of each recall@k.
    block :
        Queries scored at a time (memory stays ``block x M``).

    Returns
    -------
    dict
        ``{"recall@1": ..., "recall@10": ..., "mrr": ...}`` (fractions in [0, 1]);
        the rank of a query is that of its best-ranked right answer, ties counted pessimistically.

    Example
    -------
    >>> x = torch.eye(4)
    >>> retrieval_metrics(x, x, ks=(1,))
    {'recall@1': 1.0, 'mrr': 1.0}
    """
    check_embeddings("queries", queries)
    check_embeddings("documents", documents)
    n, m = queries.shape[0], documents.shape[0]
    if queries.shape[1] != documents.shape[1]:
        raise BatchlabInputError(f"queries have dimension {queries.shape[1]} but documents {documents.shape[1]}")
    if (query_labels is None) != (document_labels is None):
        raise BatchlabInputError("give both query_labels and document_labels, or neither")
    if query_labels is None and n != m:
        raise BatchlabInputError(f"without labels query i matches document i, so N must equal M (got {n} and {m})")
    ranks = torch.empty(n, dtype=torch.long)
    docs = documents.float()
    for start in range(0, n, block):
        stop = min(start + block, n)
        scores = queries[start:stop].float() @ docs.T  # (b, M)
        if query_labels is None:
            right = torch.zeros_like(scores, dtype=torch.bool)
            right[torch.arange(stop - start), torch.arange(start, stop)] = True
        else:
            right = query_labels[start:stop, None].to(scores.device) == document_labels[None, :].to(scores.device)
        best_right = scores.masked_fill(~right, float("-inf")).max(dim=1, keepdim=True).values
        # pessimistic ties: a wrong document scoring equal to the right one ranks above it
        ranks[start:stop] = ((scores >= best_right) & ~right).sum(dim=1).cpu() + 1
    metrics = {f"recall@{k}": float((ranks <= k).float().mean()) for k in ks}
    metrics["mrr"] = float((1.0 / ranks.float()).mean())
    return metrics
