"""The small-batch Triton path (``_dense``) in Triton's CPU interpreter, against float64.

Tolerances as in test_triton.py: values 1e-5 relative (fp32 sums of exact products);
gradients 1e-4 (fp32) and 1.5e-2 (bf16: the logit gradient is stored in bf16).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from batchlab.losses import info_nce, siglip  # noqa: E402
from batchlab.losses.triton import _dense  # noqa: E402
from tests.losses.test_triton import compare, unit  # noqa: E402


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric,reduction,targets", [
    (True, "mean", False), (True, "none", True), (False, "sum", True), (False, "mean", False),
])
def test_clip_small_batch_matches_float64(dtype, symmetric, reduction, targets, gen):
    n, m, d = 37, (37 if symmetric else 45), 20
    q, k = unit(n, d, gen, torch.float32), unit(m, d, gen, torch.float32)
    t = torch.randperm(n, generator=gen) if targets else None
    assert _dense.dense_ok(q.to(dtype), k.to(dtype))
    compare(lambda impl, q, k, s: info_nce(q, k, s, impl=impl, symmetric=symmetric, targets=t,
                                           reduction=reduction), [q, k, torch.tensor(12.0)], dtype, gen,
            reduction=reduction)


@pytest.mark.parametrize("n,scale", [(1, 14.3), (33, 0.01), (33, 100.0)])
def test_clip_small_batch_edges(n, scale, gen):
    """N=1 (loss identically 0) and extreme temperatures, with the returned LSE's gradient."""
    q, k = unit(n, 16, gen, torch.float32), unit(n, 16, gen, torch.float32)

    def fn(impl, q, k, s):
        loss, lse = info_nce(q, k, s, impl=impl, return_lse=True)
        return loss + 0.1 * lse.row.mean() + 0.1 * lse.col.mean()

    compare(fn, [q, k, torch.tensor(scale)], torch.float32, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_siglip_small_batch_matches_float64(dtype, reduction, gen):
    n, d = 29, 24
    q, k = unit(n, d, gen, torch.float32), unit(n + 5, d, gen, torch.float32)
    t = torch.randperm(n + 5, generator=gen)[:n]
    compare(lambda impl, q, k, s, b: siglip(q, k, s, b, impl=impl, targets=t, reduction=reduction),
            [q, k, torch.tensor(10.0), torch.tensor(-10.0)], dtype, gen, reduction=reduction)
