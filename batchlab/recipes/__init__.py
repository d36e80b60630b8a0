"""Training recipes: tiny open_clip models trained end to end with batchlab's samplers and losses.

* :func:`train_dual_encoder`: text to text (e.g. docstring -> code on ``codesearch``).
* :func:`train_clip`: image to text (e.g. ``fashion_mnist`` with caption templates).
* :func:`retrieval_metrics`: recall@k and MRR on a held-out split.
* :class:`TfidfTeacher` / :func:`tfidf_views`: an offline lexical teacher for batch construction.
* :func:`make_sampler`: batch samplers by name (random, cluster, community, hard_negative).
* :func:`load_run`: a saved run's model (``run.encode(texts)``), record and history.
* :mod:`batchlab.recipes.compare`: ``compare(train, test, arms=..., seeds=...)`` trains several
  batch constructions x several seeds, with seed-paired claim checks (what ``batchlab demo`` runs).
* :func:`read_pairs`: your own (query, document[, label]) pairs from a .jsonl / .tsv / .csv file.

Names load on first use (torch, open_clip and faiss with them), so that importing
:mod:`batchlab.recipes.compare` for the command line's ``--help`` stays light.
"""

import importlib

_WHERE = {
    "ContrastiveHead": "_loop", "TrainResult": "_loop",
    "train_clip": "clip",
    "ARMS": "compare", "Arm": "compare", "Comparison": "compare", "paired_difference": "compare",
    "register_arm": "compare",
    "train_dual_encoder": "dual_encoder",
    "retrieval_metrics": "evaluate",
    "Pairs": "pairs", "read_pairs": "pairs",
    "Run": "runs", "load_run": "runs",
    "SAMPLERS": "samplers", "RandomBatchSampler": "samplers", "SamplerSchedule": "samplers", "make_sampler": "samplers",
    "TeacherViews": "teachers", "TfidfTeacher": "teachers", "tfidf_views": "teachers",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'batchlab.recipes' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"batchlab.recipes.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
