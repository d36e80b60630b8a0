"""Compare batch constructions ("arms") seed by seed, on any (query, document[, label]) data.

An :class:`Arm` names one way of building the batches a model trains on (a sampler, a
batch size, the teacher that builds them, options). :func:`compare` trains every arm on
several seeds with the same recipe, scores each run on the held-out split, and checks
each teacher-built arm against random batches **seed by seed**: runs of the same seed
start from the same weights, so the difference of two arms is taken per seed and its
standard error is that of the paired differences (:func:`paired_difference`). A claim
gets a verdict only with at least :data:`MIN_SEEDS_FOR_VERDICT` seeds; below that the
check says why it has none.

This is what ``batchlab demo`` runs on codesearch, and what ``batchlab demo --data
FILE`` runs on your own pairs. From Python:

>>> from batchlab.recipes.compare import compare
>>> pairs = [("parse a file", "def parse(f): ..."), ("draw a circle", "def circle(r): ...")] * 40
>>> result = compare(pairs[:60], pairs[60:], arms=["random-16", "hard-negative-16"], seeds=3,
...                  epochs=1, progress=False)  # doctest: +SKIP
>>> print(result.report())  # doctest: +SKIP

Data may be a list of ``(query, document)`` or ``(query, document, label)`` tuples, or an
object with ``.queries``, ``.documents`` and optionally ``.labels`` (e.g.
:func:`~batchlab.datasets.load_codesearch`). Documents with the same label are all
relevant to each other's queries (several relevant documents per query); without labels,
pairs that share a query or a document text are relevant to each other, so a duplicate
text is never scored as a miss.

The registry :data:`ARMS` holds the demo's arms; :func:`register_arm` adds yours, and
any :class:`Arm` object can be passed to :func:`compare` directly. ``train_fn`` swaps the
training recipe (default :func:`~batchlab.recipes.train_dual_encoder`): any function that
takes ``(train, test, **keywords)`` and returns an object with ``metrics`` (dict),
``history``, ``seconds`` and ``sampler_seconds`` (a :class:`~batchlab.recipes.TrainResult`).
It always receives ``seed``, ``name``, ``progress`` (False or a callback of progress
events), the keywords of :meth:`Arm.train_kwargs` (``sampler``, ``batch_size``,
``teacher``, ``sampler_options``, and the arm's ``random_epochs`` / ``init`` /
``guide_margin`` / ``extra`` when set), ``data_seed`` when it differs from ``seed``, and
the shared settings given to :func:`compare` (``epochs``, ``lr``, ``device``, ...). With
``jobs > 1`` it must be importable by name (a module-level function), and a script needs
the ``if __name__ == "__main__":`` guard, as with any ``multiprocessing`` code.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from batchlab.errors import BatchlabInputError

logger = logging.getLogger(__name__)

#: A claim gets a verdict ("held", "reversed", "within seed noise") only with this many seeds.
MIN_SEEDS_FOR_VERDICT = 3

TEACHERS = ("model", "tfidf", "none")
# The sampler names of batchlab.recipes.samplers.SAMPLERS, here without importing torch (the
# command line's --help lists the arms); tests/test_recipes_compare.py checks that they agree.
SAMPLER_NAMES = ("random", "cluster", "community", "hard_negative", "tas")


@dataclass(frozen=True)
class Arm:
    """One way of building batches.

    Parameters
    ----------
    name :
        A name that explains itself (``community-64``: community (B3) batches of 64 from
        the model's own embeddings; ``...-tfidf``: from the TF-IDF teacher).
    sampler :
        ``"random"``, ``"cluster"``, ``"community"`` or ``"hard_negative"`` (see
        :func:`~batchlab.recipes.make_sampler`).
    batch_size :
        The batch the loss sees.
    help :
        One line for ``--help`` and reports.
    group :
        The heading the arm is listed under in ``--help``.
    teacher :
        ``"model"`` (the model's own embeddings, refreshed every epoch after a first
        epoch of random batches; NGAME / ANCE style), ``"tfidf"`` (a TF-IDF teacher fitted
        on the training pairs, built once and shared by every seed) or ``"none"``
        (random batches need no teacher).
    options :
        Sampler settings for :func:`~batchlab.recipes.make_sampler` (they override the
        shared ``sampler_options`` of :func:`compare`).
    random_epochs, init, guide_margin :
        As in :func:`~batchlab.recipes.train_dual_encoder` (curriculum, LSA warm start,
        GISTEmbed guided mask with the TF-IDF teacher as guide).
    extra :
        Further keywords for the training function (e.g. a recipe's own settings).
    """

    name: str
    sampler: str
    batch_size: int = 64
    help: str = ""
    group: str = "other arms"
    teacher: str = "model"
    options: Mapping[str, Any] = field(default_factory=dict)
    random_epochs: int = 0
    init: str | None = None
    guide_margin: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLER_NAMES:
            raise BatchlabInputError(f"Arm {self.name!r}: unknown sampler {self.sampler!r}; choose one of {SAMPLER_NAMES}")
        if self.teacher not in TEACHERS:
            raise BatchlabInputError(f"Arm {self.name!r}: teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.sampler != "random" and self.teacher == "none":
            raise BatchlabInputError(f"Arm {self.name!r}: the {self.sampler} sampler needs a teacher ('model' or 'tfidf')")
        if int(self.batch_size) < 1:
            raise BatchlabInputError(f"Arm {self.name!r}: batch_size must be >= 1, got {self.batch_size}")

    @property
    def needs_tfidf(self) -> bool:
        """Whether the arm uses the shared TF-IDF views (as teacher, or as the guide of its mask)."""
        return self.sampler != "random" and self.teacher == "tfidf" or self.guide_margin is not None

    def train_kwargs(self, sampler_options: Mapping[str, Mapping[str, Any]] | None = None,
                     tfidf: Any = None) -> dict[str, Any]:
        """Keywords for the training function: sampler, batch size, teacher and the arm's options.

        ``sampler_options``: shared settings per sampler name (the arm's ``options`` win);
        ``tfidf``: the prebuilt TF-IDF :class:`~batchlab.recipes.TeacherViews`, used when
        the arm's teacher (or guide) is TF-IDF.
        """
        options = {**dict((sampler_options or {}).get(self.sampler, {})), **dict(self.options)}
        if self.sampler == "random":
            teacher = tfidf if self.guide_margin is not None else None
        elif self.teacher == "model":
            teacher = "model"
        else:
            teacher = tfidf if tfidf is not None else "tfidf"
        kwargs = dict(sampler=self.sampler, batch_size=int(self.batch_size), teacher=teacher, sampler_options=options)
        if self.random_epochs:
            kwargs["random_epochs"] = self.random_epochs
        if self.init is not None:
            kwargs["init"] = self.init
        if self.guide_margin is not None:
            kwargs["guide_margin"] = self.guide_margin
        kwargs.update(self.extra)
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dataclasses.asdict(self).items()}


#: The arms known by name (``batchlab demo --arms``); :func:`register_arm` adds more.
ARMS: dict[str, Arm] = {}

#: What ``batchlab demo`` runs by default.
DEFAULT_ARMS = ("random-64", "random-256", "community-64", "hard-negative-64")

#: Names used before 2026-12-02, and what they are called now.
RENAMED = {
    "community-64-self": "community-64",
    "hard-negative-64-self": "hard-negative-64",
    "community-64-late": "community-64-tfidf-after-random-epoch",
    "hard-negative-64-late": "hard-negative-64-tfidf-after-random-epoch",
    "random-64-lsa": "random-64-lsa-init",
    "community-64-lsa": "community-64-tfidf-lsa-init",
    "hard-negative-64-lsa": "hard-negative-64-tfidf-lsa-init",
    "hard-negative-64-fnf": "hard-negative-64-tfidf-drop-near-positives",
    "hard-negative-64-lsa-fnf": "hard-negative-64-tfidf-lsa-init-drop-near-positives",
    "community-64-xmod": "community-64-tfidf-other-modules",
    "hard-negative-64-xmod": "hard-negative-64-tfidf-other-modules",
    "community-64-mix": "community-64-tfidf-half-random",
    "hard-negative-64-mix": "hard-negative-64-tfidf-half-random",
    "community-64-xmod-mix": "community-64-tfidf-other-modules-half-random",
    "hard-negative-64-xmod-mix": "hard-negative-64-tfidf-other-modules-half-random",
    "random-64-gist": "random-64-gist-mask",
    "community-64-gist": "community-64-tfidf-gist-mask",
    "hard-negative-64-gist": "hard-negative-64-tfidf-gist-mask",
}
# "community-64" and "hard-negative-64" meant the TF-IDF teacher before 2026-12-02: they now
# name the model-as-teacher arms, and the TF-IDF ones are "community-64-tfidf" / "hard-negative-64-tfidf".


def register_arm(arm: Arm, *, replace: bool = False) -> Arm:
    """Add ``arm`` to :data:`ARMS` (``replace=True`` to redefine a name); returns it."""
    if not isinstance(arm, Arm):
        raise BatchlabInputError(f"register_arm takes an Arm, got {type(arm).__name__}")
    if arm.name in ARMS and not replace and ARMS[arm.name] != arm:
        raise BatchlabInputError(f"an arm named {arm.name!r} exists; pick another name or pass replace=True")
    ARMS[arm.name] = arm
    return arm


def get_arm(arm: str | Arm) -> Arm:
    """An :class:`Arm` by name (or the arm itself).

    Names not in :data:`ARMS` of the form ``<sampler>-<batch>[-tfidf]`` (``random-32``,
    ``community-128``, ``hard-negative-32-tfidf``) are built by :func:`arm_for`; a renamed
    or unknown name says what to use.
    """
    if isinstance(arm, Arm):
        return arm
    if arm in ARMS:
        return ARMS[arm]
    if arm in RENAMED:
        raise BatchlabInputError(f"arm {arm!r} was renamed {RENAMED[arm]!r} (names now say what they do)")
    tfidf = arm.endswith("-tfidf")
    head, _, size = (arm[: -len("-tfidf")] if tfidf else arm).rpartition("-")
    if size.isdigit() and int(size) > 0 and head.replace("-", "_") in SAMPLER_NAMES:
        return arm_for(head.replace("-", "_"), int(size), teacher="tfidf" if tfidf else "model")
    raise BatchlabInputError(f"unknown arm {arm!r}; known arms: {', '.join(ARMS)}, or <sampler>-<batch>[-tfidf] "
                             f"with a sampler from {SAMPLER_NAMES} (or pass an Arm object)")


def _builtin_arms() -> None:
    base = "baselines: uniformly random batches"
    model = "teacher-built batches, the model as its own teacher (the default; NGAME / ANCE style)"
    tfidf = "teacher-built batches from a TF-IDF teacher (lose to random on codesearch)"
    variants = "variants measured in docs/recipes.md (TF-IDF teacher unless said)"
    half, fnf = {"mix_random": 0.5}, {"relative_margin": 0.05}
    xmod = {"cross_group": True}
    for arm in [
        Arm("random-64", "random", 64, "random batches of 64", base, teacher="none"),
        Arm("random-256", "random", 256, "random batches of 256 (B3's baseline)", base, teacher="none"),
        Arm("community-64", "community", 64, "community (B3) batches of 64: whole groups of mutual neighbours", model),
        Arm("hard-negative-64", "hard_negative", 64, "hard-negative batches of 64: each anchor packed with its nearest "
            "documents", model),
        Arm("community-64-tfidf", "community", 64, "community (B3) batches of 64 from the TF-IDF teacher", tfidf,
            teacher="tfidf"),
        Arm("hard-negative-64-tfidf", "hard_negative", 64, "hard-negative batches of 64 from the TF-IDF teacher", tfidf,
            teacher="tfidf"),
        Arm("community-64-tfidf-after-random-epoch", "community", 64, "curriculum: random batches in epoch 1, "
            "TF-IDF communities after", variants, teacher="tfidf", random_epochs=1),
        Arm("hard-negative-64-tfidf-after-random-epoch", "hard_negative", 64, "curriculum: random batches in epoch 1, "
            "TF-IDF hard negatives after", variants, teacher="tfidf", random_epochs=1),
        Arm("random-64-lsa-init", "random", 64, "random batches, token embeddings warm-started from an LSA of the "
            "training text", variants, teacher="none", init="lsa"),
        Arm("community-64-tfidf-lsa-init", "community", 64, "TF-IDF communities + LSA warm start", variants,
            teacher="tfidf", init="lsa"),
        Arm("hard-negative-64-tfidf-lsa-init", "hard_negative", 64, "TF-IDF hard negatives + LSA warm start", variants,
            teacher="tfidf", init="lsa"),
        Arm("hard-negative-64-tfidf-drop-near-positives", "hard_negative", 64, "TF-IDF hard negatives without those "
            "scored above 95% of the positive (NV-Retriever)", variants, teacher="tfidf", options=fnf),
        Arm("hard-negative-64-tfidf-lsa-init-drop-near-positives", "hard_negative", 64, "the two above together",
            variants, teacher="tfidf", options=fnf, init="lsa"),
        Arm("community-64-tfidf-other-modules", "community", 64, "TF-IDF communities from neighbours in other "
            "modules (groups) only", variants, teacher="tfidf", options=xmod),
        Arm("hard-negative-64-tfidf-other-modules", "hard_negative", 64, "TF-IDF hard negatives from other modules "
            "(groups) only", variants, teacher="tfidf", options=xmod),
        Arm("community-64-tfidf-half-random", "community", 64, "half of each batch TF-IDF communities, half random",
            variants, teacher="tfidf", options=half),
        Arm("hard-negative-64-tfidf-half-random", "hard_negative", 64, "half of each batch TF-IDF hard negatives, half "
            "random", variants, teacher="tfidf", options=half),
        Arm("community-64-tfidf-other-modules-half-random", "community", 64, "other-module communities, half random",
            variants, teacher="tfidf", options={**xmod, **half}),
        Arm("hard-negative-64-tfidf-other-modules-half-random", "hard_negative", 64, "other-module hard negatives, "
            "half random", variants, teacher="tfidf", options={**xmod, **half}),
        Arm("random-64-gist-mask", "random", 64, "random batches; in-batch keys TF-IDF scores above 95% of the "
            "positive leave the loss (GISTEmbed)", variants, teacher="none", guide_margin=0.05),
        Arm("community-64-tfidf-gist-mask", "community", 64, "TF-IDF communities + the GISTEmbed mask", variants,
            teacher="tfidf", guide_margin=0.05),
        Arm("hard-negative-64-tfidf-gist-mask", "hard_negative", 64, "TF-IDF hard negatives + the GISTEmbed mask",
            variants, teacher="tfidf", guide_margin=0.05),
    ]:
        register_arm(arm)


_builtin_arms()


def arm_for(sampler: str, batch_size: int, *, teacher: str = "model", **settings: Any) -> Arm:
    """An arm for any sampler and batch size, named ``<sampler>-<batch>[-tfidf]`` (e.g. ``random-16``)."""
    name = f"{sampler.replace('_', '-')}-{batch_size}" + ("-tfidf" if teacher == "tfidf" and sampler != "random" else "")
    if sampler == "random":
        teacher = "none"
    return Arm(name, sampler, batch_size, settings.pop("help", f"{sampler} batches of {batch_size}"),
               teacher=teacher, **settings)


def resolve_arms(arms: Iterable[str | Arm]) -> list[Arm]:
    """Arms by name or object (see :func:`get_arm`); names must be distinct."""
    out = [get_arm(arm) for arm in arms]
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise BatchlabInputError(f"arms must have distinct names, got {names}")
    return out


# -- statistics ---------------------------------------------------------------------
@dataclass(frozen=True)
class PairedDifference:
    """The difference ``a - b`` of a metric between two arms.

    ``basis`` is ``"paired by seed"`` when both arms ran the same seeds (the mean of the
    per-seed differences; ``standard_error`` is that of those differences) and
    ``"unpaired"`` otherwise (difference of the means, unpaired standard error).
    ``standard_error`` is None when it cannot be estimated (one seed). ``wins``: seeds
    run by both on which ``a`` was strictly ahead.
    """

    difference: float
    standard_error: float | None
    basis: str
    seeds: tuple[int, ...]
    wins: int
    n_a: int
    n_b: int

    @property
    def n(self) -> int:
        """Seeds behind the estimate (paired: common seeds; unpaired: the smaller arm)."""
        return len(self.seeds) if self.basis == "paired by seed" else min(self.n_a, self.n_b)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seeds": list(self.seeds)}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDifference:
    """Seed-paired difference of ``a`` and ``b`` (``{seed: value}``), unpaired when their seeds differ.

    >>> d = paired_difference({0: 0.20, 1: 0.31, 2: 0.25}, {0: 0.18, 1: 0.30, 2: 0.22})
    >>> round(d.difference, 3), d.basis, d.wins
    (0.02, 'paired by seed', 3)
    """
    if not a or not b:
        raise BatchlabInputError("paired_difference needs at least one seed on each side")
    seeds = tuple(sorted(set(a) & set(b)))
    wins = sum(a[s] > b[s] for s in seeds)
    if seeds and len(seeds) == len(a) == len(b):
        diffs = [a[s] - b[s] for s in seeds]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
        return PairedDifference(statistics.fmean(diffs), se, "paired by seed", seeds, wins, len(a), len(b))
    va, vb = list(a.values()), list(b.values())
    se = None
    if len(va) > 1 and len(vb) > 1:
        se = math.sqrt(statistics.variance(va) / len(va) + statistics.variance(vb) / len(vb))
    return PairedDifference(statistics.fmean(va) - statistics.fmean(vb), se, "unpaired", seeds, wins, len(a), len(b))


def verdict(diff: PairedDifference, *, min_seeds: int = MIN_SEEDS_FOR_VERDICT) -> tuple[str | None, str]:
    """``(verdict, reason)``: "held" / "reversed" beyond two standard errors, else "within seed noise".

    No verdict (None) below ``min_seeds`` seeds; the reason says so.
    """
    if diff.n < min_seeds:
        return None, (f"no verdict: {diff.n} seed(s) {'in common' if diff.basis == 'paired by seed' else 'per arm'}; "
                      f"a verdict needs at least {min_seeds} (run more seeds, e.g. --seeds {min_seeds})")
    se = diff.standard_error or 0.0
    if diff.difference == 0 or abs(diff.difference) <= 2 * se:
        return "within seed noise", f"|difference| <= 2 standard errors ({2 * se:.4f})"
    word = "held" if diff.difference > 0 else "reversed"
    return word, f"{'above' if diff.difference > 0 else 'below'} zero by more than 2 standard errors ({2 * se:.4f})"


@dataclass(frozen=True)
class Claim:
    """"``better`` beats ``worse`` on ``metric``", said in words by ``text``."""

    better: str
    worse: str
    text: str
    metric: str = "recall@1"


def default_claims(arms: Sequence[Arm]) -> list[Claim]:
    """The demo's claims: every teacher-built arm beats random batches of its own size; community
    arms also beat random batches of 256 (B3's headline). Only claims whose arms both ran are kept."""
    names = {a.name for a in arms}
    kinds = {"community": "community", "hard_negative": "hard-negative", "cluster": "cluster"}
    claims = []
    for arm in arms:
        if arm.sampler not in kinds:
            continue
        label = f"{kinds[arm.sampler]} batches ({arm.name})"
        if arm.sampler == "community" and "random-256" in names and arm.batch_size != 256:
            claims.append(Claim(arm.name, "random-256", f"B3 claim: {label} of {arm.batch_size} beat random batches of 256"))
        same = next((a.name for a in arms if a.sampler == "random" and a.batch_size == arm.batch_size
                     and a.init == arm.init and a.guide_margin is None), None)
        if same is not None:
            claims.append(Claim(arm.name, same, f"{label} beat random batches of the same size"))
    return claims


def claim_checks(runs: Sequence[Mapping[str, Any]], arms: Sequence[Arm | str], *, claims: Sequence[Claim] | None = None,
                 metric: str | None = None, min_seeds: int = MIN_SEEDS_FOR_VERDICT) -> list[dict[str, Any]]:
    """Check each claim on ``runs`` (records with ``arm``, ``seed`` and ``metrics``).

    Returns one dict per claim whose two arms ran: ``claim``, ``better``, ``worse``,
    ``metric``, ``difference``, ``standard_error``, ``basis``, ``wins``, ``seeds``,
    ``verdict`` (None below ``min_seeds`` seeds) and ``reason``.
    """
    arms = [get_arm(a) if isinstance(a, str) else a for a in arms]
    claims = default_claims(arms) if claims is None else list(claims)
    by_arm: dict[str, dict[str, dict[int, float]]] = {}
    for r in runs:
        for key, value in r["metrics"].items():
            by_arm.setdefault(r["arm"], {}).setdefault(key, {})[int(r["seed"])] = float(value)
    out = []
    for claim in claims:
        key = metric or claim.metric
        a, b = by_arm.get(claim.better, {}).get(key), by_arm.get(claim.worse, {}).get(key)
        if not a or not b:
            continue
        diff = paired_difference(a, b)
        word, reason = verdict(diff, min_seeds=min_seeds)
        out.append({"claim": claim.text, "better": claim.better, "worse": claim.worse, "metric": key,
                    "difference": diff.difference, "standard_error": diff.standard_error, "basis": diff.basis,
                    "wins": diff.wins, "seeds": list(diff.seeds), "verdict": word, "reason": reason})
    return out


def format_check(check: Mapping[str, Any]) -> str:
    """One line: the claim, the difference with its uncertainty and seeds won, the verdict or why none."""
    se = check["standard_error"]
    spread = f"2 SE = {2 * se:.3f}" if se is not None else "no SE with one seed"
    won = f"ahead on {check['wins']} of {len(check['seeds'])} seeds" if check["seeds"] else "no common seeds"
    head = f"{check['claim']}: {check['metric']} {check['difference']:+.3f} ({check['basis']}, {spread}, {won})"
    return f"{head}: {check['verdict']}" if check["verdict"] else f"{head}: {check['reason']}"


def spread(values: Sequence[float]) -> str:
    """``mean ± sd`` over seeds; one seed prints its value alone (a spread needs two)."""
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


# -- training -------------------------------------------------------------------------
def train_arm(
    arm: Arm | str,
    seed: int,
    train: Any,
    test: Any,
    *,
    tfidf: Any = None,
    sampler_options: Mapping[str, Mapping[str, Any]] | None = None,
    train_fn: Callable[..., Any] | None = None,
    data_seed: int | None = None,
    progress: Any = False,
    **settings: Any,
) -> dict[str, Any]:
    """Train one ``(arm, seed)`` and return its record.

    ``settings`` go to ``train_fn`` as they are (``epochs``, ``lr``, ``device``, ``config``,
    ``impl``, ...). ``seed`` sets the initial weights; ``data_seed`` (default: ``seed``)
    the batch order. ``tfidf``: prebuilt TF-IDF views for arms whose teacher is TF-IDF
    (built here when missing and needed).

    Returns ``{"arm", "seed", "data_seed", "metrics", "history", "train_seconds",
    "sampler_seconds", "hardness", "wall_seconds", "cpu_seconds"}``; ``hardness`` is the
    teacher similarity of batch mates for TF-IDF-built batches (None otherwise).
    """
    from batchlab.recipes.dual_encoder import split_pairs, train_dual_encoder

    arm = get_arm(arm)
    train_fn = train_fn or train_dual_encoder
    start, cpu_start = time.perf_counter(), time.process_time()
    if tfidf is None and arm.needs_tfidf:
        from batchlab.recipes.teachers import tfidf_views

        queries, documents, _ = split_pairs(train, "train")
        tfidf = tfidf_views(queries, documents, device=settings.get("device", "cpu"))
    kwargs = arm.train_kwargs(sampler_options, tfidf)
    hardness = None
    if arm.sampler != "random" and arm.teacher == "tfidf":
        from batchlab.recipes.samplers import make_sampler
        from batchlab.samplers.community_sampler import batch_similarity_stats

        built = make_sampler(arm.sampler, tfidf, batch_size=arm.batch_size, seed=seed if data_seed is None else data_seed,
                             **kwargs["sampler_options"])
        built.set_epoch(0)
        hardness = batch_similarity_stats(tfidf.pairs, built.global_batches(), top_k=10)
    if data_seed is not None and data_seed != seed:
        kwargs["data_seed"] = data_seed  # passed only when it differs, so recipes without data_seed still work
    result = train_fn(train, test, seed=seed, progress=progress, name=f"{arm.name}-seed{seed}", **kwargs, **settings)
    return {
        "arm": arm.name,
        "seed": seed,
        "data_seed": seed if data_seed is None else data_seed,
        "metrics": result.metrics,
        "history": result.history,
        "train_seconds": result.seconds,
        "sampler_seconds": result.sampler_seconds,
        "hardness": hardness,
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,  # what the run costs, whatever else runs on the machine
    }


@dataclass
class Comparison:
    """What :func:`compare` returns: every run, the claim checks, and the settings used."""

    arms: list[Arm]
    runs: list[dict[str, Any]]
    checks: list[dict[str, Any]]
    settings: dict[str, Any]
    anchor: dict[str, float] | None = None
    seconds: float = 0.0

    def rows(self) -> list[dict[str, Any]]:
        """One summary row per arm (metrics as mean ± sd over seeds, seconds per run)."""
        rows = []
        if self.anchor:
            rows.append({"arm": "TF-IDF teacher alone (anchor)", "batch": "-",
                         **{k: f"{v:.3f}" for k, v in self.anchor.items()}})
        for arm in self.arms:
            mine = sorted((r for r in self.runs if r["arm"] == arm.name), key=lambda r: r["seed"])
            if not mine:
                continue
            row: dict[str, Any] = {"arm": arm.name, "batch": arm.batch_size, "seeds": len(mine)}
            for key in mine[0]["metrics"]:
                row[key] = spread([r["metrics"][key] for r in mine])
            row["train s/run"] = statistics.fmean(r["train_seconds"] for r in mine)
            row["cpu s/run"] = statistics.fmean(r["cpu_seconds"] for r in mine)
            if mine[0].get("hardness"):
                row["teacher sim top-10"] = statistics.fmean(r["hardness"]["top_k_negative_similarity"] for r in mine)
            rows.append(row)
        return rows

    def report(self) -> str:
        """The table and one line per claim check."""
        from batchlab._table import format_table

        rows = self.rows()
        metrics = [k for r in rows for k in r if k not in ("arm", "batch", "seeds", "teacher sim top-10", "train s/run",
                                                           "cpu s/run")]
        columns = ["arm", "batch", "seeds", *dict.fromkeys(metrics), "teacher sim top-10", "train s/run", "cpu s/run"]
        lines = [format_table(rows, [c for c in columns if any(c in r for r in rows)])]
        lines += [format_check(c) for c in self.checks]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "arms": [a.to_dict() for a in self.arms], "teacher_anchor": self.anchor,
                "runs": self.runs, "checks": self.checks, "total_seconds": self.seconds}


def compare(
    train: Any,
    test: Any = None,
    *,
    arms: Iterable[str | Arm] = DEFAULT_ARMS,
    seeds: int | Sequence[int] = 3,
    data_seeds: Sequence[int] | None = None,
    epochs: int = 3,
    lr: float = 2e-3,
    groups: Sequence[Any] | None = None,
    sampler_options: Mapping[str, Mapping[str, Any]] | None = None,
    claims: Sequence[Claim] | None = None,
    min_seeds: int = MIN_SEEDS_FOR_VERDICT,
    tfidf_anchor: bool = True,
    jobs: int = 1,
    threads: int | None = 1,
    device: str = "cpu",
    train_fn: Callable[..., Any] | None = None,
    progress: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    **settings: Any,
) -> Comparison:
    """Train every arm on every seed and check each teacher-built arm against random batches.

    Parameters
    ----------
    train, test :
        ``(query, document[, label])`` tuples, objects with ``.queries``, ``.documents``
        (and optional ``.labels``), or paths of ``.jsonl`` / ``.tsv`` / ``.csv`` pairs files
        (:func:`~batchlab.recipes.pairs.read_pairs`); without ``test``, 20% of ``train``
        is held out (:func:`~batchlab.recipes.pairs.holdout`: a label's pairs stay together).
    arms :
        Names from :data:`ARMS`, ``<sampler>-<batch>`` names (``random-32``,
        ``community-32``, ``hard-negative-32-tfidf``), or :class:`Arm` objects.
    seeds :
        A count (seeds ``0 .. seeds-1``) or the seeds themselves; each sets the initial
        weights, and the batch order unless ``data_seeds`` gives one per seed.
    epochs, lr, device, settings :
        For the training function (``config``, ``impl``, ``loss``, ...).
    groups :
        One label per training pair (e.g. codesearch's modules) for the
        ``...-other-modules`` arms; default: ``train.modules`` when it exists.
    sampler_options :
        Shared settings per sampler name, e.g. ``{"community": {"group_size": 8}}``.
    claims, min_seeds :
        The claims to check (default :func:`default_claims`); verdicts need ``min_seeds``.
    tfidf_anchor :
        Also score the TF-IDF teacher alone on ``test`` (the lexical baseline).
    jobs, threads :
        Runs trained at once (separate processes) and torch threads per run; one thread
        per run makes CPU results independent of the machine's core count.
    progress :
        Bars (epochs and steps, with time estimates) when the output is a terminal, and a
        plain-text line at least every 10 s when it is not; one line per finished run.
    on_run :
        Called with each run's record as it finishes.
    """
    from batchlab.recipes import progress as progress_mod
    from batchlab.recipes.dual_encoder import split_pairs

    import os

    from batchlab.recipes.pairs import holdout, read_pairs

    train, test = (read_pairs(x) if isinstance(x, (str, os.PathLike)) else x for x in (train, test))
    if test is None:
        train, test = holdout(train if hasattr(train, "subset") else _as_pairs(train))
    arms = resolve_arms(arms)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not arms or not seed_list or epochs < 1 or jobs < 1:
        raise BatchlabInputError(f"compare needs at least one arm, one seed, epochs >= 1 and jobs >= 1 (got "
                                 f"{len(arms)} arms, seeds {seed_list}, epochs {epochs}, jobs {jobs})")
    if data_seeds is not None and len(data_seeds) != len(seed_list):
        raise BatchlabInputError(f"data_seeds needs one batch-order seed per seed ({len(seed_list)}), got {len(data_seeds)}")
    order = dict(zip(seed_list, data_seeds)) if data_seeds is not None else {s: s for s in seed_list}
    queries, documents, _ = split_pairs(train, "train")
    split_pairs(test, "test")  # fail early on a bad test split
    if groups is None and hasattr(train, "modules"):
        groups = list(train.modules)[: len(queries)]
    start = time.perf_counter()
    shared = dict(epochs=epochs, lr=lr, device=device, **settings)
    context = _RunContext(train, test, groups, device, sampler_options, train_fn, threads,
                          any(a.needs_tfidf for a in arms))
    tasks = [(arm, seed, order[seed]) for arm in arms for seed in seed_list]
    steps = [max(1, len(queries) // arm.batch_size) * epochs for arm, _, _ in tasks]
    display = progress_mod.RunDisplay(tasks=[f"{a.name} seed {s}" for a, s, _ in tasks], steps=steps, enabled=progress)
    display.note("scoring the TF-IDF teacher alone on the test split" if tfidf_anchor else None)
    anchor = tfidf_anchor_metrics(train, test) if tfidf_anchor else None
    display.note("starting the runs" + (f" in {jobs} worker processes" if jobs > 1 and len(tasks) > 1 else ""))
    runs: list[dict[str, Any]] = []

    def finished(i: int, record: dict[str, Any]) -> None:
        runs.append(record)
        same = [r["metrics"].get("recall@1", float("nan")) for r in runs if r["arm"] == record["arm"]]
        display.finish(i, f"{record['arm']} seed {record['seed']}: "
                          + " ".join(f"{k}={v:.3f}" for k, v in record["metrics"].items())
                          + f" ({record['wall_seconds']:.0f} s); {record['arm']} so far: recall@1 {spread(same)}")
        if on_run is not None:
            on_run(record)

    try:
        if jobs == 1 or len(tasks) == 1:
            context.setup()
            for i, (arm, seed, data_seed) in enumerate(tasks):
                display.start(i)
                finished(i, context.run(arm, seed, data_seed, shared, display.callback(i)))
        else:
            _run_pool(context, tasks, shared, jobs, display, finished)
    finally:
        display.close()
    runs.sort(key=lambda r: ([a.name for a in arms].index(r["arm"]), r["seed"]))
    checks = claim_checks(runs, arms, claims=claims, min_seeds=min_seeds)
    used = {**{k: v for k, v in shared.items()}, "seeds": seed_list, "data_seeds": [order[s] for s in seed_list],
            "jobs": jobs, "threads": threads, "sampler_options": {k: dict(v) for k, v in (sampler_options or {}).items()},
            "train_pairs": len(queries), "test_pairs": len(split_pairs(test, "test")[0]), "min_seeds": min_seeds,
            "arithmetic": progress_mod.arithmetic()}
    return Comparison(arms, runs, checks, used, anchor, time.perf_counter() - start)


def _as_pairs(data: Any):
    """Any accepted training data as :class:`~batchlab.recipes.pairs.Pairs` (to hold some out)."""
    from batchlab.recipes.dual_encoder import split_pairs
    from batchlab.recipes.pairs import Pairs

    return Pairs(*split_pairs(data, "train"))


def tfidf_anchor_metrics(train: Any, test: Any) -> dict[str, float]:
    """The TF-IDF teacher's own retrieval on ``test`` (fitted on ``train``; exact sparse scores)."""
    from batchlab.recipes.dual_encoder import relevance_labels, split_pairs
    from batchlab.recipes.evaluate import retrieval_metrics
    from batchlab.recipes.teachers import TfidfTeacher

    queries, documents, _ = split_pairs(train, "train")
    test_q, test_d, labels = split_pairs(test, "test")
    teacher = TfidfTeacher().fit(list(queries) + list(documents))
    labels = relevance_labels(test_q, test_d, labels)
    q, d = teacher.transform(test_q).to_dense(), teacher.transform(test_d).to_dense()
    return retrieval_metrics(q, d, query_labels=labels, document_labels=labels)


class _RunContext:
    """What every run of one comparison shares; rebuilt once in each worker process."""

    def __init__(self, train, test, groups, device, sampler_options, train_fn, threads, needs_tfidf):
        self.train, self.test, self.groups, self.device = train, test, groups, device
        self.sampler_options, self.train_fn, self.threads, self.needs_tfidf = sampler_options, train_fn, threads, needs_tfidf
        self.tfidf = None

    def __getstate__(self):
        return {**self.__dict__, "tfidf": None}  # rebuilt in the worker (deterministic)

    def setup(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(int(self.threads))
        if self.needs_tfidf and self.tfidf is None:
            from batchlab.recipes.dual_encoder import split_pairs
            from batchlab.recipes.teachers import tfidf_views

            queries, documents, _ = split_pairs(self.train, "train")
            self.tfidf = tfidf_views(queries, documents, groups=self.groups, device=self.device)

    def run(self, arm: Arm, seed: int, data_seed: int, shared: dict[str, Any], progress: Any) -> dict[str, Any]:
        return train_arm(arm, seed, self.train, self.test, tfidf=self.tfidf, sampler_options=self.sampler_options,
                         train_fn=self.train_fn, data_seed=data_seed, progress=progress, **shared)


_WORKER: dict[str, Any] = {}


def _worker_init(context: _RunContext, queue) -> None:
    context.setup()
    _WORKER.update(context=context, queue=queue)


def _worker_run(i: int, arm: Arm, seed: int, data_seed: int, shared: dict[str, Any]) -> dict[str, Any]:
    from batchlab.recipes.progress import QueueCallback

    return _WORKER["context"].run(arm, seed, data_seed, shared, QueueCallback(_WORKER["queue"], i))


def _run_pool(context, tasks, shared, jobs, display, finished) -> None:
    """Run the tasks in ``jobs`` spawned processes; their progress events come back through a queue."""
    import multiprocessing
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")  # no fork after torch has started threads
    manager = ctx.Manager()
    events = manager.Queue()
    try:
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(context, events)) as pool:
            pending = {pool.submit(_worker_run, i, arm, seed, data_seed, shared): i
                       for i, (arm, seed, data_seed) in enumerate(tasks)}
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                while True:
                    try:
                        i, event = events.get_nowait()
                    except queue_mod.Empty:
                        break
                    display.event(i, event)
                for future in done:
                    finished(pending.pop(future), future.result())
                display.tick()
    finally:
        manager.shutdown()
