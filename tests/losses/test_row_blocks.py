"""The row-block InfoNCE (``batchlab.losses.row_blocks``) and its Triton row kernel, against float64 cross-entropy.

The kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before it is
defined, as in tests/losses/test_triton.py). Tolerances (relative, max |diff| / max |ref|):
fp32 1e-5 on values and gradients (fp32 sums of at most a few thousand terms); the
3xTF32 split is checked here for its algebra only (on the CPU the split products are
fp32; the H200 run measures TF32's error, benchmarks/results/st-cached-h200-v2).
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from batchlab.errors import BatchlabInputError  # noqa: E402
from batchlab.losses import RowBlocks, row_block_info_nce  # noqa: E402
from batchlab.losses.row_blocks import tf32_split  # noqa: E402

KERNEL = "batchlab.losses.triton._rows_kernel"
if KERNEL in sys.modules:  # defined without the interpreter: redefine
    importlib.reload(sys.modules[KERNEL])


def rel(a, b) -> float:
    scale = float(b.abs().max())
    return float((a.double() - b.double()).abs().max()) / (scale or 1.0)


def problem(n: int, m: int, d: int = 6, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1).requires_grad_()
    k = F.normalize(torch.randn(m, d, generator=g, dtype=dtype), dim=1).requires_grad_()
    return q, k


def reference(q, k, scale: float, upstream: float = 1.0):
    """float64 cross-entropy of the logits against column i, and the gradients of upstream * loss."""
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    loss = F.cross_entropy(scale * q64 @ k64.T, torch.arange(q.shape[0]))
    gq, gk = torch.autograd.grad(upstream * loss, (q64, k64))
    return loss.detach(), gq, gk


CONFIGS = {
    "one-block": RowBlocks(fused=False),
    "blocks-of-3-split-2": RowBlocks(block_bytes=3 * 4 * 20, split=2, fused=False),
    "one-row-blocks": RowBlocks(block_bytes=1, fused=False),
    "triton": RowBlocks(fused=True),
    "triton-blocks-of-5-split-4": RowBlocks(block_bytes=5 * 4 * 20, split=4, fused=True),
    "3xtf32": RowBlocks(block_bytes=3 * 4 * 20, split=2, fused=False, products="3xtf32"),
    "3xtf32-triton": RowBlocks(block_bytes=3 * 4 * 20, fused=True, products="3xtf32"),
}


# the long rows (m = 3000) exercise the fused kernel's column loop: only the fused configs get them
@pytest.mark.parametrize("name,n,m", [(name, n, m) for name in CONFIGS
                                      for n, m in [(9, 20), (20, 20), (1, 1), (1, 4), (7, 3000)]
                                      if m != 3000 or CONFIGS[name].fused])
def test_matches_cross_entropy(name, n, m):
    q, k = problem(n, m, seed=n + m)
    loss = row_block_info_nce(q, k, 20.0, config=CONFIGS[name])
    gq, gk = torch.autograd.grad(loss * 0.3, (q, k))
    ref, rq, rk = reference(q, k, 20.0, upstream=0.3)
    assert rel(loss.detach(), ref) <= 1e-5
    if n > 1 or m > 1:
        assert rel(gq, rq) <= 1e-5 and rel(gk, rk) <= 1e-5
    else:  # one row, one key: the loss is 0 and so are the gradients
        assert float(gq.abs().max()) == 0 and float(gk.abs().max()) == 0


def test_fp64_and_no_grad():
    q, k = problem(8, 16, dtype=torch.float64)
    ref, rq, rk = reference(q, k, 7.5)
    loss = row_block_info_nce(q, k, 7.5, config=RowBlocks(block_bytes=8 * 16 * 3))
    gq, gk = torch.autograd.grad(loss, (q, k))
    assert rel(loss.detach(), ref) <= 1e-12 and rel(gq, rq) <= 1e-12 and rel(gk, rk) <= 1e-12
    with torch.no_grad():
        value = row_block_info_nce(q, k, 7.5)
    assert not value.requires_grad and rel(value, ref) <= 1e-12


def test_one_input_needs_grad():
    q, k = problem(5, 10)
    k = k.detach()
    (gq,) = torch.autograd.grad(row_block_info_nce(q, k, 20.0, config=RowBlocks(fused=True)), (q,))
    assert rel(gq, reference(q, k, 20.0)[1]) <= 1e-5


def test_tf32_split_is_exact():
    x = torch.randn(1000)
    hi, lo = tf32_split(x)
    assert torch.equal(hi + lo, x)
    assert int((hi.view(torch.int32) & 0x1FFF).abs().max()) == 0  # hi has TF32's 10 mantissa bits only
    assert float((lo.abs() / x.abs()).max()) < 2.0 ** -10


def test_refused():
    q, k = problem(4, 3)
    with pytest.raises(BatchlabInputError, match="M >= N"):
        row_block_info_nce(q, k, 20.0)
    with pytest.raises(BatchlabInputError, match="fp32 or fp64"):
        row_block_info_nce(k.bfloat16(), k.bfloat16(), 20.0)
    with pytest.raises(BatchlabInputError, match="products"):
        RowBlocks(products="fp16")
    with pytest.raises(BatchlabInputError, match="positive int block_bytes"):
        RowBlocks(block_bytes=0)
    with pytest.raises(BatchlabInputError, match="positive int split"):
        RowBlocks(split=True)
    with pytest.raises(BatchlabInputError, match="fused must be"):
        RowBlocks(fused="yes")
    with pytest.raises(BatchlabInputError, match="N >= 1"):
        row_block_info_nce(k[:0], k, 20.0)
    with pytest.raises(BatchlabInputError, match="finite scale"):
        row_block_info_nce(k[:2], k, float("nan"))
    with pytest.raises(BatchlabInputError, match="fixed scale"):
        row_block_info_nce(k[:2], k, torch.tensor(20.0, requires_grad=True))
    q, k = problem(3, 5)
    loss = row_block_info_nce(q, k, 20.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
