"""Contrastive losses with exact reference implementations and memory-efficient fast paths.

Functional API: :func:`info_nce`, :func:`siglip`, :func:`dcl`, :func:`nt_xent`.
Modules with open_clip's call: :class:`InfoNCELoss`, :class:`SigLIPLoss`,
:class:`DCLLoss`, :class:`NTXentLoss`; global objectives with per-example state: :func:`sogclr`,
:class:`SogCLRLoss`, :class:`ISogCLRLoss`; the one-way, diagonal-target InfoNCE of gradient caching
in blocks of full rows: :func:`row_block_info_nce` (:class:`RowBlocks`). Every function takes ``impl=`` ("auto",
"reference", "tiled", "triton") and ``distributed=`` ("none", "allgather", "ring", "auto").
"""

from batchlab.losses._common import LSE
from batchlab.losses._dispatch import available_impls
from batchlab.losses.dcl import dcl
from batchlab.losses.embedding_cache import EmbeddingCache, cached_step
from batchlab.losses.infonce import info_nce
from batchlab.losses.modules import DCLLoss, InfoNCELoss, NTXentLoss, SigLIPLoss
from batchlab.losses.nt_xent import nt_xent
from batchlab.losses.row_blocks import RowBlocks, row_block_info_nce
from batchlab.losses.siglip import siglip
from batchlab.losses.sogclr import ISogCLRLoss, SogCLRLoss, SogCLRResult, sogclr

__all__ = [
    "LSE",
    "available_impls",
    "info_nce",
    "siglip",
    "dcl",
    "nt_xent",
    "row_block_info_nce",
    "RowBlocks",
    "InfoNCELoss",
    "SigLIPLoss",
    "DCLLoss",
    "NTXentLoss",
    "EmbeddingCache",
    "cached_step",
    "sogclr",
    "SogCLRResult",
    "SogCLRLoss",
    "ISogCLRLoss",
]
