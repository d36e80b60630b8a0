"""batchlab: batches that teach.

Samplers choose which examples meet in a batch (``batchlab.samplers``); tiled loss
kernels make huge batches cheap (``batchlab.losses``). Heavy optional libraries
(faiss, open_clip, igraph, pymetis, triton) are imported only when used.
"""

from batchlab import losses, samplers
from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.losses import (
    DCLLoss,
    EmbeddingCache,
    InfoNCELoss,
    NTXentLoss,
    SigLIPLoss,
    dcl,
    info_nce,
    nt_xent,
    siglip,
)

__version__ = "0.1.0"

__all__ = [
    "losses",
    "samplers",
    "BatchlabInputError",
    "StaleArtifactError",
    "info_nce",
    "siglip",
    "dcl",
    "nt_xent",
    "InfoNCELoss",
    "SigLIPLoss",
    "DCLLoss",
    "NTXentLoss",
    "EmbeddingCache",
]
