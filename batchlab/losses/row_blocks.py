"""Row-only InfoNCE with diagonal targets, in one pass over full-width row blocks.

:func:`row_block_info_nce` computes ``mean_i [logsumexp_j(s q_i . k_j) - s q_i . k_i]`` over
query rows ``q_i`` and keys ``k_j`` (key ``i`` is row ``i``'s positive, keys past ``N`` are extra
negatives, e.g. hard-negative columns): ``info_nce(q, keys, s, symmetric=False)`` with diagonal
targets, the loss of sentence-transformers' ``(Cached)MultipleNegativesRankingLoss`` with its
default ``directions=("query_to_doc",)``. Each row's softmax runs over ALL the keys and nothing
runs over columns, so a block of ``R`` full rows holds everything its gradient needs:

1. its logits ``L = s Q_b K^T`` (one GEMM into an ``R x M`` buffer, the scale in the GEMM's alpha);
2. each row's log-sum-exp, and the logit gradient ``G = (s/N)(softmax(L) - onehot)``
   written over the logits (the Triton row kernel of :mod:`batchlab.losses.triton._rows_kernel`
   on CUDA: three HBM passes; PyTorch's in-place ops elsewhere: eight);
3. ``dQ_b = G K`` and ``dK += G^T Q_b`` (two GEMMs).

Three products per logit, the fewest an exact loss with gradients can use without
keeping the ``N x M`` logits; the tiled engine, whose tiles also serve column softmaxes,
makes the logits twice (four). The products follow torch's fp32 matmul precision
(``torch.set_float32_matmul_precision``: "highest" = IEEE fp32, "high" = TF32).
Used by :class:`batchlab.integrations.sentence_transformers.CachedMultipleNegativesRankingLoss`
(its loss phase on CUDA); measured there on an H200 at 65,536 pairs, d = 384, IEEE fp32:
4.3x sentence-transformers' loss phase, 1.9x batchlab's tiled engine
(benchmarks/results/st-cached-h200-v2).

``RowBlocks(products="3xtf32")`` (opt-in) makes every product from three TF32 tensor-core
products of split operands (``x = hi + lo``, ``hi`` with TF32's 10 mantissa bits:
``hi.hi + hi.lo + lo.hi``), which keeps about 21 of fp32's 24 bits (the dropped ``lo.lo`` and
TF32's rounding of ``lo``) whatever the global setting: close to fp32, not IEEE fp32 (measured
on an H200 at 65,536 pairs: embedding gradients within 5.5e-5 of IEEE fp32, where the default
strict path is within 1.7e-6; 1.28x faster; benchmarks/results/st-cached-h200-v2).

The loss and both gradients come out of the forward (made for losses that backpropagate at
once, as gradient caching does); ``backward`` scales them by the incoming gradient. Without
grad mode only the loss is computed (one GEMM per block).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from batchlab._checks import check_choice, check_finite, data_checks_on
from batchlab.errors import BatchlabInputError

__all__ = ["RowBlocks", "row_block_info_nce"]

PRODUCTS = ("default", "3xtf32")
_TF32_MASK = -8192  # 0xFFFFE000: sign, exponent and the top 10 mantissa bits of an fp32


@dataclass(frozen=True)
class RowBlocks:
    """How :func:`row_block_info_nce` cuts its work.

    ``block_bytes``: the logit buffer (``R = block_bytes // (M * itemsize)`` rows a block,
    at least 1; 256 MiB = 1,024 rows of 65,536 fp32 logits; 3xTF32 holds two). ``split``:
    cut ``G K`` into ``split`` column groups summed after one batched GEMM (more parallel
    work when ``R x d`` is small and ``M`` long; 1 = one GEMM). ``fused``: the Triton row
    kernel (None: on CUDA when Triton imports, and on the CPU under ``TRITON_INTERPRET=1``).
    ``products``: "default" (torch's fp32 matmul precision, as sentence-transformers) or
    "3xtf32" (see the module docstring; CUDA only, elsewhere the same split in fp32).
    """

    block_bytes: int = 256 * 2**20
    split: int = 1
    fused: bool | None = None
    products: str = "default"

    def __post_init__(self) -> None:
        check_choice("products", self.products, PRODUCTS)
        for name, value in (("block_bytes", self.block_bytes), ("split", self.split)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BatchlabInputError(f"RowBlocks needs a positive int {name}, got {value!r}")
        if self.fused not in (None, True, False):
            raise BatchlabInputError(f"RowBlocks' fused must be None (automatic), True or False, got {self.fused!r}")

    def rows(self, n: int, m: int, itemsize: int) -> int:
        return max(1, min(n, self.block_bytes // max(1, m * itemsize)))


def _interpreting() -> bool:
    # batchlab.losses.triton._launch.interpreting() reads the same variable, but importing it would import
    # batchlab.losses.triton (Triton, and the registration of every Triton loss) to answer "no" on a plain CPU.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_available(device: torch.device) -> bool:
    """Whether the Triton row kernel can run on ``device``."""
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and not _interpreting()):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.library.custom_op("batchlab::row_softmax_grad_", mutates_args=("logits", "low"))
def row_softmax_grad_(logits: Tensor, low: Tensor, diag_offset: int, coef: float, grads: bool) -> Tensor:
    """Row log-sum-exp of ``logits`` (R, M) (returned, fp32); with ``grads`` the logits become the logit gradient.

    A non-empty ``low`` (R, M) receives the low part of the split gradient (3xTF32).
    """
    from batchlab.losses.triton import _rows_kernel as kernel  # imports Triton: on first use
    lse = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    kernel.launch(logits, lse, diag_offset, coef, grads, low if low.numel() else None)
    return lse


@row_softmax_grad_.register_fake
def _(logits, low, diag_offset, coef, grads):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def tf32_split(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` with ``x = hi + lo`` exactly and ``hi`` representable in TF32 (fp32 input)."""
    hi = (x.view(torch.int32) & _TF32_MASK).view(x.dtype)
    return hi, x - hi


def _rows_torch(L: Tensor, low: Tensor, diag_offset: int, coef: float, grads: bool) -> Tensor:
    """:func:`row_softmax_grad_` in PyTorch ops (in place, one extra (R,) vector or two)."""
    top = L.amax(1, keepdim=True)
    L.sub_(top).exp_()
    total = L.sum(1, keepdim=True)
    if grads:
        L.mul_(coef / total)
        L.diagonal(diag_offset).sub_(coef)
        if low.numel():
            low.copy_(L)
            L.view(torch.int32).bitwise_and_(_TF32_MASK)
            low.sub_(L)
    return (top + total.log()).squeeze(1)


@contextmanager
def matmul_precision(precision: str | None):
    """``torch.set_float32_matmul_precision(precision)`` for the block, the global setting restored after.

    None leaves the setting alone. The row-block pass asks for "high" (TF32) under 3xTF32 on CUDA.
    """
    if precision is None:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _times_keys(G: Tensor, K: Tensor, out: Tensor, split: int, accumulate: bool) -> None:
    """``out (+)= G @ K``; with ``split`` > 1 as one batched GEMM over column groups, summed."""
    if split > 1:
        r, m = G.shape
        parts = torch.bmm(G.view(r, split, m // split).transpose(0, 1), K.view(split, m // split, K.shape[1]))
        if accumulate:
            out.add_(parts.sum(0))
        else:
            torch.sum(parts, 0, out=out)
    elif accumulate:
        out.addmm_(G, K)
    else:
        torch.mm(G, K, out=out)


def _pass(q: Tensor, keys: Tensor, scale: float, config: RowBlocks, grads: bool):
    """(loss, dq, dk): the loss of every row block and, with ``grads``, both gradients."""
    n, d = q.shape
    m = keys.shape[0]
    rows = config.rows(n, m, q.element_size())
    fused = q.dtype == torch.float32 and (config.fused if config.fused is not None else fused_available(q.device))
    split = config.split if config.split > 1 and m % config.split == 0 else 1
    three = config.products == "3xtf32" and q.dtype == torch.float32
    buf = q.new_empty(rows, m)
    low = q.new_empty(rows, m) if three and grads else q.new_empty(0)
    total = q.new_zeros(())
    dq = q.new_empty(n, d) if grads else None
    dk = torch.zeros_like(keys) if grads else None
    coef = scale / n
    k_hi, k_lo = tf32_split(keys) if three else (keys, None)
    with matmul_precision("high" if three and q.is_cuda else None):
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            L, q_b = buf[: r1 - r0], q[r0:r1]
            if three:  # s (lo.hi + hi.lo + hi.hi), the small terms first
                q_hi, q_lo = tf32_split(q_b)
                torch.addmm(L, q_lo, k_hi.T, beta=0.0, alpha=scale, out=L)
                L.addmm_(q_hi, k_lo.T, alpha=scale)
                L.addmm_(q_hi, k_hi.T, alpha=scale)
            else:
                torch.addmm(L, q_b, keys.T, beta=0.0, alpha=scale, out=L)  # beta=0: L's old contents ignored
            positive = L.diagonal(r0).sum()  # before the logits are overwritten
            lo = low[: r1 - r0] if low.numel() else low
            lse = (row_softmax_grad_ if fused else _rows_torch)(L, lo, r0, coef, grads)
            total = total + (lse.sum() - positive)
            if not grads:
                continue
            if three:  # L = G_hi, lo = G_lo
                _times_keys(L, k_hi, dq[r0:r1], split, accumulate=False)
                _times_keys(L, k_lo, dq[r0:r1], split, accumulate=True)
                _times_keys(lo, k_hi, dq[r0:r1], split, accumulate=True)
                dk.addmm_(L.T, q_hi).addmm_(L.T, q_lo).addmm_(lo.T, q_hi)
            else:
                _times_keys(L, keys, dq[r0:r1], split, accumulate=False)
                dk.addmm_(L.T, q_b)
    return total / n, dq, dk


class _RowBlockLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, keys, scale, config):
        loss, dq, dk = _pass(q, keys, scale, config, grads=True)
        ctx.grads = (dq, dk)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("the row-block loss computed its gradients once; backward through it twice "
                               "(retain_graph=True) is not supported")
        dq, dk = ctx.grads
        ctx.grads = None
        g = grad_output.to(dq.dtype)
        return (dq.mul_(g) if ctx.needs_input_grad[0] else None,
                dk.mul_(g) if ctx.needs_input_grad[1] else None, None, None)


DEFAULT = RowBlocks()


def row_block_info_nce(q: Tensor, keys: Tensor, scale: float, *, config: RowBlocks = DEFAULT) -> Tensor:
    """``mean_i [logsumexp_j(scale q_i . k_j) - scale q_i . k_i]``: row ``i``'s positive is key ``i``.

    The one-way InfoNCE of ``info_nce(q, keys, scale, symmetric=False)`` (diagonal targets,
    every other key a negative of every row) in one pass over blocks of full rows (the module
    docstring says how). Memory beyond the inputs and their gradients: the ``config.block_bytes``
    logit buffer (two under 3xTF32) and O(N) statistics.

    Parameters
    ----------
    q : Tensor (N, d), float32 or float64
        Query rows (unit rows for cosine logits: nothing is normalised here).
    keys : Tensor (M, d), M >= N, the dtype of ``q``
        Key ``i < N`` is query ``i``'s positive; keys ``N..M-1`` (e.g. hard-negative columns)
        are negatives of every row.
    scale : float
        The logit scale (1 / temperature).
    config : RowBlocks, keyword-only
        Block size, split-K groups, Triton row kernel or PyTorch ops, products.

    Returns
    -------
    Tensor ()
        The mean loss. When grad mode is on and ``q`` or ``keys`` requires a gradient, both
        gradients are computed in the same pass and handed out by ``backward`` (scaled by
        the incoming gradient; a second backward through the same loss is refused).

    Example
    -------
    >>> import torch, torch.nn.functional as F
    >>> from batchlab.losses import RowBlocks, row_block_info_nce
    >>> q = F.normalize(torch.randn(6, 4), dim=1).requires_grad_()
    >>> k = F.normalize(torch.randn(9, 4), dim=1)  # 6 positives, then 3 hard negatives
    >>> loss = row_block_info_nce(q, k, 20.0, config=RowBlocks(block_bytes=64))  # blocks of 1 row
    >>> bool(torch.allclose(loss, F.cross_entropy(20 * q @ k.T, torch.arange(6))))
    True
    >>> loss.backward(); q.grad.shape
    torch.Size([6, 4])
    """
    for name, x in (("q", q), ("keys", keys)):
        if not isinstance(x, Tensor):
            raise BatchlabInputError(f"row_block_info_nce needs torch tensors; {name} is a {type(x).__name__}")
    if not isinstance(config, RowBlocks):
        raise BatchlabInputError(f"config must be a RowBlocks(...), got {type(config).__name__}")
    if (q.dim() != 2 or keys.dim() != 2 or q.shape[1] != keys.shape[1] or keys.shape[0] < q.shape[0]
            or q.shape[0] == 0):
        raise BatchlabInputError(f"row_block_info_nce needs q (N >= 1, d) and keys (M >= N, d), got {tuple(q.shape)} "
                                 f"and {tuple(keys.shape)}")
    if q.dtype != keys.dtype or q.dtype not in (torch.float32, torch.float64):
        raise BatchlabInputError(f"row_block_info_nce takes fp32 or fp64 q and keys of one dtype, got {q.dtype} and "
                                 f"{keys.dtype}; cast them (the products follow torch's fp32 matmul precision)")
    if isinstance(scale, Tensor) and scale.requires_grad:
        raise BatchlabInputError("row_block_info_nce takes a fixed scale (no gradient flows to it); pass a float, "
                                 "or use info_nce for a learnt scale")
    if isinstance(scale, Tensor) and (scale.numel() != 1 or not scale.is_floating_point()):
        raise BatchlabInputError(f"row_block_info_nce's scale is one number; got a {scale.dtype} tensor of shape "
                                 f"{tuple(scale.shape)}: pass a float")
    if isinstance(scale, bool) or not isinstance(scale, (int, float, Tensor)):
        raise BatchlabInputError(f"row_block_info_nce's scale must be a float, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise BatchlabInputError(f"row_block_info_nce needs a finite scale, got {scale}")
    if config.fused and q.dtype == torch.float32 and not fused_available(q.device):
        raise BatchlabInputError(
            f"RowBlocks(fused=True) runs the Triton row kernel, which needs Triton and a CUDA device (on the CPU: "
            f"TRITON_INTERPRET=1, set before Triton is imported); got {q.device}. Use fused=None (automatic) or False"
        )
    if data_checks_on(q.device):  # on the CPU (CUDA: BATCHLAB_CHECK_INPUTS=1); NaN would make the loss NaN
        check_finite("q", q)
        check_finite("keys", keys)
    if torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad):
        return _RowBlockLoss.apply(q, keys, scale, config)
    return _pass(q.detach(), keys.detach(), scale, config, grads=False)[0]
