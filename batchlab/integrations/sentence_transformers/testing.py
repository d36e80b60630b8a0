"""A tiny randomly initialised SentenceTransformer: for tests, docs and CPU smoke runs, no download.

A one-layer BERT (hidden size 16 by default) with a small word-piece vocabulary, saved to
a folder and loaded through sentence-transformers' ``Transformer`` + ``Pooling`` modules,
so it tokenises, trains, saves and reloads like any sentence-transformers model.

>>> model = tiny_model(seed=0)
>>> model.encode(["read a file"]).shape
(1, 16)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

WORDS = (
    "the a an of to and in is it on for with as by at from this that code file files function functions return "
    "returns value values list lists string strings data model test tests error errors read reads write writes "
    "open close print loop class method path name number numbers line lines text json parse load save sort key "
    "keys dict array index item items user time date run call get set new add remove update find check"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789_."


def vocabulary() -> list[str]:
    return SPECIAL + WORDS + list(LETTERS) + ["##" + c for c in LETTERS]


def save_tiny_model(path: str | Path, *, hidden_size: int = 16, layers: int = 1, seed: int = 0,
                    dropout: float = 0.0, max_seq_length: int = 32) -> Path:
    """Write a tiny BERT + tokenizer + sentence-transformers config to ``path``; returns it."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    raw = path / "transformer"
    raw.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(raw)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(raw)
    transformer = modules.Transformer(str(raw), max_seq_length=max_seq_length)
    pooling = modules.Pooling(hidden_size)
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(path / "model"))
    return path / "model"


def tiny_model(path: str | Path | None = None, **options):
    """A tiny SentenceTransformer on the CPU (saved under ``path``, or a temporary folder)."""
    from sentence_transformers import SentenceTransformer

    if path is not None:
        return SentenceTransformer(str(save_tiny_model(path, **options)), device="cpu")
    # the loaded model keeps everything in memory: the temporary folder goes once it is loaded
    with tempfile.TemporaryDirectory(prefix="batchlab-tiny-st-") as tmp:
        return SentenceTransformer(str(save_tiny_model(tmp, **options)), device="cpu")
