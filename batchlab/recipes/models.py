"""Tiny open_clip models built from scratch (no weights, nothing downloaded).

The configs are JSON files next to this module, registered with
``open_clip.add_model_config`` so that ``open_clip.create_model`` and
``open_clip.get_tokenizer`` know them by name:

* ``batchlab-tiny``: CLIP with a ViT of width 128, 2 layers, 32 px images in 4 px
  patches, and a text tower of width 128, 4 heads, 2 layers, 32 tokens; embed 128.
* ``batchlab-tiny-text``: only the text tower is used: width 64, 2 heads, 2 layers,
  32 tokens, embed 64 (the demo's model: 12 runs fit in about 2 minutes on 2 cores).
* ``batchlab-small-text``: the same with width 128, 4 heads, embed 128.

The tokenizer is open_clip's BPE tokenizer, whose vocabulary ships inside the package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent
TINY_CLIP = "batchlab-tiny"
TINY_TEXT = "batchlab-tiny-text"


def register_configs() -> None:
    """Make the ``batchlab-*`` configs known to open_clip (idempotent)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    if TINY_TEXT not in open_clip.list_models() or TINY_CLIP not in open_clip.list_models():
        for path in sorted(CONFIG_DIR.glob("batchlab-*.json")):
            open_clip.add_model_config(path)


def model_config(name: str) -> dict:
    """The JSON config of a ``batchlab-*`` model."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        from batchlab.errors import BatchlabInputError

        known = sorted(p.stem for p in CONFIG_DIR.glob("batchlab-*.json"))
        raise BatchlabInputError(f"unknown tiny config {name!r}; known: {known}")
    return json.loads(path.read_text())


def tokenizer(name: str = TINY_TEXT):
    """open_clip's tokenizer for a ``batchlab-*`` config (offline; honours its context length)."""
    register_configs()
    import open_clip

    return open_clip.get_tokenizer(name)


def text_encoder(name: str = TINY_TEXT, *, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised open_clip ``TextTransformer`` from a config's ``text_cfg``.

    Takes token ids ``(B, context_length)`` and returns embeddings ``(B, embed_dim)``.
    """
    from open_clip.transformer import TextTransformer

    config = model_config(name)
    cfg = config["text_cfg"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextTransformer(
            context_length=cfg["context_length"],
            vocab_size=cfg["vocab_size"],
            width=cfg["width"],
            heads=cfg["heads"],
            layers=cfg["layers"],
            output_dim=config["embed_dim"],
        )


def clip_model(name: str = TINY_CLIP, *, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised open_clip ``CLIP`` model from a ``batchlab-*`` config."""
    register_configs()
    import open_clip

    import logging

    class _Quiet(logging.Filter):  # "no pretrained weights loaded" is the point here, not news
        def filter(self, record: logging.LogRecord) -> bool:
            return "pretrained weights" not in record.getMessage()

    quiet = _Quiet()
    logging.getLogger().addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return open_clip.create_model(name, pretrained=None)
    finally:
        logging.getLogger().removeFilter(quiet)


def lsa_token_embeddings(tokens: torch.Tensor, vocab_size: int, dim: int, *, seed: int = 0,
                         skip: tuple[int, ...] = (0,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Token vectors from a truncated SVD (LSA) of the TF-IDF matrix of tokenised texts.

    Parameters
    ----------
    tokens : LongTensor (N, L)
        Token ids of the texts the vectors are learned from (the training split only,
        so that nothing about the held-out texts leaks into the initialisation).
    vocab_size, dim :
        Rows and columns of the result.
    seed :
        Seed of the randomised SVD.
    skip :
        Token ids left out of the matrix (padding; start / end-of-text markers).

    Returns
    -------
    vectors : Tensor (vocab_size, dim)
        ``V_k S_k`` (the tokens' coordinates in the top-``dim`` latent space), zero for
        tokens that never occur; sublinear tf, smoothed idf, L2-normalised rows, as in
        :class:`~batchlab.recipes.teachers.TfidfTeacher`.
    seen : BoolTensor (vocab_size,)
        Which tokens occur in ``tokens``.
    """
    rows = torch.arange(tokens.shape[0]).unsqueeze(1).expand_as(tokens).reshape(-1)
    cols = tokens.reshape(-1).long()
    keep = torch.ones_like(cols, dtype=torch.bool)
    for t in skip:
        keep &= cols != t
    rows, cols = rows[keep], cols[keep]
    n = tokens.shape[0]
    counts = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(len(rows)), (n, vocab_size),
                                     check_invariants=False).coalesce()
    r, c = counts.indices()
    df = torch.bincount(c, minlength=vocab_size).float()
    idf = torch.log((1 + n) / (1 + df)) + 1.0
    values = (1.0 + counts.values().log()) * idf[c]
    norms = torch.zeros(n).index_add_(0, r, values * values).sqrt().clamp_min(1e-12)
    matrix = torch.sparse_coo_tensor(counts.indices(), values / norms[r], (n, vocab_size), check_invariants=False).coalesce()
    k = max(1, min(dim, min(matrix.shape) - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(matrix, q=k, niter=4)
    vectors = torch.zeros(vocab_size, dim)
    vectors[:, :k] = v * s
    seen = df > 0
    vectors[~seen] = 0.0  # exact zeros (the randomised SVD leaves round-off there)
    return vectors, seen


def init_token_embeddings_lsa(model: torch.nn.Module, tokens: torch.Tensor, *, seed: int = 0) -> torch.nn.Module:
    """Warm-start a ``TextTransformer``'s token embeddings from :func:`lsa_token_embeddings`.

    Rows of tokens seen in ``tokens`` are replaced by their LSA vectors, rescaled so that
    their mean norm equals that of the random initialisation (the transformer's layer
    norms and residual scale stay as they were trained for); other rows, and the
    start / end-of-text markers and padding, keep their random values. Deterministic.
    """
    embedding = model.token_embedding.weight
    vocab_size, width = embedding.shape
    skip = (0, vocab_size - 2, vocab_size - 1)  # padding, <start_of_text>, <end_of_text> in open_clip's BPE
    vectors, seen = lsa_token_embeddings(tokens, vocab_size, width, seed=seed, skip=skip)
    with torch.no_grad():
        scale = embedding[seen].norm(dim=1).mean() / vectors[seen].norm(dim=1).mean().clamp_min(1e-12)
        embedding[seen] = (vectors[seen] * scale).to(embedding.dtype)
    return model
