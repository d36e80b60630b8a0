"""GISTEmbed guided negative masks: brute-force equality, positive protection, tiles with
global offsets, and agreement of the callable with the dense mask inside the losses."""

import pytest
import torch
import torch.nn.functional as F

from batchlab.datasets.synthetic import gaussian_mixture
from batchlab.errors import BatchlabInputError
from batchlab.losses import info_nce
from batchlab.samplers.false_negatives import GuidedNegativeMask, guided_negative_mask


def brute_force(gq, gk, targets, margin, strategy):
    gq, gk = F.normalize(gq, dim=1), F.normalize(gk, dim=1)
    out = torch.zeros(gq.shape[0], gk.shape[0], dtype=torch.bool)
    for i in range(gq.shape[0]):
        pos = float(gq[i] @ gk[targets[i]])
        thr = pos - margin if strategy == "absolute" else pos - margin * abs(pos)
        for j in range(gk.shape[0]):
            out[i, j] = j != targets[i] and float(gq[i] @ gk[j]) > thr
    return out


@pytest.fixture(scope="module")
def batch():
    # planted: 24 examples in 4 topics; same-topic keys are the likely false negatives
    x, labels = gaussian_mixture(24, 12, 4, sigma=0.5, seed=1)
    g = torch.Generator().manual_seed(2)
    keys = F.normalize(x + 0.1 * torch.randn(24, 12, generator=g), dim=1)
    return x, keys, labels


@pytest.mark.parametrize("strategy,margin", [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.05), ("relative", 0.3)])
def test_matches_brute_force(batch, strategy, margin):
    x, keys, labels = batch
    targets = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    mask = guided_negative_mask(x, keys, margin=margin,
                                strategy=strategy, targets=targets)
    want = brute_force(x, keys, targets, margin, strategy)
    assert torch.equal(mask.materialize(), want)
    assert mask.count(block=5) == int(want.sum())


def test_planted_topics_are_masked(batch):
    x, keys, labels = batch
    dense = guided_negative_mask(x, keys, margin=0.3).materialize()
    same = labels[:, None] == labels[None, :]
    # with a generous margin the masked keys are same-topic ones, never the positive
    assert dense.any()
    assert not (dense & ~same).any()
    assert not dense.diagonal().any()


def test_positive_protected_with_any_margin_and_negative_scores():
    g = torch.Generator().manual_seed(0)
    gq = F.normalize(torch.randn(10, 6, generator=g), dim=1)
    gk = -gq  # every positive has guide score -1
    mask = guided_negative_mask(gq, gk, margin=5.0)
    dense = mask.materialize()
    assert not dense.diagonal().any() and dense.fill_diagonal_(True).all()
    # relative margin with negative positive scores: threshold = -1 - 0.5 * 1 = -1.5 < every score
    assert torch.allclose(guided_negative_mask(gq, gk, margin=0.5, strategy="relative").threshold, torch.full((10,), -1.5))


def test_tiles_use_global_indices(batch):
    x, keys, _ = batch
    targets = (torch.arange(24) + 5) % 24
    mask = guided_negative_mask(x, keys, margin=0.2, targets=targets)
    dense = mask.materialize()
    rows, cols = torch.arange(7, 19), torch.tensor([3, 12, 13, 20, 0])
    assert torch.equal(mask(rows, cols), dense[rows][:, cols])
    # the positive of row 7 is key 12: protected in a tile that does not start at 0
    assert not mask(torch.tensor([7]), torch.tensor([12])).any()


@pytest.mark.parametrize("impl", ["reference", "tiled"])
def test_losses_accept_callable_like_dense(batch, impl):
    x, keys, _ = batch
    g = torch.Generator().manual_seed(4)
    q = F.normalize(x + 0.3 * torch.randn(24, 12, generator=g), dim=1)
    k = F.normalize(keys + 0.3 * torch.randn(24, 12, generator=g), dim=1)
    mask = guided_negative_mask(x, keys, margin=0.1)
    opts = {"tile_size": (5, 7)} if impl == "tiled" else {}
    a = info_nce(q, k, 10.0, neg_mask=mask, impl=impl, **opts)
    b = info_nce(q, k, 10.0, neg_mask=mask.materialize(), impl="reference")
    plain = info_nce(q, k, 10.0, impl="reference")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert a < plain  # removing same-topic keys from denominators lowers the loss


def test_bad_input(batch):
    x, keys, _ = batch
    with pytest.raises(BatchlabInputError, match="strategy"):
        guided_negative_mask(x, keys, strategy="percent")
    with pytest.raises(BatchlabInputError, match="same dimension"):
        guided_negative_mask(x, keys[:, :5])
    with pytest.raises(BatchlabInputError, match="targets"):
        guided_negative_mask(x, keys, targets=torch.arange(23))
    with pytest.raises(BatchlabInputError, match="targets"):
        guided_negative_mask(x, keys, targets=torch.full((24,), 30))
    with pytest.raises(BatchlabInputError, match="M >= N"):
        guided_negative_mask(x, keys[:10])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(BatchlabInputError, match="non-finite"):
        guided_negative_mask(bad, keys)
    with pytest.raises(BatchlabInputError, match="empty"):
        guided_negative_mask(x[:0], keys)
    with pytest.raises(BatchlabInputError, match="relative margin"):
        guided_negative_mask(x, keys, margin=-0.1, strategy="relative")
    assert isinstance(guided_negative_mask(x[:1], keys[:1]), GuidedNegativeMask)
