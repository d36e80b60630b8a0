"""``mine_hard_negatives(dataset, model, ...)``: sentence-transformers' front end on batchlab's index and miner.

Same arguments, defaults and output formats as
``sentence_transformers.util.mine_hard_negatives`` (6.2 and 6.3): a ``datasets.Dataset`` of
(anchor, positive) pairs in, a ``Dataset`` out in ``"triplet"``, ``"n-tuple"``,
``"labeled-pair"`` or ``"labeled-list"`` format, optionally with the scores
(``output_scores``), the positives kept among the candidates (``include_positives``),
and cross-encoder rescoring. The embeddings come from the model (with the query /
corpus prompts); the search is batchlab's :class:`~batchlab.index.EmbeddingIndex`.

Two filtering orders (keyword-only ``filter_order``)
----------------------------------------------------
``"batchlab"`` (default) is :func:`batchlab.samplers.mine_hard_negatives`: rank the
corpus, drop the query's positives and any corpus text equal to the query, **skip the
first ``range_min`` ranks, then apply the score filters** inside the window
``[range_min, range_max)``; ``range_max`` counts ranks after those exclusions (default
``range_min + num_negatives``, ``x 10`` with a filter or random sampling). ``range_min``
is then a false-negative guard in rank units that the filters cannot shift.

``"sentence-transformers"`` reproduces the installed sentence-transformers: retrieve the top
``range_max + max_positives`` (6.3: ``+ 1``), drop the positives (6.3: and the corpus text equal
to the query), **apply the score filters first, then
skip the first ``range_min`` survivors** (so a margin that removes the top candidates
moves the window down the ranking), and keep ``num_negatives``; ``range_max`` defaults as
in sentence-transformers. Random sampling draws with Python's ``random`` module exactly
as sentence-transformers does (``seed=`` uses a private ``random.Random(seed)`` instead).
Cross-encoder rescoring needs this order (the batchlab miner ranks embeddings only); 6.2 rescores
only when a score filter is set, 6.3 always. Without sentence-transformers installed, 6.3's
rules apply.

With a range filter and a margin together the two orders pick different negatives.

Example
-------
>>> from datasets import Dataset
>>> from batchlab.integrations.sentence_transformers import mine_hard_negatives, tiny_model
>>> pairs = Dataset.from_dict({"query": ["read a file", "sort a list", "parse json", "print a line"],
...                            "answer": ["open the file", "sort the list", "load json text", "print text"]})
>>> triplets = mine_hard_negatives(pairs, tiny_model(), num_negatives=2, verbose=False)
>>> triplets.column_names
['query', 'answer', 'negative']
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from batchlab._checks import check_choice
from batchlab.errors import BatchlabInputError
from batchlab.index import EmbeddingIndex
from batchlab.samplers.mining import mine_hard_negatives as batchlab_miner

#: sentence-transformers releases whose miner changed what batchlab's "sentence-transformers" order does
ST_EXTRA_CANDIDATE = (6, 3)  # one more candidate retrieved, the query's own text excluded, rescoring always

logger = logging.getLogger(__name__)


def installed_sentence_transformers() -> tuple[int, int]:
    """(major, minor) of the installed sentence-transformers; (99, 0) when it is not installed (latest rules)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = version("sentence-transformers").split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except (PackageNotFoundError, ValueError):
        return 99, 0

FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")
ORDERS = ("batchlab", "sentence-transformers")


@dataclass
class Pairs:
    """The dataset's pairs, deduplicated as sentence-transformers does."""

    queries: list[str]  # unique anchors, first-seen order
    corpus: list[str]  # unique texts of corpus + positives
    positive_ids: list[list[int]]  # per unique query, its positives' corpus ids
    max_positives: int

    @property
    def n_positives(self) -> list[int]:
        return [len(p) for p in self.positive_ids]


def read_pairs(dataset, anchor: str, positive: str, corpus: list[str] | None) -> Pairs:
    queries_all, positives = list(dataset[anchor]), list(dataset[positive])
    texts = list(dict.fromkeys((list(corpus) if corpus is not None else positives) + positives))
    corpus_idx = {t: i for i, t in enumerate(texts)}
    queries = list(dict.fromkeys(queries_all))
    query_idx = {q: i for i, q in enumerate(queries)}
    positive_ids: list[list[int]] = [[] for _ in queries]
    counts = [0] * len(queries)
    for q, p in zip(queries_all, positives):
        counts[query_idx[q]] += 1
        if corpus_idx[p] not in positive_ids[query_idx[q]]:
            positive_ids[query_idx[q]].append(corpus_idx[p])
    return Pairs(queries, texts, positive_ids, max(counts))


def encode(model, pairs: Pairs, *, batch_size, query_prompt_name, query_prompt, corpus_prompt_name, corpus_prompt,
           use_multi_process, cache_folder, verbose) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-length (Q, d) query and (N, d) corpus embeddings, cached in ``cache_folder`` as sentence-transformers does."""
    files = {}
    if cache_folder:
        os.makedirs(cache_folder, exist_ok=True)
        name = model.model_card_data.base_model or ""
        for kind, prompt, prompt_name, texts in (("query", query_prompt, query_prompt_name, pairs.queries),
                                                 ("corpus", corpus_prompt, corpus_prompt_name, pairs.corpus)):
            digest = hashlib.sha256(repr((name, prompt, prompt_name, texts)).encode(), usedforsecurity=False)
            files[kind] = os.path.join(cache_folder, f"{kind}_embeddings_{digest.hexdigest()}.npy")
    loaded = {k: np.load(f) for k, f in files.items() if os.path.exists(f)}
    pool = None
    if len(loaded) < 2 and use_multi_process:
        pool = model.start_multi_process_pool(None if isinstance(use_multi_process, bool) else use_multi_process)
    try:
        common = dict(pool=pool, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                      show_progress_bar=verbose)
        if "corpus" not in loaded:
            loaded["corpus"] = model.encode_document(pairs.corpus, prompt_name=corpus_prompt_name,
                                                     prompt=corpus_prompt, **common)
        if "query" not in loaded:
            loaded["query"] = model.encode_query(pairs.queries, prompt_name=query_prompt_name, prompt=query_prompt,
                                                 **common)
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)
    for kind, path in files.items():
        if not os.path.exists(path):
            np.save(path, loaded[kind])
    return torch.as_tensor(loaded["query"]).float(), torch.as_tensor(loaded["corpus"]).float()


def derived_range_max(range_min, num_negatives, max_positives, filtered: bool) -> int:
    """sentence-transformers' default ``range_max``."""
    return range_min + num_negatives * (10 if filtered else 1) + max_positives


def sentence_transformers_order(q_emb, c_emb, pairs: Pairs, positive_scores: torch.Tensor, *, range_min, range_max,
                                num_negatives, absolute_margin, relative_margin, max_score, min_score,
                                sampling_strategy, include_positives, cross_encoder, batch_size, faiss_batch_size,
                                rng) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates, then positives out, filters, ``range_min`` skip, top / random: sentence-transformers' steps.

    Returns ``(ids, scores, positive_scores)``; ``positive_scores`` changes with cross-encoder rescoring.
    """
    new_rules = installed_sentence_transformers() >= ST_EXTRA_CANDIDATE
    index = EmbeddingIndex(c_emb, kind="flat", progress=False)
    count = range_max + pairs.max_positives + int(new_rules)
    scores, ids = index.search(q_emb, count, batch_size=faiss_batch_size, progress=False)
    if cross_encoder is not None and (new_rules or any(v is not None for v in (absolute_margin, relative_margin,
                                                                                 max_score, min_score))):
        for row, candidates in enumerate(ids.tolist()):
            texts = [pairs.corpus[i] for i in candidates]
            scores[row] = cross_encoder.predict(list(zip([pairs.queries[row]] * len(texts), texts)),
                                                batch_size=batch_size, convert_to_tensor=True).float().cpu()
        queries = [q for q, p in zip(pairs.queries, pairs.positive_ids) for _ in p]
        positives = [pairs.corpus[i] for p in pairs.positive_ids for i in p]
        positive_scores = cross_encoder.predict(list(zip(queries, positives)), batch_size=batch_size,
                                                convert_to_tensor=True).float().cpu()
    scores[ids == -1] = -float("inf")
    if new_rules:  # a corpus text equal to the query is not its negative (unless it is a kept positive)
        corpus_idx = {t: i for i, t in enumerate(pairs.corpus)}
        own = [corpus_idx.get(q, -1) for q in pairs.queries]  # -1 (none) matches only ids already at -inf
        if include_positives:
            own = [-1 if i in p else i for i, p in zip(own, pairs.positive_ids)]
        scores[ids == torch.tensor(own)[:, None]] = -float("inf")
    if not include_positives:
        for row, positives in enumerate(pairs.positive_ids):
            scores[row, torch.isin(ids[row], torch.tensor(positives))] = -float("inf")
    if absolute_margin is not None or relative_margin is not None:
        ends = np.cumsum([0] + pairs.n_positives)
        hardest = torch.stack([positive_scores[a:b].min() for a, b in zip(ends[:-1], ends[1:])])[:, None]
        if absolute_margin is not None:
            scores[scores + absolute_margin > hardest] = -float("inf")
        if relative_margin is not None:
            scores[scores > hardest - hardest.abs() * relative_margin] = -float("inf")
    if max_score is not None:
        scores[scores > max_score] = -float("inf")
    if min_score is not None:
        scores[scores < min_score] = -float("inf")
    scores, local = torch.topk(scores, k=range_max, dim=1)
    ids = ids.gather(1, local)[:, range_min:]
    scores = scores[:, range_min:]
    if sampling_strategy == "top":
        return ids[:, :num_negatives], scores[:, :num_negatives], positive_scores
    options = (ids.shape[1] - scores.isinf().sum(1)).clamp(min=num_negatives)
    picked = torch.tensor([rng.sample(range(int(n)), k=num_negatives) for n in options], dtype=torch.long)
    ids, scores = ids.gather(1, picked), scores.gather(1, picked)
    scores, order = scores.sort(dim=1, descending=True)
    return ids.gather(1, order), scores, positive_scores


def build_dataset(pairs: Pairs, ids: torch.Tensor, scores: torch.Tensor, positive_scores: torch.Tensor, *,
                  anchor: str, positive: str, output_format: str, output_scores: bool):
    """sentence-transformers' four output formats from per-query negatives (``-inf`` score = none found)."""
    from datasets import Dataset

    rows = [(q, p_id, j) for q, p_list in enumerate(pairs.positive_ids) for j, p_id in enumerate(p_list)]
    pos_score = {(q, p_id): float(positive_scores[k]) for k, (q, p_id, _) in enumerate(rows)}
    found = [[(int(i), float(s)) for i, s in zip(ids[q], scores[q]) if s != -float("inf")]
             for q in range(len(pairs.queries))]
    text, query = pairs.corpus, pairs.queries
    if output_format == "triplet":
        data = {anchor: [], positive: [], "negative": []} | ({"scores": []} if output_scores else {})
        for q, p_id, _ in rows:
            for n_id, n_score in found[q]:
                data[anchor].append(query[q])
                data[positive].append(text[p_id])
                data["negative"].append(text[n_id])
                if output_scores:
                    data["scores"].append([pos_score[q, p_id], n_score])
    elif output_format == "n-tuple":
        complete = [(q, p_id) for q, p_id, _ in rows if len(found[q]) == ids.shape[1]]
        data = {anchor: [query[q] for q, _ in complete], positive: [text[p] for _, p in complete]}
        for k in range(ids.shape[1]):
            data[f"negative_{k + 1}"] = [text[found[q][k][0]] for q, _ in complete]
        if output_scores:
            data["scores"] = [[pos_score[q, p]] + [s for _, s in found[q]] for q, p in complete]
    elif output_format == "labeled-pair":
        label = "score" if output_scores else "label"
        data = {anchor: [], positive: [], label: []}
        for q, p_list in enumerate(pairs.positive_ids):
            docs = [(p, pos_score[q, p], 1) for p in p_list] + [(n, s, 0) for n, s in found[q]]
            for doc, score, is_positive in docs:
                data[anchor].append(query[q])
                data[positive].append(text[doc])
                data[label].append(score if output_scores else is_positive)
    else:  # labeled-list
        kept = [(q, p_id) for q, p_id, _ in rows if found[q]]
        data = {anchor: [query[q] for q, _ in kept],
                positive: [[text[p]] + [text[n] for n, _ in found[q]] for q, p in kept]}
        if output_scores:
            data["scores"] = [[pos_score[q, p]] + [s for _, s in found[q]] for q, p in kept]
        else:
            data["labels"] = [[1] + [0] * len(found[q]) for q, _ in kept]
    return Dataset.from_dict(data)


def mine_hard_negatives(
    dataset,
    model,
    anchor_column_name: str | None = None,
    positive_column_name: str | None = None,
    corpus: list[str] | None = None,
    cross_encoder=None,
    range_min: int = 0,
    range_max: int | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    num_negatives: int = 3,
    sampling_strategy: Literal["random", "top"] = "top",
    query_prompt_name: str | None = None,
    query_prompt: str | None = None,
    corpus_prompt_name: str | None = None,
    corpus_prompt: str | None = None,
    include_positives: bool = False,
    output_format: Literal["triplet", "n-tuple", "labeled-pair", "labeled-list"] = "triplet",
    output_scores: bool = False,
    batch_size: int = 32,
    faiss_batch_size: int = 16384,
    use_faiss: bool = False,
    use_multi_process: list[str] | bool = False,
    verbose: bool = True,
    cache_folder: str | None = None,
    as_triplets: bool | None = None,
    margin: float | None = None,
    *,
    filter_order: str = "batchlab",
    seed: int | None = None,
    index_kwargs: dict[str, Any] | None = None,
):
    """Add mined hard negatives to a dataset of (anchor, positive) pairs; see the module docstring.

    The arguments up to ``margin`` are sentence-transformers'. ``use_faiss`` is accepted
    and has no effect (batchlab's index always searches: faiss flat on the CPU, torch on
    CUDA). Keyword-only: ``filter_order`` ("batchlab" or "sentence-transformers"),
    ``seed`` (random sampling; default 0 for batchlab's order, Python's global ``random``
    for sentence-transformers' order) and ``index_kwargs`` (batchlab's index options,
    batchlab order only).
    """
    check_choice("filter_order", filter_order, ORDERS)
    check_choice("sampling_strategy", sampling_strategy, ("top", "random"))
    if len(dataset) == 0:
        raise BatchlabInputError("the dataset is empty; give it (anchor, positive) rows")
    if as_triplets is not None:
        output_format = "triplet" if as_triplets else "n-tuple"
    if margin is not None:
        absolute_margin = margin
    if output_format == "n-tuple-scores":
        output_format, output_scores = "n-tuple", True
    check_choice("output_format", output_format, FORMATS)
    if include_positives:
        output_format = "n-tuple"  # the ranking order must be kept, as in sentence-transformers
    if num_negatives < 1:
        raise BatchlabInputError(f"num_negatives must be at least 1, got {num_negatives}")
    if range_min < 0:
        raise BatchlabInputError(f"range_min must be non-negative, got {range_min}")
    if faiss_batch_size <= 0:
        raise BatchlabInputError(f"faiss_batch_size must be a positive integer, got {faiss_batch_size}")
    columns = dataset.column_names
    anchor = anchor_column_name if anchor_column_name in columns else columns[0]
    if positive_column_name not in columns and len(columns) < 2:
        raise BatchlabInputError(f"the dataset needs an anchor and a positive column, it has {columns}")
    positive = positive_column_name if positive_column_name in columns else columns[1]
    if cross_encoder is not None and filter_order == "batchlab":
        raise BatchlabInputError("cross_encoder rescoring needs filter_order='sentence-transformers' "
                                 "(batchlab's miner ranks by embeddings only)")

    pairs = read_pairs(dataset, anchor, positive, corpus)
    q_emb, c_emb = encode(model, pairs, batch_size=batch_size, query_prompt_name=query_prompt_name,
                          query_prompt=query_prompt, corpus_prompt_name=corpus_prompt_name,
                          corpus_prompt=corpus_prompt, use_multi_process=use_multi_process,
                          cache_folder=cache_folder, verbose=verbose)
    repeat = torch.tensor([q for q, p in enumerate(pairs.positive_ids) for _ in p])
    positive_scores = (q_emb[repeat] * c_emb[torch.tensor([i for p in pairs.positive_ids for i in p])]).sum(1)
    filters = dict(absolute_margin=absolute_margin, relative_margin=relative_margin, max_score=max_score,
                   min_score=min_score)
    if filter_order == "sentence-transformers":
        filtered = any(v is not None for v in (absolute_margin, relative_margin, max_score)) or (
            cross_encoder is not None and min_score is not None)
        range_max = range_max if range_max is not None else derived_range_max(
            range_min, num_negatives, pairs.max_positives, filtered)
        if range_min >= range_max or num_negatives > range_max - range_min:
            raise BatchlabInputError(
                f"the window [range_min={range_min}, range_max={range_max}) cannot hold num_negatives="
                f"{num_negatives} negatives; lower range_min or num_negatives, or raise range_max"
            )
        rng = random.Random(seed) if seed is not None else random
        ids, scores, positive_scores = sentence_transformers_order(
            q_emb, c_emb, pairs, positive_scores, range_min=range_min, range_max=range_max,
            num_negatives=num_negatives, sampling_strategy=sampling_strategy, include_positives=include_positives,
            cross_encoder=cross_encoder, batch_size=batch_size, faiss_batch_size=faiss_batch_size, rng=rng,
            **filters)
    else:
        mined = batchlab_miner(
            q_emb, c_emb, [[] for _ in pairs.queries] if include_positives else pairs.positive_ids,
            num_negatives=num_negatives, range_min=range_min, range_max=range_max, sampling=sampling_strategy,
            seed=0 if seed is None else seed, corpus_texts=pairs.corpus, query_texts=pairs.queries,
            index_kwargs=index_kwargs, batch_size=faiss_batch_size, progress=verbose, hash_inputs=False, **filters)
        ids, scores = mined.negative_ids, mined.scores
    out = build_dataset(pairs, ids, scores, positive_scores, anchor=anchor, positive=positive,
                        output_format=output_format, output_scores=output_scores)
    if verbose:
        found = int((scores != -float("inf")).sum())
        print(f"Mined {found:,} negatives for {len(pairs.queries):,} queries ({filter_order} order); "
              f"{len(out):,} rows in {output_format!r} format.")
    return out
