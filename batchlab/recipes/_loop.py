"""The training loop both recipes share: sampler -> (JEST) -> encoders -> loss -> step.

It is deliberately plain (one optimizer, a warm-up + cosine schedule, evaluation at
epoch ends, a checkpoint and a plot) so that what changes between runs is only the
batches: which sampler built them, and whether JEST chose among them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from batchlab.errors import BatchlabInputError

logger = logging.getLogger(__name__)

LOSSES = ("info_nce", "siglip", "dcl")


@dataclass
class TrainResult:
    """What a recipe returns.

    Attributes
    ----------
    metrics : dict
        Held-out retrieval metrics after the last epoch (``recall@1``, ``recall@10``, ``mrr``).
    history : list of dict
        One row per evaluation: ``epoch``, ``step``, ``train_loss`` (mean over the
        epoch), the metrics, and ``seconds`` of training so far.
    losses : list of float
        The training loss of every step.
    seconds : float
        Training wall-clock time (evaluation and sampler building excluded).
    sampler_seconds : float
        Time spent building batch samplers (teacher kNN, partitions, mining).
    checkpoint, plot : Path or None
        Files written under ``out``.
    model : torch.nn.Module
        The trained model.
    record : dict
        Every setting the run used (stored in the checkpoint too; see :func:`~batchlab.recipes.load_run`).
    """

    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    sampler_seconds: float = 0.0
    checkpoint: Path | None = None
    plot: Path | None = None
    model: torch.nn.Module | None = None
    record: dict[str, Any] = field(default_factory=dict)


class ContrastiveHead(torch.nn.Module):
    """The learnable temperature (and SigLIP bias) plus the loss call, by name.

    ``loss`` is ``"info_nce"`` (CLIP's symmetric InfoNCE), ``"siglip"`` or ``"dcl"``,
    computed by :mod:`batchlab.losses` with the given ``impl``; or any callable
    ``fn(q, k, logit_scale) -> scalar``.
    """

    def __init__(self, loss: str | Callable = "info_nce", *, impl: str = "auto") -> None:
        super().__init__()
        if not callable(loss) and loss not in LOSSES:
            raise BatchlabInputError(f"unknown loss {loss!r}; choose one of {LOSSES} or pass a callable(q, k, logit_scale)")
        self.loss, self.impl = loss, impl
        siglip = loss == "siglip"
        # CLIP starts at temperature 0.07; SigLIP at scale 10 and bias -10 (their papers' inits).
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0) if siglip else math.log(1 / 0.07)))
        self.bias = torch.nn.Parameter(torch.tensor(-10.0)) if siglip else None

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, q: torch.Tensor, k: torch.Tensor, neg_mask: Any = None) -> torch.Tensor:
        """The loss of one batch; ``neg_mask`` (optional): keys removed from each query's denominator."""
        if neg_mask is not None and (callable(self.loss) or self.loss == "siglip"):
            raise BatchlabInputError("a negative mask (guide_margin) needs loss='info_nce' or 'dcl'")
        if callable(self.loss):
            return self.loss(q, k, self.scale())
        from batchlab import losses

        if self.loss == "siglip":
            return losses.siglip(q, k, self.scale(), self.bias, impl=self.impl)
        extra = {} if neg_mask is None else {"neg_mask": neg_mask}
        return getattr(losses, self.loss)(q, k, self.scale(), impl=self.impl, **extra)


def warmup_cosine(total_steps: int | Callable[[], int], warmup: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then cosine decay to 0 at ``total_steps``.

    ``total_steps`` may be a callable read at every step: the training loop re-estimates
    the schedule's length at each epoch start from the real batch counts (a teacher-built
    epoch can hold a different number of batches than the random first one).

    Why not ``transformers.get_cosine_schedule_with_warmup``: after the warm-up it gives
    exactly these factors (``tests/test_recipes_runs.py`` compares them), but it fixes
    ``num_training_steps`` when it is built, and its first step has learning rate 0
    (``step / warmup``; here ``(step + 1) / warmup``, so the first step learns).
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        total = total_steps() if callable(total_steps) else total_steps
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def train_loop(
    *,
    model: torch.nn.Module,
    head: ContrastiveHead,
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    sampler_for_epoch: Callable[[int], Any],
    evaluate: Callable[[], dict[str, float]],
    epochs: int,
    lr: float,
    weight_decay: float = 0.1,
    warmup_steps: int = 20,
    selector=None,
    reference: Callable[[torch.Tensor], tuple] | None = None,
    cache: tuple[Any, Callable[[torch.Tensor], tuple]] | None = None,
    negative_mask: Callable[[torch.Tensor], Any] | None = None,
    eval_every: int = 1,
    out: str | Path | None = None,
    name: str = "run",
    progress: bool | Callable[[dict], None] = True,
    record: dict[str, Any] | None = None,
    resume: dict[str, Any] | None = None,
    checkpoint_state: Callable[[], dict[str, Any]] | None = None,
) -> TrainResult:
    """Train ``model`` (+ ``head``) for ``epochs``; see the recipes for the arguments' meaning.

    ``encode(indices) -> (q, k)`` embeds the examples of a batch (L2-normalised, with
    gradients). ``sampler_for_epoch(epoch)`` returns the batch sampler for that epoch
    (it may rebuild it from a refreshed teacher). With ``selector`` (a
    :class:`~batchlab.samplers.JointExampleSelector`) each sampled batch is a
    super-batch and ``reference(indices) -> (q, k, scale)`` gives the reference model's
    embeddings of it. With ``cache = (EmbeddingCache, inputs)``, where
    ``inputs(indices)`` gives each tower's raw inputs, the batch is encoded in chunks
    with cached embedding gradients (GradCache) instead of in one pass. With
    ``negative_mask(indices) -> neg_mask`` the loss leaves those (query, key) pairs of
    the batch out of its denominators (guided false-negative masking).

    ``progress``: True for bars (epochs and steps, with time estimates) or heartbeat lines
    (see :mod:`batchlab.recipes.progress`), False for nothing, or a callback that receives
    the progress events. ``record``: the run's settings, stored in every checkpoint.
    ``resume``: a checkpoint (as saved here) to continue from its last finished epoch.
    ``checkpoint_state() -> dict``: the recipe's own entries for each checkpoint (read back from ``resume``).
    """
    if negative_mask is not None and cache is not None:
        raise BatchlabInputError("negative_mask does not work with the embedding cache yet; use one or the other")
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    result = TrainResult(metrics={}, model=model)
    horizon = {"total": None}  # the schedule's length, re-estimated at every epoch start
    scheduler = None
    step, train_seconds, first_epoch = 0, 0.0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        head.load_state_dict(resume["head"])
        first_epoch, step = int(resume["epoch"]), int(resume["step"])
        horizon["total"], warmup = int(resume["schedule_total"]), int(resume["warmup"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(lambda: horizon["total"], warmup))
        # after the scheduler: building it resets the learning rate, loading the optimizer restores it
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        result.history, result.losses = list(resume["history"]), list(resume.get("losses", []))
        result.metrics = dict(result.history[-1]) if result.history else {}
        result.metrics = {k: v for k, v in result.metrics.items() if k not in ("epoch", "step", "train_loss", "seconds")}
        train_seconds = float(resume.get("train_seconds", 0.0))
        torch.set_rng_state(resume["rng"])
        if selector is not None:  # JEST / CoLM draw each step's noise from (seed, step): continue their count
            if resume.get("selector") is not None:
                selector.load_state_dict(resume["selector"])  # also refuses another selector's state
            else:  # a checkpoint from before selector states were saved: one selection per step
                selector.step = step
    display, report = _progress(progress, name, epochs)
    try:
        for epoch in range(first_epoch, epochs):
            start = time.perf_counter()
            report({"event": "stage", "text": f"building the batches of epoch {epoch + 1}"})
            sampler = sampler_for_epoch(epoch)
            result.sampler_seconds += time.perf_counter() - start
            sampler.set_epoch(epoch)
            steps = len(sampler)
            horizon["total"] = max(1, step + steps * (epochs - epoch))  # the real steps so far + this epoch's length
            if scheduler is None:
                warmup = min(warmup_steps, horizon["total"] // 10 + 1)
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(lambda: horizon["total"], warmup))
            report({"event": "epoch", "epoch": epoch + 1, "epochs": epochs, "steps": steps})
            model.train()
            epoch_losses = []
            start = time.perf_counter()
            for i, batch in enumerate(sampler):
                indices = torch.as_tensor(batch, dtype=torch.long)
                if selector is not None:
                    with torch.no_grad():
                        learner_q, learner_k = encode(indices)
                        chosen = selector.select(learner=(learner_q, learner_k, head.scale()), reference=reference(indices))
                    indices = indices[chosen.cpu()]
                optimizer.zero_grad(set_to_none=True)
                if cache is None:
                    q, k = encode(indices)
                    loss = head(q, k, None if negative_mask is None else negative_mask(indices))
                    loss.backward()
                else:
                    embedding_cache, inputs = cache
                    normalize = torch.nn.functional.normalize
                    loss = embedding_cache.step(*inputs(indices), loss_fn=lambda a, b: head(normalize(a, dim=-1), normalize(b, dim=-1)))
                optimizer.step()
                scheduler.step()
                step += 1
                epoch_losses.append(float(loss.detach()))
                report({"event": "step", "epoch": epoch + 1, "step": i + 1, "steps": steps, "loss": epoch_losses[-1]})
            train_seconds += time.perf_counter() - start
            result.losses.extend(epoch_losses)
            last = epoch == epochs - 1
            if last or (eval_every and (epoch + 1) % eval_every == 0):
                report({"event": "stage", "text": f"evaluating after epoch {epoch + 1}"})
                model.eval()
                with torch.no_grad():
                    metrics = evaluate()
                row = {"epoch": epoch + 1, "step": step, "train_loss": sum(epoch_losses) / max(1, len(epoch_losses))}
                row.update(metrics)
                row["seconds"] = train_seconds
                result.history.append(row)
                result.metrics = metrics
                logger.info("%s epoch %d: %s", name, epoch + 1, {k: round(v, 4) for k, v in row.items()})
                if display is not None:
                    display.write(f"{name} epoch {epoch + 1}/{epochs}: "
                                  + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if out is not None:
                result.checkpoint = save_checkpoint(
                    Path(out) / f"{name}.pt", model, head, optimizer, sampler, epoch, result,
                    extra={"step": step, "scheduler": scheduler.state_dict(), "schedule_total": horizon["total"],
                           "warmup": warmup, "losses": result.losses, "train_seconds": train_seconds,
                           "rng": torch.get_rng_state(), "record": record or {},
                           "selector": selector.state_dict() if hasattr(selector, "state_dict") else None,
                           **(checkpoint_state() if checkpoint_state is not None else {})})
    finally:
        if display is not None:
            display.close()
    result.seconds = train_seconds
    if out is not None:
        result.plot = plot_curve(Path(out) / f"{name}.png", result, title=name)
    return result


def _progress(progress: Any, name: str, epochs: int):
    """``(display or None, report(event))`` for ``progress`` = True / False / a callback."""
    if callable(progress):
        return None, progress
    if not progress:
        return None, lambda event: None
    from batchlab.recipes.progress import RunDisplay

    display = RunDisplay([name], [1], unit="run")
    return display, display.callback(0)


def save_checkpoint(path: Path, model, head, optimizer, sampler, epoch: int, result: TrainResult,
                    extra: dict[str, Any] | None = None) -> Path:
    """Model, head, optimizer and sampler state after ``epoch``, plus ``extra`` (the schedule, the RNG
    state and the run record that resuming needs); load it with :func:`batchlab.recipes.load_run`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None,
        "epoch": epoch + 1,
        "history": result.history,
        **(extra or {}),
    }
    from batchlab._artifacts import atomic_file

    with atomic_file(path) as tmp:  # a preempted save leaves the previous checkpoint intact
        torch.save(state, tmp)
    return path


def plot_curve(path: Path, result: TrainResult, *, title: str) -> Path:
    """Training loss per step, and held-out recall@1 at each evaluation, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(range(1, len(result.losses) + 1), result.losses, color="tab:blue", alpha=0.7, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    if result.history:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in result.history], [r.get("recall@1", float("nan")) for r in result.history], "o-", color="tab:red")
        ax2.set_ylabel("held-out recall@1", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    from batchlab._artifacts import atomic_file

    try:
        with atomic_file(path) as tmp:  # an interrupted save leaves the previous plot, not half a PNG
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
