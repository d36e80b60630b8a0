"""Audit of batchlab's MultipleNegativesRankingLoss / CachedMultipleNegativesRankingLoss: the
constructor variants test_losses.py / test_cached.py leave out, against sentence-transformers
6.3 itself (values and parameter gradients, 1e-5 relative), and the refusals' wording.
"""

import logging

import pytest
from sentence_transformers.sentence_transformer import losses as st_losses

from batchlab.errors import BatchlabInputError
from batchlab.integrations.sentence_transformers import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from tests.integrations.conftest import columns, load
from tests.integrations.helpers import assert_same, value_and_grads

OPTIONS = {
    "doc_to_query listed first": {"directions": ("doc_to_query", "query_to_doc")},
    "doc_to_doc only": {"directions": ("query_to_doc", "doc_to_doc")},
    "three directions": {"directions": ("query_to_doc", "query_to_query", "doc_to_query")},
    "per_direction, reversed": {"directions": ("doc_to_query", "query_to_doc"), "partition_mode": "per_direction"},
    "per_direction, one direction": {"directions": ("query_to_doc",), "partition_mode": "per_direction"},
    "a list, a direction twice": {"directions": ["query_to_doc", "doc_to_query", "query_to_doc"]},
    "hardness at strength 0": {"hardness_mode": "in_batch_negatives", "hardness_strength": 0.0},
    "scale below 1": {"scale": 0.5},
}


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load(tiny_dir)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_mnrl_variants_match_sentence_transformers(model, name, caplog):
    """Both classes against sentence-transformers' cached loss (itself equal to its plain loss)."""
    options = OPTIONS[name]
    features = columns(model, 4, 3)
    with caplog.at_level(logging.ERROR):  # ST warns that hardness_strength=0 has no effect
        theirs = value_and_grads(st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **options),
                                 model, features)
        assert_same(value_and_grads(MultipleNegativesRankingLoss(model, **options), model, features), theirs)
        cached = CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **options)
        assert_same(value_and_grads(cached, model, features), theirs)


def test_mnrl_refusals_name_the_parameter(model):
    """hardness_mode with a positive strength has no InfoNCE form (batchlab refused strength 0
    too, a configuration sentence-transformers computes as the plain loss)."""
    for cls in (MultipleNegativesRankingLoss, CachedMultipleNegativesRankingLoss):
        with pytest.raises(BatchlabInputError, match="hardness_mode='hard_negatives' is not computed"):
            cls(model, hardness_mode="hard_negatives", hardness_strength=0.5)
        with pytest.raises(BatchlabInputError, match="hardness_mode must be one of"):
            cls(model, hardness_mode="bogus")
        with pytest.raises(BatchlabInputError, match="hardness_strength must be non-negative"):
            cls(model, hardness_mode="all_negatives", hardness_strength=-1.0)
        with pytest.raises(BatchlabInputError, match="Scale must be a positive value"):
            cls(model, scale=0.0)
