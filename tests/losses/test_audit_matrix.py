"""Audit matrix: every fast path of the public losses against the float64 reference.

Loss (info_nce, siglip, dcl, nt_xent) x impl (tiled with tiles that do not divide the sizes;
triton in the interpreter, on its small-batch "dense" path and on the streaming kernels) x
dtype (fp32, bf16) x case (N=1, ragged N != M, targets, several positives, extra negatives,
neg_mask, DCLW, V=3 views) x logit scale (1e-3, 14.3, 1e3) x reduction ("mean", "none").

Ground truth: the reference implementation in float64 on the same (already rounded) inputs.
Checked: the loss, and the gradients of q, k (views), the scale, the bias and the extra
negatives, with random weights on ``reduction="none"`` so that every row counts.

Stated tolerances (norm of the error over the norm of the float64 value, or over 1 for a loss
and ``(1 + s) / sqrt(N)`` for a gradient where that is larger: at N=1 the InfoNCE loss is
identically 0 and its gradients cancel):
* fp32: 1e-5 on values and 1e-4 on gradients, times ``max(1, s / 100)``: at s = 1e3 the fp32
  logits themselves carry an absolute rounding error of about ``s * 6e-8``.
* bf16: the same on values (products of the rounded inputs are exact in fp32) and 1.5e-2 on
  gradients (the gradients are bf16 tensors: 2^-9 relative per entry, and the Triton backward
  rounds the logit gradient to bf16, as FlashAttention does).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from batchlab.losses import dcl, info_nce, nt_xent, siglip

VALUE_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2}
SCALES = [1e-3, 14.3, 1e3]
TILE = (4, 8)  # divides none of the sizes below (1, 3, 6, 9, 13, 14, 15, 21)


def _unit(shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


# (name, family, n, m, options): options name the extra inputs built per case
CASES = [
    ("n1", "info_nce", 1, 1, {}),
    ("n1-oneway-ragged", "info_nce", 1, 3, {"symmetric": False}),
    ("ragged-oneway", "info_nce", 13, 21, {"symmetric": False}),
    ("targets", "info_nce", 13, 13, {"targets": "perm"}),
    ("pos-mask", "info_nce", 6, 6, {"pos_mask": "two"}),
    ("extra", "info_nce", 6, 6, {"extra": 3}),
    ("extra-ragged", "info_nce", 6, 9, {"symmetric": False, "extra": 2}),
    ("neg-mask", "info_nce", 13, 13, {"neg_mask": True}),
    ("n1", "siglip", 1, 1, {}),
    ("ragged", "siglip", 13, 21, {}),
    ("targets-extra", "siglip", 13, 21, {"targets": "perm", "extra": 2}),
    ("pos-mask", "siglip", 6, 6, {"pos_mask": "two"}),
    ("neg-mask", "siglip", 6, 6, {"neg_mask": True}),
    ("sym", "dcl", 13, 13, {}),
    ("weighted", "dcl", 6, 6, {"weighted": True}),
    ("n1-extra", "dcl", 1, 1, {"symmetric": False, "extra": 3}),
    ("ragged-targets", "dcl", 13, 21, {"symmetric": False, "targets": "perm", "weighted": True}),
    ("ragged-diagonal", "dcl", 13, 21, {"symmetric": False}),
    ("extra", "dcl", 6, 6, {"extra": 2}),
    ("neg-mask", "dcl", 6, 6, {"neg_mask": True}),
    ("v2", "nt_xent", 7, 2, {}),
    ("v3-n1", "nt_xent", 1, 3, {}),
    ("v3", "nt_xent", 5, 3, {}),
]


def _inputs(family, n, m, opts, d, gen):
    """Float64 leaves (embeddings, scale, bias, extra) and the call's keyword options."""
    kw = {k: v for k, v in opts.items() if k in ("symmetric", "weighted")}
    if family == "nt_xent":  # n examples, m views
        tensors = [_unit((m, n, d), gen)]
    else:
        tensors = [_unit((n, d), gen), _unit((m, d), gen)]
    if opts.get("targets") == "perm":
        kw["targets"] = torch.randperm(m, generator=gen)[:n]
    if opts.get("pos_mask") == "two":  # a second positive in row 0 and (symmetric) in column 1
        pos = torch.eye(n, m, dtype=torch.bool)
        pos[0, n - 1] = pos[n - 1, 0] = True
        kw["pos_mask"] = pos
    if opts.get("neg_mask"):
        neg = torch.rand(n, m, generator=gen) < 0.3
        neg[torch.arange(n), torch.arange(n)] = False
        neg[:, 1] = False  # every query (and key) keeps a negative
        neg[1, :] = False
        kw["neg_mask"] = neg
    extra = _unit((n, opts["extra"], d), gen) if opts.get("extra") else None
    return tensors, extra, kw


def _call(family, impl, tensors, scale, bias, extra, kw, reduction, options):
    if family == "nt_xent":
        return nt_xent(tensors[0], scale, impl=impl, reduction=reduction, **options)
    if extra is not None:
        kw = {**kw, "extra_negatives": extra}
    fn = {"info_nce": info_nce, "dcl": dcl}.get(family)
    if fn is None:
        return siglip(*tensors, scale, bias, impl=impl, reduction=reduction, **kw, **options)
    return fn(*tensors, scale, impl=impl, reduction=reduction, **kw, **options)


def _check(impl, options, case, dtype, scale_value, reduction, gen):
    name, family, n, m, opts = case
    tensors, extra, kw = _inputs(family, n, m, opts, 9, gen)
    fast = [t.to(dtype).requires_grad_() for t in tensors]
    scale = torch.tensor(scale_value, requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True) if family == "siglip" else None
    fast_extra = extra.to(dtype).requires_grad_() if extra is not None else None
    ref = [t.detach().double().requires_grad_() for t in fast]
    ref_scale = scale.detach().double().requires_grad_()
    ref_bias = bias.detach().double().requires_grad_() if bias is not None else None
    ref_extra = fast_extra.detach().double().requires_grad_() if extra is not None else None

    out = _call(family, impl, fast, scale, bias, fast_extra, kw, reduction, options)
    want = _call(family, "reference", ref, ref_scale, ref_bias, ref_extra, kw, reduction, {})
    what = f"{family}/{name} impl={impl} {dtype} s={scale_value} {reduction}"
    assert out.shape == want.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite loss"
    kappa = max(1.0, scale_value / 100)
    value_err = float((out.detach().double() - want.detach()).norm())
    bound = VALUE_TOL * kappa * max(float(want.detach().norm()), 1.0)
    assert value_err <= bound, f"{what}: loss off by {value_err:.2e} (bound {bound:.2e})"

    w = torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5
    optional = [t for t in (bias, fast_extra) if t is not None]
    leaves = [*fast, scale, *optional]
    ref_leaves = [*ref, ref_scale, *[t for t in (ref_bias, ref_extra) if t is not None]]
    got = torch.autograd.grad((out.double() * w).sum(), leaves, allow_unused=True)
    exp = torch.autograd.grad((want * w).sum(), ref_leaves, allow_unused=True)
    floor = (1 + scale_value) / (tensors[0].shape[-2] ** 0.5)
    for i, (a, b) in enumerate(zip(got, exp)):
        assert a is not None and torch.isfinite(a).all(), f"{what}: gradient {i} missing or non-finite"
        assert a.dtype == leaves[i].dtype and a.shape == leaves[i].shape, f"{what}: gradient {i} dtype/shape"
        err = float((a.double() - b).norm())
        bound = GRAD_TOL[dtype] * kappa * max(float(b.norm()), floor)
        assert err <= bound, f"{what}: gradient {i} off by {err:.2e} (norm {float(b.norm()):.2e}, bound {bound:.2e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-{c[0]}")
def test_tiled_matches_float64_reference(case, scale, dtype, gen):
    for reduction in ("mean", "none"):
        _check("tiled", {"tile_size": TILE}, case, dtype, scale, reduction, gen)


# ---------------------------------------------------------------------------------------------- Triton


@pytest.fixture
def interpreted_triton():
    """The Triton kernels in the interpreter (the conftest sets TRITON_INTERPRET=1 on machines without a GPU)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU machine: the Triton kernels are checked there by tests/losses/gpu_check_triton.py")
    from batchlab.losses.triton import _dense

    return _dense


# nt_xent has no Triton implementation; neg_mask runs on the tiled fallback (test_triton.py checks that).
# The small-batch "dense" path serves InfoNCE and SigLIP without extra negatives or several positives.
_DENSE = {("info_nce", "n1"), ("info_nce", "n1-oneway-ragged"), ("info_nce", "ragged-oneway"),
          ("info_nce", "targets"), ("siglip", "n1"), ("siglip", "ragged")}
TRITON_CASES = [
    pytest.param(c, path, id=f"{c[1]}-{c[0]}-{path}")
    for c in CASES if c[1] != "nt_xent" and "neg_mask" not in c[4]
    for path in ("dense", "streaming")
    if path == "streaming" or (c[1], c[0]) in _DENSE
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,path", TRITON_CASES)
def test_triton_matches_float64_reference(case, path, dtype, interpreted_triton, monkeypatch, gen):
    if path == "streaming":
        monkeypatch.setattr(interpreted_triton, "DENSE_MAX_LOGITS", 0)
    for scale in SCALES:
        for reduction in ("mean", "none"):
            _check("triton", {}, case, dtype, scale, reduction, gen)
