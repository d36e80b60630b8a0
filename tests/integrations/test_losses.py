"""batchlab's sentence-transformers losses against sentence-transformers' own (values and gradients).

Tolerance: 1e-5 relative (max abs difference over max abs value) in fp32. The two sides
compute the same sums in a different order (batchlab's InfoNCE vs ST's concatenated
logits; the GIST/two-direction rows through the stacked-row form), so agreement is to a
few float32 ulps scaled by the logit size (scale 20 / temperature 0.01 -> logits up to 100).
"""

import pytest
import torch
from sentence_transformers.sentence_transformer import losses as st_losses

from batchlab.errors import BatchlabInputError
from batchlab.integrations.sentence_transformers import (
    GISTEmbedLoss,
    MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss,
)
from tests.integrations.conftest import columns, load
from tests.integrations.helpers import assert_same, value_and_grads

ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load(tiny_dir)


@pytest.fixture(scope="module")
def guide(guide_dir):
    return load(guide_dir)


@pytest.mark.parametrize("n_columns", [2, 4])
@pytest.mark.parametrize("options", [
    {},
    {"scale": 7.0},
    {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
    {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "joint"},
    {"directions": ALL, "partition_mode": "joint"},
    {"directions": ("query_to_doc", "query_to_query")},
])
def test_mnrl_matches_sentence_transformers(model, n_columns, options):
    features = columns(model, 5, n_columns)
    theirs = value_and_grads(st_losses.MultipleNegativesRankingLoss(model, **options), model, features)
    ours = value_and_grads(MultipleNegativesRankingLoss(model, **options), model, features)
    assert_same(ours, theirs)


@pytest.mark.parametrize("impl", ["reference", "tiled"])
def test_mnrl_impls_and_single_row(model, impl):
    for rows in (1, 3):
        features = columns(model, rows, 3)
        theirs = value_and_grads(st_losses.MultipleNegativesRankingLoss(model), model, features)
        ours = value_and_grads(MultipleNegativesRankingLoss(model, impl=impl), model, features)
        assert_same(ours, theirs)


@pytest.mark.parametrize("n_columns", [2, 3])
def test_symmetric_matches(model, n_columns):
    features = columns(model, 4, n_columns, shift=1)
    with pytest.warns(DeprecationWarning):
        st = st_losses.MultipleNegativesSymmetricRankingLoss(model, scale=10.0)
    assert_same(value_and_grads(MultipleNegativesSymmetricRankingLoss(model, scale=10.0), model, features),
                value_and_grads(st, model, features))


@pytest.mark.parametrize("n_columns", [2, 3])
@pytest.mark.parametrize("options", [
    {},
    {"margin": 0.05},
    {"margin_strategy": "relative", "margin": 0.1},
    {"contrast_anchors": False},
    {"contrast_positives": False},
    {"contrast_anchors": False, "contrast_positives": False, "temperature": 0.05},
])
def test_gist_matches(model, guide, n_columns, options):
    features = columns(model, 6, n_columns, shift=2)
    theirs = value_and_grads(st_losses.GISTEmbedLoss(model, guide, **options), model, features)
    ours = value_and_grads(GISTEmbedLoss(model, guide, **options), model, features)
    assert_same(ours, theirs)


def test_same_constructor_as_sentence_transformers():
    import inspect

    for ours, theirs in [(MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss),
                         (GISTEmbedLoss, st_losses.GISTEmbedLoss)]:
        mine = {n: p.default for n, p in inspect.signature(ours).parameters.items() if p.kind != p.KEYWORD_ONLY}
        peer = {n: p.default for n, p in inspect.signature(theirs).parameters.items()}
        assert mine == peer


def test_refused_configurations(model):
    from sentence_transformers.util import dot_score

    with pytest.raises(BatchlabInputError, match="cos_sim"):
        MultipleNegativesRankingLoss(model, similarity_fct=dot_score)
    with pytest.raises(BatchlabInputError, match="hardness_mode"):
        MultipleNegativesRankingLoss(model, hardness_mode="in_batch_negatives", hardness_strength=5.0)
    with pytest.raises(BatchlabInputError, match="per_direction"):
        MultipleNegativesRankingLoss(model, directions=ALL, partition_mode="per_direction")
    with pytest.raises(BatchlabInputError, match="impl"):
        MultipleNegativesRankingLoss(model, impl="fast")
    with pytest.raises(TypeError):
        MultipleNegativesRankingLoss(model, temperature=0.05)
    with pytest.raises(BatchlabInputError, match="at least 2 columns"):
        MultipleNegativesRankingLoss(model)(columns(model, 3, 1), None)
