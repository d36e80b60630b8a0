"""pytorch-metric-learning's ``NTXentLoss``, exactly, on batchlab's InfoNCE.

Change ``from pytorch_metric_learning.losses import NTXentLoss`` to
``from batchlab.compat.pytorch_metric_learning import NTXentLoss``: same constructor
(``temperature=0.07`` and the base class's keywords), same call
``loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``,
same values and gradients. Checked against pytorch-metric-learning 2.9.0
(tests/compat/test_pytorch_metric_learning.py runs it).

PML's NT-Xent is *pairwise*: every positive pair (a, p) (same label, a != p) is one
term, ``-log(exp(s_ap / T) / (exp(s_ap / T) + sum_n exp(s_an / T)))`` over a's
negatives n (different label), averaged over the positive pairs; cosine similarity
on normalised embeddings. Here each positive pair is a query row of
:func:`batchlab.losses.info_nce` (one-way, ``targets = p``) whose other positives are
masked out of the denominator.

batchlab's own :func:`batchlab.losses.nt_xent` chooses differently for more than two
views: an anchor's V - 1 positives share one term (their logits are averaged, and
the other positives stay in the denominator: poly-view "L_out"). For two views the
two are the same loss.

Also reproduced, as PML computes them: a pair's loss is ``-log(softmax + tiny)`` in the
similarity matrix's dtype (it saturates at 87.3 nats in fp32/bf16, 9.7 in fp16); no
loss at all when every index tensor has at most one entry (a single triplet); the pairs
(i, i) are left out of the positives only when ``ref_labels`` is ``labels`` (the same
object, or ``ref_labels=None``, which pairs ``ref_emb``'s first rows by ``labels``); the
loss is in the autocast dtype under autocast.

Reproduced: PML's defaults (``CosineSimilarity``, ``MeanReducer``, no embedding
regularizer). Another ``distance``, ``reducer`` or ``embedding_regularizer`` raises a
:class:`~batchlab.errors.BatchlabInputError` (use PML itself for those).
"""

from __future__ import annotations

import torch
from torch import nn

from batchlab.errors import BatchlabInputError
from batchlab.losses import info_nce


def _is_default(obj, class_name: str, **attrs) -> bool:
    return obj is None or (type(obj).__name__ == class_name
                           and all(getattr(obj, k, None) == v for k, v in attrs.items()))


class NTXentLoss(nn.Module):
    """PML's NT-Xent: ``NTXentLoss(temperature=0.07, **kwargs)(embeddings, labels)``.

    Parameters
    ----------
    temperature : float
        Logits are cosine similarities divided by it.
    collect_stats : bool, optional
        Accepted (PML's statistics recording; no effect on the loss).
    distance, reducer, embedding_regularizer, embedding_reg_weight :
        PML's base-class options; only their defaults (``CosineSimilarity()``,
        ``MeanReducer()``, no regularizer) are reproduced, anything else is refused.

    Call: ``embeddings`` (B, d); ``labels`` (B,) (same label = positive pair), or an
    ``indices_tuple`` of pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``; optional
    ``ref_emb`` (M, d) / ``ref_labels`` (M,) as the other side of every pair.
    """

    def __init__(self, temperature=0.07, **kwargs):
        super().__init__()
        known = {"collect_stats", "distance", "reducer", "embedding_regularizer", "embedding_reg_weight"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise BatchlabInputError(f"NTXentLoss got unknown keyword(s) {unknown}; it takes temperature and {sorted(known)}")
        if not _is_default(kwargs.get("distance"), "CosineSimilarity", p=2, power=1, normalize_embeddings=True):
            raise BatchlabInputError("batchlab.compat NTXentLoss reproduces PML's default CosineSimilarity only; "
                                     "use pytorch_metric_learning itself for another distance")
        if not _is_default(kwargs.get("reducer"), "MeanReducer"):
            raise BatchlabInputError("batchlab.compat NTXentLoss reproduces PML's default MeanReducer only")
        if kwargs.get("embedding_regularizer") is not None:
            raise BatchlabInputError("batchlab.compat NTXentLoss does not take an embedding_regularizer; "
                                     "add the regularisation term to the loss yourself, or use PML")
        self.temperature = temperature
        self.collect_stats = kwargs.get("collect_stats")
        self.embedding_reg_weight = kwargs.get("embedding_reg_weight", 1)

    @staticmethod
    def _pairs(labels, ref_labels, indices_tuple, n: int, m: int, device):
        """Positive pairs (a1, p), the (n, m) bool matrix of negative pairs, and PML's pair counts."""
        if indices_tuple is None:
            if labels is None:
                raise BatchlabInputError("pass labels or indices_tuple (PML needs one of them)")
            # PML's get_matches_and_diffs: ref_labels=None means labels, and an anchor is its own
            # positive only when ref_labels IS labels (ref_emb=None, or the same tensor object passed)
            same_labels = ref_labels is None or ref_labels is labels
            ref = labels if ref_labels is None else ref_labels
            matches = labels[:, None] == ref[None, :]
            if matches.shape[1] > m:
                raise BatchlabInputError(
                    f"ref_emb has {m} rows but ref_labels (labels when ref_labels is None) has "
                    f"{matches.shape[1]}; pass ref_labels with one label per ref_emb row")
            negatives = ~matches
            if same_labels:
                matches.fill_diagonal_(False)
            if matches.shape[1] < m:  # PML pairs ref_emb's first rows only (labels stand in for ref_labels)
                pad = torch.zeros(n, m - matches.shape[1], dtype=torch.bool, device=device)
                matches, negatives = torch.cat([matches, pad], 1), torch.cat([negatives, pad], 1)
            a1, p = torch.where(matches)
            return a1, p, negatives, (a1.numel(), p.numel(), int(negatives.sum()), int(negatives.sum()))
        if len(indices_tuple) == 4:
            a1, p, a2, neg = indices_tuple
        elif len(indices_tuple) == 3:
            a1, p, neg = indices_tuple
            a2 = a1
        else:
            raise BatchlabInputError(f"indices_tuple must hold 3 (triplets) or 4 (pairs) tensors, got {len(indices_tuple)}")
        a1, p, a2, neg = (torch.as_tensor(t, device=device).long() for t in (a1, p, a2, neg))
        flat = a2 * m + neg
        if flat.numel() != torch.unique(flat).numel():
            raise BatchlabInputError("indices_tuple repeats a negative pair; give each (anchor, negative) once")
        negatives = torch.zeros(n, m, dtype=torch.bool, device=device)
        negatives[a2, neg] = True
        if a1.numel() and bool(negatives[a1, p].any()):
            raise BatchlabInputError("indices_tuple makes a pair both positive and negative")
        return a1, p, negatives, (a1.numel(), p.numel(), a2.numel(), neg.numel())

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if embeddings.dim() != 2:
            raise BatchlabInputError(f"embeddings must have shape (batch_size, dim), got {tuple(embeddings.shape)}")
        if labels is not None:
            labels = torch.as_tensor(labels, device=embeddings.device)  # the same object when already there
            if labels.shape[0] != embeddings.shape[0]:
                raise BatchlabInputError(f"Number of embeddings ({embeddings.shape[0]}) must equal number of "
                                         f"labels ({labels.shape[0]})")
        same_set = ref_emb is None
        if same_set:
            ref_emb, ref_labels = embeddings, labels
        elif ref_labels is not None:
            ref_labels = torch.as_tensor(ref_labels, device=embeddings.device)
            if ref_labels.shape[0] != ref_emb.shape[0]:
                raise BatchlabInputError(f"Number of ref_emb rows ({ref_emb.shape[0]}) must equal number of "
                                         f"ref_labels ({ref_labels.shape[0]})")
        q_all = nn.functional.normalize(embeddings, p=2, dim=1)
        keys = q_all if same_set else nn.functional.normalize(ref_emb, p=2, dim=1)
        a1, p, negatives, counts = self._pairs(labels, ref_labels, indices_tuple, q_all.shape[0], keys.shape[0],
                                               q_all.device)
        # PML: no loss when every index tensor has at most one entry (one triplet, one pair of each kind)
        if max(counts) <= 1 or a1.numel() == 0 or not bool(negatives.any()):
            return (embeddings * 0).sum()  # PML's zero loss (keeps the graph)

        def not_a_negative(rows, cols):  # leave only the pair's positive and its anchor's negatives
            return ~negatives[a1[rows]][:, cols] & (cols[None, :] != p[rows][:, None])

        per_pair = info_nce(q_all[a1], keys, 1.0 / self.temperature, symmetric=False, targets=p,
                            neg_mask=not_a_negative, reduction="none")
        # PML takes -log(softmax + tiny) in the similarity matrix's dtype: a pair's loss saturates
        # at -log(tiny) (87.3 in fp32 and bf16, 9.7 in fp16) and its gradient fades with it
        dtype = torch.get_autocast_dtype(q_all.device.type) if torch.is_autocast_enabled(q_all.device.type) \
            else embeddings.dtype
        per_pair = -torch.log(torch.exp(-per_pair) + torch.finfo(dtype).tiny)  # PML's very arithmetic
        return per_pair.mean().to(dtype)
