"""Audit of batchlab's GISTEmbedLoss / CachedGISTEmbedLoss against sentence-transformers' own
(values and parameter gradients, 1e-5 relative as in test_losses.py) on the batches where the
guide's false-negative mask has ties: a text repeated in the batch, anchor == positive, and
negative margins (the guide never removes a row's own entry there).
"""

import pytest
from sentence_transformers.sentence_transformer import losses as st_losses

from batchlab.errors import BatchlabInputError
from batchlab.integrations.sentence_transformers import CachedGISTEmbedLoss, GISTEmbedLoss
from tests.integrations.conftest import TEXTS, load
from tests.integrations.helpers import assert_same, value_and_grads

ANCHORS = TEXTS[:5]
REPEATED = [TEXTS[5], TEXTS[6], TEXTS[5], TEXTS[7], TEXTS[5]]  # one positive text for anchors 0, 2 and 4
NEGATIVES = TEXTS[10:15]
BATCHES = {
    "repeated positive": ((ANCHORS, REPEATED), {}),
    "repeated positive + negatives": ((ANCHORS, REPEATED, NEGATIVES), {}),
    "anchor == positive": ((ANCHORS, ANCHORS), {}),
    "anchor == positive, relative": ((ANCHORS, ANCHORS), {"margin_strategy": "relative"}),
    "negative margin + negatives": ((ANCHORS, REPEATED, NEGATIVES), {"margin": -0.2}),
}


@pytest.fixture(scope="module")
def models(tiny_dir, guide_dir):
    """(model, guide): the session's tiny models, loaded once for this module."""
    return load(tiny_dir), load(guide_dir)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_gist_ties_are_decided_as_sentence_transformers(models, batch):
    """batchlab's guide scores were a matmul of normalised rows against a separately summed
    positive score, so a repeated text fell on either side of the threshold (0.45% off in the
    loss, 3.4% in the gradients), and the anchor-anchor / positive-positive blocks kept a row's
    own score whenever the guide did not remove it (anchor == positive: 1.04 vs 0.36)."""
    (model, guide), (texts, options) = models, BATCHES[batch]
    features = [model.preprocess(list(t)) for t in texts]
    assert_same(value_and_grads(GISTEmbedLoss(model, guide, **options), model, features),
                value_and_grads(st_losses.GISTEmbedLoss(model, guide, **options), model, features))
    cached = {**options, "mini_batch_size": 2}
    assert_same(value_and_grads(CachedGISTEmbedLoss(model, guide, **cached), model, features),
                value_and_grads(st_losses.CachedGISTEmbedLoss(model, guide, **cached), model, features))


def test_cached_gist_takes_several_negative_columns(models):
    """sentence-transformers' CachedGISTEmbedLoss takes any number of negative columns (its
    GISTEmbedLoss 2 or 3); batchlab's cached loss refused a fourth column."""
    model, guide = models
    features = [model.preprocess(list(t)) for t in (ANCHORS, REPEATED, NEGATIVES, TEXTS[11:16])]
    assert_same(value_and_grads(CachedGISTEmbedLoss(model, guide, mini_batch_size=3), model, features),
                value_and_grads(st_losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=3), model, features))
    with pytest.raises(BatchlabInputError, match=r"takes \(anchor, positive\) or .* got 4 columns"):
        GISTEmbedLoss(model, guide)(features, None)
