"""Shared fixtures: tiny SentenceTransformer models saved once per session (no download)."""

import pytest

TEXTS = [
    "read a file", "open the file", "write a list", "sort the list", "parse json text", "load the model",
    "print a line", "return the value", "find the key", "remove an item", "check the path", "run the test",
    "add a number", "get the date", "update the user", "save the data",
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from batchlab.integrations.sentence_transformers.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)


@pytest.fixture(scope="session")
def guide_dir(tmp_path_factory):
    from batchlab.integrations.sentence_transformers.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("guide") / "g", seed=1, hidden_size=8)


def load(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def columns(model, n_rows: int, n_columns: int, shift: int = 0):
    """``n_columns`` tokenised columns of ``n_rows`` texts each (different texts per column)."""
    out = []
    for c in range(n_columns):
        texts = [TEXTS[(i * n_columns + c + shift) % len(TEXTS)] + " " + TEXTS[(i + 3 * c) % len(TEXTS)]
                 for i in range(n_rows)]
        out.append(model.preprocess(texts))
    return out
