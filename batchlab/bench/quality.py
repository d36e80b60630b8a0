"""Learning quality: fine-tune a pretrained encoder with each batch construction, seed-paired against random-64.

For every dataset and seed, every arm starts from the same weights (the pretrained
model; ``--model tiny`` builds a one-layer BERT whose initialisation depends on the seed
only) and trains with :func:`batchlab.recipes.finetune.finetune` for the same number of
optimizer steps; the batch order and the mining draw come from a separate seed
(``--order-seed-offset``). Held-out nDCG@10, MRR@10, recall@1 and recall@10 come from
sentence-transformers' ``InformationRetrievalEvaluator``; each arm's difference from the
baseline (random batches of 64) is taken seed by seed, with its standard error
(:func:`batchlab.recipes.compare.paired_difference`). Wall time counts the teacher's
embedding passes, mining, batch building and the steps (not evaluation).

Arms are named ``<kind>-<batch>[-self][-cached][-same-examples|-same-wall]``:

* ``zero-shot``: no training;
* ``random-B``: uniform batches; ``-same-examples``: ``steps * 64 / B`` steps, so as many
  pairs are seen as by the baseline; ``-cached``: GradCache chunks of 256 texts;
* ``st-mined-B``: sentence-transformers' usual recipe, random batches plus one negative
  per pair mined with the pretrained model (ranks 10-50, relative margin 0.05, max score
  0.8, drawn at random), ``MultipleNegativesRankingLoss``;
* ``community-B`` (B3), ``hard-negative-B``, ``cluster-B`` (NGAME), ``tas-B``: batches built
  from the pretrained model's embeddings; ``-self``: from the model being trained,
  re-embedded every epoch (its first epoch uses the pretrained weights);
* ``gist-B``: random batches with GISTEmbed's guided false-negative mask (pretrained guide;
  ``-self``: the model being trained, refreshed every epoch);
* ``community-mined-B``: B3 batches plus the mined negative;
* ``sogclr-B`` / ``isogclr-B``: random batches, one-way SogCLR (per-query moving-average denominators) /
  iSogCLR (also a learned temperature per query) instead of MNRL;
* ablations of SogCLR: ``dcl-B`` (one-way DCL: InfoNCE without the positive in the denominator, SogCLR's form
  without the moving average, at MNRL's scale), ``sogclr-nogamma-B`` (SogCLR with gamma = 1: the batch's own
  denominator, gradient ``tau`` times DCL's), ``sogclr-rescaled-B`` (SogCLR times ``1 / tau``: DCL's gradient
  scale, gamma 0.9);
* ``colm-B``: CoLM coresets, ``B`` chosen from a random super-batch of ``4 B`` by gradient matching, each
  query's loss weighted by its medoid's cluster size;
* ``mochi-B``: random batches plus MoCHi's synthetic hard negatives (mixes of each query's hardest in-batch
  keys, :data:`batchlab.recipes.finetune.MOCHI_DEFAULTS`); ``mochi-noquery-B``: the same without the mixes of
  the query with a negative (``mix_query=0``: only negative-negative mixes);
* ``-same-wall``: instead of a number of steps, the wall time of ``--wall-reference`` (default
  ``st-mined-64``: sentence-transformers' recipe) on the same dataset and seed, teacher, mining and batch
  building included (:func:`~batchlab.recipes.finetune.finetune`'s ``time_budget``: the learning-rate
  schedule follows the share of the budget spent, and no step starts that would end past it);
* ``scratch-B`` / ``jest-scratch-B``: a small learner from scratch (two-layer BERT, hidden 64, seeded
  per seed, ``--scratch-lr``) on random batches / on JEST batches (filter ratio 0.8: ``B`` of ``5 B``)
  with ``--model`` as the frozen reference (embedded once per dataset), evaluated every ``steps / 8``
  steps; the check reports at which share of the steps JEST first reaches the uniform learner's
  final nDCG@10, seed by seed (issue 22's target: at most half).

Example: ``batchlab bench quality --model minilm --datasets codesearch wordnet --seeds 5``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from batchlab._argtypes import positive_int

logger = logging.getLogger(__name__)

#: The study of ``benchmarks/results/quality-h200-5seeds`` (its 25 arms, in its order), so that the one command
#: ``batchlab bench quality --model minilm --datasets codesearch wordnet --seeds 5 ...`` reruns all of it.
DEFAULT_ARMS = ("zero-shot", "random-64", "random-256", "random-256-same-examples", "st-mined-64",
                "community-64", "community-64-self", "hard-negative-64", "hard-negative-64-self", "mochi-64",
                "sogclr-64", "isogclr-64", "colm-64", "scratch-64", "jest-scratch-64",
                "random-1024-cached-same-wall", "community-1024-cached-same-wall", "hard-negative-1024-cached-same-wall",
                "cluster-64", "cluster-64-self", "tas-64", "tas-64-self", "gist-64", "gist-64-self", "mochi-noquery-64")
KINDS = {"random": {}, "st-mined": {"mined_negatives": 1}, "community": {"sampler": "community"},
         "community-mined": {"sampler": "community", "mined_negatives": 1}, "hard-negative": {"sampler": "hard_negative"},
         "cluster": {"sampler": "cluster"}, "tas": {"sampler": "tas"}, "gist": {"guide": "pretrained"},
         "sogclr": {"loss": "sogclr"}, "isogclr": {"loss": "isogclr"}, "colm": {"coreset": 0.75},
         "mochi": {"mochi": True}, "scratch": {"learner": "scratch"},
         # ablations of SogCLR and MoCHi (benchmarks/results/quality-cpu-ablation)
         "dcl": {"loss": "dcl"}, "sogclr-nogamma": {"loss": "sogclr", "loss_options": {"gamma": 1.0}},
         "sogclr-rescaled": {"loss": "sogclr", "loss_options": {"rescale": True}},
         "mochi-noquery": {"mochi": {"mix_query": 0}},
         "jest-scratch": {"learner": "scratch", "jest": 0.8}}
_ARM = re.compile(r"^(?P<kind>[a-z-]+?)-(?P<batch>\d+)(?P<self>-self)?(?P<cached>-cached)?"
                  r"(?:(?P<same>-same-examples)|(?P<wall>-same-wall))?$")
METRIC = "ndcg@10"
CACHE_CHUNK = 256
WALL_STEP_CAP = 8  # a same-wall arm takes at most this many times --steps


def arm_settings(name: str, *, steps: int, base_batch: int) -> dict[str, Any] | None:
    """``finetune`` keywords of an arm name (None for ``zero-shot``).

    >>> arm_settings("community-64-self", steps=100, base_batch=64)
    {'sampler': 'community', 'batch_size': 64, 'steps': 100, 'teacher': 'model'}
    >>> arm_settings("random-256-same-examples", steps=100, base_batch=64)["steps"]
    25
    >>> arm_settings("random-1024-cached-same-wall", steps=100, base_batch=64)["time_budget"]
    'same-wall'
    """
    from batchlab.errors import BatchlabInputError

    if name == "zero-shot":
        return None
    match = _ARM.match(name)
    if match is None or match["kind"] not in KINDS:
        raise BatchlabInputError(
            f"unknown arm {name!r}: use zero-shot or <kind>-<batch>[-self][-cached][-same-examples|-same-wall] with kind one of "
            f"{', '.join(KINDS)} (e.g. random-64, community-64-self, random-1024-cached)")
    batch = int(match["batch"])
    settings: dict[str, Any] = {"sampler": "random", **KINDS[match["kind"]], "batch_size": batch}
    settings["steps"] = max(1, round(steps * base_batch / batch)) if match["same"] else steps
    if match["self"]:
        if match["kind"] == "gist":
            settings["guide"] = "model"
        elif settings["sampler"] == "random":
            raise BatchlabInputError(f"arm {name!r}: -self needs a teacher-built kind (community, hard-negative, cluster, tas, gist)")
        else:
            settings["teacher"] = "model"
    if match["cached"]:
        settings["cache_chunk"] = CACHE_CHUNK
    if match["wall"]:  # the budget is the reference arm's measured wall time (filled in by the study)
        settings["time_budget"] = "same-wall"
        settings["steps"] = WALL_STEP_CAP * steps
    return settings


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="minilm",
                        help="'minilm' (offline all-MiniLM-L6-v2), a sentence-transformers folder, or 'tiny' (a one-layer "
                             "BERT built locally, initialised per seed: CI) (default: minilm)")
    parser.add_argument("--datasets", nargs="+", default=["codesearch", "wordnet"], help="(default: codesearch wordnet)")
    parser.add_argument("--data", default=None, help="read <data>/<dataset>.json written by --export-data instead of building")
    parser.add_argument("--export-data", default=None, help="write the (subsampled) splits to this folder and stop")
    parser.add_argument("--packages", nargs="*", default=["numpy", "scipy", "torch", "networkx", "pandas"],
                        help="codesearch: also harvest these installed packages (default: numpy scipy torch networkx pandas)")
    parser.add_argument("--max-train", type=int, default=8192, help="training pairs per dataset (random subset; default 8192)")
    parser.add_argument("--max-test", type=int, default=2000, help="held-out pairs per dataset (default 2000)")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help="arms (see the module doc)")
    parser.add_argument("--baseline", default="random-64", help="the arm every other is paired against (default: random-64)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per arm (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--order-seed-offset", type=int, default=1000,
                        help="batch-order seed = seed + this (kept apart from the init/dropout seed; default 1000)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of every arm (default 200)")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW peak learning rate (default 5e-5)")
    parser.add_argument("--scratch-lr", type=float, default=1e-3, help="learning rate of the scratch learners (default 1e-3)")
    parser.add_argument("--max-seq-length", type=int, default=128, help="token limit (default 128)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast on CUDA (default fp32)")
    parser.add_argument("--cache-chunk", type=positive_int, default=CACHE_CHUNK,
                        help=f"texts per GradCache chunk of the -cached arms (default {CACHE_CHUNK})")
    parser.add_argument("--wall-reference", default=None,
                        help="the arm whose wall time the -same-wall arms get, per dataset and seed "
                             "(default: st-mined-<baseline batch>, sentence-transformers' recipe)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no new seed that the time per seed so far says would end past this")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine the runs of several quality.json files of the same study (e.g. seeds run in "
                             "separate calls) into --out: summary, claims and plots recomputed; nothing is trained. A run "
                             "in several files (e.g. the baseline) is kept from the first; the differences are reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="results/bench/quality")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


# -- data -------------------------------------------------------------------------------
def _subset(pairs: list, limit: int | None) -> list:
    import torch

    if limit is None or len(pairs) <= limit:
        return list(pairs)
    keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:limit].sort().values
    return [pairs[i] for i in keep.tolist()]


def load_data(name: str, args) -> dict[str, Any]:
    """``{"train": [(q, d)], "test": [(q, d)], "source": ...}`` for one dataset."""
    if args.data is not None:
        path = Path(args.data) / f"{name}.json"
        if not path.exists():
            from batchlab.errors import BatchlabInputError

            raise BatchlabInputError(f"{path} does not exist; write it with --export-data {args.data}")
        blob = json.loads(path.read_text())
        return {"train": [tuple(p) for p in blob["train"]], "test": [tuple(p) for p in blob["test"]], "source": blob["source"]}
    from batchlab.datasets.text_pairs import load_pairs

    packages = args.packages if name == "codesearch" else ()
    train, test = load_pairs(name, max_train=None, max_test=None, packages=packages, progress=args.progress)
    source = {"dataset": name, "packages": list(packages), "full_train": len(train), "full_test": len(test)}
    return {"train": _subset(train, args.max_train), "test": _subset(test, args.max_test), "source": source}


# -- models --------------------------------------------------------------------------------
class Models:
    """The initial model of a seed: the pretrained one or a tiny one built per seed.

    The pretrained model is loaded from disk once; every later call copies its saved weights
    back into the same model object (on the device: no reload, no new allocation), so a
    model returned earlier is reset, and only one pretrained model is in use at a time.
    """

    def __init__(self, spec: str, device: str) -> None:
        self.spec, self.device = spec, device
        self._base = None
        self._state: dict[str, Any] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="batchlab-quality-") if spec == "tiny" else None

    def initial(self, seed: int):
        from batchlab.recipes._encoder import load_model

        if self.spec == "tiny":
            from batchlab.integrations.sentence_transformers.testing import save_tiny_model

            return load_model(save_tiny_model(Path(self._tmp.name) / f"seed{seed}", hidden_size=32, seed=seed),
                              device=self.device)
        if self._base is None:
            self._base = load_model(self.spec, device=self.device)
            self._state = {k: v.detach().clone() for k, v in self._base.state_dict().items()}
            self._max_seq_length = self._base.max_seq_length
            return self._base
        import torch

        with torch.no_grad():
            self._base.load_state_dict(self._state)
        self._base.max_seq_length = self._max_seq_length
        self._base.zero_grad(set_to_none=True)
        return self._base

    def scratch(self, seed: int):
        """A small learner initialised from ``seed`` (two-layer BERT, hidden 64, no dropout)."""
        from batchlab.integrations.sentence_transformers.testing import save_tiny_model
        from batchlab.recipes._encoder import load_model

        tmp = self._tmp or tempfile.TemporaryDirectory(prefix="batchlab-quality-")
        self._tmp = tmp
        folder = save_tiny_model(Path(tmp.name) / f"scratch{seed}", hidden_size=64, layers=2, seed=seed, max_seq_length=64)
        return load_model(folder, device=self.device)


# -- statistics --------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Per arm: mean and sd of each metric, and the seed-paired difference from ``baseline``."""
    from batchlab.recipes.compare import paired_difference
    from batchlab.recipes._evaluation import METRICS

    arms = list(dict.fromkeys(r["arm"] for r in runs))
    by = {a: {m: {r["seed"]: r["metrics"][m] for r in runs if r["arm"] == a} for m in METRICS} for a in arms}
    summary = {}
    for arm in arms:
        rows = [r for r in runs if r["arm"] == arm]
        entry: dict[str, Any] = {"seeds": len(rows), "steps": round(statistics.fmean(r["steps"] for r in rows)),
                                 "steps_range": [min(r["steps"] for r in rows), max(r["steps"] for r in rows)],
                                 "examples": round(statistics.fmean(r["examples"] for r in rows)),
                                 "wall_seconds": statistics.fmean(r["seconds"].get("wall", 0.0) for r in rows)}
        budgets = [r["time_budget"] for r in rows if r.get("time_budget") is not None]
        if budgets:
            entry["time_budget_seconds"] = statistics.fmean(budgets)
        for metric in METRICS:
            values = list(by[arm][metric].values())
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else None
            if arm != baseline and baseline in by:
                mine = by[arm][metric]  # paired on the seeds both ran (an arm may have fewer seeds than the baseline)
                base = {seed: v for seed, v in by[baseline][metric].items() if seed in mine}
                if base:
                    entry[f"{metric}_vs_{baseline}"] = paired_difference(mine, base).to_dict()
        summary[arm] = entry
    return summary


def targets(runs: list[dict[str, Any]], summary: dict[str, Any], baseline: str,
            wall_reference: str | None = None) -> list[dict[str, Any]]:
    """The issues' claims on nDCG@10, each checked seed by seed (compare.claim_checks).

    Issue 22: every batch-``B`` construction (and global loss, coreset, MoCHi) against the
    baseline, with its +0.02-on-every-seed target; B3's claim (community-B vs random-4B, same
    steps); random-4B vs the baseline; every ``-same-wall`` arm against ``wall_reference``
    (sentence-transformers' recipe) with the +0.02 target, and the best of them named; the best
    same-steps arm against it (not the same wall time); JEST's half-the-steps check. Issue 19:
    sogclr-B / isogclr-B / colm-B against random-4B ("at least matches": not below it beyond two
    standard errors, ``target_at_least_matches``). Choosing "the best arm" reads the test split, so
    its claim is marked ``selected_on_test``; the per-arm claims are the unselected evidence.
    """
    from batchlab.recipes.compare import Claim, claim_checks

    b = int(_ARM.match(baseline)["batch"]) if _ARM.match(baseline) else 64
    arms = {a for a in summary if "scratch" not in a}  # scratch learners are another model: checked by jest_checks
    wall = sorted(a for a in arms if a.endswith("-same-wall"))
    steps_arms = [a for a in arms if a not in wall]
    built = [a for a in steps_arms if a not in ("zero-shot", baseline) and not a.startswith("random-")]
    at_base = [a for a in built if _ARM.match(a) and int(_ARM.match(a)["batch"]) == b and not a.startswith("st-mined")]
    claims = [Claim(a, baseline, f"{a} beats {baseline} by >= +0.02 on every seed", METRIC) for a in sorted(at_base)]
    big = f"random-{4 * b}"
    if f"community-{b}" in arms and big in arms:
        claims.append(Claim(f"community-{b}", big, f"B3's claim: community-{b} beats {big} (same steps)", METRIC))
    if big in arms:
        claims.append(Claim(big, baseline, f"{big} beats {baseline} (same steps)", METRIC))
    matches = [a for a in (f"isogclr-{b}", f"sogclr-{b}", f"colm-{b}") if a in arms and big in arms]
    for arm in matches:
        claims.append(Claim(arm, big, f"issue 19: {arm} at least matches {big} (same steps)", METRIC))
    reference = wall_reference or f"st-mined-{b}"
    selected: set[str] = set()
    if reference in arms:
        for arm in wall:
            claims.append(Claim(arm, reference, f"{arm} beats {reference} by >= +0.02 on every seed (same wall time)", METRIC))
        if wall:
            best = max(wall, key=lambda a: summary[a][METRIC])
            claims.append(Claim(best, reference, f"best same-wall arm ({best}) beats sentence-transformers' recipe "
                                f"({reference}) by >= +0.02 on every seed (same wall time)", METRIC))
            selected.add(claims[-1].text)
        trained = [a for a in steps_arms if a not in ("zero-shot", reference)]
        if trained:
            best = max(trained, key=lambda a: summary[a][METRIC])
            claims.append(Claim(best, reference, f"best same-steps arm ({best}) beats sentence-transformers' recipe "
                                f"({reference}) by >= +0.02 on every seed (same steps, not same wall time)", METRIC))
            selected.add(claims[-1].text)
    checks = []
    for claim in claims:  # each claim paired on the seeds both of its arms ran
        seeds = ({r["seed"] for r in runs if r["arm"] == claim.better} & {r["seed"] for r in runs if r["arm"] == claim.worse})
        checks += claim_checks([r for r in runs if r["seed"] in seeds], [], claims=[claim], metric=METRIC)
    value = {(r["arm"], r["seed"]): r["metrics"][METRIC] for r in runs}
    for check in checks:  # each seed's own paired difference, beside the mean and its SE
        check["per_seed"] = {seed: value[(check["better"], seed)] - value[(check["worse"], seed)] for seed in check["seeds"]}
    checks += jest_checks(runs)
    for check in checks:
        check["target_+0.02_every_seed"] = (check["verdict"] == "held" and check["difference"] >= 0.02
                                            and check["wins"] == len(check["seeds"])) if check["difference"] is not None else None
        check["selected_on_test"] = check["claim"] in selected
        if check["claim"].startswith("issue 19:"):
            check["target_at_least_matches"] = check["verdict"] is not None and check["verdict"] != "reversed"
    return checks


def jest_checks(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each ``jest-scratch-B`` arm: per seed, the first evaluated share of the steps at which it reaches
    ``scratch-B``'s final nDCG@10 (None: not within the run); the target holds when every seed is <= 0.5."""
    out = []
    for arm in sorted({r["arm"] for r in runs if r["arm"].startswith("jest-scratch-")}):
        uniform = {r["seed"]: r for r in runs if r["arm"] == arm.replace("jest-", "", 1)}
        shares = {}
        for r in (r for r in runs if r["arm"] == arm and r["seed"] in uniform):
            goal = uniform[r["seed"]]["metrics"][METRIC]
            reached = [h["step"] for h in r.get("history", []) if h[METRIC] >= goal]
            shares[r["seed"]] = reached[0] / r["steps"] if reached else None
        if shares:
            met = all(v is not None and v <= 0.5 for v in shares.values())
            out.append({"claim": f"{arm} reaches {arm.replace('jest-', '', 1)}'s final {METRIC} in at most half the steps",
                        "better": arm, "worse": arm.replace("jest-", "", 1), "metric": METRIC, "share_of_steps": shares,
                        "difference": None, "standard_error": None, "basis": "per seed", "wins": sum(
                            v is not None and v <= 0.5 for v in shares.values()), "seeds": sorted(shares),
                        "verdict": "held" if met and len(shares) >= 3 else None,
                        "reason": "share of steps per seed: " + ", ".join(
                            f"{s}: {'not reached' if v is None else f'{v:.2f}'}" for s, v in sorted(shares.items())),
                        "target_+0.02_every_seed": None, "target_half_steps": met})
    return out


def plot(path: Path, dataset: str, summary: dict[str, Any], baseline: str, title: str) -> Path:
    """Left: mean nDCG@10 (sd over seeds); right: paired difference from the baseline (2 SE). The scratch
    learners (another model, for JEST's check) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from batchlab.bench._common import save_figure

    arms = [a for a in summary if "scratch" not in a]  # the scratch learners are another model (JEST's check)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.42 * len(arms) + 1.6), sharey=True)
    y = list(range(len(arms)))[::-1]
    left.barh(y, [summary[a][METRIC] for a in arms], xerr=[summary[a][f"{METRIC}_sd"] or 0 for a in arms],
              color=["tab:gray" if a == "zero-shot" else "tab:blue" for a in arms])
    low = min(summary[a][METRIC] for a in arms)
    left.set_xlim(max(0.0, low - 0.05), max(summary[a][METRIC] for a in arms) + 0.02)
    most = max(summary[a]["seeds"] for a in arms)
    left.set_yticks(y, [a if summary[a]["seeds"] == most else f"{a} ({summary[a]['seeds']} seeds)" for a in arms])
    left.set_xlabel(f"held-out {METRIC} (mean, sd over seeds)")
    key = f"{METRIC}_vs_{baseline}"
    diffs = [summary[a][key]["difference"] if key in summary[a] else 0.0 for a in arms]
    errs = [2 * summary[a][key]["standard_error"] if key in summary[a] and summary[a][key]["standard_error"] else None
            for a in arms]  # None: one seed, no error bar and no colour (nothing is beyond noise)
    right.barh(y, diffs, xerr=[e or 0.0 for e in errs],
               color=["tab:gray" if e is None else "tab:green" if d > e else "tab:red" if d < -e else "tab:gray"
                      for d, e in zip(diffs, errs)])
    right.axvline(0, color="black", lw=0.8)
    right.axvline(0.02, color="black", lw=0.8, ls="--")
    right.set_xlabel(f"{METRIC} - {baseline}, paired by seed (2 SE; coloured beyond)")
    fig.suptitle(f"{dataset}: {title}", fontsize=10)
    return save_figure(fig, path)


# -- the study ----------------------------------------------------------------------------------
def _write(out: Path, payload: dict[str, Any]) -> Path:
    from batchlab._artifacts import write_text

    # atomic: a run stopped at a time limit leaves the last complete file
    return write_text(out / "quality.json", json.dumps(payload, indent=2, default=str))


def _format(summary: dict[str, Any], baseline: str) -> str:
    from batchlab.recipes._evaluation import METRICS

    head = ["arm", "seeds", *METRICS, f"d{METRIC} vs {baseline} (SE) wins", "steps", "pairs seen", "wall s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for arm, s in summary.items():
        d = s.get(f"{METRIC}_vs_{baseline}")
        diff = "-" if d is None else (f"{d['difference']:+.4f} ({d['standard_error']:.4f}) {d['wins']}/{len(d['seeds'])}"
                                      if d["standard_error"] is not None else f"{d['difference']:+.4f} (1 seed)")
        cells = [arm, str(s["seeds"]), *(f"{s[m]:.4f}" for m in METRICS), diff, str(s["steps"]), str(s["examples"]),
                 f"{s['wall_seconds']:.1f}"]
        lines.append(" | ".join(cells))
    return "\n".join("| " + line + " |" for line in lines)


_SAME_STUDY = ("steps", "lr", "max_seq_length", "precision", "baseline", "order_seed_offset", "cache_chunk", "model", "scratch_lr")


#: Keys of a ``quality.json`` that :func:`merge` reads.
_STUDY_KEYS = ("settings", "datasets", "arm_settings", "runs", "command")


def _read_study(path: str | os.PathLike) -> dict[str, Any]:
    """A ``quality.json`` written by this benchmark, or a BatchlabInputError naming the file and what is wrong."""
    from batchlab.errors import BatchlabInputError

    try:
        part = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:  # missing, unreadable, not UTF-8, not JSON
        raise BatchlabInputError(f"{path}: cannot read it as a quality.json ({type(error).__name__}: {error})") from None
    missing = [k for k in _STUDY_KEYS if k not in part] if isinstance(part, dict) else list(_STUDY_KEYS)
    if missing:
        raise BatchlabInputError(f"{path} is not a quality.json of this benchmark (no {', '.join(missing)})")
    return part


def merge(paths: list[str | os.PathLike], args) -> dict[str, Any]:
    """One study from several ``quality.json`` files: their runs, with the summary, claims and plots
    recomputed into ``args.out``. The files must share the study's settings (:data:`_SAME_STUDY`) and
    datasets, and an arm the same settings in every file. A (dataset, arm, seed) run present in several
    files (every call runs the baseline) is kept from the first file, and the others measure reproducibility:
    ``payload["repeats"]`` lists each repeat's metric differences from the kept run (repeat minus kept)
    and their largest absolute values (:func:`repeats_line`)."""
    from batchlab.errors import BatchlabInputError
    from batchlab.recipes._evaluation import METRICS

    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        raise BatchlabInputError("a file is given twice: " + ", ".join(
            str(p) for p, r in zip(paths, resolved) if resolved.count(r) > 1))
    parts = [_read_study(p) for p in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        changed = [k for k in _SAME_STUDY if part["settings"].get(k) != first["settings"].get(k)]
        if changed or part["datasets"] != first["datasets"]:
            raise BatchlabInputError(f"{path} is another study than {paths[0]}: {', '.join(changed) or 'datasets'} differ")
    arm_settings: dict[str, Any] = {}  # an arm must mean the same settings in every file
    for path, part in zip(paths, parts):
        for arm, kw in part["arm_settings"].items():
            if arm_settings.setdefault(arm, kw) != kw:
                raise BatchlabInputError(f"{path}: arm {arm} has other settings than in an earlier file")
    runs, kept, repeats = [], {}, []
    for index, (path, part) in enumerate(zip(paths, parts)):
        for r in part["runs"]:
            key = (r["dataset"], r["arm"], r["seed"])
            if key not in kept:
                kept[key] = index
                runs.append(r)
                continue
            was = kept[key]
            if was == index:
                raise BatchlabInputError(f"{path}: run {key} is in the file twice")
            old = next(o for o in parts[was]["runs"] if (o["dataset"], o["arm"], o["seed"]) == key)
            repeats.append({"dataset": key[0], "arm": key[1], "seed": key[2], "kept_from": str(paths[was]),
                            "repeat_from": str(path),
                            "difference": {m: r["metrics"][m] - old["metrics"][m] for m in METRICS},
                            "wall_seconds_difference": r["seconds"].get("wall", 0.0) - old["seconds"].get("wall", 0.0)})
    payload = {**first, "runs": runs, "arm_settings": arm_settings, "summary": {}, "claims": {},
               "merged_from": [str(p) for p in paths],
               "seeds_done": len({r["seed"] for r in runs}), "commands": [p["command"] for p in parts],
               "study_seconds_per_file": [p.get("study_seconds") for p in parts],
               "warmup_seconds_per_file": [p.get("warmup_seconds") for p in parts]}
    errors = [e for part in parts for e in part.get("errors", [])]
    if errors:
        payload["errors"] = errors
    if repeats:
        payload["repeats"] = {
            "runs": repeats,
            "max_abs_difference": {m: max(abs(x["difference"][m]) for x in repeats) for m in METRICS},
            "max_abs_wall_seconds_difference": max(abs(x["wall_seconds_difference"]) for x in repeats)}
    args.baseline, args.wall_reference = first["settings"]["baseline"], first["settings"].get("wall_reference")
    args.model, args.steps = first["settings"]["model"], first["settings"]["steps"]
    _finish(payload, args, Path(args.out))
    return payload


def repeats_line(payload: dict[str, Any]) -> str | None:
    """One line on the runs repeated across merged files: how many, of which arms, and the largest
    absolute difference of each metric (and of the wall time) between a repeat and the kept run."""
    rep = payload.get("repeats")
    if not rep:
        return None
    arms = ", ".join(f"{arm} x{sum(x['arm'] == arm for x in rep['runs'])}"
                     for arm in dict.fromkeys(x["arm"] for x in rep["runs"]))
    diffs = ", ".join(f"{m} {v:.4f}" for m, v in rep["max_abs_difference"].items())
    return (f"repeated runs: {len(rep['runs'])} ({arms}; the first file's run kept); max |repeat - kept|: {diffs}; "
            f"wall {rep['max_abs_wall_seconds_difference']:.2f} s")


def run(args) -> int:
    import torch

    from batchlab.errors import BatchlabInputError
    from batchlab.recipes.finetune import finetune

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.merge:
        from batchlab.errors import BatchlabInputError

        try:
            payload = merge(args.merge, args)
        except BatchlabInputError as error:
            print(f"batchlab bench quality: {error}", file=sys.stderr)
            return 2
        _print_results(payload, args)
        return 0
    began = time.perf_counter()
    out = Path(args.out)
    base_batch = int(_ARM.match(args.baseline)["batch"]) if _ARM.match(args.baseline) else 64
    args.wall_reference = args.wall_reference or f"st-mined-{base_batch}"
    try:
        settings = {a: arm_settings(a, steps=args.steps, base_batch=base_batch) for a in args.arms}
        if args.baseline not in settings:
            raise BatchlabInputError(f"the baseline {args.baseline!r} is not among --arms")
        for kw in settings.values():
            if kw and "cache_chunk" in kw:
                kw["cache_chunk"] = args.cache_chunk
        wall_arms = [a for a, kw in settings.items() if kw and kw.get("time_budget") == "same-wall"]
        if wall_arms and args.wall_reference not in settings:
            raise BatchlabInputError(f"{', '.join(wall_arms)} take the wall time of --wall-reference "
                                     f"{args.wall_reference!r}, which is not among --arms")
        # every same-wall arm runs after its reference within a seed and dataset
        settings = {a: kw for a, kw in settings.items() if a not in wall_arms} | {a: settings[a] for a in wall_arms}
        data = {name: load_data(name, args) for name in args.datasets}
    except BatchlabInputError as error:
        print(f"batchlab bench quality: {error}", file=sys.stderr)
        return 2
    if args.export_data:
        folder = Path(args.export_data)
        folder.mkdir(parents=True, exist_ok=True)
        for name, blob in data.items():
            (folder / f"{name}.json").write_text(json.dumps(blob))
            print(f"wrote {folder / name}.json: {len(blob['train'])} train, {len(blob['test'])} test pairs")
        return 0
    command = "batchlab bench quality " + " ".join(shlex.quote(a) for a in sys.argv[3:]) if sys.argv[1:3] == ["bench", "quality"] \
        else " ".join(shlex.quote(a) for a in sys.argv)
    payload: dict[str, Any] = {
        "command": command, "device": str(args.device),
        "device_name": torch.cuda.get_device_name(0) if str(args.device).startswith("cuda") else "cpu",
        "settings": {k: v for k, v in vars(args).items() if k != "func"}, "arm_settings": settings,
        "datasets": {n: {"train_pairs": len(d["train"]), "test_pairs": len(d["test"]), **d["source"]} for n, d in data.items()},
        "runs": [], "summary": {}, "claims": {}, "seeds_done": 0,
    }
    print(f"data ready after {time.perf_counter() - began:.1f}s", flush=True)
    models = Models(args.model, args.device)
    if str(args.device).startswith("cuda"):  # compile kernels and warm the allocator outside the timed runs
        warm = time.perf_counter()
        first = next(iter(data.values()))
        seen: set[str] = set()
        for arm, kw in settings.items():
            if kw is None or kw.get("learner") == "scratch":
                continue
            kw = {k: v for k, v in kw.items() if k != "time_budget"}
            # one arm per kind of step (batch shape, loss, selector, extra negatives); samplers need no warm-up
            key = repr(sorted((k, v) for k, v in kw.items() if k not in ("sampler", "teacher", "steps")))
            if key in seen:
                continue
            seen.add(key)
            began_arm = time.perf_counter()
            try:
                finetune(models.initial(args.seed), first["train"], None, **{**kw, "steps": 2}, lr=args.lr,
                         device=args.device, precision=args.precision, max_seq_length=args.max_seq_length)
            except Exception as error:  # noqa: BLE001  (the timed run reports it)
                print(f"  warm-up {arm}: FAILED {type(error).__name__}: {error}", flush=True)
                continue
            print(f"  warm-up {arm}: {time.perf_counter() - began_arm:.1f}s", flush=True)
        payload["warmup_seconds"] = time.perf_counter() - warm
        print(f"warm-up (every arm, 2 steps, untimed): {payload['warmup_seconds']:.1f}s", flush=True)
    start = time.perf_counter()
    references: dict[str, Any] = {}  # JEST's frozen reference embeddings, per dataset
    for seed in range(args.seed, args.seed + args.seeds):
        done = seed - args.seed
        if args.time_budget and done and (time.perf_counter() - start) * (done + 1) / done > args.time_budget:
            payload["stopped"] = f"time budget {args.time_budget:.0f} s: stopped after {done} seeds"
            print(payload["stopped"])
            break
        for name, d in data.items():
            for arm, kw in settings.items():
                model = models.initial(seed)
                extra: dict[str, Any] = {"lr": args.lr, "max_seq_length": args.max_seq_length}
                if kw is not None and kw.get("learner") == "scratch":  # a small learner; --model is JEST's reference
                    if name not in references and any("jest" in k for k in settings.values() if k):
                        from batchlab.recipes._encoder import embed_pairs  # once per dataset: the reference is frozen

                        references[name] = embed_pairs(model, d["train"], device=args.device,
                                                       max_seq_length=min(64, args.max_seq_length))
                    reference = references.get(name)
                    model = models.scratch(seed)
                    steps = kw["steps"]
                    extra = {"lr": args.scratch_lr, "max_seq_length": min(64, args.max_seq_length), "eval_every": max(1, steps // 8),
                             **({"reference": reference} if "jest" in kw else {})}
                    kw = {k: v for k, v in kw.items() if k != "learner"}
                if kw is None:
                    from batchlab.recipes._encoder import token_table
                    from batchlab.recipes._evaluation import retrieval_metrics_from_tables

                    model.max_seq_length = args.max_seq_length or model.max_seq_length
                    tables = [token_table(model, [p[side] for p in d["test"]], torch.device(args.device)) for side in (0, 1)]
                    record = {"metrics": retrieval_metrics_from_tables(model, *tables),
                              "steps": 0, "examples": 0, "seconds": {"wall": 0.0}}
                else:
                    try:
                        if kw.get("time_budget") == "same-wall":  # the reference's wall time, this dataset and seed
                            ref = next((r for r in payload["runs"] if r["dataset"] == name and r["seed"] == seed
                                        and r["arm"] == args.wall_reference), None)
                            if ref is None:  # its run failed (recorded in "errors"): no wall time to match
                                raise RuntimeError(f"--wall-reference {args.wall_reference} has no run on {name}, "
                                                   f"seed {seed}")
                            kw = {**kw, "time_budget": ref["seconds"]["wall"]}
                        result = finetune(model, d["train"], d["test"], **kw, **extra, seed=seed,
                                          order_seed=seed + args.order_seed_offset, precision=args.precision,
                                          device=args.device, evaluate_before=False, progress=args.progress)
                    except Exception as error:  # noqa: BLE001  (one broken arm must not lose the study)
                        logger.exception("arm %s failed", arm)
                        payload.setdefault("errors", []).append(
                            {"dataset": name, "arm": arm, "seed": seed, "error": f"{type(error).__name__}: {error}"})
                        print(f"seed {seed} {name} {arm}: FAILED {type(error).__name__}: {error}", flush=True)
                        continue
                    record = {"metrics": result.after, "steps": result.steps, "examples": result.examples,
                              "seconds": result.seconds, "losses": result.losses, "history": result.history,
                              "time_budget": kw.get("time_budget")}
                payload["runs"].append({"dataset": name, "arm": arm, "seed": seed, **record})
                print(f"seed {seed} {name} {arm}: {METRIC}={record['metrics'][METRIC]:.4f} steps {record['steps']} "
                      f"wall {record['seconds']['wall']:.2f}s eval {record['seconds'].get('eval', 0.0):.2f}s", flush=True)
                del model
            _write(out, payload)
        payload["seeds_done"] = done + 1
        payload["study_seconds"] = time.perf_counter() - began
        _finish(payload, args, out)
    payload["study_seconds"] = time.perf_counter() - began
    _finish(payload, args, out)
    _print_results(payload, args)
    print(f"\nstudy wall time {payload['study_seconds']:.0f}s (data loading, warm-up, training, evaluation)")
    return 0


def _print_results(payload: dict[str, Any], args) -> None:
    out = Path(args.out)
    for name in payload["datasets"]:
        if name not in payload["summary"]:
            continue
        print(f"\n{name} ({payload['datasets'][name]['train_pairs']} train / {payload['datasets'][name]['test_pairs']} "
              f"test pairs, {payload['seeds_done']} seeds)")
        print(_format(payload["summary"][name], args.baseline))
        for check in payload["claims"][name]:
            from batchlab.recipes.compare import format_check

            if "share_of_steps" in check:
                print(f"  {check['claim']}: {check['reason']}" + ("  [target met]" if check["target_half_steps"] else ""))
            else:
                tags = ["target +0.02 met"] if check["target_+0.02_every_seed"] else []
                if "target_at_least_matches" in check:
                    tags.append("at least matches" if check["target_at_least_matches"] else "does not match")
                if check["selected_on_test"]:
                    tags.append("arm chosen on the test split")
                print("  " + format_check(check) + "".join(f"  [{t}]" for t in tags))
    line = repeats_line(payload)
    if line:
        print(f"\n{line}")
    print(f"\nwrote {out / 'quality.json'} and {', '.join(str(out / f'quality-{n}.png') for n in payload['summary'])}")


def _finish(payload: dict[str, Any], args, out: Path) -> None:
    for name in payload["datasets"]:
        runs = [r for r in payload["runs"] if r["dataset"] == name]
        if not runs:
            continue
        payload["summary"][name] = summarise(runs, args.baseline)
        payload["claims"][name] = targets(runs, payload["summary"][name], args.baseline, args.wall_reference)
        counts = sorted({entry["seeds"] for entry in payload["summary"][name].values()})
        seeds = f"{counts[0]} seeds" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} seeds per arm"
        title = f"{Path(str(args.model)).name}, {args.steps} steps, {seeds}, {payload['device_name']}"
        plot(out / f"quality-{name}.png", name, payload["summary"][name], args.baseline, title)
    _write(out, payload)


if __name__ == "__main__":
    from batchlab.bench._common import script_main

    sys.exit(script_main(__name__, __doc__, add_arguments, run))
