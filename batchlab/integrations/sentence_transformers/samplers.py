"""Batch samplers the ``SentenceTransformerTrainer`` accepts, built on batchlab's samplers.

The trainer calls ``args.batch_sampler(dataset, batch_size=..., drop_last=...,
valid_label_columns=..., generator=..., seed=...)`` (a ``DefaultBatchSampler``
subclass or any callable with those arguments). :class:`BatchlabBatchSampler` is such a
subclass; :func:`batch_sampler` binds its batchlab options into the callable the
trainer wants::

    args = SentenceTransformerTrainingArguments(
        ..., batch_sampler=batch_sampler("community", teacher=model, group_size=8))

Kinds: ``"community"`` (B3, :class:`~batchlab.samplers.CommunityBatchSampler`),
``"hard_negatives"`` (:class:`~batchlab.samplers.HardNegativeBatchSampler` on negatives
mined from the teacher), ``"cluster"`` (NGAME, :class:`~batchlab.samplers.ClusterBatchSampler`),
``"tas"`` (:class:`~batchlab.samplers.TASBalancedBatchSampler`) and ``"random"``; any of
them with ``mix_random=`` becomes a :class:`~batchlab.samplers.MixedBatchSampler`.
The teacher is any ``SentenceTransformer``: a separate model, or the model being
trained (``teacher=model``; ``refresh_every=k`` re-encodes with it every ``k`` epochs,
as NGAME/ANCE do). Precomputed ``embeddings=`` work too.

Distributed training (accelerate / ``torchrun``)
------------------------------------------------
accelerate wraps every batch sampler in its ``BatchSamplerShard``, which hands batch
``j`` of the sampler to rank ``j % world_size``. A sampler that shards by itself (as
batchlab's do with ``num_replicas``) is therefore sharded twice: rank 0 sees half of its
own half. :class:`BatchlabBatchSampler` never shards: it builds each *global* batch
(``batch_size x world_size``, the batch the loss sees with ``gather_across_devices``) and
yields its ``world_size`` contiguous per-rank slices one after the other, so
accelerate's round robin gives rank ``r`` exactly slice ``r`` of every global batch.
Every example is seen once per epoch across ranks, and every process builds the same
plan (same seed; teacher embeddings are broadcast from rank 0). With accelerate's
``split_batches=True`` pass ``split_batches=True`` here: the sampler then yields whole
global batches and accelerate cuts them.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from sentence_transformers.base.sampler import DefaultBatchSampler

from batchlab._checks import check_choice, check_embeddings, check_positive_int
from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.samplers import (
    ClusterBatchSampler,
    CommunityBatchSampler,
    GlobalBatchSampler,
    HardNegativeBatchSampler,
    MixedBatchSampler,
    TASBalancedBatchSampler,
)
from batchlab.samplers.mining import mine_hard_negatives as mine_ids

logger = logging.getLogger(__name__)

KINDS = ("community", "hard_negatives", "cluster", "tas", "random")
_CLASSES = {"community": CommunityBatchSampler, "hard_negatives": HardNegativeBatchSampler,
            "cluster": ClusterBatchSampler, "tas": TASBalancedBatchSampler}
#: options of :func:`batchlab.samplers.mine_hard_negatives` that ``kind="hard_negatives"`` passes on
MINING_OPTIONS = ("num_negatives", "range_min", "range_max", "absolute_margin", "relative_margin",
                  "max_score", "min_score", "sampling")
#: arguments the wrapper sets itself (never taken from ``**options``)
_OWN = ("embeddings", "query_embeddings", "negative_ids", "batch_size", "drop_last", "seed", "num_replicas",
        "rank", "self")


class _RandomBatches(GlobalBatchSampler):
    """Uniformly shuffled batches (the trainer's default), under the same contract."""

    RESUME_SETTINGS = ("num_examples",)

    def __init__(self, num_examples: int, batch_size: int, **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.num_examples = check_positive_int("num_examples", num_examples)

    def plan_epoch(self, generator: torch.Generator) -> list[list[int]]:
        return [c.tolist() for c in torch.randperm(self.num_examples, generator=generator).split(self.batch_size)]


def world_size() -> int:
    """Processes that will share each global batch (accelerate's / torchrun's process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def same_on_every_rank(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's copy of ``x`` on every rank, so that every process plans the same batches."""
    if world_size() == 1:
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    y = x.detach().to(device).contiguous()
    dist.broadcast(y, src=0)
    return y.to(x.device)


def encode_columns(teacher, dataset, columns: list[str], *, encode_batch_size: int = 256,
                   show_progress_bar: bool = False) -> list[torch.Tensor]:
    """Unit-length ``(N, d)`` teacher embeddings of each named dataset column (CPU float32)."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise BatchlabInputError(
            f"the dataset has no column(s) {missing} to embed (it has {dataset.column_names}); "
            "pass columns=[...] naming the text columns"
        )
    out = []
    for column in columns:
        emb = teacher.encode(list(dataset[column]), batch_size=encode_batch_size, convert_to_tensor=True,
                             normalize_embeddings=True, show_progress_bar=show_progress_bar)
        out.append(same_on_every_rank(emb.float().cpu()))
    return out


class BatchlabBatchSampler(DefaultBatchSampler):
    """A batchlab sampler behind the interface the ``SentenceTransformerTrainer`` expects.

    Parameters
    ----------
    dataset, batch_size, drop_last, valid_label_columns, generator, seed:
        What the trainer passes. ``batch_size`` is the per-device batch; the global
        batch is ``batch_size x world_size``. ``seed`` seeds the plans (the generator is
        not used: plans depend only on ``(seed, epoch)``, the same on every rank).
    kind:
        One of :data:`KINDS`.
    teacher:
        A ``SentenceTransformer`` whose embeddings shape the batches (may be the model
        being trained). Not needed for ``"random"`` or with ``embeddings=``.
    columns:
        Dataset columns to embed: default the first two columns (anchor, positive) for
        ``"community"`` and ``"hard_negatives"``, the first for ``"cluster"`` and ``"tas"``.
    embeddings:
        Precomputed ``(N, d)`` teacher embeddings (or a tuple, one per column), instead of ``teacher``.
    refresh_every:
        Re-encode with ``teacher`` every ``refresh_every`` epochs (``set_epoch``), 0 = never.
    mix_random:
        Share of each batch drawn uniformly at random (:class:`~batchlab.samplers.MixedBatchSampler`).
    split_batches:
        True when accelerate runs with ``split_batches=True``.
    embeddings_dir:
        A folder (for instance inside ``output_dir``) where every teacher encoding is saved
        (``teacher-<texts hash>-epoch<e>.npz``) and read back instead of re-encoding. Needed for
        ``resume_from_checkpoint`` with ``teacher=model``: the resumed trainer builds its
        sampler after loading the checkpoint's weights, so without the saved embeddings it
        plans other batches than the interrupted run (examples repeated and missed in the
        resumed epoch). Files of an earlier run on the same texts are reused: use a fresh
        folder for a fresh run.
    **options:
        The batchlab sampler's own options (``group_size``, ``rank_window``, ``method``,
        ``cluster_size``, ``n_clusters``, ``clusters_per_batch``, ``max_neighbourhood_fraction``,
        ...), and for ``"hard_negatives"`` the mining options :data:`MINING_OPTIONS`.
        Unknown names are errors.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        *,
        kind: str = "random",
        teacher=None,
        columns: list[str] | None = None,
        embeddings: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        refresh_every: int = 0,
        mix_random: float = 0.0,
        split_batches: bool = False,
        encode_batch_size: int = 256,
        embeddings_dir: str | Path | None = None,
        **options: Any,
    ) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=valid_label_columns,
                         generator=generator, seed=seed)
        self.kind = check_choice("kind", kind, KINDS)
        self.world = world_size()
        self.split_batches = bool(split_batches)
        self.global_batch_size = check_positive_int("batch_size", batch_size) * self.world
        if self.split_batches:  # accelerate cuts our batches itself: it reads this attribute
            self.batch_size = self.global_batch_size
        self.dataset, self.num_examples = dataset, len(dataset)
        self.teacher, self.encode_batch_size = teacher, encode_batch_size
        self.embeddings_dir = None if embeddings_dir is None else Path(embeddings_dir)
        self._encoded_for = 0  # the epoch whose teacher encoding the plans use
        self.columns = list(columns) if columns is not None else self._default_columns(dataset)
        self.refresh_every = check_positive_int("refresh_every", refresh_every, minimum=0)
        self.mix_random = float(mix_random)
        self.options = self._check_options(options)
        if self.kind != "random" and teacher is None and embeddings is None:
            raise BatchlabInputError(
                f"kind={kind!r} needs teacher embeddings: pass teacher=<SentenceTransformer> (the model being "
                "trained works) or embeddings=<(N, d) tensor>"
            )
        if embeddings is not None:
            embeddings = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
            self._check_rows(embeddings)
            embeddings = [same_on_every_rank(e) for e in embeddings]
        self.inner = self._build(embeddings)

    # -- construction ------------------------------------------------------------
    def _default_columns(self, dataset) -> list[str]:
        names = [c for c in dataset.column_names if c not in (self.valid_label_columns or [])]
        return names[:2] if self.kind in ("community", "hard_negatives") else names[:1]

    def _check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "random":
            allowed: set[str] = set()
        else:
            allowed = set(inspect.signature(_CLASSES[self.kind].__init__).parameters) - set(_OWN)
            if self.kind == "hard_negatives":
                allowed |= set(MINING_OPTIONS)
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise BatchlabInputError(
                f"kind={self.kind!r} does not take option(s) {unknown}; it takes {sorted(allowed) or 'none'}"
            )
        return dict(options)

    def _check_rows(self, embeddings: list[torch.Tensor]) -> None:
        """One embedding row per dataset row: a plan over more rows names indices past the dataset
        (under a ``DatasetDict``, rows of the next dataset in the trainer's concatenation)."""
        for i, e in enumerate(embeddings):
            check_embeddings(f"embeddings[{i}]", e, finite=False)
            if e.shape[0] != self.num_examples:
                raise BatchlabInputError(
                    f"embeddings[{i}] has {e.shape[0]} rows but the dataset has {self.num_examples}: give one row "
                    "per dataset row (the trainer builds a sampler from the same batch_sampler= for eval_dataset "
                    "and for each dataset of a DatasetDict: pass teacher= there instead of embeddings=)"
                )

    def _embeddings(self) -> list[torch.Tensor]:
        path = self._saved_path()
        if path is not None and path.is_file():
            logger.info("teacher embeddings for epoch %d read from %s", self._encoded_for, path)
            return [same_on_every_rank(e) for e in self._read(path)]
        out = encode_columns(self.teacher, self.dataset, self.columns, encode_batch_size=self.encode_batch_size)
        if path is not None and (world_size() == 1 or dist.get_rank() == 0):
            self._write(path, out)
        return out

    def _saved_path(self) -> Path | None:
        if self.embeddings_dir is None:
            return None
        h = hashlib.blake2b(digest_size=8)
        for column in self.columns:
            h.update(json.dumps([column, list(self.dataset[column])], default=str).encode())
        return self.embeddings_dir / f"teacher-{h.hexdigest()}-epoch{self._encoded_for}.npz"

    def _write(self, path: Path, embeddings: list[torch.Tensor]) -> None:
        import numpy as np

        from batchlab._artifacts import array_hash, atomic_file

        arrays = {f"column{i}": e.numpy() for i, e in enumerate(embeddings)}
        meta = {"columns": self.columns, "n": self.num_examples, "arrays": {k: array_hash(a) for k, a in arrays.items()}}
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays, meta=np.array(json.dumps(meta)))

    def _read(self, path: Path) -> list[torch.Tensor]:
        from batchlab._artifacts import array_hash, read_npz

        fix = "delete it to re-encode with the teacher"
        names = [f"column{i}" for i in range(len(self.columns))]
        raw = read_npz(path, ["meta", *names], what="teacher-embeddings", rebuild=fix)
        try:
            meta = json.loads(str(raw["meta"]))
            hashes = meta["arrays"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StaleArtifactError(f"{path}: unreadable metadata ({exc}); {fix}") from exc
        for name in names:
            a = raw[name]
            if hashes.get(name) != array_hash(a) or a.ndim != 2 or a.shape[0] != self.num_examples:
                raise StaleArtifactError(
                    f"{path}: {name} (shape {a.shape}) is not the {self.num_examples}-row array saved with it; {fix}"
                )
        return [torch.from_numpy(raw[name]) for name in names]

    def _build(self, embeddings: list[torch.Tensor] | None) -> GlobalBatchSampler:
        if self.kind != "random" and embeddings is None:
            embeddings = self._embeddings()
        size = self.global_batch_size - (round(self.mix_random * self.global_batch_size) if self.mix_random else 0)
        common = dict(seed=self.seed, drop_last=self.drop_last, num_replicas=1, rank=0)
        options = {k: v for k, v in self.options.items() if k not in MINING_OPTIONS}
        if self.kind == "random":
            inner = _RandomBatches(self.num_examples, size, **common)
        elif self.kind == "community":
            source = embeddings[0] if len(embeddings) == 1 else (embeddings[0], embeddings[1])
            inner = CommunityBatchSampler(source, size, **common, **options)
        elif self.kind == "hard_negatives":
            queries, corpus = embeddings[0], embeddings[-1]
            mining = {k: v for k, v in self.options.items() if k in MINING_OPTIONS}
            mining.setdefault("num_negatives", 8)
            mined = mine_ids(queries, corpus, [[i] for i in range(self.num_examples)], seed=self.seed,
                             progress=False, **mining)
            inner = HardNegativeBatchSampler(mined.negative_ids, size, **common, **options)
        elif self.kind == "cluster":
            inner = ClusterBatchSampler(embeddings[0], size, **common, **options)
        else:
            inner = TASBalancedBatchSampler(embeddings[0], size, **common, **options)
        if self.mix_random:
            inner = MixedBatchSampler(inner, self.num_examples, batch_size=self.global_batch_size,
                                      mix_random=self.mix_random, **common)
        return inner

    # -- the trainer's interface -------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        # the last refresh at or before this epoch (a resumed run may start past it)
        refreshed_at = epoch - epoch % self.refresh_every if self.refresh_every else 0
        if refreshed_at != self._encoded_for:
            if self.teacher is None:
                raise BatchlabInputError("refresh_every needs teacher= (the model whose embeddings to refresh)")
            logger.info("teacher embeddings of %d examples for epoch %d", self.num_examples, refreshed_at)
            self._encoded_for = refreshed_at
            self.inner = self._build(None)
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            if self.split_batches or self.world == 1:
                yield batch
                continue
            if len(batch) < self.world:
                logger.warning("dropping a last global batch of %d example(s): fewer than the %d ranks",
                               len(batch), self.world)
                continue
            base, extra = divmod(len(batch), self.world)
            start = 0
            for r in range(self.world):  # rank r's contiguous slice, in rank order (accelerate deals them out)
                stop = start + base + (1 if r < extra else 0)
                yield batch[start:stop]
                start = stop

    def __len__(self) -> int:
        if self.split_batches or self.world == 1:
            return len(self.inner)
        return self.world * sum(1 for b in self.inner.global_batches() if len(b) >= self.world)

    def state_dict(self, *, consumed: int | None = None) -> dict[str, Any]:
        """The wrapped batchlab sampler's state; ``consumed`` = the batches this rank's loop received.

        Under accelerate each rank receives one slice of every global batch, so the steps a
        rank's loop received are the global batches consumed: ``consumed`` passes through
        unchanged (see :meth:`batchlab.samplers.base.GlobalBatchSampler.state_dict`).
        """
        return self.inner.state_dict(consumed=consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def batch_sampler(kind: str, **options: Any) -> Callable[..., BatchlabBatchSampler]:
    """The ``batch_sampler=`` value for ``SentenceTransformerTrainingArguments``: a :class:`BatchlabBatchSampler` factory.

    >>> make = batch_sampler("random")
    >>> from datasets import Dataset
    >>> sampler = make(Dataset.from_dict({"anchor": list("abcde"), "positive": list("vwxyz")}),
    ...                batch_size=2, drop_last=False, seed=0)
    >>> sorted(i for b in sampler for i in b)
    [0, 1, 2, 3, 4]
    """
    check_choice("kind", kind, KINDS)
    return functools.partial(BatchlabBatchSampler, kind=kind, **options)
