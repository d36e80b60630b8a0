"""The small-batch path of ``impl="triton"``: few launches, no host synchronisation.

Below ``DENSE_MAX_LOGITS`` logits (N x M) the whole loss is a handful of kernels,
registered as PyTorch custom ops (``torch.library``) with fake (meta) implementations
and autograd formulas, so that ``torch.compile(fullgraph=True)`` traces them without
graph breaks and CUDA graphs can capture them:

==========  ==================================================================  ========
loss        forward + backward                                                  launches
==========  ==================================================================  ========
CLIP        ``S = q @ k.T`` (cuBLAS, fp32) ; ``clip_lse_kernel`` ; sum of the     8
            per-program partials || zero grad of the statistics ;
            ``clip_grad_kernel`` (recomputes the tiles) ; sum ; ``G @ k`` ; ``G.T @ q``
SigLIP      ``siglip_loss_kernel`` ; sum || ``siglip_grad_kernel`` ; sum ;         6
            ``G @ k`` ; ``G.T @ q``
==========  ==================================================================  ========

Memory: the fp32 (N, M) product of the CLIP forward (freed before the backward) and the
(N, M) logit gradient in the inputs' dtype: at N = 8,192 256 MiB and 128 MiB (bf16),
what open_clip's own loss holds at that size.

Covered: bf16/fp32 inputs, the diagonal or ``targets``, symmetric or one-way, every
reduction, ``return_lse`` (with gradients through it). Anything else (pos_mask,
extra negatives, neg_mask, DCL, fp16: the logit gradient could underflow) goes to
the streaming kernels (:mod:`._lse`, :mod:`._siglip`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from batchlab.losses.triton import _dense_kernels as kd
from batchlab.losses.triton._launch import config, interpreting, kernel_flags, mm_f32

#: The small-batch path runs up to this many logits (N * M): 8,192 x 8,192. Above it the
#: streaming kernels hold O(N + M) instead of O(N M) (see docs/losses.md's table for the
#: measured crossover). ``BATCHLAB_DENSE_MAX_LOGITS`` overrides it (0: always stream).
DENSE_MAX_LOGITS = int(os.environ.get("BATCHLAB_DENSE_MAX_LOGITS", 8192 * 8192))
#: Input dtypes of the small-batch path (fp16 logit gradients could underflow: streaming path).
DENSE_DTYPES = (torch.bfloat16, torch.float32)
#: Owned block and swept chunk of ``clip_lse_kernel``; interpreter: small, several blocks at test sizes.
_LSE_BLOCKS = (64, 128)
_INTERPRET_LSE_BLOCKS = (16, 32)
_REDUCTIONS = ("mean", "sum", "none")


def dense_ok(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether an (N x M) problem of this dtype takes the small-batch path."""
    return q.dtype in DENSE_DTYPES and q.shape[0] * k.shape[0] <= DENSE_MAX_LOGITS


def _coefficients(n: int, m: int, symmetric: bool, reduction: int) -> tuple[float, float]:
    """Weights of one row loss and one column loss in the total (``reduction`` indexes _REDUCTIONS)."""
    half = 0.5 if symmetric else 1.0
    if _REDUCTIONS[reduction] == "mean":
        return half / n, half / m
    return half, half


def _grad_flags(q: torch.Tensor, cfg: dict) -> dict:
    flags = kernel_flags(q, cfg["BD"])
    return dict(BM=cfg["BM"], BN=cfg["BN"], BD=cfg["BD"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"], **flags)


# ----------------------------------------------------------------------------- CLIP / InfoNCE


@torch.library.custom_op("batchlab::clip_dense", mutates_args=())
def clip_dense(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: Optional[torch.Tensor],
               symmetric: bool, reduction: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, stats, counts)``: the loss (0-d, or (N,) for "none"), the row then column
    log-sum-exps (N + M,) fp32, and positives per column (M,) int32 (symmetric with targets)."""
    n, m = q.shape[0], k.shape[0]
    s = mm_f32(q, k.t())
    block, chunk = _INTERPRET_LSE_BLOCKS if interpreting() else _LSE_BLOCKS
    programs = triton.cdiv(n, block) + (triton.cdiv(m, block) if symmetric else 0)
    f32 = dict(device=q.device, dtype=torch.float32)
    stats = torch.empty(n + (m if symmetric else 0), **f32)
    rows = torch.empty(n, **f32)
    cols = torch.empty(m if symmetric else 1, **f32)
    counts = torch.empty(m if symmetric else 1, device=q.device, dtype=torch.int32)
    parts = torch.empty(programs, **f32)
    cr, cc = _coefficients(n, m, symmetric, reduction)
    kd.clip_lse_kernel[(programs,)](
        s, scale, targets if targets is not None else counts, stats, rows, cols, counts, parts,
        n, m, s.stride(0), cr, cc, BLOCK=block, CHUNK=chunk, SYM=symmetric, HAS_TGT=targets is not None,
    )
    if _REDUCTIONS[reduction] != "none":
        loss = parts.sum()
    else:
        loss = (rows + cols) * 0.5 if symmetric else rows
    return loss, stats, counts


@clip_dense.register_fake
def _(q, k, scale, targets, symmetric, reduction):
    n, m = q.shape[0], k.shape[0]
    loss_shape = (n,) if _REDUCTIONS[reduction] == "none" else ()
    return (q.new_empty(loss_shape, dtype=torch.float32), q.new_empty(n + (m if symmetric else 0), dtype=torch.float32),
            q.new_empty(m if symmetric else 1, dtype=torch.int32))


@torch.library.custom_op("batchlab::clip_dense_backward", mutates_args=())
def clip_dense_backward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: Optional[torch.Tensor],
                        stats: torch.Tensor, counts: torch.Tensor, g: torch.Tensor, g_stats: torch.Tensor,
                        symmetric: bool, reduction: int, need_q: bool, need_k: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dscale)`` of ``g * loss + g_stats . stats`` (dq/dk empty when not needed)."""
    n, d = q.shape
    m = k.shape[0]
    cfg = config("bwd", q.dtype)
    grad = torch.empty(n, m, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(n, cfg["BM"]), triton.cdiv(m, cfg["BN"]))
    parts = torch.empty(grid[0] * grid[1], device=q.device, dtype=torch.float32)
    cr, cc = _coefficients(n, m, symmetric, reduction)
    kd.clip_grad_kernel[grid](
        q, k, scale, targets if targets is not None else counts, stats, g_stats, counts, g, grad, parts,
        n, m, d, q.stride(0), k.stride(0), grad.stride(0), cr, cc,
        SYM=symmetric, HAS_TGT=targets is not None, G_VEC=g.dim() > 0, **_grad_flags(q, cfg),
    )
    dq = torch.mm(grad, k) if need_q else q.new_empty(0)
    dk = torch.mm(grad.t(), q) if need_k else k.new_empty(0)
    return dq, dk, parts.sum().to(scale.dtype)


@clip_dense_backward.register_fake
def _(q, k, scale, targets, stats, counts, g, g_stats, symmetric, reduction, need_q, need_k):
    return (q.new_empty(q.shape if need_q else (0,)), k.new_empty(k.shape if need_k else (0,)),
            scale.new_empty(()))


def _clip_setup(ctx, inputs, output):
    q, k, scale, targets, symmetric, reduction = inputs
    _, stats, counts = output
    ctx.save_for_backward(q, k, scale, targets, stats, counts)
    ctx.symmetric, ctx.reduction = symmetric, reduction


def _clip_backward(ctx, g, g_stats, _g_counts):
    q, k, scale, targets, stats, counts = ctx.saved_tensors
    need_q, need_k, need_s = ctx.needs_input_grad[:3]
    # an upstream gradient may be an expanded view (stride 0): the kernel reads it by index
    dq, dk, ds = clip_dense_backward(q, k, scale, targets, stats, counts, g.contiguous(), g_stats.contiguous(),
                                     ctx.symmetric,
                                     ctx.reduction, need_q, need_k)
    return (dq if need_q else None), (dk if need_k else None), (ds if need_s else None), None, None, None


clip_dense.register_autograd(_clip_backward, setup_context=_clip_setup)


def clip_loss(q, k, scale, targets, *, symmetric: bool, reduction: str):
    """``(loss, row_lse (N,), col_lse (M,) or None)`` of InfoNCE/CLIP on the small-batch path."""
    n = q.shape[0]
    loss, stats, _ = clip_dense(q.contiguous(), k.contiguous(), scale.reshape(()), targets, symmetric,
                                _REDUCTIONS.index(reduction))
    return loss, stats[:n], (stats[n:] if symmetric else None)


# ----------------------------------------------------------------------------- SigLIP


@torch.library.custom_op("batchlab::siglip_dense", mutates_args=())
def siglip_dense(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 targets: Optional[torch.Tensor], reduction: int) -> torch.Tensor:
    """The summed (``reduction`` 1) or mean-per-query (0) SigLIP loss, 0-d fp32."""
    n, d = q.shape
    m = k.shape[0]
    cfg = config("bwd", q.dtype)
    grid = (triton.cdiv(n, cfg["BM"]), triton.cdiv(m, cfg["BN"]))
    parts = torch.empty(grid[0] * grid[1], device=q.device, dtype=torch.float32)
    coef = 1.0 / n if _REDUCTIONS[reduction] == "mean" else 1.0
    kd.siglip_loss_kernel[grid](
        q, k, scale, bias, targets if targets is not None else parts, parts, n, m, d, q.stride(0), k.stride(0),
        coef, HAS_TGT=targets is not None, **_grad_flags(q, cfg),
    )
    return parts.sum()


@siglip_dense.register_fake
def _(q, k, scale, bias, targets, reduction):
    return q.new_empty((), dtype=torch.float32)


@torch.library.custom_op("batchlab::siglip_dense_backward", mutates_args=())
def siglip_dense_backward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                          targets: Optional[torch.Tensor], g: torch.Tensor, reduction: int, need_q: bool,
                          need_k: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, [dscale, dbias])`` of ``g * loss`` (fp32 (2,); dq/dk empty when not needed)."""
    n, d = q.shape
    m = k.shape[0]
    cfg = config("bwd", q.dtype)
    grid = (triton.cdiv(n, cfg["BM"]), triton.cdiv(m, cfg["BN"]))
    grad = torch.empty(n, m, device=q.device, dtype=q.dtype)
    parts = torch.empty(grid[0] * grid[1], 2, device=q.device, dtype=torch.float32)
    coef = 1.0 / n if _REDUCTIONS[reduction] == "mean" else 1.0
    kd.siglip_grad_kernel[grid](
        q, k, scale, bias, targets if targets is not None else parts, g, grad, parts,
        n, m, d, q.stride(0), k.stride(0), grad.stride(0), coef, HAS_TGT=targets is not None,
        **_grad_flags(q, cfg),
    )
    dq = torch.mm(grad, k) if need_q else q.new_empty(0)
    dk = torch.mm(grad.t(), q) if need_k else k.new_empty(0)
    return dq, dk, parts.sum(0)


@siglip_dense_backward.register_fake
def _(q, k, scale, bias, targets, g, reduction, need_q, need_k):
    return (q.new_empty(q.shape if need_q else (0,)), k.new_empty(k.shape if need_k else (0,)),
            q.new_empty(2, dtype=torch.float32))


def _siglip_setup(ctx, inputs, output):
    q, k, scale, bias, targets, reduction = inputs
    ctx.save_for_backward(q, k, scale, bias, targets)
    ctx.reduction = reduction


def _siglip_backward(ctx, g):
    q, k, scale, bias, targets = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk, dsb = siglip_dense_backward(q, k, scale, bias, targets, g, ctx.reduction, need[0], need[1])
    ds, db = dsb.to(scale.dtype).unbind()
    return (dq if need[0] else None), (dk if need[1] else None), (ds if need[2] else None), \
        (db if need[3] else None), None, None


siglip_dense.register_autograd(_siglip_backward, setup_context=_siglip_setup)


def siglip_loss(q, k, scale, bias, targets, *, reduction: str):
    """SigLIP's summed or mean loss (0-d) on the small-batch path (``reduction`` "mean" or "sum")."""
    return siglip_dense(q.contiguous(), k.contiguous(), scale.reshape(()), bias.reshape(()), targets,
                        _REDUCTIONS.index(reduction))
