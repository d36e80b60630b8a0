"""Recipe options for the demo's variants: a random-then-teacher curriculum, an LSA warm start
of the token embeddings, and false-negative filtering of mined hard negatives (all at tiny size)."""

from __future__ import annotations

import pytest
import torch

from batchlab.errors import BatchlabInputError
from batchlab.recipes import RandomBatchSampler, SamplerSchedule, TeacherViews, tfidf_views, train_dual_encoder
from batchlab.recipes.models import init_token_embeddings_lsa, lsa_token_embeddings, text_encoder
from batchlab.recipes.samplers import hard_negative_ids


@pytest.fixture(scope="module")
def views():
    from batchlab.datasets import gaussian_mixture

    x, _ = gaussian_mixture(128, 16, 8, seed=0)
    return TeacherViews(x)


def test_curriculum_schedule_random_then_teacher(views):
    schedule = SamplerSchedule("community", views, batch_size=16, num_examples=128, random_epochs=2,
                               options={"group_size": 4, "rank_window": (1, 9)})
    assert isinstance(schedule(0), RandomBatchSampler) and schedule(1) is schedule(0)
    later = schedule(2)
    assert not isinstance(later, RandomBatchSampler) and type(later).__name__ == "CommunityBatchSampler"
    plain = SamplerSchedule("community", views, batch_size=16, num_examples=128,
                            options={"group_size": 4, "rank_window": (1, 9)})
    assert not isinstance(plain(0), RandomBatchSampler)  # the default is unchanged
    with pytest.raises(BatchlabInputError, match="random_epochs"):
        SamplerSchedule("community", views, batch_size=16, num_examples=128, random_epochs=-1)


def test_lsa_token_embeddings_group_cooccurring_tokens():
    # tokens 1, 2 always occur together, 3, 4 together; 0 is padding; 9 never occurs
    tokens = torch.tensor([[1, 2, 0, 0], [1, 2, 5, 0], [3, 4, 0, 0], [3, 4, 6, 0], [1, 2, 0, 0], [3, 4, 0, 0]])
    vectors, seen = lsa_token_embeddings(tokens, vocab_size=10, dim=2)
    assert vectors.shape == (10, 2) and seen.tolist() == [False, True, True, True, True, True, True, False, False, False]
    assert torch.all(vectors[~seen] == 0)
    cos = torch.nn.functional.cosine_similarity
    assert cos(vectors[1], vectors[2], dim=0) > 0.99 and cos(vectors[3], vectors[4], dim=0) > 0.99
    assert abs(float(cos(vectors[1], vectors[3], dim=0))) < 0.1


def test_init_token_embeddings_lsa_changes_only_seen_rows():
    model = text_encoder(seed=0)
    before = model.token_embedding.weight.detach().clone()
    tokens = torch.tensor([[49406, 100, 200, 49407, 0], [49406, 100, 300, 49407, 0], [49406, 400, 49407, 0, 0]])
    init_token_embeddings_lsa(model, tokens)
    after = model.token_embedding.weight.detach()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [100, 200, 300, 400]  # not padding, <start_of_text>, <end_of_text> or unseen tokens
    assert after[[100, 200, 300, 400]].norm(dim=1).mean() == pytest.approx(float(before[[100, 200, 300, 400]].norm(dim=1).mean()), rel=1e-4)


def test_hard_negative_ids_relative_margin_drops_likely_false_negatives():
    queries = ["parse the json file", "parse the xml file", "draw a red circle", "draw a blue square", "open the socket"]
    documents = ["def parse_json(f): parse the json file", "def load_xml(f): xml tree",
                 "def circle(r): draw red", "def square(s): draw square", "def connect(host): socket"]
    views = tfidf_views(queries, documents, dim=3)
    plain = hard_negative_ids(views, num_negatives=3)
    filtered = hard_negative_ids(views, num_negatives=3, relative_margin=0.05)
    assert filtered.shape == plain.shape
    positive = views.positive_scores()
    full = torch.stack([torch.sparse.mm(views.sparse[2], views.sparse[1].to_dense()[i:i + 1].T).flatten()
                        for i in range(len(views))])  # (query, document) exact scores
    assert torch.allclose(positive, full.diagonal(), atol=1e-6)
    for i, row in enumerate(filtered.tolist()):
        for j in row:
            if j >= 0:
                assert j != i and 0 < full[i, j] <= 0.95 * positive[i] + 1e-6
    # some mined negative scored above 95% of its positive and is gone
    assert any((full[i, j] > 0.95 * positive[i]) for i, row in enumerate(plain.tolist()) for j in row)
    assert (filtered == -1).any()


def test_dual_encoder_with_curriculum_and_lsa_init():
    words = ["parse", "draw", "close", "open", "read", "write", "sort", "merge"]
    pairs = [(f"{words[i % 8]} the {words[(i // 8) % 8]} item {i}", f"def {words[i % 8]}_{i}(x):\n    return x")
             for i in range(80)]
    result = train_dual_encoder(pairs[:64], pairs[64:], sampler="hard_negative", batch_size=32, epochs=2, progress=False,
                                random_epochs=1, init="lsa", sampler_options={"relative_margin": 0.05})
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    with pytest.raises(BatchlabInputError, match="init"):
        train_dual_encoder(pairs[:64], pairs[64:], batch_size=32, epochs=1, progress=False, init="svd")
