"""``impl="triton"`` for InfoNCE/CLIP, SigLIP and DCL/DCLW: kernels plus O(N d) glue.

The kernels compute what needs every (query, key) pair: the log-sum-exp
denominators (:mod:`._lse`) and SigLIP's pairwise sum (:mod:`._siglip`). The
positive logits (one per target, or the pairs of ``pos_mask``), extra negatives
and the DCLW weights touch O(N d) or O(N m d) numbers and stay in PyTorch, so
autograd handles them; except in the common case (InfoNCE or DCL with the diagonal
positives, no extra negatives, bf16/fp32): :func:`._lse.stream_loss` computes the
whole loss in one autograd node, with the positives, the loss and the gradients'
glue in four small kernels (``_glue``): 41 launches per forward + backward at
N = 65,536 on the H200 instead of 84 (8 panels x 3 of them the gradient kernel and
its two products, 8 cuBLAS memsets).

What the kernels cover natively, and what falls back to the tiled engine (or the
reference when the tiled engine is not installed), with identical results:

============================  =====================================================
native                        fp32/bf16/fp16 inputs, any N, M, d; targets (any
                              indices) or the default diagonal; ``pos_mask`` for
                              InfoNCE (several positives: pairs gathered, O(P d));
                              ``pos_mask`` with one positive per row for SigLIP and
                              DCL (turned into targets); extra negatives; every
                              reduction; return_lse; DCLW
falls back                    ``neg_mask`` (any form); float64 inputs; SigLIP or
                              DCL with several positives in a row of ``pos_mask``
============================  =====================================================
"""

from __future__ import annotations

import torch

from batchlab.losses import _dispatch
from batchlab.losses._common import LSE, compute_dtype
from batchlab.losses.dcl import dclw_weights
from batchlab.losses.infonce import reduce_loss
from batchlab.losses.siglip import reduce_siglip
from batchlab.losses.triton import _dense
from batchlab.losses.triton._lse import pair_lse, stream_loss, stream_ok
from batchlab.losses.triton._siglip import siglip_pass, siglip_total

#: Options only the Triton implementation understands (dropped when falling back).
_OWN_OPTIONS = ("workspace_bytes",)
#: Rows per chunk when gathering positive pairs in fp32 (bounds the temporary copies).
_CHUNK = 1 << 16


def _fallback(family: str, *args, **kwargs):
    """The tiled engine's result (or the reference's when the tiled engine is missing)."""
    for name in _OWN_OPTIONS:
        kwargs.pop(name, None)
    for impl in ("tiled", "reference"):
        if _dispatch._load_backend(impl) and (family, impl) in _dispatch._REGISTRY:
            return _dispatch._REGISTRY[(family, impl)](*args, **kwargs)
    raise RuntimeError(f"no fallback implementation registered for {family}")  # pragma: no cover


class _PairDot(torch.autograd.Function):
    """fp32 dot products ``q[qi] . k[ki]`` (P,) without fp32 copies of q and k.

    ``qi`` None: all of ``q`` (P = N); ``ki`` None: the diagonal, key i for query i (``k`` may have more
    rows than ``q``, as one-way InfoNCE with extra keys: those rows get no gradient from here).
    """

    @staticmethod
    def forward(ctx, q, k, qi, ki):
        p = q.shape[0] if qi is None else qi.shape[0]
        out = torch.empty(p, device=q.device, dtype=torch.float32)
        for s in range(0, p, _CHUNK):
            e = min(p, s + _CHUNK)
            a = q[s:e] if qi is None else q[qi[s:e]]
            b = k[s:e] if ki is None else k[ki[s:e]]
            out[s:e] = (a.float() * b.float()).sum(1)
        ctx.save_for_backward(q, k, qi, ki)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, qi, ki = ctx.saved_tensors
        dq = dk = None
        if ctx.needs_input_grad[0]:
            b = k[: g.shape[0]] if ki is None else k[ki]  # the diagonal: key i pairs with query i
            contrib = g[:, None] * b.float()
            dq = contrib.to(q.dtype) if qi is None else torch.zeros(q.shape, device=q.device,
                                                                    dtype=torch.float32).index_add_(0, qi, contrib).to(q.dtype)
        if ctx.needs_input_grad[1]:
            a = q[: g.shape[0]] if qi is None else q[qi]
            contrib = g[:, None] * a.float()
            if ki is None and k.shape[0] == contrib.shape[0]:
                dk = contrib.to(k.dtype)
            elif ki is None:  # the diagonal of a wider key set (one-way, M > N): keys past N get no gradient here
                dk = torch.zeros(k.shape, device=k.device, dtype=k.dtype)
                dk[: contrib.shape[0]] = contrib
            else:
                dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32).index_add_(0, ki, contrib).to(k.dtype)
        return dq, dk, None, None


def _positive_cosines(q, k, targets, pos_mask, need_cols: bool):
    """Mean positive cosine per row (N,) and per column (M,) (or None), differentiable.

    ``targets`` and ``pos_mask`` both None: the diagonal (no gather, no index tensor).
    """
    n, m = q.shape[0], k.shape[0]
    if pos_mask is None:
        dots = _PairDot.apply(q, k, None, targets)  # one positive per row
        if not need_cols:
            return dots, None
        if targets is None:  # the symmetric diagonal: column j's positive is row j
            return dots, dots
        rows, cols = torch.arange(n, device=q.device), targets
    else:
        rows, cols = pos_mask.nonzero(as_tuple=True)
        dots = _PairDot.apply(q, k, rows, cols)
    f32 = dict(device=q.device, dtype=torch.float32)

    def mean_by(index, size):
        return torch.zeros(size, **f32).index_add(0, index, dots) / torch.bincount(index, minlength=size).float()

    row_mean = dots if pos_mask is None else mean_by(rows, n)
    return row_mean, (mean_by(cols, m) if need_cols else None)


def _extra_logits(q, extra, scale):
    """(N, m) logits of each query against its own extra negatives, in the compute dtype."""
    dtype = compute_dtype(q.dtype)
    return scale * torch.einsum("nd,nmd->nm", q.to(dtype), extra.to(dtype))


def _single_targets(pos_mask: torch.Tensor) -> torch.Tensor | None:
    """Targets when every row of ``pos_mask`` holds exactly one positive, else None."""
    if bool((pos_mask.sum(1) == 1).all()):
        return pos_mask.to(torch.int8).argmax(1)
    return None


def _native(q: torch.Tensor, neg_mask) -> bool:
    return neg_mask is None and q.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _contrastive(q, k, scale, *, symmetric, targets, pos_mask, extra_negatives, reduction, exclude,
                 weighted=False, sigma=0.5, workspace_bytes=None):
    """InfoNCE (``exclude=False``) or DCL/DCLW (``exclude=True``) from kernel log-sum-exps."""
    no_extra = extra_negatives is None or not extra_negatives.shape[1]
    if targets is None and pos_mask is None and no_extra and not weighted and stream_ok(q, k, scale):
        # the diagonal positives: the whole loss in one autograd node, its glue in small kernels
        loss, row_lse, col_lse = stream_loss(q, k, scale, symmetric=symmetric, exclude=exclude, reduction=reduction,
                                             workspace_bytes=workspace_bytes)
        return loss, LSE(row_lse, col_lse)
    row_lse, col_lse = pair_lse(q, k, scale, targets, cols=symmetric, exclude=exclude,
                                workspace_bytes=workspace_bytes)
    if extra_negatives is not None and extra_negatives.shape[1]:
        row_lse = torch.logaddexp(row_lse, torch.logsumexp(_extra_logits(q, extra_negatives, scale), dim=1))
    row_cos, col_cos = _positive_cosines(q, k, targets, pos_mask, symmetric)
    w_row = dclw_weights(row_cos, sigma) if weighted else 1.0
    row_loss = row_lse - w_row * (scale * row_cos)
    col_loss = None
    if symmetric:
        w_col = dclw_weights(col_cos, sigma) if weighted else 1.0
        col_loss = col_lse - w_col * (scale * col_cos)
    return reduce_loss(row_loss, col_loss, reduction), LSE(row_lse, col_lse)


@_dispatch.register("info_nce", "triton")
def info_nce_triton(q, k, scale, *, symmetric, targets, pos_mask, extra_negatives, neg_mask, reduction,
                    workspace_bytes=None):
    """InfoNCE/CLIP on the Triton kernels (see the module docstring for coverage)."""
    if not _native(q, neg_mask):
        return _fallback("info_nce", q, k, scale, symmetric=symmetric, targets=targets, pos_mask=pos_mask,
                         extra_negatives=extra_negatives, neg_mask=neg_mask, reduction=reduction)
    if pos_mask is None and (extra_negatives is None or not extra_negatives.shape[1]) and _dense.dense_ok(q, k):
        loss, row_lse, col_lse = _dense.clip_loss(q, k, scale, targets, symmetric=symmetric, reduction=reduction)
        return loss, LSE(row_lse, col_lse)
    # The denominators never depend on the positives, so pos_mask needs no kernel support.
    return _contrastive(q, k, scale, symmetric=symmetric, targets=targets if pos_mask is None else None,
                        pos_mask=pos_mask, extra_negatives=extra_negatives, reduction=reduction, exclude=False,
                        workspace_bytes=workspace_bytes)


@_dispatch.register("dcl", "triton")
def dcl_triton(q, k, scale, *, weighted, sigma, symmetric, targets, pos_mask, extra_negatives, neg_mask,
               reduction, workspace_bytes=None):
    """DCL/DCLW on the Triton kernels: each query's target is left out of both log-sum-exps in-kernel."""
    if pos_mask is not None and _native(q, neg_mask):
        targets = _single_targets(pos_mask)
        pos_mask = None if targets is not None else pos_mask
    if not _native(q, neg_mask) or pos_mask is not None:
        return _fallback("dcl", q, k, scale, weighted=weighted, sigma=sigma, symmetric=symmetric, targets=targets,
                         pos_mask=pos_mask, extra_negatives=extra_negatives, neg_mask=neg_mask, reduction=reduction)
    return _contrastive(q, k, scale, symmetric=symmetric, targets=targets, pos_mask=None,
                        extra_negatives=extra_negatives, reduction=reduction, exclude=True, weighted=weighted,
                        sigma=sigma, workspace_bytes=workspace_bytes)


@_dispatch.register("siglip", "triton")
def siglip_triton(q, k, scale, bias, *, targets, pos_mask, extra_negatives, neg_mask, reduction,
                  workspace_bytes=None):
    """SigLIP on the Triton kernel (one pass for loss and gradients when the loss is summed)."""
    if pos_mask is not None and _native(q, neg_mask):
        targets = _single_targets(pos_mask)
        pos_mask = None if targets is not None else pos_mask
    if not _native(q, neg_mask) or pos_mask is not None:
        return _fallback("siglip", q, k, scale, bias, targets=targets, pos_mask=pos_mask,
                         extra_negatives=extra_negatives, neg_mask=neg_mask, reduction=reduction)
    n = q.shape[0]
    has_extra = extra_negatives is not None and extra_negatives.shape[1] > 0
    if not has_extra and reduction != "none" and _dense.dense_ok(q, k):
        return _dense.siglip_loss(q, k, scale, bias, targets, reduction=reduction), None
    if not torch.is_grad_enabled():
        rows, _ = siglip_pass(q.contiguous(), k.contiguous(), scale, bias,
                              None if targets is None else targets.contiguous(), loss=True)
        if has_extra:
            rows = rows + torch.nn.functional.softplus(_extra_logits(q, extra_negatives, scale) + bias).sum(1)
        return reduce_siglip(rows, reduction), None
    if reduction == "none":
        rows = siglip_total(q, k, scale, bias, targets, per_row=True, workspace_bytes=workspace_bytes)
        if has_extra:
            rows = rows + torch.nn.functional.softplus(_extra_logits(q, extra_negatives, scale) + bias).sum(1)
        return rows, None
    total = siglip_total(q, k, scale, bias, targets, per_row=False, workspace_bytes=workspace_bytes)
    if has_extra:
        total = total + torch.nn.functional.softplus(_extra_logits(q, extra_negatives, scale) + bias).sum()
    return (total / n if reduction == "mean" else total), None
