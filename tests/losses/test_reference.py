"""The reference losses against open_clip and against a float64 hand computation.

Tolerances: fp32 inputs are compared at rtol=atol=1e-5 (fp32 sums over <= 64 terms);
bf16 inputs at 2e-2 against open_clip run on the *same* bf16 inputs (open_clip computes
its logits in bf16, we accumulate in fp32, so the two differ by bf16 rounding of the
logits: about 2^-8 relative, times a scale up to 100).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from batchlab.errors import BatchlabInputError
from batchlab.losses import LSE, DCLLoss, InfoNCELoss, NTXentLoss, SigLIPLoss, dcl, info_nce, nt_xent, siglip
from tests.losses.helpers import assert_close_all, grads, unit

open_clip = pytest.importorskip("open_clip")
from open_clip.loss import SigLipLoss  # noqa: E402


# ---------------------------------------------------------------------------
# a float64 hand computation, row by row, written independently of the library
# ---------------------------------------------------------------------------
def hand_rows(q, k, s, pos, neg=None, extra=None, dcl_mode=False, weights=None):
    """Per-query losses by explicit loops (float64, differentiable)."""
    rows = []
    for i in range(pos.shape[0]):
        terms, pos_terms = [], []
        for j in range(pos.shape[1]):
            logit = s * (q[i] @ k[j])
            if pos[i, j]:
                pos_terms.append(logit)
                if dcl_mode:
                    continue
            if neg is not None and neg[i, j]:
                continue
            terms.append(logit)
        if extra is not None:
            terms += [s * (q[i] @ e) for e in extra[i]]
        w = 1.0 if weights is None else weights[i]
        rows.append(torch.logsumexp(torch.stack(terms), 0) - w * torch.stack(pos_terms).mean())
    return torch.stack(rows)


def hand_info_nce(q, k, s, pos, neg=None, extra=None, symmetric=True, dcl_mode=False, weights=None):
    """Per-row and per-column losses; a column is a row of the transposed problem (no extra negatives)."""
    rows = hand_rows(q, k, s, pos, neg, extra, dcl_mode, None if weights is None else weights[0])
    if not symmetric:
        return rows, None
    cols = hand_rows(k, q, s, pos.T, None if neg is None else neg.T, None, dcl_mode,
                     None if weights is None else weights[1])
    return rows, cols


def sym_mean(rows, cols):
    return rows.mean() if cols is None else (rows.mean() + cols.mean()) / 2


def diag(n):
    return torch.eye(n, dtype=torch.bool)


# ---------------------------------------------------------------------------
# open_clip parity
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 33])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_info_nce_matches_open_clip(gen, n, scale, dtype):
    q, k = unit(n, 24, gen, dtype), unit(n, 24, gen, dtype)
    s = torch.tensor(scale, requires_grad=True)
    ours = info_nce(q, k, s, impl="reference")
    g_ours = grads(ours, q, k, s)
    theirs = open_clip.ClipLoss()(q, k, s)
    g_theirs = grads(theirs, q, k, s)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * scale / 10)
    assert_close_all([ours], [theirs.float()], **tol, what="loss")
    assert_close_all(g_ours, g_theirs, **tol, what="grad")


@pytest.mark.parametrize("n", [1, 5, 32])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (100.0, 3.0), (1.0, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_siglip_matches_open_clip(gen, n, scale, bias, dtype):
    q, k = unit(n, 16, gen, dtype), unit(n, 16, gen, dtype)
    s = torch.tensor(scale, requires_grad=True)
    b = torch.tensor(bias, requires_grad=True)
    ours = siglip(q, k, s, b, impl="reference")
    g_ours = grads(ours, q, k, s, b)
    theirs = SigLipLoss()(q, k, s, b)
    g_theirs = grads(theirs, q, k, s, b)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2 * scale / 10)
    assert_close_all([ours], [theirs.float()], **tol, what="loss")
    assert_close_all(g_ours, g_theirs, **tol, what="grad")


def test_modules_drop_into_open_clip_call(gen):
    q, k = unit(6, 8, gen), unit(6, 8, gen)
    s, b = torch.tensor(10.0), torch.tensor(-5.0)
    out = InfoNCELoss(impl="reference")(image_features=q, text_features=k, logit_scale=s, output_dict=True)
    torch.testing.assert_close(out["contrastive_loss"], open_clip.ClipLoss()(q, k, s))
    out = SigLIPLoss(impl="reference")(q, k, s, b, output_dict=True)
    torch.testing.assert_close(out["contrastive_loss"], SigLipLoss()(q, k, s, b))
    assert DCLLoss(weighted=True)(q, k, s).ndim == 0
    torch.testing.assert_close(NTXentLoss()(q, k, s), nt_xent(torch.stack([q, k]), s))
    with pytest.raises(BatchlabInputError, match="logit_bias"):
        SigLIPLoss()(q, k, s)
    with pytest.raises(BatchlabInputError, match="no logit bias"):
        InfoNCELoss()(q, k, s, b)


# ---------------------------------------------------------------------------
# every option against the float64 hand computation
# ---------------------------------------------------------------------------
def _f64(gen, n, m, d=12, extra=0):
    q, k = unit(n, d, gen, torch.float64), unit(m, d, gen, torch.float64)
    e = F.normalize(torch.randn(n, extra, d, generator=gen, dtype=torch.float64), dim=-1).requires_grad_(True)
    s = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    return q, k, e, s


TOL64 = dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_info_nce_targets_and_reductions(gen, symmetric, reduction):
    n = 9
    q, k, _, s = _f64(gen, n, n)
    targets = torch.randperm(n, generator=gen)
    pos = torch.zeros(n, n, dtype=torch.bool)
    pos[torch.arange(n), targets] = True
    loss, lse = info_nce(q, k, s, symmetric=symmetric, targets=targets, reduction=reduction, return_lse=True,
                         impl="reference")
    rows, cols = hand_info_nce(q, k, s, pos, symmetric=symmetric)
    if reduction == "none":
        expected = rows if cols is None else (rows + cols) / 2
    elif reduction == "sum":
        expected = rows.sum() if cols is None else (rows.sum() + cols.sum()) / 2
    else:
        expected = sym_mean(rows, cols)
    assert isinstance(lse, LSE) and lse.row.shape == (n,)
    assert (lse.col is None) == (not symmetric)
    torch.testing.assert_close(loss, expected, **TOL64)
    assert_close_all(grads(loss.sum(), q, k, s), grads(expected.sum(), q, k, s), **TOL64, what="grad")


def test_info_nce_multi_positive_extra_negatives_and_neg_mask(gen):
    n, m = 8, 8
    q, k, e, s = _f64(gen, n, m, extra=3)
    pos = diag(n) | (torch.rand(n, m, generator=gen) < 0.15)
    neg = (torch.rand(n, m, generator=gen) < 0.2) & ~pos
    loss = info_nce(q, k, s, pos_mask=pos, extra_negatives=e, neg_mask=neg, impl="reference")
    rows, cols = hand_info_nce(q, k, s, pos, neg=neg, extra=e)
    expected = sym_mean(rows, cols)
    torch.testing.assert_close(loss, expected, **TOL64)
    assert_close_all(grads(loss, q, k, e, s), grads(expected, q, k, e, s), **TOL64, what="grad")


def test_neg_mask_forms_agree(gen):
    n = 10
    q, k, _, s = _f64(gen, n, n)
    neg = (torch.rand(n, n, generator=gen) < 0.3) & ~diag(n)
    pairs = neg.nonzero()
    dense = info_nce(q, k, s, neg_mask=neg, impl="reference")
    by_pairs = info_nce(q, k, s, neg_mask=pairs, impl="reference")
    by_fn = info_nce(q, k, s, neg_mask=lambda r, c: neg[r][:, c], impl="reference")
    torch.testing.assert_close(dense, by_pairs, **TOL64)
    torch.testing.assert_close(dense, by_fn, **TOL64)
    assert not torch.allclose(dense, info_nce(q, k, s, impl="reference"))


def test_one_way_with_more_keys_than_queries(gen):
    q, k, _, s = _f64(gen, 5, 11)
    targets = torch.tensor([3, 0, 10, 7, 7])
    pos = torch.zeros(5, 11, dtype=torch.bool)
    pos[torch.arange(5), targets] = True
    loss = info_nce(q, k, s, symmetric=False, targets=targets, impl="reference")
    rows, _ = hand_info_nce(q, k, s, pos, symmetric=False)
    torch.testing.assert_close(loss, rows.mean(), **TOL64)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dcl_against_hand(gen, weighted, symmetric):
    n = 7
    q, k, e, s = _f64(gen, n, n, extra=2)
    pos = diag(n)
    weights = None
    if weighted:
        cos = (q * k).sum(1).detach()
        w = 2 - n * torch.softmax(cos / 0.5, dim=0)
        weights = (w, w)
    loss = dcl(q, k, s, weighted=weighted, symmetric=symmetric, extra_negatives=e, impl="reference")
    rows, cols = hand_info_nce(q, k, s, pos, extra=e, symmetric=symmetric, dcl_mode=True, weights=weights)
    expected = sym_mean(rows, cols)
    torch.testing.assert_close(loss, expected, **TOL64)
    assert_close_all(grads(loss, q, k, e, s), grads(expected, q, k, e, s), **TOL64, what="grad")


def test_dclw_weights_follow_the_paper(gen):
    # uniform positive similarity -> softmax = 1/N -> every weight is 1 -> DCLW == DCL
    q = unit(6, 8, gen, torch.float64)
    assert torch.allclose(dcl(q, q, 5.0, weighted=True), dcl(q, q, 5.0))


@pytest.mark.parametrize("v", [2, 3])
def test_nt_xent_against_hand(gen, v):
    n, d = 5, 8
    views = F.normalize(torch.randn(v, n, d, generator=gen, dtype=torch.float64), dim=-1).requires_grad_(True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = nt_xent(views, s, impl="reference")
    z = views.reshape(v * n, d)
    per = []
    for a in range(v * n):
        others = [s * (z[a] @ z[b]) for b in range(v * n) if b != a]
        positives = [s * (z[a] @ z[b]) for b in range(v * n) if b != a and b % n == a % n]
        per.append(torch.logsumexp(torch.stack(others), 0) - torch.stack(positives).mean())
    expected = torch.stack(per).mean()
    torch.testing.assert_close(loss, expected, **TOL64)
    assert_close_all(grads(loss, views, s), grads(expected, views, s), **TOL64, what="grad")
    assert nt_xent(views, s, reduction="none", impl="reference").shape == (v, n)


def test_nt_xent_two_views_is_simclr(gen):
    # SimCLR: cross entropy over the 2N x 2N logits with the diagonal removed
    n = 6
    views = F.normalize(torch.randn(2, n, 8, generator=gen), dim=-1)
    z = views.reshape(2 * n, 8)
    logits = 2.0 * z @ z.T
    logits.fill_diagonal_(float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    torch.testing.assert_close(nt_xent(views, 2.0), F.cross_entropy(logits, labels), rtol=1e-5, atol=1e-6)


def test_siglip_options_against_hand(gen):
    n = 6
    q, k, e, s = _f64(gen, n, n, extra=2)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    pos = diag(n) | (torch.rand(n, n, generator=gen) < 0.2)
    neg = (torch.rand(n, n, generator=gen) < 0.2) & ~pos
    loss = siglip(q, k, s, b, pos_mask=pos, neg_mask=neg, extra_negatives=e, impl="reference")
    total = 0
    for i in range(n):
        for j in range(n):
            if neg[i, j]:
                continue
            y = 1.0 if pos[i, j] else -1.0
            total = total - F.logsigmoid(y * (s * (q[i] @ k[j]) + b))
        for x in e[i]:
            total = total - F.logsigmoid(-(s * (q[i] @ x) + b))
    expected = total / n
    torch.testing.assert_close(loss, expected, **TOL64)
    assert_close_all(grads(loss, q, k, e, s, b), grads(expected, q, k, e, s, b), **TOL64, what="grad")


def test_n_equals_one():
    q = F.normalize(torch.ones(1, 4), dim=1)
    assert float(info_nce(q, q, 10.0)) == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(siglip(q, q, 10.0, -10.0))
    with pytest.raises(BatchlabInputError, match="at least one negative"):
        dcl(q, q, 10.0)


def test_extreme_scale_stays_finite(gen):
    q, k = unit(16, 8, gen), unit(16, 8, gen)
    s = torch.tensor(1000.0, requires_grad=True)
    loss = info_nce(q, k, s)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads(loss, q, k, s))


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda q, k: (q, k[:, :4]), "same embedding dimension"),
        (lambda q, k: (q, k.double()), "dtype"),
        (lambda q, k: (q[0], k), r"shape \(N, d\)"),
        (lambda q, k: (q[:0], k[:0]), "empty"),
        (lambda q, k: (q.masked_fill(torch.eye(*q.shape, dtype=torch.bool), float("nan")), k), "non-finite"),
        (lambda q, k: (q * 3, k), "L2-normalised"),
        (lambda q, k: (q, k[:5]), "as many keys as queries"),
    ],
)
def test_bad_input_raises(gen, make, match):
    q, k = unit(6, 8, gen).detach(), unit(6, 8, gen).detach()
    a, b = make(q, k)
    with pytest.raises(BatchlabInputError, match=match):
        info_nce(a, b, 10.0)


def test_bad_masks_and_options(gen):
    q, k = unit(4, 8, gen).detach(), unit(4, 8, gen).detach()
    empty_row = torch.eye(4, dtype=torch.bool)
    empty_row[2, 2] = False
    with pytest.raises(BatchlabInputError, match="no positive"):
        info_nce(q, k, 10.0, pos_mask=empty_row)
    with pytest.raises(BatchlabInputError, match="removes a positive"):
        info_nce(q, k, 10.0, neg_mask=torch.eye(4, dtype=torch.bool), impl="reference")
    with pytest.raises(BatchlabInputError, match="either targets or pos_mask"):
        info_nce(q, k, 10.0, targets=torch.arange(4), pos_mask=torch.eye(4, dtype=torch.bool))
    with pytest.raises(BatchlabInputError, match="nobody's target"):
        info_nce(q, k, 10.0, targets=torch.tensor([0, 0, 1, 2]))
    with pytest.raises(BatchlabInputError, match=r"\[0, 4\)"):
        info_nce(q, k, 10.0, targets=torch.tensor([0, 1, 2, 9]), symmetric=False)
    with pytest.raises(BatchlabInputError, match="reduction"):
        info_nce(q, k, 10.0, reduction="avg")
    with pytest.raises(BatchlabInputError, match="impl"):
        info_nce(q, k, 10.0, impl="fast")
    with pytest.raises(BatchlabInputError, match="logit_scale must be finite"):
        info_nce(q, k, float("inf"))
    with pytest.raises(BatchlabInputError, match="extra_negatives"):
        info_nce(q, k, 10.0, extra_negatives=torch.zeros(3, 2, 8))
    with pytest.raises(BatchlabInputError, match="callable neg_mask"):
        info_nce(q, k, 10.0, neg_mask=lambda r, c: torch.zeros(1, 1), impl="reference")
    with pytest.raises(BatchlabInputError, match="sigma"):
        dcl(q, k, 10.0, weighted=True, sigma=0)
    with pytest.raises(BatchlabInputError, match="at least 2 views"):
        nt_xent(q[None], 2.0)
    with pytest.raises(BatchlabInputError, match="initialised torch.distributed"):
        info_nce(q, k, 10.0, distributed="ring")
    # distributed="auto" without a process group falls back to one process
    torch.testing.assert_close(info_nce(q, k, 10.0, distributed="auto"), info_nce(q, k, 10.0))


def test_normalize_flag(gen):
    q, k = unit(5, 8, gen).detach(), unit(5, 8, gen).detach()
    torch.testing.assert_close(info_nce(q * 3, k * 0.5, 10.0, normalize=True), info_nce(q, k, 10.0))


def test_scale_gets_gradient_and_matches_finite_difference(gen):
    q, k = unit(6, 8, gen, torch.float64).detach(), unit(6, 8, gen, torch.float64).detach()
    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(info_nce(q, k, s), s)
    h = 1e-6
    fd = (info_nce(q, k, 5.0 + h) - info_nce(q, k, 5.0 - h)) / (2 * h)
    assert math.isclose(float(g), float(fd), rel_tol=1e-6)


def test_backend_options_are_dropped_by_auto_and_checked_when_explicit(gen):
    q, k = unit(4, 8, gen).detach(), unit(4, 8, gen).detach()
    # auto picks the reference at this size: a tile size is meaningless there, not an error
    torch.testing.assert_close(info_nce(q, k, 10.0, tile_size=2), info_nce(q, k, 10.0))
    with pytest.raises(BatchlabInputError, match="does not take option"):
        info_nce(q, k, 10.0, impl="reference", tile_size=2)
    with pytest.raises(BatchlabInputError, match="does not take option"):
        siglip(q, k, 10.0, -10.0, impl="tiled", tile_sise=2)
