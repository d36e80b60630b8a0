"""(query, document) pairs of the offline text datasets, by name, for the fine-tuning recipes.

>>> from batchlab.datasets.text_pairs import TEXT_PAIR_DATASETS
>>> TEXT_PAIR_DATASETS
('codesearch', 'wordnet')
"""

from __future__ import annotations

from batchlab.errors import BatchlabInputError

#: the datasets :func:`load_pairs` knows
TEXT_PAIR_DATASETS = ("codesearch", "wordnet")


def load_pairs(name: str, *, max_train: int | None, max_test: int | None, packages=(), progress: bool = True):
    """``(train, test)`` lists of (query, document) pairs of an offline dataset, the first N of each.

    ``packages`` (codesearch only) adds the installed-package harvest to the pairs.
    """
    if name == "codesearch":
        from batchlab.datasets import load_codesearch

        train = load_codesearch("train", packages=tuple(packages), progress=progress)
        test = load_codesearch("test", packages=tuple(packages), progress=progress)
    elif name == "wordnet":
        from batchlab.datasets.wordnet import load_wordnet

        train, test = load_wordnet("train"), load_wordnet("test")
    else:
        raise BatchlabInputError(
            f"unknown text-pair dataset {name!r}; expected one of {TEXT_PAIR_DATASETS} "
            "(or pass your own pairs to the recipe)"
        )
    return list(zip(train.queries, train.documents))[:max_train], list(zip(test.queries, test.documents))[:max_test]
