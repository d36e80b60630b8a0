"""The tiled engine against the exact reference losses: values, LSEs and every gradient.

Tolerances (stated, with reasons):
* fp32: rtol = 1e-5, atol = 2e-5 * max(1, max|expected|). The two implementations sum the
  same fp32 terms in a different order (tiles, log-add-exp merges), so they differ by a
  few ulps of the largest term; gradients of ``reduction="sum"`` are O(1) per entry.
* bf16: both implementations get the SAME bf16 inputs and accumulate in fp32, so the
  only difference is the final rounding of the bf16 gradients (2^-8 relative) plus fp32
  summation order: rtol = atol = 1e-2 * max(1, max|expected|) (relative to the largest entry).
Random inputs are fresh (seeded per test by the ``gen`` fixture) and unit-norm.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchlab.errors import BatchlabInputError
from batchlab.losses import dcl, info_nce, nt_xent, siglip
from tests.losses.helpers import unit

TILE = 16
SIZES = [1, 7, 37, 50]


def _close(actual, expected, *, tol: float, what: str) -> None:
    assert actual is not None and expected is not None, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite"
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), rtol=tol / 2, atol=tol * scale,
        msg=lambda m: f"{what}: {m}",
    )


def _tol(dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 1e-2


def _run(fn, tensors: dict, kwargs: dict, upstream_gen_seed: int):
    """Call ``fn`` on fresh leaf copies; backward a random weighting of the output; return all."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in tensors.items()}
    out = fn(**leaves, **kwargs)
    loss, lse = out if isinstance(out, tuple) else (out, None)
    weight = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_gen_seed), dtype=loss.dtype)
    (loss * weight).sum().backward()
    return loss, lse, {name: leaf.grad for name, leaf in leaves.items()}


def _compare(fn, tensors, kwargs, *, dtype=torch.float32, tile=TILE):
    ref = _run(fn, tensors, {**kwargs, "impl": "reference"}, 7)
    til = _run(fn, tensors, {**kwargs, "impl": "tiled", "tile_size": tile}, 7)
    tol = _tol(dtype)
    _close(til[0], ref[0], tol=tol, what="loss")
    if ref[1] is not None:
        _close(til[1].row, ref[1].row, tol=tol, what="row lse")
        if ref[1].col is not None:
            _close(til[1].col, ref[1].col, tol=tol, what="col lse")
        else:
            assert til[1].col is None
    for name, g in ref[2].items():
        if g is None or til[2][name] is None:  # only an empty input (no extra negatives) gets no gradient
            assert tensors[name].numel() == 0 and (til[2][name] is None or not til[2][name].any()), name
            continue
        _close(til[2][name], g, tol=tol, what=f"grad {name}")
        assert til[2][name].dtype == tensors[name].dtype


# ----------------------------------------------------------------------------- inputs


def _pair(n, m, d, gen, dtype, scale, extra=0):
    t = {"q": unit(n, d, gen, dtype).detach(), "k": unit(m, d, gen, dtype).detach(),
         "logit_scale": torch.tensor(float(scale))}
    if extra:
        t["extra_negatives"] = F.normalize(torch.randn(n, extra, d, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    return t


def _neg_mask(form: str, n: int, m: int, pos: torch.Tensor, gen):
    """A random false-negative mask that spares the positives, in one of the three forms."""
    dense = (torch.rand(n, m, generator=gen) < 0.25) & ~pos
    if form == "bool":
        return dense
    if form == "pairs":
        return dense.nonzero()
    return lambda rows, cols: dense[rows][:, cols]


def _positives(kind: str, n: int, m: int, gen):
    """(kwargs, dense positive mask) for: diagonal, a permutation of targets, several positives."""
    if kind == "diag":
        return {}, torch.eye(n, m, dtype=torch.bool)
    if kind == "perm":
        t = torch.randperm(n, generator=gen)
        pos = torch.zeros(n, m, dtype=torch.bool)
        pos[torch.arange(n), t] = True
        return {"targets": t}, pos
    pos = (torch.rand(n, m, generator=gen) < 0.15) | torch.eye(n, m, dtype=torch.bool)
    return {"pos_mask": pos}, pos


# option sets: (positives, neg_mask form or None, extra negatives, symmetric, reduction)
INFONCE_CASES = [
    ("diag", None, 0, True, "mean"),
    ("diag", None, 0, False, "sum"),
    ("perm", "bool", 3, True, "none"),
    ("multi", "pairs", 0, True, "mean"),
    ("multi", "callable", 2, False, "none"),
    ("perm", "callable", 0, False, "mean"),
    ("diag", "pairs", 4, True, "sum"),
]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", INFONCE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_info_nce_matches_reference(n, case, gen):
    positives, neg_form, extra, symmetric, reduction = case
    t = _pair(n, n, 12, gen, torch.float32, 100.0, extra)
    pos_kw, pos = _positives(positives, n, n, gen)
    kwargs = dict(symmetric=symmetric, reduction=reduction, return_lse=True, **pos_kw)
    if neg_form:
        kwargs["neg_mask"] = _neg_mask(neg_form, n, n, pos, gen)
    _compare(info_nce, t, kwargs)


@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("tile", [(16, 16), (5, 9), 4096])
def test_info_nce_tiles_and_scales(scale, tile, gen):
    """Tiles not dividing N, rectangular tiles, tiles larger than N; a tiny and a large scale."""
    t = _pair(37, 37, 12, gen, torch.float32, scale, extra=2)
    _compare(info_nce, t, dict(return_lse=True), tile=tile)


def test_info_nce_more_keys_than_queries(gen):
    t = _pair(20, 45, 12, gen, torch.float32, 30.0)
    _compare(info_nce, t, dict(symmetric=False, targets=torch.randint(0, 45, (20,), generator=gen),
                               return_lse=True))


def test_info_nce_bf16(gen):
    t = _pair(50, 50, 32, gen, torch.bfloat16, 100.0, extra=3)
    pos_kw, pos = _positives("perm", 50, 50, gen)
    _compare(info_nce, t, dict(neg_mask=_neg_mask("pairs", 50, 50, pos, gen), return_lse=True, **pos_kw),
             dtype=torch.bfloat16)


def test_masked_positive_is_refused(gen):
    t = _pair(7, 7, 8, gen, torch.float32, 10.0)
    with pytest.raises(BatchlabInputError, match="removes a positive"):
        info_nce(t["q"], t["k"], 10.0, neg_mask=torch.tensor([[3, 3]]), impl="tiled", tile_size=4)


@pytest.mark.parametrize("bad", [0, -3, (4,), (4, 0), "16", 2.5])
def test_bad_tile_size(bad, gen):
    t = _pair(7, 7, 8, gen, torch.float32, 10.0)
    with pytest.raises(BatchlabInputError, match="tile_size"):
        info_nce(t["q"], t["k"], 10.0, impl="tiled", tile_size=bad)


# ----------------------------------------------------------------------------- DCL / DCLW

DCL_CASES = [
    ("diag", None, 0, True, "mean", False),
    ("perm", "bool", 2, True, "none", True),
    ("multi", "pairs", 0, False, "sum", True),
    ("diag", "callable", 3, False, "mean", False),
]


@pytest.mark.parametrize("n", [2, 7, 37, 50])
@pytest.mark.parametrize("case", DCL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_dcl_matches_reference(n, case, gen):
    positives, neg_form, extra, symmetric, reduction, weighted = case
    t = _pair(n, n, 12, gen, torch.float32, 50.0, extra)
    pos_kw, pos = _positives(positives, n, n, gen)
    kwargs = dict(symmetric=symmetric, reduction=reduction, weighted=weighted, return_lse=True, **pos_kw)
    if neg_form:
        # keep at least one negative per row and column: mask only pairs (i, j) with j > i + 1
        spare = pos | ~torch.ones(n, n, dtype=torch.bool).triu(2)
        kwargs["neg_mask"] = _neg_mask(neg_form, n, n, spare, gen)
    _compare(dcl, t, kwargs)


def test_dcl_single_query_with_extra_negatives(gen):
    t = _pair(1, 1, 12, gen, torch.float32, 10.0, extra=3)
    _compare(dcl, t, dict(weighted=True, symmetric=False, return_lse=True))


def test_dcl_bf16(gen):
    t = _pair(50, 50, 32, gen, torch.bfloat16, 100.0, extra=2)
    _compare(dcl, t, dict(weighted=True, return_lse=True), dtype=torch.bfloat16)


def test_dcl_without_negatives_is_refused(gen):
    t = _pair(3, 3, 8, gen, torch.float32, 10.0)
    everything_but_positive = ~torch.eye(3, dtype=torch.bool)
    with pytest.raises(BatchlabInputError, match="no negative left"):
        dcl(t["q"], t["k"], 10.0, neg_mask=everything_but_positive, impl="tiled", tile_size=2)


# ----------------------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("v,n", [(2, 1), (2, 7), (3, 11), (4, 9)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nt_xent_matches_reference(v, n, reduction, gen):
    views = F.normalize(torch.randn(v, n, 12, generator=gen, dtype=torch.float64), dim=-1).float()
    _compare(nt_xent, {"views": views, "logit_scale": torch.tensor(2.0)}, dict(reduction=reduction, return_lse=True))


def test_nt_xent_bf16_large_scale(gen):
    views = F.normalize(torch.randn(3, 13, 32, generator=gen, dtype=torch.float64), dim=-1).to(torch.bfloat16)
    _compare(nt_xent, {"views": views, "logit_scale": torch.tensor(100.0)}, dict(reduction="sum", return_lse=True),
             dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- SigLIP

SIGLIP_CASES = [
    ("diag", None, 0, "mean"),
    ("perm", "bool", 2, "none"),
    ("multi", "pairs", 3, "sum"),
    ("diag", "callable", 0, "none"),
    ("multi", None, 1, "mean"),
]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", SIGLIP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_siglip_matches_reference(n, case, gen):
    positives, neg_form, extra, reduction = case
    t = _pair(n, n, 12, gen, torch.float32, 10.0, extra)
    t["logit_bias"] = torch.tensor(-10.0)
    pos_kw, pos = _positives(positives, n, n, gen)
    kwargs = dict(reduction=reduction, **pos_kw)
    if neg_form:
        kwargs["neg_mask"] = _neg_mask(neg_form, n, n, pos, gen)
    _compare(siglip, t, kwargs)


@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (100.0, -5.0)])
def test_siglip_scales_more_keys_and_bf16(scale, bias, gen):
    t = _pair(20, 45, 12, gen, torch.float32, scale)
    t["logit_bias"] = torch.tensor(bias)
    _compare(siglip, t, dict(targets=torch.randint(0, 45, (20,), generator=gen)), tile=(7, 4096))
    tb = {name: x.to(torch.bfloat16) if x.dim() else x for name, x in _pair(50, 50, 32, gen, torch.float32, scale, 2).items()}
    tb["logit_bias"] = torch.tensor(bias)
    _compare(siglip, tb, dict(reduction="sum"), dtype=torch.bfloat16)


def test_siglip_forward_only_keeps_no_gradients(gen):
    """Without autograd the single pass computes no gradients (and the loss is still exact)."""
    t = _pair(37, 37, 12, gen, torch.float32, 10.0)
    with torch.no_grad():
        a = siglip(t["q"], t["k"], 10.0, -10.0, impl="tiled", tile_size=16)
    torch.testing.assert_close(a, siglip(t["q"], t["k"], 10.0, -10.0, impl="reference"), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- dispatch


def test_auto_picks_tiled_above_threshold(monkeypatch, gen):
    from batchlab.losses import _dispatch

    monkeypatch.setattr(_dispatch, "AUTO_TILED_MIN_LOGITS", 100)
    assert _dispatch.resolve("info_nce", "auto", 20, 20, torch.device("cpu")).__name__ == "info_nce_tiled"
    assert _dispatch.resolve("info_nce", "auto", 5, 5, torch.device("cpu")).__name__ == "info_nce_reference"
    for family in ("info_nce", "siglip", "dcl", "nt_xent"):
        assert "tiled" in _dispatch.available_impls(family)


# ----------------------------------------------------------------------------- backward vs finite differences


@pytest.mark.parametrize("family", ["info_nce", "siglip", "dcl", "nt_xent"])
def test_gradcheck_fp64(family, gen):
    """The hand-written backward against finite differences (fp64, every option at once).

    DCL is unweighted here: DCLW treats its weights as constants, which finite differences
    cannot (its gradients are compared with the reference above).
    """
    n, d = 5, 4
    q = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(n, 2, d, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([2, 0, 1, 4, 3])
    neg = torch.tensor([[0, 0], [1, 3]])
    opts = dict(impl="tiled", tile_size=(2, 3))

    def fn(q, k, extra, scale, bias):
        e = F.normalize(extra, dim=-1)
        if family == "info_nce":
            return info_nce(q, k, scale, targets=targets, extra_negatives=e, neg_mask=neg, normalize=True,
                            reduction="none", **opts)
        if family == "siglip":
            return siglip(q, k, scale, bias, targets=targets, extra_negatives=e, neg_mask=neg, normalize=True, **opts)
        if family == "dcl":
            return dcl(q, k, scale, targets=targets, extra_negatives=e, neg_mask=neg, normalize=True,
                       **opts)
        return nt_xent(torch.stack([q, k, e[:, 0]]), scale, normalize=True, reduction="none", **opts)

    assert torch.autograd.gradcheck(fn, (q, k, extra, scale, bias))


# ----------------------------------------------------------------------------- block primitives (the ring's API)


def test_block_primitives_compose_over_column_and_row_blocks(gen):
    """Split rows and columns into blocks with global offsets, merge: equals the whole problem."""
    from batchlab.losses.tiled import LSECoefficients, Pairs, lse_block_backward, lse_block_forward, merge_stats

    n, d = 23, 8
    q, k = unit(n, d, gen).detach(), unit(n, d, gen).detach()
    scale = torch.tensor(20.0)
    targets = torch.randperm(n, generator=gen)
    pos = torch.zeros(n, n, dtype=torch.bool)
    pos[torch.arange(n), targets] = True
    pairs = Pairs(targets=targets, neg_mask=_neg_mask("pairs", n, n, pos, gen))
    opts = dict(exclude_positives=False, tile=(4, 5))
    whole = lse_block_forward(q, k, scale, pairs, **opts)

    rows = [(0, 9), (9, 23)]
    cols = [(0, 11), (11, 17), (17, 23)]
    col_lse = torch.full((n,), float("-inf"))
    col_pos = torch.zeros(n)
    for r0, r1 in rows:  # each "rank" owns rows r0:r1 and sees every column block in turn
        stats = None
        for c0, c1 in cols:
            part = lse_block_forward(q[r0:r1], k[c0:c1], scale, pairs, row_offset=r0, col_offset=c0, **opts)
            col_lse[c0:c1] = torch.logaddexp(col_lse[c0:c1], part.col_lse)
            col_pos[c0:c1] += part.col_pos
            padded = part._replace(col_lse=None, col_pos=torch.zeros(0))
            stats = padded if stats is None else merge_stats(stats, padded)
        torch.testing.assert_close(stats.row_lse, whole.row_lse[r0:r1])
        torch.testing.assert_close(stats.row_pos, whole.row_pos[r0:r1])
    torch.testing.assert_close(col_lse, whole.col_lse)
    torch.testing.assert_close(col_pos, whole.col_pos)

    a = torch.rand(n, generator=gen)
    b = torch.rand(n, generator=gen)
    coef = LSECoefficients(a, a / 3, b, b / 5)
    U, V = lse_block_backward(q, k, scale, pairs, row_lse=whole.row_lse, col_lse=whole.col_lse, coef=coef, **opts)
    U_sum, V_sum = torch.zeros_like(U), torch.zeros_like(V)
    for r0, r1 in rows:
        for c0, c1 in cols:
            u, v = lse_block_backward(
                q[r0:r1], k[c0:c1], scale, pairs, row_lse=whole.row_lse[r0:r1], col_lse=whole.col_lse[c0:c1],
                coef=LSECoefficients(a[r0:r1], a[r0:r1] / 3, b[c0:c1], b[c0:c1] / 5),
                row_offset=r0, col_offset=c0, **opts,
            )
            U_sum[r0:r1] += u
            V_sum[c0:c1] += v
    torch.testing.assert_close(U_sum, U, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(V_sum, V, rtol=1e-5, atol=1e-6)


def test_empty_extra_negatives(gen):
    t = _pair(7, 7, 8, gen, torch.float32, 10.0)
    t["extra_negatives"] = torch.zeros(7, 0, 8)
    _compare(info_nce, t, dict(return_lse=True))


@pytest.mark.parametrize("family", [info_nce, dcl])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gradients_flow_through_returned_lse(family, symmetric, gen):
    """A z-loss on the returned LSE back-propagates as in the reference."""
    t = _pair(37, 37, 12, gen, torch.float32, 30.0, extra=2)

    def with_z_loss(**kwargs):
        loss, lse = family(**kwargs)
        z = lse.row.square().mean() + (0 if lse.col is None else 0.5 * lse.col.square().mean())
        return loss + 1e-2 * z, lse

    _compare(with_z_loss, t, dict(symmetric=symmetric, return_lse=True))
