"""Batch samplers by name, built from teacher embeddings, for the recipes and the CLI.

``make_sampler("community", teacher, batch_size=64, seed=0)`` hides which module each
sampler lives in and which teacher view it needs: community (B3) and cluster batches
use one embedding per training pair; hard-negative batches mine, for each pair's query,
the documents the teacher ranks just below its own (a rank window guards against
near-duplicates that would be false negatives).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from batchlab._checks import check_positive_int
from batchlab.errors import BatchlabInputError
from batchlab.recipes.teachers import TeacherViews
from batchlab.samplers.base import GlobalBatchSampler

logger = logging.getLogger(__name__)

SAMPLERS = ("random", "cluster", "community", "hard_negative", "tas")

#: Every option :func:`make_sampler` takes per sampler, with its default (run records store them).
SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "random": {},
    "cluster": {"cluster_size": 8},
    "community": {"group_size": 8, "rank_window": (2, 34), "cross_group": False, "mix_random": 0.0},
    "hard_negative": {"num_negatives": 8, "range_min": 0, "relative_margin": None, "max_neighbourhood_fraction": 0.25,
                      "cross_group": False, "mix_random": 0.0, "negative_ids": None},
    # n_clusters None: one topic per 200 queries (TAS-Balanced's topics hold a few hundred queries)
    "tas": {"n_clusters": None, "method": "balanced"},
}


def resolved_options(name: Any, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` completed with :data:`SAMPLER_DEFAULTS` for a named sampler (what a run really used).

    An option the sampler does not take is an error. A sampler that is not a name (an
    instance or a factory) keeps ``options`` as given.
    """
    options = dict(options or {})
    if not isinstance(name, str) or name not in SAMPLER_DEFAULTS:
        return options
    unknown = sorted(set(options) - set(SAMPLER_DEFAULTS[name]))
    if unknown:
        raise BatchlabInputError(
            f"the {name!r} sampler takes no option(s) {unknown}; it takes {sorted(SAMPLER_DEFAULTS[name]) or 'none'}"
        )
    resolved = {**SAMPLER_DEFAULTS[name], **options}
    if resolved.get("negative_ids") is not None:
        resolved["negative_ids"] = f"given ({tuple(resolved['negative_ids'].shape)})"
    if "rank_window" in resolved:
        resolved["rank_window"] = list(resolved["rank_window"])
    return resolved


class RandomBatchSampler(GlobalBatchSampler):
    """Uniformly shuffled batches (the baseline every other sampler is compared with).

    >>> [len(b) for b in RandomBatchSampler(10, 4, seed=0)]
    [4, 4, 2]
    """

    RESUME_SETTINGS = ("num_examples",)

    def __init__(self, num_examples: int, batch_size: int, **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.num_examples = check_positive_int("num_examples", num_examples)
        self.check_num_examples(self.num_examples)  # an impossible rank split is refused here, not at len()/iter()

    def plan_epoch(self, generator: torch.Generator) -> list[list[int]]:
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        return [order[i : i + self.batch_size] for i in range(0, self.num_examples, self.batch_size)]


def hard_negative_ids(
    teacher: TeacherViews,
    *,
    num_negatives: int = 8,
    range_min: int = 0,
    relative_margin: float | None = None,
    cross_group: bool = False,
) -> torch.Tensor:
    """``(N, num_negatives)``: for each query, the documents the teacher ranks highest after its own.

    The top ``range_min`` are skipped (likely near-duplicates, i.e. false negatives).
    ``cross_group=True`` mines only documents of other groups (``teacher.groups``, e.g.
    other modules: same-module neighbours are often near-duplicates).
    With ``relative_margin`` (NV-Retriever's TopK-PercPos, Moreira et al. 2024, arXiv
    2407.15831: 0.05 keeps negatives scoring at most 95% of the positive), candidates the
    teacher scores above ``pos - relative_margin * |pos|`` are dropped as likely false
    negatives, and so are candidates scoring 0 or less (no evidence of similarity);
    ``range_min`` then counts survivors, the search goes ``10 * num_negatives`` deep past
    it, and rows with too few survivors are padded with -1.
    """
    if relative_margin is None:
        _, ids = teacher.neighbours(range_min + num_negatives, between="query_document", cross_group=cross_group)
        return ids[:, range_min:]
    outside = len(teacher) - (int(torch.bincount(teacher.groups).max()) if cross_group and teacher.groups is not None else 1)
    depth = min(outside, range_min + 10 * num_negatives)
    scores, ids = teacher.neighbours(depth, between="query_document", cross_group=cross_group)
    positive = teacher.positive_scores().unsqueeze(1)
    keep = (scores <= positive - float(relative_margin) * positive.abs()) & (scores > 0)
    rank = keep.long().cumsum(dim=1) - 1  # rank among the survivors
    keep &= (rank >= range_min) & (rank < range_min + num_negatives)
    out = torch.full((len(teacher), num_negatives), -1, dtype=torch.long)
    rows, cols = keep.nonzero(as_tuple=True)
    out[rows, rank[rows, cols] - range_min] = ids[rows, cols]
    return out


def make_sampler(
    name: str,
    teacher: TeacherViews | torch.Tensor | None,
    *,
    batch_size: int,
    seed: int = 0,
    num_examples: int | None = None,
    drop_last: bool = True,
    **options: Any,
) -> GlobalBatchSampler:
    """Build a batch sampler by name.

    Parameters
    ----------
    name : "random" | "cluster" | "community" | "hard_negative" | "tas"
    teacher : TeacherViews or Tensor (N, d)
        Teacher embeddings (ignored by ``"random"``, which then needs ``num_examples``).
    batch_size, seed, drop_last :
        As in every batchlab sampler.
    options :
        Sampler settings: ``group_size`` and ``rank_window`` (community; defaults 8 and
        (2, 34), scaled down from B3's 32 and (30, 130) for a few thousand examples),
        ``cluster_size`` (cluster; default 8), ``num_negatives``, ``range_min``,
        ``relative_margin`` and ``max_neighbourhood_fraction`` (hard_negative; defaults 8,
        0, None and 0.25; see :func:`hard_negative_ids`). For community and hard_negative:
        ``cross_group=True`` builds from the teacher's neighbours in other groups only
        (``teacher.groups``, e.g. modules); ``mix_random`` (default 0) fills that share of
        every batch with uniformly random examples and the rest from the named sampler
        (:class:`~batchlab.samplers.mixed.MixedBatchSampler`; group sizes and the
        neighbourhood cap keep their size in examples). ``n_clusters`` and ``method``
        (tas: TAS-Balanced topic batches over the teacher's query embeddings; defaults one
        topic per 200 queries and ``"balanced"``).
    """
    if name not in SAMPLERS:
        raise BatchlabInputError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    resolved_options(name, options)  # an option this sampler does not take is an error, not ignored
    given, options = options, {**SAMPLER_DEFAULTS[name], **options}
    if isinstance(teacher, torch.Tensor):
        teacher = TeacherViews(teacher)
    if name == "random":
        n = num_examples if num_examples is not None else (len(teacher) if teacher is not None else None)
        if n is None:
            raise BatchlabInputError("the random sampler needs num_examples (or teacher embeddings to count them)")
        return RandomBatchSampler(n, batch_size, seed=seed, drop_last=drop_last)
    if teacher is None:
        raise BatchlabInputError(f"the {name!r} sampler needs teacher embeddings; pass teacher='tfidf' or a tensor")
    mix = float(options.pop("mix_random", 0.0) or 0.0)
    given.pop("mix_random", None)
    if mix:
        from batchlab.samplers.mixed import MixedBatchSampler, random_share

        structured = batch_size - random_share(batch_size, mix)
        if name == "hard_negative":  # the cap on one neighbourhood keeps its size in examples
            fraction = options["max_neighbourhood_fraction"] * batch_size / structured
            given["max_neighbourhood_fraction"] = min(1.0, fraction)
        base = make_sampler(name, teacher, batch_size=structured, seed=seed, drop_last=True, **given)
        return MixedBatchSampler(base, len(teacher), batch_size=batch_size, mix_random=mix, seed=seed, drop_last=drop_last)
    cross_group = bool(options.get("cross_group", False))
    if name == "cluster":
        if cross_group:
            raise BatchlabInputError("cross_group applies to the community and hard_negative samplers, not to cluster")
        from batchlab.samplers import ClusterBatchSampler

        return ClusterBatchSampler(
            teacher.pairs, batch_size, cluster_size=options["cluster_size"], seed=seed, drop_last=drop_last
        )
    if name == "tas":
        if cross_group:
            raise BatchlabInputError("cross_group applies to the community and hard_negative samplers, not to tas")
        from batchlab.samplers import TASBalancedBatchSampler

        n_clusters = options["n_clusters"] or max(1, len(teacher) // 200)
        return TASBalancedBatchSampler(teacher.queries, batch_size, n_clusters=n_clusters, method=options["method"],
                                       seed=seed, drop_last=drop_last)
    if name == "community":
        from batchlab.samplers.community_sampler import CommunityBatchSampler

        window = tuple(options["rank_window"])
        return CommunityBatchSampler(
            None,
            batch_size,
            group_size=options["group_size"],
            rank_window=window,
            seed=seed,
            drop_last=drop_last,
            neighbours=teacher.neighbours(min(window[1], len(teacher) - 1), cross_group=cross_group),
        )
    from batchlab.samplers.hard_negatives import HardNegativeBatchSampler

    ids = options["negative_ids"]
    if ids is None:
        ids = hard_negative_ids(teacher, num_negatives=options["num_negatives"], range_min=options["range_min"],
                                relative_margin=options["relative_margin"], cross_group=cross_group)
    return HardNegativeBatchSampler(
        ids, batch_size, max_neighbourhood_fraction=options["max_neighbourhood_fraction"], seed=seed, drop_last=drop_last
    )


class SamplerSchedule:
    """The batch sampler of each epoch: ``schedule(epoch) -> sampler``.

    Parameters
    ----------
    sampler :
        A name for :func:`make_sampler`, a ready sampler instance (used every epoch), or
        a factory ``fn(teacher_views, epoch) -> sampler`` (called every epoch).
    views :
        The teacher's :class:`~batchlab.recipes.teachers.TeacherViews` (None for ``"random"``
        or when ``model_views`` supplies them).
    model_views :
        When given, the teacher is the model itself: the first epoch uses random batches,
        then ``model_views()`` re-embeds the training set every ``refresh_every`` epochs
        and the sampler is rebuilt from it (NGAME-style refresh).
    random_epochs :
        A curriculum: the first ``random_epochs`` epochs use random batches, the later
        ones the named sampler (hard batches once the model has learned the easy
        distinctions). Default 0; with ``model_views`` at least the first epoch is random.
    batch_size, num_examples, seed, options :
        For :func:`make_sampler`.
    """

    def __init__(
        self,
        sampler: Any,
        views: TeacherViews | None,
        *,
        batch_size: int,
        num_examples: int,
        seed: int = 0,
        model_views: Callable[[], TeacherViews] | None = None,
        refresh_every: int = 1,
        random_epochs: int = 0,
        options: dict[str, Any] | None = None,
    ) -> None:
        if int(random_epochs) < 0:
            raise BatchlabInputError(f"random_epochs must be >= 0, got {random_epochs}")
        if not isinstance(sampler, str) and not callable(sampler) and getattr(sampler, "batch_size", batch_size) != batch_size:
            raise BatchlabInputError(
                f"the sampler builds batches of {sampler.batch_size} but the recipe needs batches of {batch_size} "
                f"(with JEST: super-batches of batch_size / (1 - filter_ratio)); build the sampler with "
                f"batch_size={batch_size}"
            )
        self.sampler, self.views, self.model_views = sampler, views, model_views
        self.batch_size, self.num_examples, self.seed = batch_size, num_examples, seed
        self.refresh_every = check_positive_int("refresh_every", refresh_every)
        self.options = dict(options or {})
        self.random_epochs = int(random_epochs)
        if model_views is not None and not (isinstance(sampler, str) and sampler == "random"):
            self.random_epochs = max(1, self.random_epochs)  # no model teacher before the model has trained
        self._built: GlobalBatchSampler | None = None
        self._random: GlobalBatchSampler | None = None

    def _make(self, epoch: int):
        if isinstance(self.sampler, str):
            return make_sampler(
                self.sampler, self.views, batch_size=self.batch_size, seed=self.seed,
                num_examples=self.num_examples, **self.options,
            )
        return self.sampler(self.views, epoch)

    def __call__(self, epoch: int):
        if epoch < self.random_epochs:
            if self._random is None:
                self._random = make_sampler("random", None, batch_size=self.batch_size, seed=self.seed,
                                            num_examples=self.num_examples)
            return self._random
        if not isinstance(self.sampler, str) and not callable(self.sampler):
            return self.sampler  # a ready sampler instance
        if self.model_views is not None and self.sampler != "random":
            if self._built is None or epoch % self.refresh_every == 0:
                logger.info("refreshing the teacher from the model's embeddings (epoch %d)", epoch)
                self.views, self._built = self.model_views(), None
        if self._built is None or not isinstance(self.sampler, str):
            self._built = self._make(epoch)
        return self._built


class ModelTeacher:
    """The model as teacher, exact on resume: ``teacher()`` gives ``views()`` (the model's embeddings of the
    training set) and remembers the weights it embedded with; :meth:`checkpoint_state` puts them in every
    checkpoint, and :meth:`resume` makes the first call after a resume embed with the saved weights when
    the resumed epoch reuses an earlier epoch's batches (``refresh_every`` > 1), not with the current ones.
    """

    def __init__(self, model: torch.nn.Module, views: Callable[[], TeacherViews]) -> None:
        self.model, self.views = model, views
        self._now: dict[str, torch.Tensor] | None = None
        self._pending: dict[str, torch.Tensor] | None = None

    def __call__(self) -> TeacherViews:
        pending, current = self._pending, None
        self._pending = None
        if pending is not None:
            current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(pending)
        try:
            views = self.views()
            self._now = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        finally:
            if current is not None:
                self.model.load_state_dict(current)
        return views

    def resume(self, state: dict[str, Any] | None, schedule: SamplerSchedule) -> None:
        """Arm the saved teacher weights of checkpoint ``state`` if the epoch it resumes at does not refresh."""
        epoch = int(state["epoch"]) if state is not None else 0
        if state is not None and state.get("teacher_model") is not None and epoch > schedule.random_epochs \
                and epoch % schedule.refresh_every != 0:
            self._pending = state["teacher_model"]

    def checkpoint_state(self) -> dict[str, Any]:
        return {"teacher_model": self._now}

