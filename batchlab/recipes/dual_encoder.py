"""Recipe: a text-to-text dual encoder (open_clip's text transformer, tiny, from scratch).

One shared ``TextTransformer`` embeds both sides of each pair (e.g. a docstring summary
and a piece of code); training is contrastive over the batches a batchlab sampler
builds; evaluation is retrieval on a held-out split (documents for queries).

Example
-------
>>> from batchlab.datasets import load_codesearch
>>> from batchlab.recipes import train_dual_encoder
>>> result = train_dual_encoder(load_codesearch("train"), load_codesearch("test"),
...                             sampler="community", batch_size=64, epochs=2)  # doctest: +SKIP
>>> result.metrics  # doctest: +SKIP
{'recall@1': ..., 'recall@10': ..., 'mrr': ...}
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from batchlab.errors import BatchlabInputError
from batchlab.recipes._loop import ContrastiveHead, TrainResult, train_loop
from batchlab.recipes.runs import load_checkpoint
from batchlab.recipes.evaluate import retrieval_metrics
from batchlab.recipes.global_loss import global_contrastive_head
from batchlab.recipes.models import TINY_TEXT, init_token_embeddings_lsa, text_encoder, tokenizer
from batchlab.recipes.samplers import ModelTeacher, SamplerSchedule, resolved_options
from batchlab.recipes.teachers import TeacherViews, tfidf_views

logger = logging.getLogger(__name__)

_TOKENS: dict[tuple[str, str], torch.Tensor] = {}  # (config, hash of texts) -> token ids


def tokenize(texts: Sequence[str], config: str = TINY_TEXT) -> torch.Tensor:
    """Token ids ``(len(texts), context_length)`` with open_clip's tokenizer (memoised per text list)."""
    digest = hashlib.sha1("\0".join(texts).encode()).hexdigest()
    key = (config, digest)
    if key not in _TOKENS:
        if len(_TOKENS) >= 8:  # a small memo: the demo reuses two or four lists many times
            _TOKENS.pop(next(iter(_TOKENS)))
        _TOKENS[key] = tokenizer(config)(list(texts))
    return _TOKENS[key]


def split_pairs(data: Any, what: str) -> tuple[list[str], list[str], list[Any] | None]:
    """``(queries, documents, labels or None)`` from a dataset or a list of pairs.

    ``data``: an object with ``.queries`` and ``.documents`` (and optionally ``.labels``),
    e.g. :func:`~batchlab.datasets.load_codesearch`; or a list of ``(query, document)`` or
    ``(query, document, label)`` tuples. Pairs with the same label are relevant to each
    other (several relevant documents per query).
    """
    labels = None
    if hasattr(data, "queries") and hasattr(data, "documents"):
        queries, documents = list(data.queries), list(data.documents)
        labels = list(data.labels) if getattr(data, "labels", None) is not None else None
    else:
        try:
            rows = [tuple(row) for row in data]
            widths = {len(row) for row in rows}
            if rows and (widths - {2, 3} or len(widths) > 1):
                raise ValueError
            queries, documents = [r[0] for r in rows], [r[1] for r in rows]
            if widths == {3}:
                labels = [r[2] for r in rows]
        except (TypeError, ValueError):
            raise BatchlabInputError(
                f"{what} must be a dataset with .queries and .documents (e.g. load_codesearch) or a non-empty list of "
                f"(query, document) or (query, document, label) tuples"
            ) from None
    if not queries:
        raise BatchlabInputError(f"{what} needs at least one (query, document) pair; got no pairs")
    if len(queries) != len(documents) or labels is not None and len(labels) != len(queries):
        raise BatchlabInputError(f"{what} needs at least one (query, document) pair and one label per pair when labels "
                                 f"are given; got {len(queries)} queries, {len(documents)} documents")
    bad = next((x for x in queries + documents if not isinstance(x, str)), None)
    if bad is not None:
        raise BatchlabInputError(f"{what}: queries and documents must be str, got {type(bad).__name__}")
    return queries, documents, labels


def pairs_hash(*columns: Sequence[Any] | None) -> str:
    """A short content hash of the train and test columns (texts and labels), so that a checkpoint is not
    resumed on other pairs of the same count."""
    digest = hashlib.blake2b(digest_size=8)
    for column in columns:
        digest.update(b"\1" if column is None else b"\2" + "\0".join(map(repr, column)).encode())
    return digest.hexdigest()


def _pairs(data: Any, what: str) -> tuple[list[str], list[str]]:
    queries, documents, _ = split_pairs(data, what)
    return queries, documents


def relevance_labels(queries: Sequence[str], documents: Sequence[str], labels: Sequence[Any] | None = None) -> torch.Tensor:
    """``(N,)`` int64: pairs with the same value are relevant to each other.

    With ``labels``: one id per distinct label. Without: pairs that share a query text or
    a document text (directly or through a chain of such pairs) get the same id, so that
    retrieving a duplicate of the right document is not scored as a miss.

    >>> relevance_labels(["a", "b", "c"], ["x", "y", "x"]).tolist()
    [0, 1, 0]
    """
    if labels is not None:
        ids: dict[Any, int] = {}
        return torch.tensor([ids.setdefault(label, len(ids)) for label in labels], dtype=torch.long)
    parent = list(range(len(queries)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for texts in (queries, documents):
        first: dict[str, int] = {}
        for i, text in enumerate(texts):
            j = first.setdefault(text, i)
            if j != i:
                parent[root(i)] = root(j)
    roots: dict[int, int] = {}
    return torch.tensor([roots.setdefault(root(i), len(roots)) for i in range(len(queries))], dtype=torch.long)


def same_label_mask(labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``fn(indices) -> (B, B)`` bool: in-batch pairs that share a label (not the diagonal), to be left
    out of the loss's denominators; None when no two pairs share one."""
    if len(torch.unique(labels)) == len(labels):
        return None

    def mask(indices: torch.Tensor) -> torch.Tensor:
        batch = labels[indices.cpu()]
        same = batch[:, None] == batch[None, :]
        same.fill_diagonal_(False)
        return same

    return mask


def resolve_teacher(teacher: Any, queries: Sequence[str], documents: Sequence[str], *, seed: int = 0,
                    device: str | torch.device = "cpu") -> TeacherViews | None:
    """``"tfidf"`` -> fitted TF-IDF views; a tensor -> its views; ``None``/``"model"`` -> None.

    ``device``: where the views rank neighbours (the run's device)."""
    if teacher is None or isinstance(teacher, str) and teacher == "model":
        return None
    if isinstance(teacher, str):
        if teacher != "tfidf":
            raise BatchlabInputError(f"teacher must be 'tfidf', 'model', None, a tensor or TeacherViews, got {teacher!r}")
        return tfidf_views(queries, documents, seed=seed, device=device)
    if isinstance(teacher, torch.Tensor):
        teacher = TeacherViews(teacher, device=device)
    if not isinstance(teacher, TeacherViews) or len(teacher) != len(queries):
        raise BatchlabInputError(f"teacher embeddings must have one row per training pair ({len(queries)})")
    return teacher


def teacher_name(teacher: Any) -> str:
    """How a run record names its teacher: the string, or what kind of object it was."""
    if teacher is None or isinstance(teacher, str):
        return str(teacher)
    if isinstance(teacher, TeacherViews):
        return "TeacherViews(tfidf)" if teacher.sparse is not None else f"TeacherViews({len(teacher)} x {teacher.pairs.shape[1]})"
    return f"{type(teacher).__name__}{tuple(getattr(teacher, 'shape', ()))}"


def train_dual_encoder(
    train: Any,
    test: Any,
    *,
    sampler: str | Callable[[TeacherViews | None, int], Any] | Any = "random",
    batch_size: int = 64,
    epochs: int = 3,
    lr: float = 2e-3,
    loss: str | Callable = "info_nce",
    impl: str = "auto",
    teacher: Any = "model",
    refresh_every: int = 1,
    random_epochs: int = 0,
    init: str | None = None,
    sampler_options: dict[str, Any] | None = None,
    guide_margin: float | None = None,
    jest=None,
    embedding_cache: int | None = None,
    config: str = TINY_TEXT,
    device: str | torch.device = "cpu",
    seed: int = 0,
    data_seed: int | None = None,
    eval_every: int = 1,
    out: str | os.PathLike | None = None,
    name: str = "dual_encoder",
    progress: bool | Callable[[dict], None] = True,
    resume: str | os.PathLike | dict | None = None,
) -> TrainResult:
    """Train a tiny text dual encoder and evaluate retrieval on ``test``.

    Parameters
    ----------
    train, test :
        Datasets with ``.queries`` and ``.documents`` (and optional ``.labels``; e.g.
        :func:`~batchlab.datasets.load_codesearch`) or lists of ``(query, document)`` or
        ``(query, document, label)`` tuples. Pairs with the same label are relevant to each
        other: in training they leave each other's loss denominators (``info_nce``, ``dcl``),
        in evaluation any of them is a right answer. Without labels, pairs sharing a query
        or document text count as relevant (:func:`relevance_labels`).
    sampler :
        A name (``"random"``, ``"cluster"``, ``"community"``, ``"hard_negative"``, built
        from the teacher by :func:`~batchlab.recipes.samplers.make_sampler`); a batch
        sampler instance yielding lists of train indices (used as is; its batch size must
        match, with JEST the super-batch size); or a factory
        ``fn(teacher_views, epoch) -> sampler``.
    batch_size :
        The batch the loss sees. With ``jest`` the sampler draws super-batches of
        ``batch_size / (1 - jest.filter_ratio)`` and JEST keeps ``batch_size`` of them.
    epochs, lr :
        Passes over ``train``; AdamW peak learning rate (warm-up, cosine decay to 0 at the
        last step; the length is re-estimated at each epoch start from the real batch counts).
    loss, impl :
        ``"info_nce"`` (symmetric, CLIP), ``"siglip"``, ``"dcl"``, ``"sogclr"`` / ``"isogclr"``
        (per-example state; :mod:`batchlab.recipes.global_loss`), a
        :class:`~batchlab.losses.SogCLRLoss`, or a callable
        ``fn(q, k, logit_scale)``; ``impl`` picks the batchlab implementation
        (``"auto"``, ``"reference"``, ``"tiled"``, ...).
    teacher :
        Embeddings that tell the sampler which examples look alike. Default ``"model"``:
        the model's own embeddings, refreshed every ``refresh_every`` epochs, the first
        epoch with random batches (NGAME / ANCE style; what the demo measured to beat
        random batches given enough data). ``"tfidf"``: a lexical teacher fitted on
        ``train`` (offline; it loses to random batches on codesearch). Or a tensor
        ``(N, d)``, :class:`~batchlab.recipes.teachers.TeacherViews`, or None.
    random_epochs :
        A curriculum: random batches for the first ``random_epochs`` epochs, then the
        sampler's (default 0: the sampler's from the start).
    init :
        ``None`` (open_clip's random initialisation) or ``"lsa"``: warm-start the token
        embeddings from a truncated SVD of the TF-IDF matrix of the training split's
        tokens (:func:`~batchlab.recipes.models.init_token_embeddings_lsa`; no download,
        nothing from ``test``).
    sampler_options :
        Extra settings for a named sampler (``group_size``, ``rank_window``, ...).
    guide_margin :
        ``None`` (default) or a relative margin: GISTEmbed's guided in-batch false-negative
        masking (Solatorio 2024, arXiv 2402.16829) with the teacher as the guide (TF-IDF
        when ``teacher`` is ``"model"``): a key the guide scores above ``pos - guide_margin
        * |pos|`` for a query (``pos``: its own document's score) leaves that query's
        denominator (and the query leaves the key's, the loss being symmetric);
        ``info_nce`` and ``dcl`` only.
    jest :
        Optional :class:`~batchlab.samplers.JointExampleSelector`; its reference model is
        the teacher (TF-IDF when ``teacher`` gives no query/document views), scored at
        CLIP's initial scale 1/0.07. Or a :class:`~batchlab.samplers.CoLMSelector` (mini-batch
        coresets by gradient matching; no reference model).
    embedding_cache :
        Optional chunk size: encode each batch in chunks of this many examples with
        :class:`~batchlab.losses.EmbeddingCache` (GradCache), so a batch can be larger
        than activation memory allows; the gradients are those of the whole batch.
    config :
        A tiny open_clip config (``batchlab-tiny-text``); only the text tower is built.
    device :
        Where to train, and where teachers rank neighbours.
    seed, data_seed :
        ``seed`` fixes the initial weights; ``data_seed`` (default: ``seed``) the batch
        order (the sampler's seed), so either can vary with the other held.
    eval_every, out, name, progress :
        Evaluate every ``eval_every`` epochs (and at the end); write ``<out>/<name>.pt``
        (checkpoint, with the run record: every setting used) and ``<out>/<name>.png``
        (training curve); ``progress``: bars / heartbeat lines, or a callback of events.
    resume :
        A checkpoint (path or loaded dict) written by an interrupted run of the same
        settings: training continues after its last finished epoch, with the same
        batches and learning rates as an uninterrupted run.

    Returns
    -------
    TrainResult
        ``metrics`` (recall@1, recall@10, MRR on ``test``), ``history``, ``losses``,
        ``seconds``, ``checkpoint``, ``plot``, ``model``, ``record``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(device)
    train_q, train_d, train_labels = split_pairs(train, "train")
    test_q, test_d, test_labels = split_pairs(test, "test")
    if epochs < 1:
        raise BatchlabInputError(f"epochs must be >= 1, got {epochs}")
    data_seed = seed if data_seed is None else int(data_seed)
    record = {
        "recipe": "dual_encoder", "sampler": sampler if isinstance(sampler, str) else type(sampler).__name__,
        "batch_size": batch_size, "epochs": epochs, "lr": lr, "loss": loss if isinstance(loss, str) else repr(loss),
        "impl": impl, "teacher": teacher_name(teacher), "refresh_every": refresh_every, "random_epochs": random_epochs,
        "init": init, "sampler_options": resolved_options(sampler, sampler_options), "guide_margin": guide_margin,
        "jest": None if jest is None else {"filter_ratio": jest.filter_ratio, "seed": getattr(jest, "seed", None)},
        "embedding_cache": embedding_cache, "config": config, "device": str(device), "seed": seed, "data_seed": data_seed,
        "eval_every": eval_every, "train_pairs": len(train_q), "test_pairs": len(test_q), "labels": train_labels is not None,
        "data_hash": pairs_hash(train_q, train_d, train_labels, test_q, test_d, test_labels),
    }
    state = load_checkpoint(resume, record) if resume is not None else None
    tokens_q, tokens_d = tokenize(train_q, config).to(device), tokenize(train_d, config).to(device)
    eval_q, eval_d = tokenize(test_q, config).to(device), tokenize(test_d, config).to(device)
    model = text_encoder(config, seed=seed)
    if init == "lsa":
        init_token_embeddings_lsa(model, torch.cat([tokens_q, tokens_d]).cpu(), seed=seed)
    elif init is not None:
        raise BatchlabInputError(f"init must be None or 'lsa', got {init!r}")
    model = model.to(device)
    head = (global_contrastive_head(loss, len(train_q), impl=impl) or ContrastiveHead(loss, impl=impl)).to(device)
    torch.manual_seed(seed)
    eval_labels = relevance_labels(test_q, test_d, test_labels)
    label_mask = same_label_mask(relevance_labels(train_q, train_d, train_labels))
    if label_mask is not None and (callable(loss) or loss == "siglip"):
        raise BatchlabInputError(
            "some training pairs share a label (or a query / document text), so they are false negatives of each "
            "other; loss='info_nce' or 'dcl' leaves them out of the denominators, siglip and custom losses cannot: "
            "use one of those, or pass pairs without labels and without duplicate texts"
        )

    def embed(tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(model(tokens), dim=-1)

    def encode(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = embed(torch.cat([tokens_q[indices], tokens_d[indices]]))
        return both[: len(indices)], both[len(indices) :]

    def embed_all(tokens: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        return torch.cat([embed(tokens[i : i + chunk]) for i in range(0, len(tokens), chunk)])

    def evaluate() -> dict[str, float]:
        return retrieval_metrics(embed_all(eval_q).cpu(), embed_all(eval_d).cpu(), query_labels=eval_labels,
                                 document_labels=eval_labels)

    sample_size = batch_size if jest is None else int(round(batch_size / (1.0 - jest.filter_ratio)))
    ready = not isinstance(sampler, str) and not callable(sampler)  # a sampler instance
    needs_teacher = jest is not None or not ready and not (isinstance(sampler, str) and sampler == "random")
    views = resolve_teacher(teacher, train_q, train_d, seed=seed, device=device) if needs_teacher else None
    if jest is not None and views is None:
        views = tfidf_views(train_q, train_d, seed=seed, device=device)

    def model_views() -> TeacherViews:
        model.eval()
        with torch.no_grad():
            q, d = embed_all(tokens_q), embed_all(tokens_d)
        model.train()
        # ranked on the run's device (an O(N^2) job: seconds on a GPU, minutes on a CPU at 50k pairs)
        return TeacherViews(torch.nn.functional.normalize(q + d, dim=1).cpu(), q.cpu(), d.cpu(), device=device)

    model_teacher = ModelTeacher(model, model_views)  # saves / restores the weights it embedded with
    sampler_for_epoch = SamplerSchedule(
        sampler,
        views,
        batch_size=sample_size,
        num_examples=len(train_q),
        seed=data_seed,
        # a ready sampler instance is used as given: the model-as-teacher refresh applies to named samplers and factories
        model_views=model_teacher if isinstance(teacher, str) and teacher == "model" and not ready else None,
        refresh_every=refresh_every,
        random_epochs=random_epochs,
        options=sampler_options,
    )

    model_teacher.resume(state, sampler_for_epoch)

    negative_mask = None
    if guide_margin is not None:
        from batchlab.samplers import guided_negative_mask

        lexical = teacher is None or isinstance(teacher, str)  # "tfidf", "model" or None: the guide is TF-IDF
        guide = views if views is not None and not (lexical and teacher == "model") else None
        if guide is None:
            guide = resolve_teacher("tfidf" if lexical else teacher, train_q, train_d, seed=seed, device=device)

        def negative_mask(indices: torch.Tensor):
            guide_q, guide_d = (t.to(device) for t in guide.rows(indices))
            guided = guided_negative_mask(guide_q, guide_d, margin=float(guide_margin), strategy="relative")
            return guided if label_mask is None else guided.materialize() | label_mask(indices).to(device)
    elif label_mask is not None:

        def negative_mask(indices: torch.Tensor):
            return label_mask(indices).to(device)

    cache = None
    if embedding_cache is not None:
        from batchlab.losses import EmbeddingCache

        cache = (EmbeddingCache([model, model], embedding_cache), lambda indices: (tokens_q[indices], tokens_d[indices]))
    reference = None
    if hasattr(head, "track"):  # SogCLR / iSogCLR: the loss reads the batch's ids from encode
        encode = head.track(encode)
    if jest is not None and not getattr(jest, "needs_reference", True):
        reference = lambda indices: None  # noqa: E731  (CoLM)
    elif jest is not None:
        ref_q, ref_d = views.queries.to(device), views.documents.to(device)

        def reference(indices: torch.Tensor):
            return ref_q[indices], ref_d[indices], 1 / 0.07

    result = train_loop(
        model=model,
        head=head,
        encode=encode,
        sampler_for_epoch=sampler_for_epoch,
        evaluate=evaluate,
        epochs=epochs,
        lr=lr,
        selector=jest,
        reference=reference,
        cache=cache,
        negative_mask=negative_mask,
        eval_every=eval_every,
        out=Path(out) if out is not None else None,
        name=name,
        progress=progress,
        record=record,
        resume=state,
        checkpoint_state=model_teacher.checkpoint_state,
    )
    result.record = record
    return result
