"""mine_hard_negatives(dataset, model, ...) against sentence_transformers.util.mine_hard_negatives.

With ``filter_order="sentence-transformers"`` the output must be the same dataset (same
rows, texts and labels; scores within 1e-5: batchlab's index and sentence-transformers'
matmul round differently). The tiny model's embeddings have no exact score ties.
"""

import random

import pytest
from datasets import Dataset
from sentence_transformers.util import mine_hard_negatives as st_mine

from batchlab.errors import BatchlabInputError
from batchlab.integrations.sentence_transformers import mine_hard_negatives
from tests.integrations.conftest import TEXTS, load


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load(tiny_dir)


def pairs(n=16, duplicate_queries=False):
    queries = [f"{TEXTS[i]} {TEXTS[(3 * i + 1) % 16]}" for i in range(n)]
    answers = [f"{TEXTS[(i + 5) % 16]} and {TEXTS[(7 * i + 2) % 16]} file" for i in range(n)]
    if duplicate_queries:  # a query with several positives
        queries[3] = queries[2]
        queries[9] = queries[2]
    return Dataset.from_dict({"query": queries, "answer": answers})


def assert_same_dataset(ours, theirs):
    assert ours.column_names == theirs.column_names
    a, b = ours.to_dict(), theirs.to_dict()
    for column in a:
        if column in ("scores", "score"):
            flat = lambda x: [v for row in x for v in (row if isinstance(row, list) else [row])]  # noqa: E731
            assert flat(a[column]) == pytest.approx(flat(b[column]), abs=1e-5)
        else:
            assert a[column] == b[column], column


def assert_same_as_sentence_transformers(data, model, options):
    """Both miners on the same data and options (Python's random seeded alike) give the same dataset."""
    random.seed(7)
    theirs = st_mine(data, model, verbose=False, **options)
    random.seed(7)
    ours = mine_hard_negatives(data, model, verbose=False, filter_order="sentence-transformers", **options)
    assert len(theirs) > 0
    assert_same_dataset(ours, theirs)


CASES = [
    {},
    {"num_negatives": 4, "output_format": "n-tuple", "output_scores": True},
    {"num_negatives": 3, "range_min": 2, "absolute_margin": 0.0, "output_format": "n-tuple"},
    {"num_negatives": 2, "range_min": 1, "range_max": 9, "relative_margin": 0.001, "max_score": 0.9999},
    {"num_negatives": 2, "output_format": "labeled-pair", "output_scores": True},
    {"num_negatives": 2, "output_format": "labeled-pair"},
    {"num_negatives": 3, "output_format": "labeled-list", "min_score": 0.0},
    {"num_negatives": 2, "output_format": "labeled-list", "output_scores": True},
    {"num_negatives": 3, "include_positives": True},
    {"num_negatives": 3, "sampling_strategy": "random", "range_max": 10},
    {"num_negatives": 2, "corpus": [f"extra {t}" for t in TEXTS[:6]], "output_scores": True},
]


@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("options", CASES)
def test_sentence_transformers_order_gives_the_same_dataset(model, options, duplicates):
    data = pairs(duplicate_queries=duplicates)
    assert_same_as_sentence_transformers(data, model, options)


class HashCrossEncoder:
    """A stand-in cross-encoder: a fixed pseudo-random score per (query, passage), no ties."""

    def predict(self, sentence_pairs, batch_size=32, convert_to_tensor=False, **_):
        import hashlib

        import torch

        scores = [int.from_bytes(hashlib.blake2b(f"{q}\x00{p}".encode(), digest_size=6).digest(), "big") / 2**48
                  for q, p in sentence_pairs]
        return torch.tensor(scores) if convert_to_tensor else scores


@pytest.mark.parametrize("options", [
    {"num_negatives": 2},  # no filter: sentence-transformers 6.3 rescores anyway, 6.2 does not
    {"num_negatives": 2, "max_score": 0.9, "output_scores": True},
    {"num_negatives": 2, "corpus": None},  # a query's own text in the corpus (see below)
])
def test_sentence_transformers_order_matches_the_installed_release_on_its_changed_rules(model, options):
    """Rules that changed between sentence-transformers 6.2 and 6.3 (candidate count, the query's own
    text excluded, cross-encoder rescoring without filters) follow whichever release is installed."""
    data = pairs()
    options = dict(options)
    if "corpus" in options:  # four queries' own texts as corpus documents: never their own negatives on 6.3
        options["corpus"] = list(data["query"][:4]) + [f"extra {t}" for t in TEXTS[:4]]
    else:
        options["cross_encoder"] = HashCrossEncoder()
    assert_same_as_sentence_transformers(data, model, options)


def test_batchlab_order_skips_ranks_before_filtering(model):
    """batchlab: range_min counts ranks before the filters; sentence-transformers: after them."""
    data = pairs()
    common = dict(num_negatives=2, range_min=3, range_max=12, absolute_margin=-0.0005, output_format="n-tuple",
                  output_scores=True, verbose=False)
    ours = mine_hard_negatives(data, model, **common)
    theirs = mine_hard_negatives(data, model, filter_order="sentence-transformers", **common)
    assert ours.to_dict() != theirs.to_dict()
    plain = dict(num_negatives=3, output_format="n-tuple", verbose=False)  # no window, no filter: the same
    assert_same_dataset(mine_hard_negatives(data, model, **plain),
                        mine_hard_negatives(data, model, filter_order="sentence-transformers", **plain))


def test_bad_arguments(model):
    with pytest.raises(BatchlabInputError, match="filter_order"):
        mine_hard_negatives(pairs(), model, filter_order="st")
    with pytest.raises(BatchlabInputError, match="output_format"):
        mine_hard_negatives(pairs(), model, output_format="pairs", verbose=False)
    with pytest.raises(BatchlabInputError, match="cross_encoder"):
        mine_hard_negatives(pairs(), model, cross_encoder=object(), verbose=False)
    with pytest.raises(BatchlabInputError, match="cannot hold"):
        mine_hard_negatives(pairs(), model, range_min=5, range_max=6, num_negatives=3,
                            filter_order="sentence-transformers", verbose=False)
    with pytest.raises(BatchlabInputError, match="empty"):
        mine_hard_negatives(pairs().select([]), model)
