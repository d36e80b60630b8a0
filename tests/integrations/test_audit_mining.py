"""Audit: mine_hard_negatives(filter_order="sentence-transformers") against sentence-transformers 6.3 on the
inputs test_mining leaves out: texts shared between queries and positives, extra and renamed columns,
the deprecated arguments, include_positives forcing n-tuple, and the errors sentence-transformers raises."""

import pytest
from datasets import Dataset

from batchlab.integrations.sentence_transformers import mine_hard_negatives
from tests.integrations.test_mining import assert_same_as_sentence_transformers, pairs


@pytest.fixture(scope="module")
def model(tiny_dir):
    from tests.integrations.conftest import load

    return load(tiny_dir)


def overlapping():
    """Two queries share a positive, a positive is another query's text, a query is another's positive."""
    data = pairs()
    q, a = list(data["query"]), list(data["answer"])
    a[5], a[7], q[10] = a[4], q[8], a[11]
    return Dataset.from_dict({"query": q, "answer": a})


def with_columns(names):
    data = pairs()
    columns = {"query": data["query"], "answer": data["answer"], "extra": [f"note {i}" for i in range(len(data))],
               "id": list(range(len(data)))}
    return Dataset.from_dict({name: columns[name] for name in names})


CASES = [
    (overlapping, {}),
    (overlapping, {"num_negatives": 4, "output_format": "n-tuple", "output_scores": True}),
    (overlapping, {"output_format": "labeled-list", "include_positives": True}),
    (overlapping, {"corpus": ["zzz"] + [f"extra {i} file" for i in range(5)], "output_format": "labeled-pair"}),
    (lambda: with_columns(["query", "answer", "extra"]), {"output_format": "n-tuple"}),
    (lambda: with_columns(["id", "query", "answer"]), {"anchor_column_name": "query", "positive_column_name": "answer"}),
    (lambda: with_columns(["query", "answer", "extra"]), {"anchor_column_name": "extra", "positive_column_name": "answer"}),
    (pairs, {"anchor_column_name": "missing"}),  # sentence-transformers falls back to the first column
    (pairs, {"anchor_column_name": "answer", "positive_column_name": "query"}),
    (pairs, {"include_positives": True, "output_format": "triplet"}),  # forced to n-tuple
    (pairs, {"output_format": "n-tuple-scores"}),  # deprecated: n-tuple with scores
    (pairs, {"as_triplets": False}),  # deprecated: n-tuple
    (pairs, {"margin": 0.0, "range_max": 10}),  # deprecated: absolute_margin
    (pairs, {"num_negatives": 20}),  # more than the corpus holds
    (pairs, {"num_negatives": 3, "range_min": 3, "range_max": 30, "max_score": 0.99, "min_score": 0.1,
             "output_format": "labeled-list", "output_scores": True}),
]


@pytest.mark.parametrize("make,options", CASES)
def test_same_dataset_as_sentence_transformers(model, make, options):
    assert_same_as_sentence_transformers(make(), model, options)


@pytest.mark.parametrize("options,message", [
    ({"num_negatives": 0}, "num_negatives must be at least 1"),
    ({"range_min": -1}, "range_min must be non-negative"),
    ({"range_min": 4, "range_max": 4}, "range_min"),
    ({"sampling_strategy": "bogus"}, "sampling_strategy"),  # sentence-transformers: an IndexError later
])
def test_bad_arguments_are_value_errors_like_sentence_transformers(model, options, message):
    """Refused before any encoding, with the exception type sentence-transformers users catch."""
    for order in ("sentence-transformers", "batchlab"):
        with pytest.raises(ValueError, match=message):
            mine_hard_negatives(pairs(), model, verbose=False, filter_order=order, **options)
