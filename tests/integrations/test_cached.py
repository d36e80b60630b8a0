"""Gradient-cached losses (batchlab's EmbeddingCache) against sentence-transformers' cached and plain losses.

Tolerance 1e-5 relative in fp32, as in test_losses.py. The tiny model has no dropout, so
every forward of a mini-batch gives the same embeddings on both sides.
"""

import pytest
import torch
from sentence_transformers.sentence_transformer import losses as st_losses

from batchlab.errors import BatchlabInputError
from batchlab.integrations.sentence_transformers import CachedGISTEmbedLoss, CachedMultipleNegativesRankingLoss
from tests.integrations.conftest import columns, load
from tests.integrations.helpers import assert_same, rel_err, value_and_grads


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load(tiny_dir)


@pytest.fixture(scope="module")
def guide(guide_dir):
    return load(guide_dir)


@pytest.mark.parametrize("n_columns,mini_batch_size,options", [
    (2, 2, {}),
    (4, 3, {}),
    (3, 1, {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}),
    (3, 4, {"directions": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")}),
    (2, 8, {"scale": 5.0}),
])
def test_cached_mnrl_matches(model, n_columns, mini_batch_size, options):
    features = columns(model, 5, n_columns)
    ours = value_and_grads(CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, **options),
                           model, features)
    st_cached = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, **options)
    assert_same(ours, value_and_grads(st_cached, model, features))
    assert_same(ours, value_and_grads(st_losses.MultipleNegativesRankingLoss(model, **options), model, features))


@pytest.mark.parametrize("n_columns,options", [(2, {}), (3, {"margin": 0.05}), (3, {"contrast_anchors": False}),
                                                (2, {"margin_strategy": "relative", "margin": 0.1})])
def test_cached_gist_matches(model, guide, n_columns, options):
    features = columns(model, 6, n_columns, shift=1)
    ours = value_and_grads(CachedGISTEmbedLoss(model, guide, mini_batch_size=4, **options), model, features)
    theirs = value_and_grads(st_losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=4, **options), model, features)
    assert_same(ours, theirs)


def test_backward_scaled_by_upstream_gradient(model):
    """Gradient accumulation and loss scaling reach the re-encoded mini-batches."""
    features = columns(model, 4, 2)
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
    _, full = value_and_grads(loss, model, features)
    model.zero_grad(set_to_none=True)
    (loss([dict(f) for f in features], None) * 0.25).backward()
    scaled = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.grad is not None])
    assert rel_err(scaled, 0.25 * torch.cat([full[k].flatten() for k in sorted(full)])) <= 1e-6
    model.zero_grad(set_to_none=True)


def test_no_grad_gives_the_value(model):
    features = columns(model, 4, 2)
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
    with torch.no_grad():
        value = loss([dict(f) for f in features], None)
    expected, _ = value_and_grads(st_losses.MultipleNegativesRankingLoss(model), model, features)
    assert rel_err(value, expected) <= 1e-5


def test_refused(model):
    with pytest.raises(BatchlabInputError, match="mini_batch_num_tokens"):
        CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=64)
    with pytest.raises(BatchlabInputError, match="at least 2"):
        CachedMultipleNegativesRankingLoss(model)(columns(model, 3, 1), None)
