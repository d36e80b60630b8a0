"""SigLIP's streaming kernels in Triton's CPU interpreter: the lean one-tile kernel (``TILE=2``) against
float64, and the accuracy of the softplus terms ``log(1 + e)`` with ``e = exp(-|x|)`` tiny (b = -10).

The old ``log2(1 + e)`` lost the low bits of ``e`` to the rounding of ``1 + e``: at s = 0.01, b = -10
(``e ~ 4.5e-5``) each negative term was off by up to ~1e-3, rows of negatives by ~1e-4 here.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from batchlab.losses import siglip  # noqa: E402
from batchlab.losses.triton import _dense, _launch, _siglip  # noqa: E402
from tests.losses.test_triton import compare, unit  # noqa: E402

KERNELS = {"default": {}, "one-tile": dict(TILE=1), "lean": dict(TILE=2), "lean tma": dict(TILE=2, TMA=1),
           "lean looped": dict(TILE=2, TPP=3, FLAT=1)}


@pytest.fixture(autouse=True)
def _streaming(monkeypatch):
    monkeypatch.setattr(_dense, "DENSE_MAX_LOGITS", 0)


def _use(monkeypatch, kernel):
    options = tuple(_launch.KERNEL_OPTIONS["siglip"])
    if "TPP" not in options:  # the lean kernel's loop options, until _launch lists them
        monkeypatch.setitem(_launch.KERNEL_OPTIONS, "siglip", options + ("TPP", "FLAT"))
    for key, value in KERNELS[kernel].items():
        monkeypatch.setitem(_launch.INTERPRET_CONFIG, key, value)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_softplus_of_tiny_terms_is_log1p_accurate(kernel, gen, monkeypatch):
    """Rows of negatives only (targets outside the keys) at s = 0.01, b = -10 and s = 10, b = -10:
    per-row loss sums within 1e-6 of float64, and the gradients."""
    _use(monkeypatch, kernel)
    n, m, d = 40, 70, 24
    q, k = unit(n, d, gen, torch.float32), unit(m, d, gen, torch.float32)
    none = torch.full((n,), -1, dtype=torch.long)
    for s, b in ((0.01, -10.0), (10.0, -10.0)):
        scale, bias = torch.tensor(s), torch.tensor(b)
        g = torch.rand(n, generator=gen) + 0.5
        rows, (dq, dk, ds, db) = _siglip.siglip_pass(q, k, scale, bias, none, loss=True, g_row=g)
        q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
        s64, b64 = torch.tensor(s, dtype=torch.float64, requires_grad=True), torch.tensor(b, dtype=torch.float64,
                                                                                          requires_grad=True)
        ref = F.softplus(s64 * q64 @ k64.T + b64).sum(1)
        torch.testing.assert_close(rows.double(), ref.detach(), rtol=1e-6, atol=0)
        grads = torch.autograd.grad((ref * g.double()).sum(), [q64, k64, s64, b64])
        for got, want in zip((dq, dk, ds, db), grads):
            assert float((got.double() - want).norm()) <= 1e-5 * float(want.norm())


@pytest.mark.parametrize("kernel", ["lean", "lean tma", "lean looped"])
def test_lean_kernel_matches_float64(kernel, gen, monkeypatch):
    """``TILE=2``: ragged rows and columns (partial tiles, the masked epilogue), several panels, targets,
    extra negatives, summed and per-row losses, bf16 and fp32, the scale gradient at s = 0.01 (b = 0)."""
    _use(monkeypatch, kernel)
    n, m, d = 70, 45, 40
    q, k = unit(n, d, gen, torch.bfloat16), unit(n, d, gen, torch.bfloat16)
    panels = {"workspace_bytes": 16 * n * 2}
    for reduction in ("mean", "none"):
        compare(lambda impl, q, k, s, b: siglip(q, k, s, b, reduction=reduction, impl=impl,
                                                **(panels if impl == "triton" else {})),
                [q, k, torch.tensor(10.0), torch.tensor(-10.0)], torch.bfloat16, gen)
    targets = torch.randint(0, m, (n,), generator=gen)
    extra = F.normalize(torch.randn(n, 2, d, generator=gen, dtype=torch.float64), dim=-1).float()
    compare(lambda impl, q, k, s, b, e: siglip(q, k, s, b, targets=targets, extra_negatives=e, reduction="sum",
                                              impl=impl), [q.float(), k[:m].float(), torch.tensor(12.0),
                                                           torch.tensor(-5.0), extra], torch.float32, gen)
    qs, ks = unit(33, 16, gen, torch.bfloat16), unit(33, 16, gen, torch.bfloat16)
    s = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(siglip(qs, ks, s.float(), torch.tensor(0.0), impl="triton"), s)[0]
    s64 = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(siglip(qs.double(), ks.double(), s64, torch.tensor(0.0, dtype=torch.float64),
                                      impl="reference"), s64)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_lean_kernel_fp16_and_scale_gradient_from_the_products(gen, monkeypatch):
    """``TILE=2`` with fp16 inputs (the stored gradient normalised by ``ginv = 1 / max|g|``, not ``s``) and
    with the scale gradient taken from the products (``_lse.DS_SUM`` off: the kernel's ``DS=False`` path)."""
    from batchlab.losses.triton import _lse

    _use(monkeypatch, "lean")
    n, d = 40, 24
    q, k = unit(n, d, gen, torch.float16), unit(n, d, gen, torch.float16)
    args = [q, k, torch.tensor(10.0), torch.tensor(-10.0)]
    compare(lambda impl, q, k, s, b: siglip(q, k, s, b, reduction="none", impl=impl), args, torch.float16, gen)
    monkeypatch.setattr(_lse, "DS_SUM", False)
    compare(lambda impl, q, k, s, b: siglip(q, k, s, b, impl=impl), args, torch.bfloat16, gen)
