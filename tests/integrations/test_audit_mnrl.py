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


@pytest.fixture(scope="module")
def dropout_models(tmp_path_factory, guide_dir):
    """(a tiny model with dropout 0.2 in training mode, the session's guide)."""
    from batchlab.integrations.sentence_transformers.testing import save_tiny_model

    model = load(save_tiny_model(tmp_path_factory.mktemp("dropout") / "m", seed=0, dropout=0.2))
    model.train()
    return model, load(guide_dir)


@pytest.mark.parametrize("n_columns,mini_batch_size", [(2, 2), (3, 3)])
def test_cached_losses_replay_dropout_as_sentence_transformers(dropout_models, n_columns, mini_batch_size):
    """With dropout the re-encode must draw the masks of the first encode, in sentence-transformers'
    order (column by column, mini-batch by mini-batch): the same seed gives the same loss and gradients."""
    import torch

    from batchlab.integrations.sentence_transformers import CachedGISTEmbedLoss

    model, guide = dropout_models
    features = columns(model, 5, n_columns)
    pairs = [(CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size),
              st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size)),
             (CachedGISTEmbedLoss(model, guide, mini_batch_size=mini_batch_size),
              st_losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=mini_batch_size))]
    for ours, theirs in pairs:
        torch.manual_seed(3)
        got = value_and_grads(ours, model, features)
        torch.manual_seed(3)
        assert_same(got, value_and_grads(theirs, model, features))
    torch.manual_seed(4)  # another seed draws other masks: the check can fail
    other = value_and_grads(pairs[0][0], model, features)
    torch.manual_seed(3)
    assert float(other[0]) != float(value_and_grads(pairs[0][1], model, features)[0])
