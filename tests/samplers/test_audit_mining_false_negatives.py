"""Audit of GuidedNegativeMask with repeated texts: a key that duplicates the positive's guide
vector ties with the positive, so the strict ``>`` keeps it (as sentence-transformers and
batchlab's own GISTEmbed integration do), and the answer is the same in every tile shape
(the tiled losses ask for other tiles than materialize())."""

import torch

from batchlab.samplers.false_negatives import guided_negative_mask


def test_a_duplicate_of_the_positive_is_kept_in_every_tile_shape():
    g = torch.Generator().manual_seed(0)
    n = 300
    gq, gk = torch.randn(n, 37, generator=g), torch.randn(n, 37, generator=g)
    for strategy in ("absolute", "relative"):
        mask = guided_negative_mask(gq, torch.cat([gk, gk]), margin=0.0, strategy=strategy)  # key n+i repeats key i
        full = mask.materialize()
        assert not full[torch.arange(n), torch.arange(n) + n].any(), strategy
        for rows_per_tile in (1, 7):
            tiles = torch.cat([mask(torch.arange(r, min(n, r + rows_per_tile)), torch.arange(2 * n))
                               for r in range(0, n, rows_per_tile)])
            assert torch.equal(tiles, full), (strategy, rows_per_tile)
        single = torch.stack([mask(torch.tensor([i]), torch.tensor([n + i]))[0, 0] for i in range(0, n, 10)])
        assert not single.any(), strategy
    # a margin still masks the duplicate (it scores above pos - margin)
    mask = guided_negative_mask(gq, torch.cat([gk, gk]), margin=0.01)
    assert mask.materialize()[torch.arange(n), torch.arange(n) + n].all()
