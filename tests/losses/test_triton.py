"""The Triton kernels (``impl="triton"``) in Triton's CPU interpreter, against float64 ground truth.

``TRITON_INTERPRET=1`` must be set before the kernels are defined, so this module sets
it before importing ``batchlab.losses.triton`` (and re-imports the kernels if another
test imported them without it). The interpreter runs the same kernel code as the GPU,
with bf16 dot operands upcast to fp32 (its bf16 dot is broken in Triton 3.8); the
products of bf16 inputs are exact in fp32 either way, so nothing is hidden.

Ground truth: the reference implementations evaluated in float64 on the same
(already rounded) inputs, plus an explicit float64 formula for the headline losses.

Tolerances (relative, on values and on gradient norms):
* fp32 inputs: 1e-5 on values, 1e-4 on gradients (fp32 sums of <= 70 terms; the
  gradient goes through fp32 products in a different order).
* bf16 / fp16 inputs: 1e-5 on values (logits are exact products of the rounded inputs,
  summed in fp32), 1.5e-2 on gradients: the backward stores the logit gradient in the
  input dtype (bf16: 2^-9 relative per entry) before the two gradient products.
Small sizes keep the interpreter fast (the whole file runs in well under a minute).
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

if "batchlab.losses.triton._kernels" in sys.modules:  # defined without the interpreter: redefine
    importlib.reload(sys.modules["batchlab.losses.triton._kernels"])

from batchlab.losses import LSE, dcl, info_nce, siglip  # noqa: E402
from batchlab.losses.triton import _dense, _launch, _lse, triton_available, triton_info_nce  # noqa: E402

@pytest.fixture(autouse=True)
def _streaming_kernels(monkeypatch):
    """These tests cover the streaming kernels; the small-batch path has its own (test_triton_dense.py)."""
    monkeypatch.setattr(_dense, "DENSE_MAX_LOGITS", 0)


VALUE_RTOL = 1e-5
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 1.5e-2}


def unit(n, d, gen, dtype):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(loss_fn, tensors, dtype, gen, *, reduction="mean"):
    """Run ``loss_fn(impl, *tensors)`` with triton on ``dtype`` inputs and the reference in float64.

    Scalars (0-d) stay fp32 for the kernel run. Returns the two outputs for extra checks.
    """
    fast_in = [t.detach().to(dtype if t.dim() else torch.float32).requires_grad_() for t in tensors]
    ref_in = [t.detach().to(dtype if t.dim() else torch.float32).double().requires_grad_() for t in fast_in]
    fast = loss_fn("triton", *fast_in)
    ref = loss_fn("reference", *ref_in)
    fast_loss = fast[0] if isinstance(fast, tuple) else fast
    ref_loss = ref[0] if isinstance(ref, tuple) else ref
    assert torch.isfinite(fast_loss).all(), "non-finite loss"
    torch.testing.assert_close(fast_loss.double(), ref_loss, rtol=VALUE_RTOL, atol=VALUE_RTOL)
    # random weights make every output element of reduction="none" matter for the gradient
    w = torch.rand(fast_loss.shape, generator=gen, dtype=torch.float64) + 0.5
    g_fast = torch.autograd.grad((fast_loss.double() * w).sum(), fast_in, allow_unused=True)
    g_ref = torch.autograd.grad((ref_loss * w).sum(), ref_in, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_fast, g_ref)):
        if b is None:
            assert a is None or not a.abs().sum(), f"gradient {i} should be zero"
            continue
        assert a is not None and torch.isfinite(a).all(), f"gradient {i} missing or non-finite"
        assert a.dtype == fast_in[i].dtype
        # Where the true gradient nearly cancels (N=1: the loss is identically 0), compare with
        # its natural size |s| / sqrt(N) instead of its own norm.
        floor = (1 + float(tensors[2].abs())) / len(tensors[0]) ** 0.5
        err = float((a.double() - b).norm())
        assert err <= GRAD_TOL[dtype] * max(float(b.norm()), floor), (
            f"gradient {i}: relative error {rel_err(a, b):.2e} (norm {float(b.norm()):.2e})"
        )
    return fast, ref


SIZES = [(1, 16), (7, 16), (33, 40), (70, 40)]


@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_matches_float64(n, d, dtype, symmetric, gen):
    q, k = unit(n, d, gen, dtype), unit(n, d, gen, dtype)
    s = torch.tensor(14.3)
    reduction = "none" if n == 33 else "mean"

    def fn(impl, q, k, s):
        return info_nce(q, k, s, symmetric=symmetric, reduction=reduction, return_lse=True, impl=impl)

    (_, lse), (_, ref_lse) = compare(fn, [q, k, s], dtype, gen, reduction=reduction)
    assert isinstance(lse, LSE)
    torch.testing.assert_close(lse.row.double(), ref_lse.row, rtol=1e-5, atol=1e-5)
    if symmetric:
        torch.testing.assert_close(lse.col.double(), ref_lse.col, rtol=1e-5, atol=1e-5)
    else:
        assert lse.col is None


@pytest.mark.parametrize("tma", [0, 1])
def test_symmetric_info_nce_explicit_formula(tma, gen, monkeypatch):
    """The headline loss against the formula written out in float64 (no library code).

    Both load paths: pointer loads, and tensor descriptors (TMA on Hopper).
    """
    monkeypatch.setitem(_launch.INTERPRET_CONFIG, "TMA", tma)
    n, d = 33, 40
    q, k = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    s = torch.tensor(20.0)
    qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
    sd = s.double().requires_grad_()
    logits = sd * qd @ kd.T
    diag = logits.diagonal()
    expected = ((torch.logsumexp(logits, 1) - diag).mean() + (torch.logsumexp(logits, 0) - diag).mean()) / 2
    qt, kt, st = q.clone().requires_grad_(), k.clone().requires_grad_(), s.clone().requires_grad_()
    got = triton_info_nce(qt, kt, st)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, [qt, kt, st]), torch.autograd.grad(expected, [qd, kd, sd])):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("scale,one_exp", [(0.01, True), (14.3, False), (100.0, True)])
def test_info_nce_extreme_scales(scale, one_exp, gen, monkeypatch):
    """Both epilogues: one exp2 per logit (small |s|) and two (large |s|, or switched off)."""
    monkeypatch.setattr(_lse, "ONE_EXP", one_exp)
    n, d = 33, 16
    q, k = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    compare(lambda impl, q, k, s: info_nce(q, k, s, impl=impl), [q, k, torch.tensor(scale)], torch.float32, gen)


def _one_pointing_away(gen, n=12, d=16):
    """(a, b): unit rows near e1, except b[3] near -e1 (its logits against every row of a are near -s)."""
    e1 = torch.zeros(d, dtype=torch.float64)
    e1[0] = 1
    a = F.normalize(e1 + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).float()
    b = F.normalize(e1 + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    b[3] = F.normalize(-e1 + 0.05 * torch.randn(d, generator=gen, dtype=torch.float64), dim=0)
    return a, b.float()


def test_column_underflow_is_recomputed_exactly(gen, monkeypatch):
    """At s=100 a key that every query points away from has column logits near -100.

    Against the fixed shift (bound - 92 binary orders) its column sum underflows; the
    forward must notice and recompute that column exactly (second pass on swapped inputs).
    """
    q, k = _one_pointing_away(gen)
    # the shifted column sum of key 3 underflows: the finish pass must recompute it exactly
    ctl = _lse.control(q, k, torch.tensor(100.0))
    shifted = torch.exp2(100.0 * (q @ k[3]) * _lse.LOG2E - ctl[0]).sum()
    assert float(shifted) < _lse._UNDERFLOW
    for dcl_mode in (False, True):

        def fn(impl, q, k, s):
            if dcl_mode:
                return dcl(q, k, s, impl=impl, return_lse=True)
            return info_nce(q, k, s, impl=impl, return_lse=True)

        (_, lse), (_, ref) = compare(fn, [q, k, torch.tensor(100.0)], torch.float32, gen)
        torch.testing.assert_close(lse.col.double(), ref.col, rtol=1e-5, atol=1e-5)


def test_info_nce_targets_extra_negatives_and_panels(gen):
    """Arbitrary targets, more keys than queries, extra negatives, and several gradient panels."""
    n, m, d = 33, 50, 40
    q, k = unit(n, d, gen, torch.bfloat16), unit(m, d, gen, torch.bfloat16)
    extra = F.normalize(torch.randn(n, 3, d, generator=gen, dtype=torch.float64), dim=-1).bfloat16()
    targets = torch.randint(0, m, (n,), generator=gen)

    def fn(impl, q, k, s, extra):
        opts = {"workspace_bytes": 16 * m * 2} if impl == "triton" else {}  # 16-row panels: 3 panels
        return info_nce(q, k, s, symmetric=False, targets=targets, extra_negatives=extra, reduction="none",
                        impl=impl, **opts)

    compare(fn, [q, k, torch.tensor(10.0), extra], torch.bfloat16, gen)


def test_symmetric_permuted_targets_and_pos_mask(gen):
    n, d = 33, 16
    q, k = unit(n, d, gen, torch.float16), unit(n, d, gen, torch.float16)
    perm = torch.randperm(n, generator=gen)
    compare(lambda impl, q, k, s: info_nce(q, k, s, targets=perm, impl=impl, workspace_bytes=32 * n * 2)
            if impl == "triton" else info_nce(q, k, s, targets=perm, impl=impl),
            [q, k, torch.tensor(14.3)], torch.float16, gen)
    pos = torch.eye(n, dtype=torch.bool) | (torch.rand(n, n, generator=gen) < 0.1)
    compare(lambda impl, q, k, s: info_nce(q, k, s, pos_mask=pos, reduction="sum", impl=impl),
            [q, k, torch.tensor(14.3)], torch.float32, gen)


@pytest.mark.parametrize("options", [dict(TPP=3), dict(TPP=2, FLAT=1, TMA=1), dict(FLAT=1)])
def test_loop_options_give_the_same_losses(options, gen, monkeypatch):
    """The speed-only launch options (several column tiles per backward program, loop
    flattening) against float64: symmetric InfoNCE over
    several gradient panels with d not a multiple of the d chunk, and DCL (excluded
    positives inside the tile loop)."""
    for key, value in options.items():
        monkeypatch.setitem(_launch.INTERPRET_CONFIG, key, value)
    n = m = 70  # 5 row blocks, 3 column tiles (the last partial), d = 2.5 chunks
    d = 40
    q, k = unit(n, d, gen, torch.bfloat16), unit(m, d, gen, torch.bfloat16)
    targets = torch.randperm(m, generator=gen)

    def fn(impl, q, k, s):
        opts = {"workspace_bytes": 16 * m * 2} if impl == "triton" else {}
        return info_nce(q, k, s, targets=targets, reduction="none", impl=impl, **opts)

    compare(fn, [q, k, torch.tensor(14.3)], torch.bfloat16, gen, reduction="none")
    compare(lambda impl, q, k, s: dcl(q, k, s, impl=impl), [q[:33], k[:33], torch.tensor(10.0)],
            torch.float32, gen)


@pytest.mark.parametrize("n,d", [(7, 16), (70, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_siglip_matches_float64(n, d, dtype, reduction, gen, monkeypatch):
    monkeypatch.setitem(_launch.INTERPRET_CONFIG, "TMA", int(reduction == "none"))  # both load paths
    q, k = unit(n, d, gen, dtype), unit(n, d, gen, dtype)

    def fn(impl, q, k, s, b):
        return siglip(q, k, s, b, reduction=reduction, impl=impl)

    compare(fn, [q, k, torch.tensor(10.0), torch.tensor(-10.0)], dtype, gen)


def test_siglip_explicit_formula_targets_extra_and_no_grad(gen):
    n, m, d = 33, 40, 24
    q, k = unit(n, d, gen, torch.float32), unit(m, d, gen, torch.float32)
    targets = torch.randint(0, m, (n,), generator=gen)
    s, b = torch.tensor(12.0), torch.tensor(-5.0)
    logits = s.double() * q.double() @ k.double().T + b.double()
    y = -torch.ones(n, m, dtype=torch.float64)
    y[torch.arange(n), targets] = 1
    expected = -F.logsigmoid(y * logits).sum() / n
    with torch.no_grad():
        got = siglip(q, k, s, b, targets=targets, impl="triton")
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    extra = F.normalize(torch.randn(n, 2, d, generator=gen, dtype=torch.float64), dim=-1).float()
    compare(lambda impl, q, k, s, b, e: siglip(q, k, s, b, targets=targets, extra_negatives=e, reduction="sum",
                                              impl=impl, **({"workspace_bytes": 16 * m * 4} if impl == "triton" else {})),
            [q, k, s, b, extra], torch.float32, gen)
    one_hot = torch.zeros(n, m, dtype=torch.bool)
    one_hot[torch.arange(n), targets] = True  # one positive per row: turned into targets in-kernel
    compare(lambda impl, q, k, s, b: siglip(q, k, s, b, pos_mask=one_hot, impl=impl), [q, k, s, b],
            torch.bfloat16, gen)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dcl_matches_float64(weighted, dtype, gen, monkeypatch):
    monkeypatch.setitem(_launch.INTERPRET_CONFIG, "TMA", int(weighted))  # both load paths
    n, d = 33, 40
    q, k = unit(n, d, gen, dtype), unit(n, d, gen, dtype)
    perm = torch.randperm(n, generator=gen)

    def fn(impl, q, k, s):
        return dcl(q, k, s, weighted=weighted, targets=perm, reduction="none", return_lse=True, impl=impl)

    (_, lse), (_, ref) = compare(fn, [q, k, torch.tensor(14.3)], dtype, gen)
    torch.testing.assert_close(lse.row.double(), ref.row, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.col.double(), ref.col, rtol=1e-5, atol=1e-5)


def test_dcl_one_way_more_keys(gen):
    n, m, d = 20, 45, 16
    q, k = unit(n, d, gen, torch.float32), unit(m, d, gen, torch.float32)
    targets = torch.randint(0, m, (n,), generator=gen)
    compare(lambda impl, q, k, s: dcl(q, k, s, symmetric=False, targets=targets, impl=impl),
            [q, k, torch.tensor(5.0)], torch.float32, gen)


def test_fallbacks_give_reference_results(gen):
    """neg_mask (any form) and several positives per row for SigLIP/DCL run on the fallback."""
    n, d = 16, 16
    q, k = unit(n, d, gen, torch.float32), unit(n, d, gen, torch.float32)
    neg = (torch.rand(n, n, generator=gen) < 0.2) & ~torch.eye(n, dtype=torch.bool)
    pairs = neg.nonzero()
    compare(lambda impl, q, k, s: info_nce(q, k, s, neg_mask=pairs, impl=impl), [q, k, torch.tensor(10.0)],
            torch.float32, gen)
    pos = torch.eye(n, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    compare(lambda impl, q, k, s, b: siglip(q, k, s, b, pos_mask=pos, impl=impl),
            [q, k, torch.tensor(10.0), torch.tensor(-3.0)], torch.float32, gen)
    compare(lambda impl, q, k, s: dcl(q, k, s, pos_mask=pos, neg_mask=neg & ~pos, impl=impl),
            [q, k, torch.tensor(10.0)], torch.float32, gen)


def test_availability_and_dispatch(gen):
    assert triton_available("cpu")  # under the interpreter
    assert not triton_available("meta")
    q, k = unit(8, 16, gen, torch.float32), unit(8, 16, gen, torch.float32)
    # auto never picks the interpreter on the CPU: it gives the reference result
    torch.testing.assert_close(info_nce(q, k, 10.0, impl="auto"), info_nce(q, k, 10.0, impl="triton"))


TILE_OPTIONS = [dict(TILE=1), dict(TILE=1, TMA=1, WS=1, TWO_EXP=1)]


@pytest.mark.parametrize("options", TILE_OPTIONS)
def test_one_tile_kernels_match_float64(options, gen, monkeypatch):
    """``TILE=1`` (one tile per program; fixed-shift row sums; per-tile row partials in SigLIP)
    and its warp-specialised, branch-free variant against float64: ragged sizes over several
    panels, bf16 and fp32, N=1, targets, DCL's excluded positives, per-row SigLIP."""
    for key, value in options.items():
        monkeypatch.setitem(_launch.INTERPRET_CONFIG, key, value)
    n, m, d = 70, 45, 40  # partial row and column tiles, d = 2.5 chunks
    q, k = unit(n, d, gen, torch.bfloat16), unit(n, d, gen, torch.bfloat16)
    perm = torch.randperm(n, generator=gen)
    panels = {"workspace_bytes": 16 * n * 2}

    def clip(impl, q, k, s):
        return info_nce(q, k, s, targets=perm, reduction="none", return_lse=True, impl=impl,
                        **(panels if impl == "triton" else {}))

    compare(clip, [q, k, torch.tensor(14.3)], torch.bfloat16, gen)
    k = k[:m]
    targets = torch.randint(0, m, (n,), generator=gen)
    qs, ks = unit(33, 16, gen, torch.float32), unit(33, 16, gen, torch.float32)
    for scale in (0.01, 100.0):
        compare(lambda impl, q, k, s: info_nce(q, k, s, impl=impl), [qs, ks, torch.tensor(scale)], torch.float32, gen)
    compare(lambda impl, q, k, s: info_nce(q, k, s, impl=impl), [qs[:1], ks[:1], torch.tensor(14.3)], torch.float32,
            gen)
    perm33 = torch.randperm(33, generator=gen)
    compare(lambda impl, q, k, s: dcl(q, k, s, targets=perm33, impl=impl),
            [qs, ks, torch.tensor(10.0)], torch.float32, gen)
    compare(lambda impl, q, k, s: info_nce(q, k, s, symmetric=False, impl=impl), [qs, ks, torch.tensor(14.3)],
            torch.float32, gen)
    for reduction in ("mean", "none"):
        compare(lambda impl, q, k, s, b: siglip(q, k, s, b, targets=targets, reduction=reduction, impl=impl,
                                                **(panels if impl == "triton" else {})),
                [q, k, torch.tensor(10.0), torch.tensor(-10.0)], torch.bfloat16, gen)


@pytest.mark.parametrize("options", TILE_OPTIONS[:1])
def test_one_tile_forward_recomputes_underflowed_rows(options, gen, monkeypatch):
    """The one-tile forward shifts the row sums too: a query that points away from every key
    (s=100) underflows against the shift and must be recomputed exactly (the row finish)."""
    for key, value in options.items():
        monkeypatch.setitem(_launch.INTERPRET_CONFIG, key, value)
    k, q = _one_pointing_away(gen)
    ctl = _lse.control(q, k, torch.tensor(100.0))
    assert float(torch.exp2(100.0 * (k @ q[3]) * _lse.LOG2E - ctl[0]).sum()) < _lse._UNDERFLOW
    (_, lse), (_, ref) = compare(lambda impl, q, k, s: info_nce(q, k, s, impl=impl, return_lse=True),
                                 [q, k, torch.tensor(100.0)], torch.float32, gen)
    torch.testing.assert_close(lse.row.double(), ref.row, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.col.double(), ref.col, rtol=1e-5, atol=1e-5)


def test_one_tile_forward_config_falls_back_to_the_looped_forward_for_large_keys(gen, monkeypatch):
    """With ``TILE`` in the forward config but more key bytes than ``TILE_FWD_MAX_KEY_BYTES`` the looped
    forward runs (its config without ``TILE``, its own stages): same results as the reference."""
    monkeypatch.setitem(_launch.INTERPRET_CONFIG, "TILE", 1)
    monkeypatch.setattr(_lse, "TILE_FWD_MAX_KEY_BYTES", 0)
    calls = []
    monkeypatch.setattr(_lse, "_lse_forward_tiles", lambda *a, **kw: calls.append(1))
    q, k = unit(37, 24, gen, torch.bfloat16), unit(37, 24, gen, torch.bfloat16)
    perm = torch.randperm(37, generator=gen)
    compare(lambda impl, q, k, s: info_nce(q, k, s, targets=perm, impl=impl), [q, k, torch.tensor(14.3)],
            torch.bfloat16, gen)
    compare(lambda impl, q, k, s: dcl(q, k, s, impl=impl), [q, k, torch.tensor(100.0)], torch.bfloat16, gen)
    assert not calls  # the one-tile forward was never asked
