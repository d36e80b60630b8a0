"""batchlab.compat.open_clip against open_clip 3.3.0 itself: values and every gradient."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from batchlab.compat import open_clip as compat
from batchlab.errors import BatchlabInputError
from tests.compat.helpers import assert_same, assert_same_run, run
from tests.compat.peers import open_clip_loss



def _features(gen, n=6, d=8, unit=True, scale=3.0):
    a, b = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    if unit:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return [a * (1 if unit else scale), b, torch.tensor(4.0), torch.tensor(-3.0)]


def test_constructors_are_open_clips():
    for name in ("ClipLoss", "SigLipLoss"):
        ours = inspect.signature(getattr(compat, name).__init__)
        theirs = inspect.signature(getattr(open_clip_loss, name).__init__)
        assert list(ours.parameters) == list(theirs.parameters), name
        assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()]
        ours_call = inspect.signature(getattr(compat, name).forward)
        theirs_call = inspect.signature(getattr(open_clip_loss, name).forward)
        assert list(ours_call.parameters) == list(theirs_call.parameters), name
        assert [p.default for p in ours_call.parameters.values()] == [
            p.default for p in theirs_call.parameters.values()]


@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_clip_loss_single_process(gen, unit, n):
    img, txt, scale, bias = _features(gen, n=n, unit=unit)
    args = (False, False, True, 0, 1, False)  # positional, as open_clip takes them
    for extra in ((), (bias,)):  # with and without a logit_bias
        want = run(open_clip_loss.ClipLoss(*args), [img, txt, scale, *extra])
        got = run(compat.ClipLoss(*args), [img, txt, scale, *extra])
        assert_same_run((got[0], got[1][:3]), (want[0], want[1][:3]), what=f"clip n={n} unit={unit}")
        if extra:  # a constant bias has zero gradient: open_clip's is rounding noise
            assert abs(float(want[1][3])) < 1e-6 and float(got[1][3]) == 0.0
    out = compat.ClipLoss()(img, txt, scale, output_dict=True)
    assert list(out) == ["contrastive_loss"]


@pytest.mark.parametrize("unit", [True, False])
def test_siglip_loss_single_process(gen, unit):
    inputs = _features(gen, n=5, unit=unit)
    want = run(open_clip_loss.SigLipLoss(False, 0, 1, None), inputs)
    got = run(compat.SigLipLoss(False, 0, 1, None), inputs)
    assert_same_run(got, want, what=f"siglip unit={unit}")
    assert list(compat.SigLipLoss()(*inputs, output_dict=True)) == ["contrastive_loss"]


def test_mixed_dtypes_under_autocast(gen):
    """fp32 images + bf16 texts: open_clip's matmul runs in bf16 under autocast; ours
    multiplies the same bf16 values in fp32 (open_clip rounds its logits to bf16, we do
    not), so the two agree to bf16's precision, and the gradients come back in each
    input's own dtype, as open_clip's do."""
    img, txt, scale, bias = _features(gen, n=8)
    txt = txt.bfloat16()
    for peer, ours, extra in ((open_clip_loss.ClipLoss(), compat.ClipLoss(), ()),
                              (open_clip_loss.SigLipLoss(), compat.SigLipLoss(), (bias,))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = run(peer, [img, txt, scale, *extra])
            got = run(ours, [img, txt, scale, *extra])
        assert got[0].dtype == want[0].dtype == torch.float32
        assert [g.dtype for g in got[1]] == [g.dtype for g in want[1]]
        assert_same(got[0], want[0], rtol=2e-2, what=f"{type(ours).__name__} bf16 loss")
        for i in range(2):
            assert_same(got[1][i], want[1][i], rtol=5e-2, what=f"{type(ours).__name__} bf16 grad[{i}]")
    with pytest.raises(BatchlabInputError, match="mixed dtypes"):
        compat.ClipLoss()(img, txt, scale)


def test_bf16_without_autocast(gen):
    """bf16 features: open_clip's logits and loss are bf16; ours accumulate in fp32 and
    return the loss in bf16 too (agreement to bf16's precision)."""
    img, txt, scale, bias = _features(gen, n=8)
    img, txt = img.bfloat16(), txt.bfloat16()
    for peer, ours, extra in ((open_clip_loss.ClipLoss(), compat.ClipLoss(), ()),
                              (open_clip_loss.SigLipLoss(), compat.SigLipLoss(), (bias,))):
        want = run(peer, [img, txt, scale, *extra])
        got = run(ours, [img, txt, scale, *extra])
        assert got[0].dtype == want[0].dtype == torch.bfloat16
        assert [g.dtype for g in got[1]] == [g.dtype for g in want[1]]
        assert_same(got[0], want[0], rtol=2e-2, what=f"{type(ours).__name__} bf16 loss")
        for i in range(2):
            assert_same(got[1][i], want[1][i], rtol=5e-2, what=f"{type(ours).__name__} bf16 grad[{i}]")


def test_bad_arguments():
    with pytest.raises(BatchlabInputError, match="dist_impl"):
        compat.SigLipLoss(dist_impl="ring")
    with pytest.raises(TypeError):
        compat.ClipLoss(temperature=0.1)
    with pytest.raises(BatchlabInputError, match="process group"):
        compat.ClipLoss(world_size=2)(torch.randn(2, 4), torch.randn(2, 4), torch.tensor(1.0))
    with pytest.raises(BatchlabInputError, match="logit_bias"):
        compat.SigLipLoss()(torch.randn(2, 4), torch.randn(2, 4), torch.tensor(1.0), None)

# the 2-rank parity checks run in tests/compat/test_two_ranks.py (one spawn for every peer)
