"""Audit of batchlab.compat.open_clip: call variants tests/compat/test_open_clip.py leaves
out, each against open_clip 3.3.0's own loss file (values and every gradient, the
helpers' 1e-5 relative), or the precise error batchlab raises where it refuses.
"""

from __future__ import annotations

import pytest
import torch

from batchlab.compat import open_clip as compat
from batchlab.errors import BatchlabInputError
from tests.compat.helpers import assert_same_run, run
from tests.compat.peers import open_clip_loss

PAIRS = {"ClipLoss": (open_clip_loss.ClipLoss, compat.ClipLoss),
         "SigLipLoss": (open_clip_loss.SigLipLoss, compat.SigLipLoss)}


def _compare(name, inputs, *extra, what="", **kwargs):
    peer, ours = PAIRS[name]
    want = run(peer(**kwargs), inputs, *extra)
    got = run(ours(**kwargs), inputs, *extra)
    assert_same_run(got, want, what=f"{name} {what}")


def _pair(gen, n, d=6, dtype=torch.float32):
    return [torch.randn(n, d, generator=gen, dtype=dtype) * 2, torch.randn(n, d, generator=gen, dtype=dtype)]


@pytest.mark.parametrize("name", list(PAIRS))
def test_float64_features(gen, name):
    """open_clip computes in fp64 when the features are; batchlab's norm bounds were fp32 only (a
    RuntimeError from vector_norm's narrowing dtype)."""
    scale, bias = torch.tensor(4.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    _compare(name, [*_pair(gen, 5, dtype=torch.float64), scale] + ([bias] if name == "SigLipLoss" else []),
             what="fp64")


@pytest.mark.parametrize("name", list(PAIRS))
def test_all_zero_features(gen, name):
    """A dead encoder (every row zero): open_clip's loss is log(n) / SigLIP's bias term; the zero
    norm bound made batchlab's lift divide 0 by 0 and report non-finite features."""
    inputs = [torch.zeros(3, 4), torch.randn(3, 4, generator=gen), torch.tensor(3.0)]
    _compare(name, inputs + ([torch.tensor(-1.0)] if name == "SigLipLoss" else []), what="zero images")


@pytest.mark.parametrize("name", list(PAIRS))
def test_python_and_one_element_scales(gen, name):
    a, b = _pair(gen, 5)
    if name == "ClipLoss":
        _compare(name, [a, b], 4.0, what="float scale")
        _compare(name, [a, b], 4.0, 2.0, what="float scale and bias")
    else:
        _compare(name, [a, b], 4.0, -3.0, what="float scale and bias")
    _compare(name, [a, b, torch.tensor([4.0]), torch.tensor([-3.0])], what="(1,) scale and bias")


def test_siglip_single_pair_and_non_contiguous(gen):
    a, b = _pair(gen, 1)
    _compare("SigLipLoss", [a, b, torch.tensor(4.0), torch.tensor(-3.0)], what="n=1")
    a, b = torch.randn(7, 5, generator=gen).T, torch.randn(7, 5, generator=gen).T  # (5, 7) views
    _compare("ClipLoss", [a, b, torch.tensor(4.0)], what="transposed")
    _compare("SigLipLoss", [a, b, torch.tensor(4.0), torch.tensor(-3.0)], what="transposed")


def test_cache_labels_with_changing_batch_size(gen):
    """open_clip's label cache is keyed by the logit count: repeated calls of one module with
    4, 6, 4, 3 rows, and a scale that needs a gradient."""
    peer, ours = open_clip_loss.ClipLoss(cache_labels=True), compat.ClipLoss(cache_labels=True)
    for n in (4, 6, 4, 3):
        inputs = _pair(gen, n) + [torch.tensor(3.0)]
        assert_same_run(run(ours, inputs), run(peer, inputs), what=f"cached labels n={n}")


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("shape", [(5,), (5, 5)])
def test_per_logit_bias_is_refused(gen, name, shape):
    """open_clip adds any broadcastable bias to the logits; a non-constant one changes the
    cross-entropy, which batchlab used to ignore silently (ClipLoss 12.40 vs open_clip's 13.17)."""
    a, b = _pair(gen, 5)
    with pytest.raises(BatchlabInputError, match=r"logit_bias.*\(one element"):
        PAIRS[name][1]()(a, b, torch.tensor(4.0), torch.randn(shape, generator=gen))
