"""The row kernel of :mod:`batchlab.losses.row_blocks`: a block of logits becomes its row LSE and logit gradient.

One program per row, two passes over the row (no matrix product, so strict fp32 and TF32
are the same here): an online per-lane max and sum of exponentials give the row's
log-sum-exp; with ``GRADS`` the second pass overwrites the logits with
``coef * (exp(L - lse) - [column == diag_offset + row])`` (the InfoNCE logit gradient of
a row whose positive is column ``diag_offset + row``). Three HBM passes over the block
(read, read, write) where the same steps in PyTorch take eight. With a ``low`` buffer
the gradient leaves split in two for 3xTF32 products (``hi`` = the top 10 mantissa bits,
``lo`` = the rest).

Why not this package's other kernels (``_dense_kernels.py``): ``clip_lse_kernel``
reads a product buffer too, but only computes statistics (row and column log-sum-exps in base 2
of ``s * S`` with a device-side scale, per-row losses, partial sums); ``clip_grad_kernel``
recomputes each tile of ``q . k`` from the embeddings and writes ``s * dLoss/dL`` to a separate
output. This kernel instead turns the fp32 logit block into its gradient in place (no fourth
product, no second buffer), with the positive on the shifted diagonal ``diag_offset + row``
(hard-negative columns after the N positives) and, for 3xTF32, the hi/lo split of the gradient
in the same pass; its online log-sum-exp keeps one (max, sum) per lane in natural-base ``exp``
where ``_kernels.online_lse`` folds 2-D tiles per row in base 2, so calling it would change the
numerics of the fp32 path.

``TRITON_INTERPRET=1`` must be set before this module is imported for the kernel to run on
the CPU (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_softmax_grad(L, LO, stride, M, lse_ptr, diag_offset, coef, BLOCK: tl.constexpr, GRADS: tl.constexpr,
                      SPLIT: tl.constexpr):
    row = tl.program_id(0)
    base = L + row.to(tl.int64) * stride
    offs = tl.arange(0, BLOCK)
    top = tl.full([BLOCK], -1e30, tl.float32)  # finite: a lane that only ever sees padding stays NaN-free
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, M, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < M, other=float("-inf")).to(tl.float32)
        new = tl.maximum(top, x)
        total = total * tl.exp(top - new) + tl.exp(x - new)
        top = new
    row_max = tl.max(top, 0)
    lse = row_max + tl.log(tl.sum(total * tl.exp(top - row_max), 0))
    tl.store(lse_ptr + row, lse)
    if GRADS:
        diag = diag_offset + row
        for start in range(0, M, BLOCK):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < M, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * coef
            g = tl.where(cols == diag, g - coef, g)
            if SPLIT:  # g = hi + lo, hi with TF32's 10 mantissa bits (exact), lo the rest
                hi = (g.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                tl.store(LO + row.to(tl.int64) * stride + cols, g - hi, mask=cols < M)
                g = hi
            tl.store(base + cols, g, mask=cols < M)


def launch(logits: torch.Tensor, lse: torch.Tensor, diag_offset: int, coef: float, grads: bool,
           low: torch.Tensor | None = None) -> None:
    """Run the kernel on ``logits`` (R, M) (rows contiguous), writing ``lse`` (R,) fp32.

    With ``low`` (same shape and strides as ``logits``) and ``grads``, the gradient is split:
    its TF32-exact high part in ``logits``, the remainder in ``low`` (3xTF32 products).
    """
    rows, m = logits.shape
    if rows == 0:
        return
    if low is not None and low.stride() != logits.stride():
        raise ValueError("low must have the strides of logits")
    block = min(2048, triton.next_power_of_2(max(m, 16)))
    _row_softmax_grad[(rows,)](logits, logits if low is None else low, logits.stride(0), m, lse, diag_offset, coef,
                               BLOCK=block, GRADS=grads, SPLIT=low is not None and grads,
                               num_warps=8 if block >= 2048 else 4)
