"""batchlab with sentence-transformers: losses, trainer-ready batch samplers, dataset mining.

Needs the ``st`` extra (``pip install batchlab[st]``: sentence-transformers,
transformers, datasets, accelerate). See docs/sentence_transformers.md.

========================================  ==========================================
``MultipleNegativesRankingLoss``          losses.py: InfoNCE, every directions mode
``MultipleNegativesSymmetricRankingLoss`` losses.py
``GISTEmbedLoss``                         losses.py: guided in-batch negatives
``CachedMultipleNegativesRankingLoss``    cached.py: GradCache on ``EmbeddingCache``
``CachedGISTEmbedLoss``                   cached.py
``RowBlocks``                             cached.py (from batchlab.losses): the row-block pass
``BatchlabBatchSampler``, ``batch_sampler`` samplers.py: the trainer's ``batch_sampler=``
``mine_hard_negatives``                   mining.py: dataset in, dataset out
``tiny_model``                            testing.py: a tiny offline model
========================================  ==========================================

Names are imported on first use, so ``from batchlab.integrations.sentence_transformers
import CachedMultipleNegativesRankingLoss`` loads neither the samplers nor the index.
"""

from __future__ import annotations

import importlib
from typing import Any

try:
    import sentence_transformers as _st  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchlab.integrations.sentence_transformers needs sentence-transformers; "
        "install the extra: pip install 'batchlab[st]'"
    ) from exc

_WHERE = {
    "MultipleNegativesRankingLoss": "losses",
    "MultipleNegativesSymmetricRankingLoss": "losses",
    "GISTEmbedLoss": "losses",
    "CachedMultipleNegativesRankingLoss": "cached",
    "CachedGISTEmbedLoss": "cached",
    "RowBlocks": "cached",
    "BatchlabBatchSampler": "samplers",
    "batch_sampler": "samplers",
    "KINDS": "samplers",
    "mine_hard_negatives": "mining",
    "tiny_model": "testing",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
