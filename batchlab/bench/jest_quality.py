"""JEST quality through the real recipe: uniform vs JEST batches for ``train_dual_encoder``.

Issue 8's quality target: on the demo dataset (codesearch), JEST-selected batches reach
the retrieval quality of uniform batches in at most half the steps. This experiment
trains the recipe's model (open_clip's tiny text tower, ``batchlab-tiny-text``, from
scratch, symmetric InfoNCE with a learnable temperature, AdamW with warm-up and cosine
decay) on the same learner pool with

* ``uniform``: random batches of ``b``;
* ``JEST <score>``: random super-batches of ``5 b``, of which
  :class:`~batchlab.samplers.JointExampleSelector` (16 chunks, filter ratio 0.8) keeps ``b``,

for the same number of learner steps, and evaluates test MRR every ``--eval-every``
steps. The reference model (``--reference heldout``, the default) is the same tiny text
tower trained on the pairs of a held-out share of the training *modules* (never in the
learner's pool, as the JEST paper's reference is trained on other, curated data and
RHO-LOSS's on a hold-out set); its embeddings of the pool are computed once and passed
to the recipe as the teacher views, which ``train_dual_encoder(jest=...)`` uses as the
reference. ``--reference tfidf`` uses the recipe's default reference instead (the
TF-IDF/LSA teacher fitted on the pool).

The metric, per seed: the first evaluated step at which the JEST run's test MRR reaches
the uniform run's MRR at the last step, divided by the number of steps (``None``: not
reached within the horizon). Run through ``python -m batchlab.bench.jest --quality-recipe``.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
from pathlib import Path

import torch

from batchlab.samplers.base import GlobalBatchSampler

logger = logging.getLogger(__name__)


class RoundSampler(GlobalBatchSampler):
    """``steps`` uniformly random batches per round (one recipe "epoch"), from back-to-back passes.

    A round takes its batches from consecutive random permutations of the ``n`` examples,
    so every batch is a uniform draw without replacement and a round may be shorter or
    longer than one pass over the data; evaluating after each round gives a curve over
    learner steps.

    >>> s = RoundSampler(10, 4, steps=5, seed=0)
    >>> len(s), [len(b) for b in s], all(len(set(b)) == 4 for b in s)
    (5, [4, 4, 4, 4, 4], True)
    """

    RESUME_SETTINGS = ("n", "steps")

    def __init__(self, n: int, batch_size: int, steps: int, **kwargs) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} examples")
        self.n, self.steps = n, steps

    def plan_epoch(self, generator: torch.Generator) -> list[list[int]]:
        passes = -(-self.steps * self.batch_size // self.n) + 1
        batches = []
        for _ in range(passes):
            perm = torch.randperm(self.n, generator=generator).tolist()
            # a batch never straddles two passes (which could repeat an example within it)
            batches += [perm[i:i + self.batch_size] for i in range(0, self.n - self.batch_size + 1, self.batch_size)]
            if len(batches) >= self.steps:
                break
        return batches[: self.steps]


def _split(train, fraction: float, seed: int):
    """(learner pool, reference pairs): the pairs of a held-out share of the training modules go to the reference."""
    modules = sorted(set(train.modules))
    perm = torch.randperm(len(modules), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {modules[i] for i in perm[: int(len(modules) * fraction)]}
    pairs = list(zip(train.queries, train.documents))
    pool = [p for p, m in zip(pairs, train.modules) if m not in held]
    ref = [p for p, m in zip(pairs, train.modules) if m in held]
    return pool, ref


def _reference_views(ref_pairs, pool, test, args, seed):
    """Train the reference on its own pairs; its embeddings of the learner pool as TeacherViews."""
    import torch.nn.functional as F

    from batchlab.recipes import train_dual_encoder
    from batchlab.recipes.dual_encoder import tokenize
    from batchlab.recipes.teachers import TeacherViews

    b = args.quality_batch
    result = train_dual_encoder(ref_pairs, test, sampler=RoundSampler(len(ref_pairs), b, args.reference_steps, seed=seed),
                                batch_size=b, epochs=1, teacher=None, seed=seed, eval_every=0, progress=False)
    model = result.model.eval()
    with torch.no_grad():
        def embed(texts):
            return torch.cat([F.normalize(model(t), dim=-1) for t in tokenize(list(texts)).split(512)])

        q, d = embed([p[0] for p in pool]), embed([p[1] for p in pool])
    return TeacherViews(F.normalize(q + d, dim=1), q, d), result.metrics


def _steps_to(steps, mrrs, target):
    return next((s for s, m in zip(steps, mrrs) if m >= target), None)


def _summary(values):
    got = [v for v in values if v is not None]
    out = {"per_seed": values, "reached": f"{len(got)}/{len(values)}"}
    if len(got) == len(values):
        out.update(mean=statistics.fmean(got), std=statistics.stdev(got) if len(got) > 1 else 0.0,
                   min=min(got), max=max(got))
    return out


def run(args) -> int:
    from batchlab.bench._common import device_name, format_table, write_results
    from batchlab.datasets.codesearch import load_codesearch
    from batchlab.recipes import train_dual_encoder
    from batchlab.samplers import JointExampleSelector

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, test = load_codesearch("train", progress=False), load_codesearch("test", progress=False)
    b, steps, every = args.quality_batch, args.quality_steps, args.eval_every
    if steps % every:
        raise SystemExit(f"--quality-steps ({steps}) must be a multiple of --eval-every ({every})")
    scores = [s for s in (args.quality_scores or "learnability").split(",") if s]
    names = ["uniform"] + [f"JEST {s}" for s in scores]
    seeds = [args.seed + i for i in range(args.quality_seeds)]
    curves, ref_metrics, sizes = {}, {}, {}
    for seed in seeds:
        if args.reference == "heldout":
            pool, ref_pairs = _split(train, args.reference_fraction, seed)
            teacher, ref_metrics[seed] = _reference_views(ref_pairs, pool, test, args, seed + 1000)
        else:
            pool, ref_pairs, teacher = list(zip(train.queries, train.documents)), [], "tfidf"
        sizes = {"pool": len(pool), "reference": len(ref_pairs), "test": len(test)}
        curves[seed] = {}
        for name in names:
            jest = None
            if name != "uniform":
                jest = JointExampleSelector(n_chunks=args.chunks, filter_ratio=args.filter_ratio, seed=seed,
                                            score=name.split()[-1], first_chunk=args.first_chunk)
            size = b if jest is None else int(round(b / (1 - args.filter_ratio)))
            result = train_dual_encoder(pool, test, sampler=RoundSampler(len(pool), size, every, seed=seed),
                                        batch_size=b, epochs=steps // every, jest=jest, teacher=teacher, seed=seed,
                                        eval_every=1, progress=False)
            curves[seed][name] = [{k: r[k] for k in ("step", "mrr", "recall@1", "recall@10", "seconds")}
                                  for r in result.history]
            logger.info("seed %d %s: final %s (%.0f s training)", seed, name, result.metrics, result.seconds)

    step_axis = [r["step"] for r in curves[seeds[0]]["uniform"]]
    mrr = {n: [[r["mrr"] for r in curves[sd][n]] for sd in seeds] for n in names}
    mean = {n: [statistics.fmean(col) for col in zip(*mrr[n])] for n in names}
    ratios, ratio_of_means = {}, {}
    for n in names[1:]:
        per_seed = []
        for i in range(len(seeds)):
            s = _steps_to(step_axis, mrr[n][i], mrr["uniform"][i][-1])
            per_seed.append(None if s is None else s / steps)
        ratios[n] = _summary(per_seed)
        s = _steps_to(step_axis, mean[n], mean["uniform"][-1])
        ratio_of_means[n] = None if s is None else s / steps

    rows = [{"run": n, "final MRR (mean)": mean[n][-1],
             "final MRR (std)": statistics.stdev(m[-1] for m in mrr[n]) if len(seeds) > 1 else 0.0,
             "step ratio per seed": ratios.get(n, {}).get("per_seed"),
             "step ratio mean": ratios.get(n, {}).get("mean")} for n in names]
    if ref_metrics:
        rows.append({"run": f"reference ({args.reference_steps} steps on {sizes['reference']} held-out pairs)",
                     "final MRR (mean)": statistics.fmean(m["mrr"] for m in ref_metrics.values())})
    print(f"codesearch through train_dual_encoder; pool {sizes['pool']}, reference pairs {sizes['reference']}, "
          f"test {sizes['test']}; {len(seeds)} seeds, {steps} steps")
    print(format_table(rows))
    print(f"step ratio to reach uniform's final MRR (target <= 0.5): {ratios}; on the mean curves: {ratio_of_means}")

    tag = f"jest-quality-recipe-{args.reference}"
    if scores != ["learnability"] or args.first_chunk != "random":  # variants never overwrite the main results
        tag += "-" + "-".join(scores) + ("-first-score" if args.first_chunk == "score" else "")
    payload = {
        "benchmark": "jest-quality-recipe", "device": device_name("cpu"),
        "command": "python -m batchlab.bench.jest " + " ".join(sys.argv[1:]),
        "dataset": f"codesearch: learner pool {sizes['pool']} pairs, reference {sizes['reference']} pairs "
                   f"(held-out training modules), test {sizes['test']}",
        "model": "train_dual_encoder: open_clip batchlab-tiny-text tower from scratch, symmetric InfoNCE, learnable "
                 "temperature, AdamW 2e-3 warm-up + cosine; reference scored at scale 1/0.07",
        "config": {"batch": b, "super_batch": int(round(b / (1 - args.filter_ratio))), "chunks": args.chunks,
                   "filter_ratio": args.filter_ratio, "first_chunk": args.first_chunk, "steps": steps,
                   "eval_every": every, "reference": args.reference, "reference_steps": args.reference_steps,
                   "reference_fraction": args.reference_fraction, "seeds": seeds},
        "metric": "per seed: first evaluated step at which JEST's test MRR >= the uniform run's MRR at the last "
                  "step, divided by the number of steps (None: not reached)",
        "step_ratio": ratios, "step_ratio_of_mean_curves": ratio_of_means,
        "reference_metrics": ref_metrics, "mean_mrr": {"step": step_axis, **mean}, "curves": curves,
        "target": "JEST reaches uniform's final retrieval quality in at most half the steps (ratio <= 0.5)",
    }
    path = write_results(args.out, tag, payload)
    _plot(Path(args.out) / f"{tag}.png", step_axis, mrr, ref_metrics, ratios,
          title=f"JEST vs uniform, train_dual_encoder on codesearch ({len(seeds)} seeds, CPU)")
    print(f"wrote {path}")
    return 0


def _plot(path, steps, mrr, ref_metrics, ratios, *, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from batchlab.bench._common import save_figure

    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for name, runs in mrr.items():
        cols = list(zip(*runs))
        label = name if name == "uniform" else f"{name} (step ratio {_ratio_text(ratios[name])})"
        line, = ax.plot(steps, [statistics.fmean(c) for c in cols], label=label)
        ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], color=line.get_color(), alpha=0.2)
    final = statistics.fmean(r[-1] for r in mrr["uniform"])
    ax.axhline(final, color="gray", ls=":", lw=1, label="uniform's final MRR (mean)")
    ax.axvline(steps[-1] / 2, color="gray", ls="--", lw=1, label="half the steps")
    if ref_metrics:
        ax.axhline(statistics.fmean(m["mrr"] for m in ref_metrics.values()), color="tab:purple", ls="-.", lw=1,
                   label="reference model")
    ax.set_xlabel("learner step")
    ax.set_ylabel("test MRR (mean; band: min-max over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def _ratio_text(summary):
    if summary.get("mean") is None:
        return f"reached {summary['reached']} seeds"
    return f"{summary['mean']:.2f} +- {summary['std']:.2f}"
