"""Recipe options for the demo's variants: teacher neighbours from other groups only (cross_group)
and batches mixed from teacher structure and uniform draws (mix_random), at tiny size."""

from __future__ import annotations

import pytest
import torch

from batchlab.datasets import gaussian_mixture
from batchlab.errors import BatchlabInputError
from batchlab.recipes import TeacherViews, make_sampler
from batchlab.recipes.samplers import hard_negative_ids
from batchlab.samplers import MixedBatchSampler


@pytest.fixture(scope="module")
def planted():
    """128 points in 8 tight clusters; the groups are the clusters, in shuffled label order."""
    x, labels = gaussian_mixture(128, 16, 8, sigma=0.2, seed=0)
    names = [f"module{int(c)}" for c in labels]  # any hashable label works
    return TeacherViews(x, groups=names), labels


def same_group_share(ids: torch.Tensor, labels: torch.Tensor) -> float:
    valid = ids >= 0
    return float((labels[ids.clamp_min(0)] == labels.unsqueeze(1))[valid].float().mean())


def test_neighbours_cross_group_are_the_best_outside_the_own_group(planted):
    views, labels = planted
    scores, ids = views.neighbours(10, cross_group=True)
    plain_scores, plain_ids = views.neighbours(10)
    assert same_group_share(plain_ids, labels) > 0.9  # the teacher's neighbours sit in the own cluster
    assert same_group_share(ids, labels) == 0.0
    sim = views.pairs @ views.pairs.T
    sim[labels.unsqueeze(1) == labels.unsqueeze(0)] = float("-inf")
    expected = sim.topk(10, dim=1)
    assert torch.allclose(scores, expected.values, atol=1e-5)
    first = {}
    assert views.groups.tolist() == [first.setdefault(int(c), len(first)) for c in labels]  # ids by first appearance
    with pytest.raises(BatchlabInputError, match="groups=labels"):
        TeacherViews(views.pairs).neighbours(5, cross_group=True)
    with pytest.raises(BatchlabInputError, match="k <= 112"):
        views.neighbours(113, cross_group=True)  # 16 per cluster: 112 outside
    with pytest.raises(BatchlabInputError, match="one label per example"):
        TeacherViews(views.pairs, groups=[0, 1])


def test_hard_negatives_and_communities_cross_group(planted):
    views, labels = planted
    for margin in (None, 0.05):
        ids = hard_negative_ids(views, num_negatives=4, relative_margin=margin, cross_group=True)
        assert same_group_share(ids, labels) == 0.0 and (ids >= 0).any()
    sampler = make_sampler("hard_negative", views, batch_size=16, cross_group=True, num_negatives=4)
    assert same_group_share(sampler.negative_ids, labels) == 0.0

    def community_same_group(sampler) -> float:  # a batch of 16 is 4 whole communities of 4, in order
        groups = [b[i : i + 4] for b in sampler.global_batches() for i in range(0, 16, 4)]
        share = [float((labels[g].unsqueeze(0) == labels[g].unsqueeze(1)).float().mean()) for g in groups]
        return sum(share) / len(share)

    options = {"group_size": 4, "rank_window": (1, 9)}
    plain = make_sampler("community", views, batch_size=16, **options)
    cross = make_sampler("community", views, batch_size=16, cross_group=True, **options)
    assert community_same_group(plain) > 0.9 and community_same_group(cross) < 0.6  # 0.25: only itself
    with pytest.raises(BatchlabInputError, match="cross_group"):
        make_sampler("cluster", views, batch_size=16, cross_group=True)


def test_make_sampler_mix_random(planted):
    views, _ = planted
    sampler = make_sampler("community", views, batch_size=16, mix_random=0.5, group_size=4, rank_window=(1, 9))
    assert isinstance(sampler, MixedBatchSampler) and sampler.base.batch_size == 8
    assert sampler.base.group_size == 4
    batches = sampler.global_batches()
    assert len(batches) == 128 // 16 and sorted(i for b in batches for i in b) == list(range(128))
    hard = make_sampler("hard_negative", views, batch_size=16, mix_random=0.5, num_negatives=3)
    assert hard.base.batch_size == 8 and hard.base.neighbourhood_cap == 4  # int(0.25 * 16), as without mixing
    assert not isinstance(make_sampler("community", views, batch_size=16, group_size=4, rank_window=(1, 9)),
                          MixedBatchSampler)  # the default is unchanged


def test_guide_margin_masks_in_batch_negatives_the_guide_cannot_tell_apart():
    from batchlab.recipes import train_dual_encoder

    words = ["parse", "draw", "close", "open", "read", "write", "sort", "merge"]
    pairs = [(f"{words[i % 8]} the {words[(i // 8) % 8]} item {i}", f"def {words[i % 8]}_{i}(x):\n    return x")
             for i in range(80)]
    # a guide that scores every pair alike masks every negative: only the positive is left, the loss is 0
    blind = torch.ones(64, 4)
    masked = train_dual_encoder(pairs[:64], pairs[64:], batch_size=32, epochs=1, progress=False, teacher=blind,
                                guide_margin=0.05)
    assert masked.losses == pytest.approx([0.0, 0.0], abs=1e-5)
    plain = train_dual_encoder(pairs[:64], pairs[64:], batch_size=32, epochs=1, progress=False, teacher=blind)
    assert min(plain.losses) > 1.0
    # TF-IDF as the guide masks a few pairs only
    some = train_dual_encoder(pairs[:64], pairs[64:], batch_size=32, epochs=1, progress=False, guide_margin=0.05)
    assert all(0.5 < x < max(plain.losses) + 1 for x in some.losses)
    with pytest.raises(BatchlabInputError, match="negative mask"):
        train_dual_encoder(pairs[:64], pairs[64:], batch_size=32, epochs=1, progress=False, loss="siglip", guide_margin=0.05)


def test_teacher_rows_are_the_sparse_rows():
    from batchlab.recipes import tfidf_views

    views = tfidf_views(["parse a file", "draw a circle", "open a file"], ["def parse(f):", "def circle(r):", "def open(f):"],
                        dim=2)
    q, d = views.rows(torch.tensor([2, 0]))
    assert torch.equal(q, views.sparse[1].to_dense()[[2, 0]]) and torch.equal(d, views.sparse[2].to_dense()[[2, 0]])
    dense = TeacherViews(views.pairs, views.queries, views.documents)
    assert torch.equal(dense.rows(torch.tensor([1]))[0], views.queries[[1]])
