"""Held-out retrieval metrics of the fine-tuning recipe, computed on the model's device from pre-tokenised texts.

Query ``i``'s one relevant document is document ``i`` of the corpus; :data:`METRICS` are nDCG@10,
MRR@10, recall@1 and recall@10, the numbers of sentence-transformers' ``InformationRetrievalEvaluator``
(:func:`ir_metrics`, the reference). :func:`retrieval_metrics_from_tables` gives the same numbers from
:class:`~batchlab.recipes._encoder.TokenTable` s: ``(Nq, d)`` and ``(Nd, d)`` normalised embeddings,
scored in blocks of queries, one host read for the four values.

Example
-------
>>> import torch
>>> from batchlab.recipes._evaluation import ranks_to_metrics
>>> ranks_to_metrics(torch.tensor([1, 2, 11]))["recall@10"]  # doctest: +ELLIPSIS
0.666...
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from batchlab.recipes._encoder import TokenTable, _embed_all, sentence_encoder

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10")


def ir_metrics(model, queries: Sequence[str], documents: Sequence[str], *, batch_size: int = 128) -> dict[str, float]:
    """nDCG@10, MRR@10, recall@1 and recall@10 from sentence-transformers' ``InformationRetrievalEvaluator``.

    Query ``i``'s one relevant document is document ``i``; the corpus is all of ``documents``.
    The reference for :func:`retrieval_metrics_from_tables` (what
    :func:`~batchlab.recipes.finetune.finetune` uses).
    """
    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.evaluation import InformationRetrievalEvaluator

    evaluator = InformationRetrievalEvaluator(
        {f"q{i}": q for i, q in enumerate(queries)}, {f"d{i}": d for i, d in enumerate(documents)},
        {f"q{i}": {f"d{i}"} for i in range(len(queries))},
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1, 10], precision_recall_at_k=[1, 10], map_at_k=[10],
        batch_size=batch_size, name="heldout", write_csv=False, show_progress_bar=False,
    )
    was_training = model.training
    raw = evaluator(model)
    model.train(was_training)
    return {metric: float(raw[f"heldout_cosine_{metric}"]) for metric in METRICS}


def ranks_to_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """:data:`METRICS` from each query's 1-based rank of its one relevant document (one host read)."""
    r = ranks.double()
    top10 = r <= 10
    values = torch.stack([torch.where(top10, 1.0 / torch.log2(r + 1), 0.0).mean(), torch.where(top10, 1.0 / r, 0.0).mean(),
                          (r <= 1).double().mean(), top10.double().mean()])
    return dict(zip(METRICS, values.tolist()))


def retrieval_metrics_from_tables(model, q_table: "TokenTable", d_table: "TokenTable", *, fast: bool = True,
                                  block: int = 1024) -> dict[str, float]:
    """:func:`ir_metrics` from pre-tokenised texts, on the model's device, in fp32 (no autocast).

    Cosine scores of every query against every document; a query's rank is 1 + the number
    of documents scored strictly above its own (ties, which do not occur with real
    embeddings, count in its favour).
    """
    encode = sentence_encoder(model, fast=fast)
    q = _embed_all(model, q_table, lambda f: F.normalize(encode(f).float(), dim=-1))
    d = _embed_all(model, d_table, lambda f: F.normalize(encode(f).float(), dim=-1))
    ranks = []
    for start in range(0, q.shape[0], block):
        scores = q[start : start + block] @ d.T
        own = scores[torch.arange(scores.shape[0], device=q.device), torch.arange(start, start + scores.shape[0], device=q.device)]
        ranks.append((scores > own[:, None]).sum(1) + 1)
    return ranks_to_metrics(torch.cat(ranks))
