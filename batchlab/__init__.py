"""batchlab: batches that teach.

Samplers choose which examples meet in a batch (``batchlab.samplers``); tiled loss
kernels make huge batches cheap (``batchlab.losses``). Heavy optional libraries
(faiss, open_clip, igraph, pymetis, triton) are imported only when used.
"""

from batchlab.errors import BatchlabInputError, StaleArtifactError

# The losses and samplers (and torch with them) load on first use, so that `batchlab --help`
# and every bad-usage message answer without importing torch (PEP 562 module __getattr__).
_LAZY = {
    "losses": ("batchlab.losses", None),
    "samplers": ("batchlab.samplers", None),
    **{name: ("batchlab.losses", name) for name in (
        "DCLLoss", "EmbeddingCache", "InfoNCELoss", "NTXentLoss", "SigLIPLoss", "dcl", "info_nce", "nt_xent", "siglip")},
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'batchlab' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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
