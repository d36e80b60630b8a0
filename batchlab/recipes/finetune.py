"""Recipe: fine-tune a pretrained sentence-transformers encoder with batchlab's batches and losses.

One :class:`~sentence_transformers.SentenceTransformer` embeds both sides of each
(query, document) pair. Every optimizer step takes a batch from a batchlab sampler
(random, B3 communities, hard-negative neighbourhoods, NGAME clusters, TAS topics),
optionally adds hard negatives mined with the pretrained model (sentence-transformers'
usual recipe: ranks 10-50, ``relative_margin=0.05``, ``max_score=0.8``, one drawn at
random), optionally masks in-batch false negatives with a guide (GISTEmbed), optionally
synthesises extra hard negatives by mixing (MoCHi), optionally chooses the batch from a
larger super-batch (JEST by learnability, CoLM by gradient matching), and computes
``MultipleNegativesRankingLoss`` (one-way InfoNCE at scale 20) with batchlab's
:func:`~batchlab.losses.info_nce`, or SogCLR / iSogCLR. Batches larger than activation
memory go through :class:`~batchlab.losses.EmbeddingCache` (GradCache). Retrieval on the
held-out split is measured before and after (nDCG@10, MRR@10, recall@1, recall@10: the
same numbers as sentence-transformers' ``InformationRetrievalEvaluator``, computed on the
model's device from pre-tokenised texts). The model is saved in sentence-transformers'
format, checkpoints at epoch ends, and a run resumes exactly from a checkpoint.

The teacher that builds the batches is ``"pretrained"`` (the initial model's embeddings,
computed once), ``"model"`` (the model being trained, re-embedded every
``refresh_every`` epochs; its first epoch uses the initial weights, i.e. the pretrained
teacher), ``"tfidf"``, a tensor or :class:`~batchlab.recipes.teachers.TeacherViews`.

Speed (the loop is overhead-bound at batch 64 on a GPU): texts are tokenised once per
(tokenizer, texts) and shared by later runs; each batch is padded to its own longest text;
a mean-pooling model is run as its transformer plus pooling (no sentence-transformers
wrapper); on CUDA both sides of a batch go through one forward pass; the step reads
nothing back to the host (losses accumulate on the device and are read at epoch ends).

Example
-------
>>> from batchlab.datasets import load_codesearch
>>> from batchlab.recipes.finetune import finetune
>>> result = finetune("minilm", load_codesearch("train"), load_codesearch("test"),
...                   sampler="community", batch_size=64, steps=300, out="runs/minilm")  # doctest: +SKIP
>>> result.before["ndcg@10"], result.after["ndcg@10"]  # doctest: +SKIP
>>> train, test = load_codesearch("train"), load_codesearch("test")  # doctest: +SKIP
>>> finetune("minilm", train, test, mochi={"num_hardest": 8}, steps=300)  # MoCHi negatives  # doctest: +SKIP
>>> finetune("minilm", train, test, coreset=0.75, time_budget=120.0)  # CoLM, 120 s of wall time  # doctest: +SKIP
>>> finetune("minilm", train, test, loss="isogclr", loss_options={"gamma": 0.8})  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from batchlab._artifacts import write_text
from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.recipes._encoder import (
    TokenTable,
    _cat,
    _views,
    embed_pairs,
    load_model,
    minilm_path,
    sentence_encoder,
    token_table,
)
from batchlab.recipes._evaluation import METRICS, ir_metrics, ranks_to_metrics, retrieval_metrics_from_tables
from batchlab.recipes.batch_losses import (
    GLOBAL_LOSS_OPTIONS,
    LOSSES,
    MOCHI_DEFAULTS,
    _loss_options,
    _mochi_options,
    make_batch_loss,
    mochi_negatives,
)
from batchlab.recipes.dual_encoder import _pairs, resolve_teacher
from batchlab.recipes.teachers import TeacherViews

# The recipe's parts live in batchlab.recipes._encoder (model, tokens, embeddings), ._evaluation (held-out
# metrics) and .batch_losses (the loss of one batch); their public names stay importable from here.
__all__ = [
    "FinetuneResult", "GLOBAL_LOSS_OPTIONS", "LOSSES", "METRICS", "MOCHI_DEFAULTS", "RESUME_KEYS", "SAMPLERS",
    "ST_MINING", "TEACHERS", "TokenTable", "embed_pairs", "finetune", "ir_metrics", "load_model", "make_batch_loss",
    "minilm_path", "mochi_negatives", "ranks_to_metrics", "retrieval_metrics_from_tables", "sentence_encoder",
    "token_table",
]

logger = logging.getLogger(__name__)

SAMPLERS = ("random", "community", "hard_negative", "cluster", "tas")
TEACHERS = ("pretrained", "model", "tfidf")
# sentence-transformers' documented mining recipe (util.mine_hard_negatives docs example):
# ranks 10..50 of the pretrained model, at most 95% of the positive's score, at most 0.8, one at random.
ST_MINING = {"range_min": 10, "range_max": 50, "relative_margin": 0.05, "max_score": 0.8, "sampling": "random"}
# settings a checkpoint must share with the run that resumes it
RESUME_KEYS = ("sampler", "batch_size", "total_steps", "lr", "loss", "scale", "teacher", "mined_negatives", "jest",
               "coreset", "mochi", "guide", "cache_chunk", "loss_options", "seed", "order_seed", "num_train",
               "max_seq_length")


# -- result ----------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    """What :func:`finetune` returns (and writes to ``<out>/finetune.json``).

    ``before`` / ``after``: held-out metrics (:data:`METRICS`) of the initial and the trained
    model; ``steps``: optimizer steps; ``examples``: training pairs seen; seconds of
    ``teacher`` embedding, ``mining``, ``sampler`` building and ``train`` steps, and
    ``wall`` (their sum: everything but evaluation); ``history``: metrics every
    ``eval_every`` steps; ``losses``: mean loss per epoch; ``model_path``: the saved model.
    """

    before: dict[str, float]
    after: dict[str, float]
    steps: int = 0
    examples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    model_path: str | None = None
    model: Any = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("model")
        return out


# -- the recipe -------------------------------------------------------------------------
def _mine(views: TeacherViews, documents: Sequence[str], count: int, seed: int, options: dict[str, Any]) -> torch.Tensor:
    """``(N, count)`` mined document ids (sentence-transformers' recipe); rows without survivors get random ids."""
    from batchlab.samplers import mine_hard_negatives

    n = len(views)
    settings = {**ST_MINING, **options}
    settings["range_max"] = min(settings["range_max"], n - 1)
    settings["range_min"] = min(settings["range_min"], max(0, settings["range_max"] - count))
    mined = mine_hard_negatives(views.queries, views.documents, torch.arange(n), num_negatives=count, seed=seed,
                                corpus_texts=list(documents), progress=False, hash_inputs=False,
                                index_kwargs={"kind": "torch"}, **settings)
    ids = mined.negative_ids.clone()
    missing = ids < 0
    if missing.any():  # sentence-transformers drops such rows; a random other document keeps N fixed
        generator = torch.Generator().manual_seed(seed + 7)
        fill = torch.randint(0, n - 1, (int(missing.sum()),), generator=generator)
        rows = missing.nonzero()[:, 0]
        ids[missing] = fill + (fill >= rows).long()  # skip the row's own document
        logger.info("mining: %d of %d rows had no candidate left after the filters; filled at random", len(rows), n)
    return ids


def _make_sampler(name: str, views: TeacherViews | None, *, batch_size: int, n: int, seed: int, options: dict[str, Any]):
    from batchlab.recipes.samplers import make_sampler

    return make_sampler(name, views, batch_size=batch_size, seed=seed, num_examples=n, drop_last=True, **options)


def _jest_setup(jest, reference, model, pretrained_views, train_q, train_d, q_table, d_table, embed, device, seed,
                batch_size):
    """The selector (16 chunks, the paper's, or one per kept example when fewer) and the reference's views."""
    from batchlab.samplers import JointExampleSelector

    selector = jest if isinstance(jest, JointExampleSelector) else JointExampleSelector(
        filter_ratio=float(jest), n_chunks=min(16, batch_size), seed=seed)
    if isinstance(reference, TeacherViews):
        if len(reference) != len(train_q):
            raise BatchlabInputError(f"reference views have {len(reference)} rows, the training set {len(train_q)} pairs")
        return selector, reference
    if isinstance(reference, str) and reference == "pretrained":
        return selector, pretrained_views if pretrained_views is not None else _views(model, q_table, d_table, embed)
    return selector, embed_pairs(reference, list(zip(train_q, train_d)), device=device, max_seq_length=model.max_seq_length)


def _coreset_selector(coreset, seed: int):
    from batchlab.samplers.colm import CoLMSelector

    if isinstance(coreset, CoLMSelector):
        return coreset
    if isinstance(coreset, bool) or not isinstance(coreset, (int, float)) or not 0 < float(coreset) < 1:
        raise BatchlabInputError(f"coreset must be a filter ratio in (0, 1) (0.75: 64 of 256) or a CoLMSelector, got {coreset!r}")
    return CoLMSelector(filter_ratio=float(coreset), seed=seed)


class _Clock:
    """A wall-time budget for the whole run (teacher, mining, batch building and steps): the learning
    rate follows the share of the budget spent on steps, and no step starts that would end past it."""

    def __init__(self, budget: float, seconds: dict[str, float], warmup: float, sync: Callable[[], None]) -> None:
        self.budget, self.seconds, self.warmup, self.sync = float(budget), seconds, float(warmup), sync
        self.setup = None
        self.fraction = 0.0
        self.segment_start = time.perf_counter()

    def spent(self, now: float) -> float:
        s = self.seconds
        return s["teacher"] + s["mining"] + s["sampler"] + s["train"] + (now - self.segment_start)

    def start_steps(self, segment_start: float) -> None:
        self.segment_start = segment_start
        if self.setup is None:
            self.setup = self.spent(segment_start)

    def factor(self, _step: int) -> float:
        w = max(self.warmup, 1e-9)
        f = self.fraction
        return max(f, 0.01 * w) / w if f < w else max(0.0, (1.0 - f) / max(1e-9, 1.0 - w))

    def step_done(self) -> None:
        training = max(1e-9, self.budget - (self.setup or 0.0))
        self.fraction = min(1.0, (self.spent(time.perf_counter()) - (self.setup or 0.0)) / training)

    def room_for_step(self, steps_done: int) -> bool:
        """Whether one more step (at the mean step time so far) fits; syncs only near the end."""
        now = time.perf_counter()
        per_step = (self.spent(now) - (self.setup or 0.0)) / steps_done if steps_done else 0.0
        if self.spent(now) + 2 * per_step < self.budget:
            return True
        self.sync()  # the host may be ahead of the device: measure exactly before stopping
        now = time.perf_counter()
        per_step = (self.spent(now) - (self.setup or 0.0)) / steps_done if steps_done else 0.0
        return self.spent(now) + per_step <= self.budget


def finetune(
    model: Any,
    train: Any,
    test: Any = None,
    *,
    sampler: str = "random",
    batch_size: int = 64,
    steps: int | None = None,
    epochs: int = 1,
    lr: float = 5e-5,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    loss: str = "mnrl",
    scale: float = 20.0,
    loss_options: dict[str, Any] | None = None,
    teacher: Any = "pretrained",
    refresh_every: int = 1,
    sampler_options: dict[str, Any] | None = None,
    mined_negatives: int = 0,
    mining_options: dict[str, Any] | None = None,
    guide: Any = None,
    guide_margin: float = 0.0,
    mochi: Any = None,
    jest: Any = None,
    reference: Any = "pretrained",
    coreset: Any = None,
    cache_chunk: int | None = None,
    time_budget: float | None = None,
    max_seq_length: int | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    order_seed: int | None = None,
    eval_every: int | None = None,
    eval_batch_size: int = 128,
    evaluator: str = "fast",
    evaluate_before: bool = True,
    fuse_sides: bool | None = None,
    out: str | os.PathLike | None = None,
    save_model: bool = True,
    resume: str | os.PathLike | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune a sentence-transformers model on (query, document) pairs and evaluate retrieval.

    Parameters
    ----------
    model :
        ``"minilm"`` (all-MiniLM-L6-v2, offline), a sentence-transformers folder, or a
        ``SentenceTransformer`` (trained in place).
    train, test :
        Datasets with ``.queries`` / ``.documents`` or lists of pairs; ``test`` may be None
        (no evaluation). Test documents are the retrieval corpus.
    sampler :
        ``"random"``, ``"community"`` (B3), ``"hard_negative"``, ``"cluster"`` (NGAME) or
        ``"tas"`` (TAS-balanced topics); ``sampler_options`` go to its constructor
        (see :func:`~batchlab.recipes.samplers.make_sampler`).
    batch_size, steps, epochs :
        Pairs per optimizer step; the number of steps (default: ``epochs`` passes). With
        ``steps`` the sampler's epochs repeat until ``steps`` are done.
    lr, warmup, weight_decay :
        AdamW; linear warm-up over the first ``warmup`` fraction of steps, then linear decay
        to 0 (sentence-transformers' trainer defaults, lr 5e-5).
    loss, scale :
        ``"mnrl"`` (``MultipleNegativesRankingLoss``: query -> documents and mined negatives),
        ``"mnsrl"`` (symmetric; no mined negatives), ``"sogclr"`` (one-way SogCLR, Yuan et al.
        2022: a moving average of each query's denominator over the epochs, temperature
        ``1 / scale``) or ``"isogclr"`` (iSogCLR, Qiu et al. 2023: also a temperature per query,
        starting at ``1 / scale``, learned in [0.02, 0.2] with DRO radius 0.3, the recipes'
        settings in :mod:`batchlab.recipes.global_loss`), or ``"dcl"`` (one-way DCL: the positive left
        out of the denominator, as in SogCLR, without its moving average); similarity scale (20, as
        sentence-transformers).
    loss_options :
        SogCLR / iSogCLR only: ``{"gamma": g}`` (the moving average's weight of the new batch, default
        0.9; 1: no average, the batch's own denominator, so the gradient is ``tau`` times DCL's) and
        ``{"rescale": True}`` (the loss times ``scale``, so its gradient is DCL's scale, not ``tau`` times
        it: for ablations of the optimizer's scale sensitivity).
    teacher, refresh_every :
        Embeddings that build the batches (module doc); ``"model"`` re-embeds every
        ``refresh_every`` epochs.
    mined_negatives, mining_options :
        Hard negatives per pair mined once with the initial model (:data:`ST_MINING`,
        overridable); each query's denominator then holds every document and every mined
        negative of the batch, as in ``MultipleNegativesRankingLoss``.
    guide, guide_margin :
        GISTEmbed: ``"pretrained"`` or ``"model"`` (refreshed like the teacher) guide
        embeddings; a key the guide scores above ``positive - guide_margin`` for a query
        leaves that query's denominator.
    mochi :
        MoCHi (Kalantidis et al. 2020): ``True`` (:data:`MOCHI_DEFAULTS`) or a dict of its
        options; every step adds, to each query's denominator only, synthetic negatives mixed
        from its hardest keys in the batch (:func:`mochi_negatives`; detached, as in the paper).
    jest, reference :
        JEST (Evans et al. 2024): a filter ratio (0.8: keep 64 of 320) or a
        :class:`~batchlab.samplers.JointExampleSelector`; the sampler then draws super-batches
        of ``batch_size / (1 - filter_ratio)`` and the selector keeps ``batch_size`` of them by
        learnability against ``reference``: ``"pretrained"`` (the initial model) or another
        model (``"minilm"``, a folder, a SentenceTransformer; embedded once) or its
        :func:`embed_pairs` views: a stronger encoder teaching a smaller or from-scratch learner.
    coreset :
        CoLM (Nguyen & Mirzasoleiman 2025): a filter ratio (0.75: 64 of 256) or a
        :class:`~batchlab.samplers.colm.CoLMSelector`; super-batches are drawn as for JEST and
        the selector keeps the medoids of the per-example gradients of the super-batch's loss at
        the embeddings; each kept query's loss is weighted by its medoid's cluster size (the
        weights average 1), as CoLM and CRAIG weight the coreset's gradients.
    cache_chunk :
        Encode each batch in chunks of this many texts with cached gradients (GradCache), so
        ``batch_size`` can exceed activation memory; gradients are those of the whole batch.
    time_budget :
        Seconds of wall time for the run (teacher embedding, mining, batch building and steps;
        not evaluation), e.g. another recipe's measured time. The learning rate then follows the
        share of the budget spent on steps (warm-up over ``warmup`` of it, then linear decay),
        ``steps`` (default: no limit) only caps the count, and no step starts that the mean step
        time says would end past the budget. Not resumable.
    max_seq_length, precision :
        Token limit (default: the model's); ``"bf16"`` autocasts the encoder on CUDA.
    device, seed, order_seed :
        ``seed`` fixes dropout (and a tiny model's init upstream); ``order_seed`` (default
        ``seed``) fixes the batch order and the mining draw, so arms of one seed can share
        initial weights while batch orders vary separately.
    eval_every, evaluator :
        Also evaluate every that many steps (``history``), e.g. for learning curves.
        ``evaluator="fast"`` scores pre-tokenised texts on the model's device
        (:func:`retrieval_metrics_from_tables`); ``"sentence-transformers"`` runs
        :func:`ir_metrics` (the same numbers, slower).
    fuse_sides :
        Embed a batch's queries and documents in one forward pass (default: on CUDA, where the
        step is bound by launch overhead; on the CPU the sides go separately, each padded to
        its own longest text).
    out, save_model, resume :
        Write ``<out>/model`` (sentence-transformers format), ``<out>/finetune.json`` and a
        checkpoint ``<out>/checkpoints/step-<n>`` at every epoch end (the last two kept);
        ``resume`` continues from such a checkpoint with the same settings (exactly: same
        batches, dropout draws and optimizer state).

    Returns
    -------
    FinetuneResult
    """
    if sampler not in SAMPLERS:
        raise BatchlabInputError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if loss not in LOSSES:
        raise BatchlabInputError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    if loss == "mnsrl" and mined_negatives:
        raise BatchlabInputError("loss='mnsrl' is symmetric and takes no mined negatives; use loss='mnrl'")
    if precision not in ("fp32", "bf16"):
        raise BatchlabInputError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if guide is not None and not (isinstance(guide, str) and guide in ("pretrained", "model")):
        raise BatchlabInputError(f"guide must be None, 'pretrained' or 'model', got {guide!r}")
    if evaluator not in ("fast", "sentence-transformers"):
        raise BatchlabInputError(f"evaluator must be 'fast' or 'sentence-transformers', got {evaluator!r}")
    for label, value in (("batch_size", batch_size), ("epochs", epochs), ("refresh_every", refresh_every)):
        if int(value) < 1:
            raise BatchlabInputError(f"{label} must be >= 1, got {value}")
    if steps is not None and int(steps) < 1:
        raise BatchlabInputError(f"steps must be >= 1 (or None for `epochs` passes), got {steps}")
    if int(mined_negatives) < 0:
        raise BatchlabInputError(f"mined_negatives must be >= 0, got {mined_negatives}")
    if jest is not None and coreset is not None:
        raise BatchlabInputError("jest and coreset both choose the batch from a super-batch; pass one of them")
    mochi_options = _mochi_options(mochi)
    loss_options = _loss_options(loss, loss_options)
    global_state = loss in ("sogclr", "isogclr")
    if global_state and (mochi_options or coreset is not None or loss == "mnsrl"):
        raise BatchlabInputError(f"loss={loss!r} takes neither mochi nor coreset (their extra negatives and per-query "
                                 "weights are defined for MultipleNegativesRankingLoss); use loss='mnrl'")
    if mochi_options and loss == "mnsrl":
        raise BatchlabInputError("mochi adds negatives to each query's denominator: use loss='mnrl', not 'mnsrl'")
    if time_budget is not None:
        if isinstance(time_budget, bool) or not isinstance(time_budget, (int, float)) or not 0 < time_budget < math.inf:
            raise BatchlabInputError(f"time_budget must be a finite positive number of seconds, got {time_budget!r}")
        if resume is not None:
            raise BatchlabInputError("a run under a time_budget cannot resume (its schedule follows the clock)")
    order_seed = seed if order_seed is None else int(order_seed)
    device = torch.device(device)
    train_q, train_d = _pairs(train, "train")
    if len(train_q) < batch_size:
        raise BatchlabInputError(f"batch_size {batch_size} is larger than the training set ({len(train_q)} pairs)")
    test_q, test_d = _pairs(test, "test") if test is not None else ([], [])
    model = load_model(model, device=device)
    if max_seq_length is not None:
        model.max_seq_length = int(max_seq_length)
    bf16 = precision == "bf16" and device.type == "cuda"
    fuse = device.type == "cuda" if fuse_sides is None else bool(fuse_sides)
    torch.manual_seed(seed)
    seconds = {"teacher": 0.0, "mining": 0.0, "sampler": 0.0, "train": 0.0, "eval": 0.0}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(key: str, fn, *args, **kwargs):
        sync()
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        sync()
        seconds[key] += time.perf_counter() - start
        return value

    encode = sentence_encoder(model)

    def embed(features: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = encode(features)
        return F.normalize(out.float(), dim=-1)

    def embed_sides(q_features: dict[str, torch.Tensor], k_features: dict[str, torch.Tensor]):
        if not fuse:
            return embed(q_features), embed(k_features)
        both = embed(_cat([q_features, k_features]))
        nq = q_features["input_ids"].shape[0]
        return both[:nq], both[nq:]

    q_table = token_table(model, train_q, device)
    d_table = token_table(model, train_d, device)
    test_tables = None
    if test_q and evaluator == "fast":
        test_tables = (token_table(model, test_q, device), token_table(model, test_d, device))

    def evaluate() -> dict[str, float]:
        if test_tables is not None:
            return retrieval_metrics_from_tables(model, *test_tables)
        return ir_metrics(model, test_q, test_d, batch_size=eval_batch_size)

    n = len(train_q)
    options = dict(sampler_options or {})
    settings = {"sampler": sampler, "batch_size": int(batch_size), "lr": lr, "loss": loss, "scale": scale,
                "teacher": teacher if isinstance(teacher, str) or teacher is None else "given",
                "mined_negatives": int(mined_negatives), "guide": guide, "cache_chunk": cache_chunk, "seed": seed,
                "order_seed": order_seed, "num_train": n, "max_seq_length": model.max_seq_length,
                "refresh_every": refresh_every, "sampler_options": options, "guide_margin": guide_margin,
                "precision": precision, "warmup": warmup, "weight_decay": weight_decay,
                "jest": None if jest is None else float(getattr(jest, "filter_ratio", jest)),
                "coreset": None if coreset is None else float(getattr(coreset, "filter_ratio", coreset)),
                "mochi": mochi_options, "loss_options": loss_options or None, "time_budget": time_budget,
                "fuse_sides": fuse, "evaluator": evaluator,
                "reference": reference if isinstance(reference, str) else type(reference).__name__}

    # Teachers from the initial weights, before any step (and before a checkpoint is loaded).
    uses_teacher = sampler != "random"
    if uses_teacher and (teacher is None or isinstance(teacher, str) and teacher not in TEACHERS):
        raise BatchlabInputError(f"sampler {sampler!r} needs a teacher: one of {TEACHERS}, a tensor or TeacherViews")
    clock = _Clock(time_budget, seconds, warmup, sync) if time_budget is not None else None
    pretrained_views = None  # the initial model's embeddings: mining, guides, and the model teachers' first epochs
    if mined_negatives or guide is not None or uses_teacher and teacher in ("pretrained", "model"):
        pretrained_views = timed("teacher", _views, model, q_table, d_table, embed)
    initial_views = pretrained_views
    if uses_teacher and teacher == "tfidf":
        initial_views = timed("teacher", resolve_teacher, "tfidf", train_q, train_d, seed=seed)
    elif uses_teacher and not isinstance(teacher, str):
        initial_views = resolve_teacher(teacher, train_q, train_d, seed=seed)
    negatives = None
    if mined_negatives:
        negatives = timed("mining", _mine, pretrained_views, train_d, int(mined_negatives), order_seed, dict(mining_options or {}))
    before = timed("eval", evaluate) if test_q and evaluate_before else {}

    selector, reference_views, draw, weighted = None, None, batch_size, False
    if jest is not None:
        selector, reference_views = timed("teacher", _jest_setup, jest, reference, model, pretrained_views, train_q,
                                          train_d, q_table, d_table, embed, device, order_seed, batch_size)
    elif coreset is not None:
        selector, weighted = _coreset_selector(coreset, order_seed), True
    if selector is not None:
        draw = int(round(batch_size / (1.0 - selector.filter_ratio)))
        if draw > n:
            raise BatchlabInputError(f"the super-batch ({draw}) is larger than the training set ({n} pairs)")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    first_sampler = timed("sampler", _make_sampler, sampler, initial_views if uses_teacher else None,
                          batch_size=draw, n=n, seed=order_seed, options=options)
    per_epoch = len(first_sampler)
    if per_epoch == 0:
        raise BatchlabInputError(f"the {sampler} sampler built no full batch of {batch_size} from {n} pairs")
    if clock is not None:
        total = int(steps) if steps is not None else 2**62
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, clock.factor)
    else:
        total = int(steps) if steps is not None else per_epoch * int(epochs)
        warm = max(1, int(round(warmup * total)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    settings["total_steps"] = total if clock is None else None
    result = FinetuneResult(before=before, after={}, settings=settings, model=model)
    step, epoch = 0, 0
    if resume is not None:
        step, epoch = _load_checkpoint(Path(resume), model, optimizer, scheduler, settings, result, device)

    views, guide_views = initial_views, pretrained_views
    cache = None
    if cache_chunk is not None:
        from batchlab.losses import EmbeddingCache

        cache = EmbeddingCache([lambda **f: embed(f)] * 2, int(cache_chunk))
    from batchlab.samplers import guided_negative_mask

    batch_loss, global_loss = make_batch_loss(loss, scale=scale, num_examples=n, loss_options=loss_options,
                                              mochi=mochi_options, device=device)
    if global_loss is not None and resume is not None:
        global_loss.load_state_dict(torch.load(Path(resume) / "trainer_state.pt", map_location="cpu", weights_only=True)["global_loss"])

    model.train()
    out_dir = Path(out) if out is not None else None
    from tqdm.auto import tqdm

    bar = tqdm(total=None if clock is not None else total, initial=step, desc=f"finetune {sampler}", unit="step",
               disable=not progress, leave=False)
    model_teacher, model_guide = teacher == "model" and uses_teacher, guide == "model"
    current = None
    resumed_at = epoch if resume is not None else None
    out_of_time = False
    while step < total and not out_of_time:
        # The model as teacher / guide: re-embed every `refresh_every` epochs (and where a run resumes).
        refresh = epoch > 0 and (epoch % refresh_every == 0 or epoch == resumed_at)
        if refresh and (model_teacher or model_guide):
            fresh = timed("teacher", _views, model, q_table, d_table, embed)
            views = fresh if model_teacher else views
            guide_views = fresh if model_guide else guide_views
            current = None if model_teacher else current
        if current is None:
            current = first_sampler if views is initial_views else timed(
                "sampler", _make_sampler, sampler, views, batch_size=draw, n=n, seed=order_seed, options=options)
        current.set_epoch(epoch)
        sync()
        start = time.perf_counter()
        if clock is not None:
            clock.start_steps(start)
        epoch_loss, count = torch.zeros((), device=device), 0
        for batch in current:
            if step >= total:
                break
            if clock is not None and not clock.room_for_step(step):
                out_of_time = True
                break
            idx = torch.as_tensor(batch, dtype=torch.long)
            weights = None
            if selector is not None:  # keep batch_size of the super-batch (JEST: learnability; CoLM: gradient medoids)
                with torch.no_grad():
                    learner = (*embed_sides(q_table.take(idx), d_table.take(idx)), scale)
                if weighted:
                    chosen = selector.select(learner=learner, step=step, return_weights=True)  # step: exact on resume
                    idx, weights = idx[chosen.indices.cpu()], chosen.weights.to(device, torch.float32)
                else:
                    ref = (reference_views.queries[idx].to(device), reference_views.documents[idx].to(device), scale)
                    idx = idx[selector.select(learner=learner, reference=ref, step=step).cpu()]
            key_idx = idx if negatives is None else torch.cat([idx, negatives[idx].reshape(-1)])
            q_features = q_table.take(idx)
            k_features = _cat([d_table.take(idx), *([d_table.take(negatives[idx].reshape(-1))] if negatives is not None else [])])
            mask = None
            if guide is not None:
                gq, gk = guide_views.queries[idx].to(device), guide_views.documents[key_idx].to(device)
                mask = guided_negative_mask(gq, gk, margin=float(guide_margin), strategy="absolute")
            generator = None
            if mochi_options:
                generator = torch.Generator(device=device)
                generator.manual_seed(order_seed * 1_000_003 + step)  # per step: exact on resume
            optimizer.zero_grad(set_to_none=True)
            if cache is None:
                value = batch_loss(*embed_sides(q_features, k_features), mask, idx, weights, generator)
                value.backward()
            else:
                value = cache.step(q_features, k_features,
                                   loss_fn=lambda a, b: batch_loss(a, b, mask, idx, weights, generator))
            optimizer.step()
            if clock is not None:
                clock.step_done()
            scheduler.step()
            step += 1
            count += 1
            result.examples += len(idx)
            epoch_loss += value.detach()
            bar.update()
            if eval_every and test_q and step % eval_every == 0 and step < total:
                sync()
                seconds["train"] += time.perf_counter() - start
                row = {"step": step, **timed("eval", evaluate)}
                result.history.append(row)
                start = time.perf_counter()
                if clock is not None:
                    clock.start_steps(start)
        sync()
        seconds["train"] += time.perf_counter() - start
        if clock is not None:
            clock.start_steps(time.perf_counter())
        if count:
            result.losses.append(float(epoch_loss) / count)
        epoch += 1
        if out_dir is not None and step < total and not out_of_time:
            _save_checkpoint(out_dir, model, optimizer, scheduler, settings, result, step, epoch, global_loss)
    bar.close()
    result.steps = step
    if test_q:
        result.after = timed("eval", evaluate)
        if eval_every:
            result.history.append({"step": step, **result.after})
    seconds["wall"] = seconds["teacher"] + seconds["mining"] + seconds["sampler"] + seconds["train"]
    result.seconds = seconds
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if save_model:
            _atomic_save(model, out_dir / "model")
            result.model_path = str(out_dir / "model")
        write_text(out_dir / "finetune.json", json.dumps(result.to_dict(), indent=2, default=str))
    return result


# -- checkpoints ---------------------------------------------------------------------
def _atomic_save(model, path: Path, state: dict[str, Any] | None = None) -> None:
    """The model (sentence-transformers format, plus ``trainer_state.pt`` from ``state``) written beside
    ``path`` and swapped in whole (:mod:`batchlab._artifacts`): a killed writer leaves the previous one."""
    from batchlab._artifacts import _remove_dead_temporaries, _swap_into_place, _temp_name

    _remove_dead_temporaries(path)
    tmp = _temp_name(path, "tmp")
    try:
        model.save(str(tmp))
        if state is not None:
            torch.save(state, tmp / "trainer_state.pt")
        _swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_checkpoint(out: Path, model, optimizer, scheduler, settings, result: FinetuneResult, step: int, epoch: int,
                     global_loss=None, keep: int = 2) -> Path:
    """``<out>/checkpoints/step-<step>``: the model (sentence-transformers format) plus ``trainer_state.pt``."""
    folder = out / "checkpoints" / f"step-{step}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step, "epoch": epoch, "settings": settings, "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "before": result.before, "losses": result.losses, "history": result.history, "examples": result.examples,
        "global_loss": None if global_loss is None else global_loss.state_dict(),
    }
    _atomic_save(model, folder, state)  # the model and trainer_state.pt appear together or not at all
    older = sorted(folder.parent.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for stale in older[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def _load_checkpoint(folder: Path, model, optimizer, scheduler, settings, result: FinetuneResult, device) -> tuple[int, int]:
    path = folder / "trainer_state.pt"
    if not path.exists():
        raise BatchlabInputError(f"{folder} is not a finetune checkpoint (no trainer_state.pt); pass <out>/checkpoints/step-<n>")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"settings", "step", "epoch"} <= set(state):
            raise ValueError("no settings / step / epoch entries")
    except Exception as error:  # truncated, or not a torch file
        raise BatchlabInputError(f"{path} is not a readable finetune checkpoint ({type(error).__name__}: {error}); "
                                 "resume from an intact <out>/checkpoints/step-<n> (the previous one is kept)") from None
    changed = {k: (state["settings"].get(k), settings.get(k)) for k in RESUME_KEYS if state["settings"].get(k) != settings.get(k)}
    if changed:
        raise StaleArtifactError(
            f"the checkpoint {folder} was made with other settings: "
            + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
            + "; resume with the same settings or start a new run"
        )
    from sentence_transformers import SentenceTransformer

    try:
        saved = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    except Exception as error:  # a damaged model file beside an intact trainer_state.pt
        raise BatchlabInputError(f"the model in {folder} is not readable ({type(error).__name__}: {error}); resume from "
                                 "an intact <out>/checkpoints/step-<n> (the previous one is kept)") from None
    model.load_state_dict(saved.float().state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    result.before = state["before"] or result.before
    result.losses, result.history, result.examples = list(state["losses"]), list(state["history"]), state["examples"]
    logger.info("resumed from %s at step %d (epoch %d)", folder, state["step"], state["epoch"])
    return int(state["step"]), int(state["epoch"])
