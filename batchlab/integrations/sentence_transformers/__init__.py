"""batchlab with sentence-transformers: losses, trainer-ready batch samplers, dataset mining.

Needs the ``st`` extra (``pip install batchlab[st]``: sentence-transformers,
transformers, datasets, accelerate). See docs/sentence_transformers.md.
"""

from __future__ import annotations

try:
    import sentence_transformers as _st  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchlab.integrations.sentence_transformers needs sentence-transformers; "
        "install the extra: pip install 'batchlab[st]'"
    ) from exc

from batchlab.integrations.sentence_transformers.cached import (
    CachedGISTEmbedLoss,
    CachedMultipleNegativesRankingLoss,
)
from batchlab.integrations.sentence_transformers.losses import (
    GISTEmbedLoss,
    MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss,
)
from batchlab.integrations.sentence_transformers.mining import mine_hard_negatives
from batchlab.integrations.sentence_transformers.samplers import KINDS, BatchlabBatchSampler, batch_sampler
from batchlab.integrations.sentence_transformers.testing import tiny_model

__all__ = [
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "GISTEmbedLoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedGISTEmbedLoss",
    "BatchlabBatchSampler",
    "mine_hard_negatives",
    "batch_sampler",
    "KINDS",
    "tiny_model",
]
