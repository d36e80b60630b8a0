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
