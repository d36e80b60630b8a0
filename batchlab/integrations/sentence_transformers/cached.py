"""Gradient-cached losses: sentence-transformers' ``Cached*`` classes on batchlab's ``EmbeddingCache``.

The three GradCache phases (encode every mini-batch without a graph; compute the loss
on all the embeddings and backpropagate to them; re-encode each mini-batch with
autograd and push its cached gradient) are :class:`batchlab.losses.EmbeddingCache`'s.
The loss phase is batchlab's (one ``info_nce`` over the whole batch, reference, tiled
or Triton), where sentence-transformers loops over ``mini_batch_size`` rows of the
score matrix with a backward per chunk. As in sentence-transformers, ``forward`` returns
the (detached) loss with a hook: the trainer's ``loss.backward()`` runs the re-encode
phase, scaled by the gradient it receives (gradient accumulation, fp16 loss scaling).
Between the two, only the embeddings' gradients are kept, and on CUDA (``offload_gradients=None``;
True / False force it) they wait in pinned host memory, coming back one mini-batch at a time:
the re-encode, where the step peaks, then holds one mini-batch's gradient on the GPU where
sentence-transformers holds the whole batch's (asynchronous copies, no host synchronisation).
Measured on an H200 at 65,536 pairs with MiniLM: step peak 0.93x sentence-transformers' (0.9994x
with ``offload_gradients=False``), step time unchanged (benchmarks/results/st-cached-h200-v3).

Constructor arguments and defaults are sentence-transformers 6.2's (plus keyword-only
``impl`` / ``distributed`` / ``loss_dtype`` / ``row_blocks`` / ``offload_gradients``).
``mini_batch_num_tokens`` (token-budget mini-batches) is not supported: ``EmbeddingCache``
cuts fixed-size chunks.

``CachedMultipleNegativesRankingLoss`` with its default ``directions=("query_to_doc",)``
(any number of hard-negative columns, one process or ``gather_across_devices=False``)
computes the loss phase in one pass over full-width row blocks
(:func:`batchlab.losses.row_block_info_nce`: three matrix products per logit, loss and
gradients together) on CUDA (``impl="auto"``) or
wherever ``impl="rows"`` asks (``row_blocks=RowBlocks(...)`` tunes it; ``products="3xtf32"``
opts in to TF32 tensor-core products, close to fp32 but not IEEE fp32); every other
configuration goes through batchlab's ``info_nce`` with ``impl``. ``loss_dtype=torch.bfloat16``
(opt-in) computes the loss phase on bf16 unit embeddings (batchlab's Triton kernels on CUDA):
faster, not fp32-exact. Measured on an H200 at 65,536 pairs (docs/sentence_transformers.md):
the default pass 4.3x sentence-transformers' loss phase in IEEE fp32, 15x in TF32; bf16 35x
with gradients within 1e-2 of fp32; 3xTF32 5.5x within 5.5e-5.

Example
-------
>>> from batchlab.integrations.sentence_transformers import CachedMultipleNegativesRankingLoss, tiny_model
>>> model = tiny_model()
>>> loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
>>> texts = ["a list", "read a file", "sort the keys"], ["the list", "open the file", "sort keys"]
>>> value = loss([model.preprocess(t) for t in texts], labels=None)
>>> value.backward()   # re-encodes the 2 + 1 mini-batches of each column
>>> on_device = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, offload_gradients=False)
>>> CachedMultipleNegativesRankingLoss(model, offload_gradients="host")
Traceback (most recent call last):
    ...
batchlab.errors.BatchlabInputError: offload_gradients must be None (on CUDA), True or False, got 'host'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from functools import partial
from typing import Any, Literal

import torch
from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss as _STCachedGISTEmbedLoss
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss as _STCachedMultipleNegativesRankingLoss,
)
from sentence_transformers.util import batch_to_device, cos_sim
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from batchlab._checks import check_choice
from batchlab.errors import BatchlabInputError
from batchlab.integrations.sentence_transformers._scores import cosine_rows, world_and_rank
from batchlab.integrations.sentence_transformers.losses import (
    IMPLS,
    STRATEGIES,
    MultipleNegativesRankingLoss,
    gist_loss,
)
from batchlab.losses import EmbeddingCache, RowBlocks, row_block_info_nce


def split_features(features: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(per-example tensors, everything else): only the first part is cut into mini-batches."""
    mask = features.get("attention_mask", features.get("input_ids"))
    if not isinstance(mask, Tensor) or mask.dim() == 0:
        raise BatchlabInputError(
            "cached losses cut tokenised columns into mini-batches along their first dimension; these features "
            f"have no 'input_ids'/'attention_mask' tensor (keys: {sorted(features)}), e.g. a flattened "
            "(cu_seq_lens) or StaticEmbedding batch: use the non-cached loss"
        )
    if "cu_seq_lens_q" in features:
        raise BatchlabInputError("flattened (cu_seq_lens_q) batches are not supported by batchlab's cached losses")
    rows = mask.shape[0]
    batched = {k: v for k, v in features.items() if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == rows}
    return batched, {k: v for k, v in features.items() if k not in batched}


def trim_padding(chunk: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop padding columns past the chunk's last real token (as sentence-transformers' mini-batches do)."""
    mask = chunk.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] == 0:
        return chunk
    active = mask.bool().any(0)
    if not bool(active.any()):
        return chunk
    width, last = mask.shape[1], int(active.nonzero().max()) + 1
    if last == width:
        return chunk
    return {k: (v[:, :last] if v.dim() >= 2 and v.shape[1] == width else v) for k, v in chunk.items()}


class ColumnEncoder:
    """``encoder(**chunk) -> (chunk, d)`` sentence embeddings: what ``EmbeddingCache`` calls per mini-batch.

    With a DDP-wrapped model, gradient synchronisation is switched off for every
    re-encoded mini-batch but the last of the step (``sync_on``), so DDP all-reduces once.
    """

    def __init__(self, model, static: dict[str, Any], replay: "ReplaySync") -> None:
        self.model, self.static, self.replay = model, static, replay

    def __call__(self, **chunk: Tensor) -> Tensor:
        features = {**trim_padding(chunk), **self.static}
        with self.replay.context(self.model):
            return self.model(features)["sentence_embedding"]


class ReplaySync:
    """Counts the re-encoded mini-batches so that DDP synchronises gradients on the last one only."""

    def __init__(self) -> None:
        self.remaining = 0

    def context(self, model):
        if not (isinstance(model, DistributedDataParallel) and torch.is_grad_enabled()):
            return nullcontext()
        self.remaining -= 1
        return nullcontext() if self.remaining == 0 else model.no_sync()


def gradient_cached(loss_module, sentence_features: Iterable[dict[str, Tensor]], labels, extra=None) -> Tensor:
    """The three GradCache phases around ``loss_module.calculate_loss``; returns the loss with the replay hook.

    ``extra`` (the guide embeddings for GIST) is passed to ``calculate_loss`` after the model's embeddings.
    """
    features = list(sentence_features)
    if len(features) < 2:
        raise BatchlabInputError(f"{type(loss_module).__name__} needs at least 2 columns, got {len(features)}")
    parts = [split_features(f) for f in features]
    replay = ReplaySync()
    cache = EmbeddingCache([ColumnEncoder(loss_module.model, static, replay) for _, static in parts],
                           chunk_size=loss_module.mini_batch_size, progress=loss_module.show_progress_bar)
    embeddings = cache.encode(*[batched for batched, _ in parts])
    reps = [[e] for e in embeddings]  # sentence-transformers' layout: per column, a list of mini-batches
    args = (reps, extra) if extra is not None else (reps, labels)
    if not torch.is_grad_enabled():
        return loss_module.calculate_loss(*args)
    loss = loss_module.calculate_loss(*args, with_backward=True)
    unused = [str(i) for i, e in enumerate(embeddings) if e.grad is None]
    if unused:
        raise BatchlabInputError(f"the loss did not use input column(s) {', '.join(unused)}; remove them from the dataset")
    replay.remaining = sum(-(-e.shape[0] // loss_module.mini_batch_size) for e in embeddings)
    # the embeddings die with this frame: the re-encode holds their gradients only (on the host: one chunk at a time)
    offload = loss_module.offload_gradients
    cache.keep_gradients(offload=embeddings[0].is_cuda if offload is None else offload)
    loss = loss.detach().requires_grad_()
    loss.register_hook(partial(_replay, cache=cache))
    return loss


def _replay(grad_output: Tensor, *, cache: EmbeddingCache) -> None:
    """Phase 3, run by the trainer's backward: re-encode with the cached gradients times ``grad_output``."""
    with torch.enable_grad():
        cache.backward(scale=grad_output)


def joined(parts: list[Tensor]) -> Tensor:
    """One column's embeddings from its mini-batches (no copy when there is one part, as from ``EmbeddingCache``)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


#: ``impl`` values of the cached MNRL: batchlab's ``info_nce`` ones plus "rows" (the row-block pass, any device).
CACHED_IMPLS = (*IMPLS, "rows")
#: ``loss_dtype`` values: None (the embeddings' own, fp32 for an fp32 model) or a dtype to cast unit embeddings to.
LOSS_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def check_offload(offload_gradients: bool | None) -> None:
    """``offload_gradients`` of the cached losses: None (host memory for CUDA embeddings), True or False."""
    if offload_gradients is not None and not isinstance(offload_gradients, bool):  # 1 == True: refused too
        raise BatchlabInputError(f"offload_gradients must be None (on CUDA), True or False, got {offload_gradients!r}")


def check_no_token_budget(mini_batch_num_tokens: int | None) -> None:
    if mini_batch_num_tokens is not None:
        raise BatchlabInputError(
            "mini_batch_num_tokens (token-budget mini-batches) is not supported by batchlab's cached losses; "
            "use mini_batch_size, or sentence-transformers' own cached loss"
        )


class CachedMultipleNegativesRankingLoss(_STCachedMultipleNegativesRankingLoss):
    """GradCache InfoNCE: sentence-transformers' constructor, batchlab's ``EmbeddingCache`` and loss."""

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        gather_across_devices: bool = False,
        directions: tuple[Literal["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"], ...] = (
            "query_to_doc",
        ),
        partition_mode: Literal["joint", "per_direction"] = "joint",
        show_progress_bar: bool = False,
        hardness_mode: Literal["in_batch_negatives", "hard_negatives", "all_negatives"] | None = None,
        hardness_strength: float = 0.0,
        *,
        impl: str = "auto",
        distributed: str = "auto",
        loss_dtype: torch.dtype | None = None,
        row_blocks: RowBlocks | None = None,
        offload_gradients: bool | None = None,
    ) -> None:
        check_choice("impl", impl, CACHED_IMPLS)
        check_offload(offload_gradients)
        if row_blocks is not None and not isinstance(row_blocks, RowBlocks):
            raise BatchlabInputError(f"row_blocks must be a RowBlocks, got {type(row_blocks).__name__}")
        check_choice("distributed", distributed, STRATEGIES)
        if loss_dtype not in LOSS_DTYPES:
            raise BatchlabInputError(f"loss_dtype must be one of {LOSS_DTYPES}, got {loss_dtype!r}")
        check_no_token_budget(mini_batch_num_tokens)
        batchlab_loss = MultipleNegativesRankingLoss(
            model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices,
            directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength, impl="auto" if impl == "rows" else impl, distributed=distributed)
        try:
            super().__init__(model, scale=scale, similarity_fct=similarity_fct, mini_batch_size=mini_batch_size,
                             mini_batch_num_tokens=mini_batch_num_tokens,
                             gather_across_devices=gather_across_devices, directions=directions,
                             partition_mode=partition_mode, show_progress_bar=show_progress_bar)
        except ValueError as exc:
            raise BatchlabInputError(str(exc)) from None
        self.loss = batchlab_loss  # the wrapped loss owns the hyperparameters, as in sentence-transformers
        self.impl, self.distributed, self.loss_dtype = impl, distributed, loss_dtype
        #: How the row-block pass cuts its work (buffer, split GEMM, Triton row kernel, products): a ``RowBlocks``.
        self.row_blocks = row_blocks or RowBlocks()
        #: Where the cached embedding gradients wait for the re-encode (None: host memory on CUDA).
        self.offload_gradients = offload_gradients

    def uses_row_blocks(self, embeddings: list[Tensor]) -> bool:
        """Whether the loss phase of these embeddings takes the row-block pass (see the module docstring)."""
        e = embeddings[0]
        return (
            (self.impl == "rows" or (self.impl == "auto" and e.is_cuda))
            and self.loss_dtype in (None, torch.float32)
            and set(self.directions) == {"query_to_doc"}
            and not (self.gather_across_devices and world_and_rank()[0] > 1)
            and len(embeddings) >= 2
            and len({x.shape[0] for x in embeddings}) == 1
            and all(x.dtype in (torch.float32, torch.float64) and x.dtype == e.dtype for x in embeddings)
        )

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss of the whole batch (batchlab's, in one piece) from per-column lists of mini-batch embeddings."""
        embeddings = [joined(r) for r in reps]
        if self.uses_row_blocks(embeddings):
            loss = self._row_block_loss(embeddings)
        else:
            if self.loss_dtype is not None:
                embeddings = [cosine_rows(e).to(self.loss_dtype) for e in embeddings]
            loss = self.loss.compute_loss_from_embeddings(embeddings, labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def _row_block_loss(self, embeddings: list[Tensor]) -> Tensor:
        """The row-block pass on unit rows (a function of its own: the unit copies die before the backward)."""
        docs = [cosine_rows(e) for e in embeddings[1:]]
        keys = docs[0] if len(docs) == 1 else torch.cat(docs)
        return row_block_info_nce(cosine_rows(embeddings[0]), keys, self.scale, config=self.row_blocks)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        return gradient_cached(self, sentence_features, labels)

    def get_config_dict(self) -> dict[str, Any]:
        extra = {} if self.loss_dtype is None else {"loss_dtype": str(self.loss_dtype).removeprefix("torch.")}
        return {**super().get_config_dict(), "impl": self.impl, **extra}


class CachedGISTEmbedLoss(_STCachedGISTEmbedLoss):
    """GradCache GISTEmbed: sentence-transformers' constructor, batchlab's ``EmbeddingCache`` and loss."""

    def __init__(
        self,
        model,
        guide,
        temperature: float = 0.01,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
        margin_strategy: Literal["absolute", "relative"] = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
        *,
        impl: str = "auto",
        offload_gradients: bool | None = None,
    ) -> None:
        check_choice("impl", impl, IMPLS)
        check_offload(offload_gradients)
        check_no_token_budget(mini_batch_num_tokens)
        try:
            super().__init__(model, guide, temperature=temperature, mini_batch_size=mini_batch_size,
                             mini_batch_num_tokens=mini_batch_num_tokens, show_progress_bar=show_progress_bar,
                             margin_strategy=margin_strategy, margin=margin, contrast_anchors=contrast_anchors,
                             contrast_positives=contrast_positives, gather_across_devices=gather_across_devices)
        except ValueError as exc:
            raise BatchlabInputError(str(exc)) from None
        self.impl = impl
        #: Where the cached embedding gradients wait for the re-encode (None: host memory on CUDA).
        self.offload_gradients = offload_gradients

    def guide_column(self, features: dict[str, Any]) -> Tensor:
        """The guide's embeddings of one column, mini-batch by mini-batch, without a graph."""
        batched, static = split_features(features)
        rows = next(iter(batched.values())).shape[0]
        out = []
        with torch.no_grad():
            for start in range(0, rows, self.mini_batch_size):
                chunk = {**trim_padding({k: v[start:start + self.mini_batch_size] for k, v in batched.items()}),
                         **static}
                if self.must_retokenize:
                    decoded = self.tokenizer.batch_decode(chunk["input_ids"], skip_special_tokens=True)
                    chunk = batch_to_device(self.guide.preprocess(decoded), self.guide.device)
                out.append(self.guide(chunk)["sentence_embedding"])
        return torch.cat(out)

    def calculate_loss(self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *,
                       with_backward: bool = False) -> Tensor:
        loss = gist_loss(self, [joined(r) for r in reps], [joined(r) for r in reps_guided], impl=self.impl,
                         max_columns=None)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        features = list(sentence_features)
        guides = [[self.guide_column(dict(f))] for f in features]
        return gradient_cached(self, features, labels, extra=guides)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "impl": self.impl}
