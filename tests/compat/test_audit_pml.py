"""Audit of batchlab.compat.pytorch_metric_learning.NTXentLoss: the call variants that
tests/compat/test_lightly_pml.py leaves out, each against pytorch-metric-learning 2.9.0
itself (values and every gradient, helpers' 1e-5 relative), or a precise error where
batchlab refuses what PML would compute differently or crash on.
"""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from batchlab.compat import pytorch_metric_learning as compat
from batchlab.errors import BatchlabInputError
from tests.compat.helpers import assert_same_run, run


def _both(temperature, embeddings, ref=None, rtol=1e-5, what="", **kwargs):
    """Run PML's and batchlab's NT-Xent on the same leaves (ref_emb a leaf too when given)."""
    leaves = [embeddings] + ([ref] if ref is not None else [])

    def call(module):
        def f(*xs):
            return module(xs[0], ref_emb=xs[1] if ref is not None else None, **kwargs)
        return run(f, leaves)

    want = call(pml_losses.NTXentLoss(temperature=temperature))
    got = call(compat.NTXentLoss(temperature=temperature))
    assert_same_run(got, want, rtol=rtol, what=what)
    return got, want


def test_pair_loss_saturates_like_pmls(gen):
    """PML takes -log(softmax + tiny): a pair far beyond 87 nats (fp32) is clamped there and
    its gradient fades; batchlab used to return the unclamped loss (100.3 for 44.0 here)."""
    e = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([0, 0, 1, 1])
    got, want = _both(0.01, e, labels=labels, what="T=0.01")
    assert float(want[0]) < 60  # the case really saturates
    # fp16: tiny is 6.1e-5, so PML's pair losses stop at 9.7 nats even at the default temperature
    e16 = torch.randn(8, 6, generator=gen).half()
    _both(0.07, e16, labels=torch.arange(8) % 2, rtol=2e-2, what="fp16")


@pytest.mark.parametrize("case", ["one triplet", "one pair each", "ref one and one"])
def test_a_single_pair_of_each_kind_is_pmls_zero_loss(gen, case):
    """GenericPairLoss returns zero when every index tensor has at most one entry."""
    e = torch.randn(4, 5, generator=gen)
    if case == "one triplet":
        got, _ = _both(0.1, e, indices_tuple=(torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    elif case == "one pair each":
        got, _ = _both(0.1, e, indices_tuple=(torch.tensor([0]), torch.tensor([1]), torch.tensor([0]),
                                               torch.tensor([3])))
    else:
        got, _ = _both(0.1, e[:1], ref=torch.randn(2, 5, generator=gen), labels=torch.tensor([0]),
                       ref_labels=torch.tensor([0, 1]))
    assert float(got[0]) == 0.0
    # two triplets are a real loss again
    _both(0.1, e, indices_tuple=(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 3])))


def test_ref_labels_identity_decides_the_diagonal(gen):
    """PML drops (i, i) from the positives when ref_labels IS labels (same object), not when equal."""
    e, ref = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    _both(0.2, e, ref=ref, labels=labels, ref_labels=labels, what="same object")
    _both(0.2, e, ref=ref, labels=labels, ref_labels=labels.clone(), what="equal copy")


@pytest.mark.parametrize("m", [6, 9])
def test_ref_emb_without_ref_labels(gen, m):
    """ref_labels=None: PML pairs by labels on both sides (diagonal dropped), over ref_emb's first rows."""
    e, ref = torch.randn(6, 5, generator=gen), torch.randn(m, 5, generator=gen)
    _both(0.2, e, ref=ref, labels=torch.tensor([0, 0, 1, 1, 2, 0]), what=f"m={m}")


def test_ref_shapes_are_checked(gen):
    e, labels = torch.randn(6, 5, generator=gen), torch.tensor([0, 0, 1, 1, 2, 0])
    with pytest.raises(BatchlabInputError, match="ref_labels"):  # PML: an IndexError deep inside
        compat.NTXentLoss()(e, labels, ref_emb=torch.randn(4, 5))
    with pytest.raises(BatchlabInputError, match="ref_labels"):  # PML: ValueError, same wording
        compat.NTXentLoss()(e, labels, ref_emb=torch.randn(4, 5), ref_labels=torch.tensor([0, 1]))


def test_under_autocast_the_loss_is_in_the_autocast_dtype(gen):
    """PML's similarity matrix, and so its loss, is bf16 under CPU autocast."""
    e = torch.randn(8, 6, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _both(0.1, e, labels=torch.arange(8) % 3, rtol=3e-2, what="autocast")
    assert got[0].dtype == want[0].dtype == torch.bfloat16


def test_indices_tuples_batchlab_refuses(gen):
    """Repeated negative pairs and a pair both positive and negative: PML counts them twice /
    in the denominator too; batchlab names the problem instead of computing something else."""
    e = torch.randn(4, 5, generator=gen)
    a = torch.tensor([0, 0])
    with pytest.raises(BatchlabInputError, match="repeats a negative pair"):
        compat.NTXentLoss()(e, indices_tuple=(a, torch.tensor([1, 1]), a, torch.tensor([2, 2])))
    with pytest.raises(BatchlabInputError, match="both positive and negative"):
        compat.NTXentLoss()(e, indices_tuple=(a, torch.tensor([1, 2]), a, torch.tensor([2, 3])))
    with pytest.raises(BatchlabInputError, match="3 .triplets. or 4"):
        compat.NTXentLoss()(e, indices_tuple=(a, a))


def test_pairs_without_negatives_cost_exactly_zero(gen):
    """Anchors whose every reference shares their label: each pair's softmax is 1 and PML's
    log(1 + tiny) rounds to 0; batchlab's loss must not come out at -1e-38."""
    e, ref = torch.randn(3, 4, generator=gen), torch.randn(2, 4, generator=gen)
    got, _ = _both(0.1, e, ref=ref, labels=torch.tensor([0, 0, 1]), ref_labels=torch.tensor([0, 0]))
    assert float(got[0]) == 0.0
