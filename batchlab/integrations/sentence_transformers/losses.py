"""sentence-transformers' in-batch losses, computed by batchlab's InfoNCE.

Each class takes exactly the constructor arguments (and defaults) of the
sentence-transformers 6.2 class of the same name, subclasses it (so the trainer, the
model card and ``get_config_dict`` see the class they know), and replaces only the
loss computation: the similarity blocks become one :func:`batchlab.losses.info_nce`
problem (reference, tiled or Triton, ``impl=``), and ``gather_across_devices`` goes
through batchlab's gather-with-gradient (pairs with no extra blocks: through
``info_nce(distributed=...)``, the ring or the all-gather strategy). Values and
gradients equal sentence-transformers' own (``tests/integrations/test_losses.py``).

Two batchlab options are added, keyword-only: ``impl`` ("auto", "reference",
"tiled", "triton") and ``distributed`` (the strategy for ``gather_across_devices``:
"auto", "allgather", "ring").

Not computed by batchlab, refused at construction with a ``BatchlabInputError``:
a ``similarity_fct`` other than ``cos_sim`` and ``hardness_mode`` with a non-zero
``hardness_strength`` (its penalty adds a stop-gradient term to the logits, which InfoNCE
has no slot for); use the sentence-transformers class for those.

Example
-------
>>> from batchlab.integrations.sentence_transformers import MultipleNegativesRankingLoss, tiny_model
>>> model = tiny_model()
>>> loss = MultipleNegativesRankingLoss(model)
>>> features = [model.preprocess(["a list", "read a file"]), model.preprocess(["the list", "open the file"])]
>>> value = loss(features, labels=None)
>>> value.backward()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss as _STGISTEmbedLoss
from sentence_transformers.sentence_transformer.losses import (
    MultipleNegativesRankingLoss as _STMultipleNegativesRankingLoss,
)
from sentence_transformers.util import batch_to_device, cos_sim
from torch import Tensor

from batchlab._checks import check_choice
from batchlab.errors import BatchlabInputError
from batchlab.integrations.sentence_transformers._scores import Gathered, JointRows, cosine_rows, world_and_rank
from batchlab.losses import info_nce

IMPLS = ("auto", "reference", "tiled", "triton")
STRATEGIES = ("auto", "allgather", "ring")


def check_batchlab_options(impl: str, distributed: str) -> None:
    check_choice("impl", impl, IMPLS)
    check_choice("distributed", distributed, STRATEGIES)


def check_cosine(similarity_fct: Callable, loss_name: str) -> None:
    if similarity_fct is not cos_sim:
        name = getattr(similarity_fct, "__name__", type(similarity_fct).__name__)
        raise BatchlabInputError(
            f"batchlab's {loss_name} computes cosine similarities (similarity_fct=cos_sim), got {name}; "
            f"use sentence_transformers.losses.{loss_name} for other similarity functions"
        )


class MultipleNegativesRankingLoss(_STMultipleNegativesRankingLoss):
    """InfoNCE with in-batch negatives, sentence-transformers' constructor, batchlab's loss.

    Columns ``(anchor, positive, negative_1, ..., negative_n)``: every anchor is scored
    against the positives and negatives of the whole batch (all ranks with
    ``gather_across_devices``), as in sentence-transformers. Every ``directions`` /
    ``partition_mode`` combination is supported; see the module docstring for what is not.
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: tuple[Literal["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"], ...] = (
            "query_to_doc",
        ),
        partition_mode: Literal["joint", "per_direction"] = "joint",
        hardness_mode: Literal["in_batch_negatives", "hard_negatives", "all_negatives"] | None = None,
        hardness_strength: float = 0.0,
        *,
        impl: str = "auto",
        distributed: str = "auto",
    ) -> None:
        check_batchlab_options(impl, distributed)
        check_cosine(similarity_fct, type(self).__name__)
        if hardness_mode is not None and hardness_strength > 0.0:  # strength 0: no penalty, as in ST
            raise BatchlabInputError(
                f"hardness_mode={hardness_mode!r} is not computed by batchlab (its stop-gradient penalty has no "
                "InfoNCE form); use sentence_transformers.losses.MultipleNegativesRankingLoss for it"
            )
        try:
            super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                             gather_across_devices=gather_across_devices, directions=directions,
                             partition_mode=partition_mode, hardness_mode=hardness_mode,
                             hardness_strength=hardness_strength)
        except ValueError as exc:
            raise BatchlabInputError(str(exc)) from None
        self.impl = impl
        self.distributed = distributed

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """The loss from per-column embeddings ``[(B, d) anchors, (B, d) positives, (B, d) negatives ...]``."""
        if len(embeddings) < 2:
            raise BatchlabInputError(
                f"{type(self).__name__} needs at least 2 columns (anchor, positive[, negatives...]), "
                f"got {len(embeddings)}"
            )
        sizes = {e.shape[0] for e in embeddings}
        if len(sizes) != 1:
            raise BatchlabInputError(f"every column must have the same number of rows, got {[len(e) for e in embeddings]}")
        q, docs = cosine_rows(embeddings[0]), [cosine_rows(e) for e in embeddings[1:]]
        dirs, joint = set(self.directions), self.partition_mode == "joint" or len(self.directions) == 1
        if len(docs) == 1 and dirs <= {"query_to_doc", "doc_to_query"} and not (joint and len(dirs) == 2):
            return self._pairs(q, docs[0], symmetric="doc_to_query" in dirs)
        gathered = Gathered(q.shape[0], q.device, enabled=self.gather_across_devices)
        q_all, docs_all = gathered(q), [gathered(d) for d in docs]
        keys = torch.cat(docs_all)
        targets = torch.arange(gathered.offset, gathered.offset + q.shape[0], device=q.device)
        if not joint:  # per_direction: query_to_doc and doc_to_query, each with its own softmax
            rows = info_nce(q, keys, self.scale, symmetric=False, targets=targets, impl=self.impl)
            cols = info_nce(docs[0], q_all, self.scale, symmetric=False, targets=targets, impl=self.impl)
            return (rows + cols) / 2
        return self._joint(q, docs[0], q_all, keys, targets, gathered.total).loss(
            self.scale, targets, impl=self.impl)

    def _pairs(self, q: Tensor, d: Tensor, *, symmetric: bool) -> Tensor:
        """(anchor, positive) pairs: one ``info_nce`` call, distributed by batchlab's strategies."""
        distributed = self.distributed if self.gather_across_devices and world_and_rank()[0] > 1 else "none"
        return info_nce(q, d, self.scale, symmetric=symmetric, impl=self.impl, distributed=distributed)

    def _joint(self, q, d_pos, q_all, keys, targets, world_batch) -> JointRows:
        """The joint softmax over the chosen directions (rows ``q_i`` and ``d_i``)."""
        n, device = q.shape[0], q.device
        two_sided = bool({"doc_to_query", "doc_to_doc"} & set(self.directions))
        rows = JointRows(q, d_pos if two_sided else None)
        rows.add("u", keys)
        self_col = torch.zeros(n, world_batch, dtype=torch.bool, device=device)
        self_col[torch.arange(n, device=device), targets] = True
        if "query_to_query" in self.directions:
            rows.add("u", q_all, self_col)
        if "doc_to_query" in self.directions:
            rows.add("v", q_all)
        if "doc_to_doc" in self.directions:
            rows.add("v", keys, self_col.repeat(1, keys.shape[0] // world_batch))
        return rows


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """``MultipleNegativesRankingLoss`` with ``directions=("query_to_doc", "doc_to_query")``, ``partition_mode="per_direction"``.

    sentence-transformers 6.2 deprecates its class of this name in favour of those
    arguments; batchlab keeps the name (same constructor, same values) without the warning.
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        *,
        impl: str = "auto",
        distributed: str = "auto",
    ) -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices,
                         directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                         impl=impl, distributed=distributed)


def guide_embeddings(loss, sentence_features: list[dict[str, Tensor]]) -> list[Tensor]:
    """The guide model's embeddings of every column (no gradient), re-tokenised when the tokenisers differ.

    The same steps as sentence-transformers' ``GISTEmbedLoss.forward``. Pass shallow copies
    of the features taken *before* the model ran (the model writes its outputs into them).
    """
    with torch.no_grad():
        if not loss.must_retokenize:
            return embed_columns(loss.guide, sentence_features)
        features = []
        for feature in sentence_features:
            input_ids = feature["input_ids"]
            if "cu_seq_lens_q" in feature:
                flat, bounds = input_ids[0].tolist(), feature["cu_seq_lens_q"].tolist()
                input_ids = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            decoded = loss.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
            features.append(batch_to_device(loss.guide.preprocess(decoded), loss.guide.device))
        return embed_columns(loss.guide, features)


def guide_masks(loss, guides: list[Tensor], gathered: "Gathered") -> list[Tensor]:
    """GISTEmbed's false-negative masks (True removes a score), decided as sentence-transformers decides them.

    Blocks: anchor-positive (the positive itself kept), anchor-anchor and positive-positive
    (each row's own entry removed, as sentence-transformers does explicitly), anchor-negative
    per negative column. A row's threshold is its positive's guide score taken from the same
    product as the anchor blocks' scores, so a text repeated in the batch (the same guide
    vector twice) ties with the positive and is kept, as in sentence-transformers.
    """
    ga, gp = cosine_rows(guides[0]), cosine_rows(guides[1])
    n, offset = ga.shape[0], gathered.offset
    gp_all, gnegs = gathered(gp), [gathered(cosine_rows(g)) for g in guides[2:]]
    key_blocks = [gp_all] + ([ga] if loss.contrast_anchors else []) + gnegs
    scores = (ga @ torch.cat(key_blocks).T).split([k.shape[0] for k in key_blocks], dim=1)
    own = scores[0].diagonal(offset=offset).view(-1, 1)
    threshold = own - loss.margin if loss.margin_strategy == "absolute" else own - own.abs() * loss.margin
    rows = torch.arange(n, device=ga.device)
    masks = [block > threshold for block in scores]
    masks[0][rows, offset + rows] = False  # the positive itself is never suppressed
    if loss.contrast_anchors:
        masks[1][rows, rows] = True  # no self-negative
    if loss.contrast_positives:
        pp_mask = gp @ gp_all.T > threshold
        pp_mask[rows, offset + rows] = True
        masks.insert(2 if loss.contrast_anchors else 1, pp_mask)
    return masks


def gist_loss(loss, embeddings: list[Tensor], guides: list[Tensor], *, impl: str,
              max_columns: int | None = 3) -> Tensor:
    """GISTEmbed's loss from the model's and the guide's per-column embeddings, as one ``info_nce``.

    Rows ``a_i`` (anchor) and ``p_i`` (positive); blocks anchor-positive (the positive's
    column is the target), anchor-anchor, positive-positive and anchor-negative (one per
    negative column), each with the guide's false-negative mask (:func:`guide_masks`).
    ``max_columns``: sentence-transformers' ``GISTEmbedLoss`` takes 2 or 3 columns, its
    cached loss any number (None).
    """
    if len(embeddings) < 2 or (max_columns is not None and len(embeddings) > max_columns):
        takes = "(anchor, positive) or (anchor, positive, negative)" if max_columns == 3 else \
            "(anchor, positive, negative_1, ..., negative_n)"
        raise BatchlabInputError(f"{type(loss).__name__} takes {takes} columns, got {len(embeddings)} columns")
    a, p = cosine_rows(embeddings[0]), cosine_rows(embeddings[1])
    n = a.shape[0]
    gathered = Gathered(n, a.device, enabled=loss.gather_across_devices)
    masks = iter(guide_masks(loss, guides, gathered))
    targets = torch.arange(gathered.offset, gathered.offset + n, device=a.device)
    p_all = gathered(p)
    rows = JointRows(a, p if loss.contrast_positives else None)
    rows.add("u", p_all, next(masks))
    if loss.contrast_anchors:
        rows.add("u", a, next(masks))
    if loss.contrast_positives:
        rows.add("v", p_all, next(masks))
    for negative in embeddings[2:]:
        rows.add("u", gathered(cosine_rows(negative)), next(masks))
    return rows.loss(1.0 / loss.temperature, targets, impl=impl)


class GISTEmbedLoss(_STGISTEmbedLoss):
    """GISTEmbed (guided in-batch negatives), sentence-transformers' constructor, batchlab's loss.

    Anchors are local and the candidates are gathered across ranks with
    ``gather_across_devices``, as in sentence-transformers.
    """

    def __init__(
        self,
        model,
        guide,
        temperature: float = 0.01,
        margin_strategy: Literal["absolute", "relative"] = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
        *,
        impl: str = "auto",
    ) -> None:
        check_choice("impl", impl, IMPLS)
        try:
            super().__init__(model, guide, temperature=temperature, margin_strategy=margin_strategy, margin=margin,
                             contrast_anchors=contrast_anchors, contrast_positives=contrast_positives,
                             gather_across_devices=gather_across_devices)
        except ValueError as exc:
            raise BatchlabInputError(str(exc)) from None
        self.impl = impl

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        sentence_features = list(sentence_features)
        guide_features = [dict(feature) for feature in sentence_features]  # before the model writes into them
        embeddings = embed_columns(self.model, sentence_features)  # the model first: dropout draws as in ST
        guides = guide_embeddings(self, guide_features)
        return gist_loss(self, embeddings, guides, impl=self.impl)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "impl": self.impl}
