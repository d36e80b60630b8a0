"""Memory-efficient tiled losses in plain PyTorch (any device).

Importing this package registers the ``"tiled"`` implementation of every loss family
with :mod:`batchlab.losses._dispatch`; the engine and its block primitives (reused by
the distributed ring) are documented in :mod:`batchlab.losses.tiled.engine`.
"""

from batchlab.losses.tiled import dcl, infonce, nt_xent, siglip  # noqa: F401  (register the "tiled" impls)
from batchlab.losses.tiled.engine import (
    BlockStats,
    LSECoefficients,
    Pairs,
    SigmoidBlock,
    lse_block_backward,
    lse_block_forward,
    merge_stats,
    sigmoid_block,
)

__all__ = [
    "Pairs",
    "BlockStats",
    "LSECoefficients",
    "SigmoidBlock",
    "lse_block_forward",
    "lse_block_backward",
    "merge_stats",
    "sigmoid_block",
]
