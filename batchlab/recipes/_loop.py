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
    """

    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    sampler_seconds: float = 0.0
    checkpoint: Path | None = None
    plot: Path | None = None
    model: torch.nn.Module | None = None


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


def warmup_cosine(total_steps: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
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
    progress: bool = True,
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
    """
    if negative_mask is not None and cache is not None:
        raise BatchlabInputError("negative_mask does not work with the embedding cache yet; use one or the other")
    from tqdm.auto import tqdm

    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    result = TrainResult(metrics={}, model=model)
    scheduler = None
    step, train_seconds = 0, 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        sampler = sampler_for_epoch(epoch)
        result.sampler_seconds += time.perf_counter() - start
        sampler.set_epoch(epoch)
        if scheduler is None:  # the first epoch's length sets the schedule
            total = max(1, len(sampler) * epochs)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, min(warmup_steps, total // 10 + 1)))
        model.train()
        epoch_losses = []
        start = time.perf_counter()
        bar = tqdm(sampler, desc=f"{name} epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress, leave=False)
        for batch in bar:
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
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
        train_seconds += time.perf_counter() - start
        result.losses.extend(epoch_losses)
        last = epoch == epochs - 1
        if last or (eval_every and (epoch + 1) % eval_every == 0):
            model.eval()
            with torch.no_grad():
                metrics = evaluate()
            row = {"epoch": epoch + 1, "step": step, "train_loss": sum(epoch_losses) / max(1, len(epoch_losses))}
            row.update(metrics)
            row["seconds"] = train_seconds
            result.history.append(row)
            result.metrics = metrics
            logger.info("%s epoch %d: %s", name, epoch + 1, {k: round(v, 4) for k, v in row.items()})
        if out is not None:
            result.checkpoint = save_checkpoint(Path(out) / f"{name}.pt", model, head, optimizer, sampler, epoch, result)
    result.seconds = train_seconds
    if out is not None:
        result.plot = plot_curve(Path(out) / f"{name}.png", result, title=name)
    return result


def save_checkpoint(path: Path, model, head, optimizer, sampler, epoch: int, result: TrainResult) -> Path:
    """Model, head, optimizer and sampler state after ``epoch`` (resume with ``torch.load``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None,
        "epoch": epoch + 1,
        "history": result.history,
    }
    torch.save(state, path)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
