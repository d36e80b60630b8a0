"""MoCHi hard-negative mixing on planted geometry (orthogonal negatives with known hardness)."""

import pytest
import torch
import torch.nn.functional as F

from batchlab.errors import BatchlabInputError
from batchlab.losses import info_nce
from batchlab.samplers.mixing import mix_hard_negatives


def planted(n=4, d=16):
    """Bank = basis vectors e_0..e_9; query i has similarity decreasing in the basis index,
    so its hardest negatives are known (e_0 is reserved as the positive when targets are used)."""
    bank = torch.eye(d)[:10]
    w = torch.linspace(1.0, 0.1, 10)
    q = F.normalize(w.repeat(n, 1) + 0.01 * torch.arange(n)[:, None], dim=1)
    q = F.normalize(torch.cat([q, torch.zeros(n, d - 10)], 1), dim=1)
    return q, bank


def test_shape_norm_detached_and_seeded():
    q, bank = planted()
    q = q.clone().requires_grad_(True)
    a = mix_hard_negatives(q, bank, num_hardest=3, num_synthetic=5, mix_query=2, seed=0)
    assert a.shape == (4, 7, 16) and not a.requires_grad
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(4, 7))
    assert torch.equal(a, mix_hard_negatives(q, bank, num_hardest=3, num_synthetic=5, mix_query=2, seed=0))
    assert not torch.equal(a, mix_hard_negatives(q, bank, num_hardest=3, num_synthetic=5, mix_query=2, seed=1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(a, mix_hard_negatives(q, bank, num_hardest=3, num_synthetic=5, mix_query=2, generator=g))


def test_pair_mixes_live_in_the_hardest_span_and_are_at_least_as_hard():
    q, bank = planted()
    h = 3
    out = mix_hard_negatives(q, bank, num_hardest=h, num_synthetic=50, seed=3)
    # only coordinates 0..2 (the three hardest negatives) are used, with non-negative weights
    assert torch.allclose(out[:, :, h:], torch.zeros_like(out[:, :, h:]))
    assert (out[:, :, :h] >= -1e-6).all()
    # convex mixes of positive-similarity negatives are at least as hard as the weaker of the pair
    sims = torch.einsum("nd,nmd->nm", q, out)
    hth = (q @ bank.T).topk(h, dim=1).values[:, -1]
    assert (sims >= hth[:, None] - 1e-6).all()
    # pairs are distinct negatives: no mix equals a single basis vector
    assert (out[:, :, :h].max(dim=-1).values < 1 - 1e-6).all()


def test_query_mixes_are_harder_than_their_negative():
    q, bank = planted()
    out = mix_hard_negatives(q, bank, num_hardest=4, num_synthetic=0, mix_query=30, query_weight_max=0.5, seed=1)
    sims = torch.einsum("nd,nmd->nm", q, out)
    hardest_4th = (q @ bank.T).topk(4, dim=1).values[:, -1]
    assert (sims >= hardest_4th[:, None]).all()
    # b <= 0.5: the mix stays closer to its negative than to the query: sim(q) < 1
    assert (sims < 1).all()


def test_targets_exclude_the_positive_from_a_bank():
    q, bank = planted()
    targets = torch.zeros(4, dtype=torch.long)  # e_0, the most similar row, is everyone's positive
    out = mix_hard_negatives(q, bank, num_hardest=2, num_synthetic=20, targets=targets, seed=0)
    assert torch.allclose(out[:, :, 0], torch.zeros(4, 20))
    assert (out[:, :, 1:3] > 0).any() and torch.allclose(out[:, :, 3:], torch.zeros(4, 20, 13))


def test_per_query_negatives_and_clipping():
    q, bank = planted()
    per = bank[None].repeat(4, 1, 1)[:, [5, 1, 7]]  # 3 negatives per query, hardest is e_1
    out = mix_hard_negatives(q, per, num_hardest=10, num_synthetic=6, seed=0)  # clipped to 3
    assert out.shape == (4, 6, 16)
    assert torch.allclose(out[:, :, [0, 2, 3, 4, 6, 8, 9]], torch.zeros(4, 6, 7))


def test_feeds_info_nce_extra_negatives():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(8, 16, generator=g), dim=1)
    extra = mix_hard_negatives(q, k, num_hardest=3, num_synthetic=4, mix_query=1, targets=torch.arange(8), seed=0)
    base = info_nce(q, k, 10.0, symmetric=False)
    harder = info_nce(q, k, 10.0, symmetric=False, extra_negatives=extra)
    assert harder > base
    empty = mix_hard_negatives(q, k, num_hardest=3, num_synthetic=0, seed=0)
    assert empty.shape == (8, 0, 16)


def test_bad_input():
    q, bank = planted()
    with pytest.raises(BatchlabInputError, match="num_hardest"):
        mix_hard_negatives(q, bank, num_hardest=0, num_synthetic=2)
    with pytest.raises(BatchlabInputError, match="dimension"):
        mix_hard_negatives(q, bank[:, :8], num_hardest=2, num_synthetic=2)
    with pytest.raises(BatchlabInputError, match="only the positive"):
        mix_hard_negatives(q, bank[:1], num_hardest=2, num_synthetic=2, targets=torch.zeros(4, dtype=torch.long))
    with pytest.raises(BatchlabInputError, match="per-query"):
        mix_hard_negatives(q, bank[None].repeat(3, 1, 1), num_hardest=2, num_synthetic=2)
    with pytest.raises(BatchlabInputError, match="targets"):
        mix_hard_negatives(q, bank, num_hardest=2, num_synthetic=2, targets=torch.tensor([0, 1]))
    for weight in (2.0, True, "0.5", float("nan")):  # one range check with the recipe's (check_mix_options)
        with pytest.raises(BatchlabInputError, match=r"query_weight_max must be a number in \[0, 1\]"):
            mix_hard_negatives(q, bank, num_hardest=2, num_synthetic=2, query_weight_max=weight)
    nan = bank.clone()
    nan[2, 2] = float("nan")
    with pytest.raises(BatchlabInputError, match="non-finite"):
        mix_hard_negatives(q, nan, num_hardest=2, num_synthetic=2)
