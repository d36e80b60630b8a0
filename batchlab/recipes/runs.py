"""Saved runs: load a trained model from its checkpoint, and check a checkpoint before resuming.

Every recipe run with ``out=`` writes ``<out>/<name>.pt`` at each epoch end: the model,
the loss head (temperature), the optimizer, the learning-rate schedule, the RNG state,
the history and the run record (every setting the run used). :func:`load_run` gives the
trained model back, ready to embed text:

>>> from batchlab.recipes import load_run
>>> run = load_run("results/train/codesearch-random-64.pt")  # doctest: +SKIP
>>> run.record["sampler"], run.metrics["recall@1"]  # doctest: +SKIP
>>> vectors = run.encode(["parse a configuration file"])  # (1, 64), L2-normalised  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from batchlab.errors import BatchlabInputError

# Settings that may differ between an interrupted run and its resumption: none change the result.
_RESUMABLE = {"device"}
# Settings recorded since a later version: compared only when the checkpoint has them.
_ADDED_LATER = {"data_hash"}


def read_checkpoint(path: str | os.PathLike | dict) -> dict[str, Any]:
    """The checkpoint dict of ``path`` (or ``path`` itself when it is already a dict)."""
    if isinstance(path, dict):
        return path
    path = Path(path)
    if not path.is_file():
        raise BatchlabInputError(f"no checkpoint at {path}; a run with out= writes <out>/<name>.pt at every epoch end")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or not a torch file
        raise BatchlabInputError(f"{path} is not a readable batchlab checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise BatchlabInputError(f"{path} is not a batchlab checkpoint (no model / epoch entries)")
    return state


def load_checkpoint(resume: str | os.PathLike | dict, record: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint to resume from, after checking it belongs to a run with the same ``record``.

    Raises :class:`~batchlab.errors.BatchlabInputError` when a setting differs (it names
    them), when the checkpoint predates resumable checkpoints, or when the run already
    finished all its epochs.
    """
    state = read_checkpoint(resume)
    saved = state.get("record")
    if not saved or "schedule_total" not in state:
        raise BatchlabInputError("this checkpoint has no run record (written before resuming existed); start the run again")
    differ = sorted(k for k in set(saved) | set(record) if k not in _RESUMABLE and _norm(saved.get(k)) != _norm(record.get(k))
                    and not (k in _ADDED_LATER and k not in saved))
    if differ:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r}, now {record.get(k)!r}" for k in differ)
        raise BatchlabInputError(f"the checkpoint is from another run ({detail}); resume with the saved settings, or "
                                 f"start a new run under another name")
    if int(state["epoch"]) >= int(record["epochs"]):
        raise BatchlabInputError(f"the run finished all {record['epochs']} epochs already; nothing to resume "
                                 f"(load it with batchlab.recipes.load_run)")
    return state


def _norm(value: Any) -> Any:
    """Tuples and lists compare equal (a record written as JSON turns tuples into lists)."""
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


@dataclass
class Run:
    """A saved run: the trained model and what produced it.

    Attributes
    ----------
    record : dict
        Every setting the run used (sampler and its options, teacher, loss, lr, seeds, ...).
    history : list of dict
        One row per evaluation (epoch, step, train_loss, metrics, seconds).
    metrics : dict
        The last evaluation's metrics.
    epoch : int
        Epochs finished when the checkpoint was written.
    model : torch.nn.Module
        The trained model in eval mode (open_clip ``TextTransformer``, or ``CLIP``).
    head : torch.nn.Module
        The loss head (learned temperature, SigLIP bias).
    """

    path: Path
    record: dict[str, Any]
    history: list[dict[str, Any]]
    epoch: int
    model: torch.nn.Module
    head: torch.nn.Module
    metrics: dict[str, float] = field(default_factory=dict)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, batch_size: int = 512) -> torch.Tensor:
        """L2-normalised embeddings ``(len(texts), d)`` of ``texts`` (the text tower)."""
        from batchlab.recipes.dual_encoder import tokenize

        tokens = tokenize(list(texts), self.record.get("config") or "batchlab-tiny-text")
        encode = self.model.encode_text if hasattr(self.model, "encode_text") else self.model
        device = next(self.model.parameters()).device
        out = [encode(tokens[i : i + batch_size].to(device)) for i in range(0, len(tokens), batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()


def load_run(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Run:
    """Load a run saved by :func:`~batchlab.recipes.train_dual_encoder` or
    :func:`~batchlab.recipes.train_clip` (``<out>/<name>.pt``) onto ``device``."""
    from batchlab.recipes._loop import ContrastiveHead
    from batchlab.recipes.models import clip_model, text_encoder

    state = read_checkpoint(path)
    record = dict(state.get("record") or {})
    recipe = record.get("recipe", "dual_encoder")
    if recipe == "clip":
        model = clip_model(record.get("config") or "batchlab-tiny")
    else:
        model = text_encoder(record.get("config") or "batchlab-tiny-text")
    model.load_state_dict(state["model"])
    loss = record.get("loss", "info_nce")
    head = ContrastiveHead(loss if loss in ("info_nce", "siglip", "dcl") else "info_nce")
    if set(state["head"]) == set(head.state_dict()):
        head.load_state_dict(state["head"])
    history = list(state.get("history") or [])
    metrics = {k: v for k, v in (history[-1] if history else {}).items() if k not in ("epoch", "step", "train_loss", "seconds")}
    return Run(Path(path), record, history, int(state["epoch"]), model.to(device).eval(), head.to(device), metrics)
