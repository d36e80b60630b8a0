"""``batchlab train --model PATH|minilm``: fine-tune a pretrained sentence-transformers encoder.

The ``--model`` branch of ``batchlab train`` (:mod:`batchlab.commands.train` adds the
flags below and hands over here). It runs :func:`batchlab.recipes.finetune.finetune`
on an offline dataset and writes ``<out>/<name>/model`` (loadable with
``SentenceTransformer(path)``), ``<out>/<name>/finetune.json`` and checkpoints.

Shared flags that reach :func:`~batchlab.recipes.finetune.finetune`: ``--loss`` (``info_nce``
is sentence-transformers' ``MultipleNegativesRankingLoss``, finetune's ``"mnrl"``; ``dcl`` its
one-way DCL; ``sogclr`` and ``isogclr`` keep per-query state) and ``--coreset`` (CoLM, with finetune's per-query
weights). ``--mochi [KEY=VALUE ...]`` and ``--time-budget SECONDS`` are ``--model`` flags.
"""

from __future__ import annotations

import argparse
import math
import sys

from batchlab._argtypes import non_negative_int, positive_float, positive_int
from batchlab.commands._common import EXIT_BAD_INPUT
#: batchlab.datasets.text_pairs.TEXT_PAIR_DATASETS, written out because importing batchlab.datasets
#: loads torch and --help must not (tests/test_finetune.py checks that the two agree)
DATASETS = ("codesearch", "wordnet")
#: batchlab.recipes.finetune.MOCHI_DEFAULTS, written out for the same reason (tests/test_train_model_options.py
#: checks that the two agree); each option's parser and what it accepts
MOCHI_DEFAULTS = {"num_hardest": 16, "num_synthetic": 16, "mix_query": 8, "query_weight_max": 0.5}
_MOCHI_RANGES = {"num_hardest": (int, 1, "an integer >= 1"), "num_synthetic": (int, 0, "an integer >= 0"),
                 "mix_query": (int, 0, "an integer >= 0"), "query_weight_max": (float, 0.0, "a number in [0, 1]")}
#: --loss values the --model branch takes, and finetune()'s name for each
LOSSES = {"info_nce": "mnrl", "dcl": "dcl", "sogclr": "sogclr", "isogclr": "isogclr"}


def filter_ratio(text: str) -> float:
    """A fraction of a super-batch to leave out, strictly between 0 and 1 (``--coreset``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a filter ratio in (0, 1), e.g. 0.75 (64 of 256), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a filter ratio in (0, 1), e.g. 0.75 (64 of 256), got {text}")
    return value


def mochi_setting(text: str) -> tuple[str, int | float]:
    """One ``KEY=VALUE`` of ``--mochi`` (a key of :data:`MOCHI_DEFAULTS`; ``-`` or ``_`` in it)."""
    keys = ", ".join(MOCHI_DEFAULTS)
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in MOCHI_DEFAULTS:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of {keys}, got {text!r}")
    kind, minimum, wanted = _MOCHI_RANGES[key]
    try:
        value = kind(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key} must be {wanted}, got {raw!r}") from None
    if value < minimum or kind is float and not (math.isfinite(value) and value <= 1.0):
        raise argparse.ArgumentTypeError(f"{key} must be {wanted}, got {raw}")
    return key, value


class _MochiOptions(argparse.Action):
    """``--mochi`` alone: MoCHi with finetune's defaults (``{}``); with ``KEY=VALUE``s: those overrides."""

    def __call__(self, parser, namespace, values, option_string=None):
        options: dict[str, int | float] = {}
        for key, value in values:
            if key in options:
                parser.error(f"argument --mochi: {key} given twice")
            options[key] = value
        merged = {**MOCHI_DEFAULTS, **options}
        if merged["num_synthetic"] == 0 and merged["mix_query"] == 0:  # finetune refuses it too; here before torch loads
            parser.error("argument --mochi: num_synthetic=0 and mix_query=0 synthesise no negative; leave one above 0")
        setattr(namespace, self.dest, options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags only the ``--model`` branch reads (the shared ones live in ``train.py``)."""
    group = parser.add_argument_group("pretrained encoder (--model)")
    group.add_argument("--model", default=None, metavar="PATH|minilm",
                       help="fine-tune this sentence-transformers model (a folder, or 'minilm' for the offline "
                            "all-MiniLM-L6-v2) instead of training a tiny model from scratch; datasets: codesearch, "
                            "wordnet; losses: info_nce (MultipleNegativesRankingLoss), dcl (one-way), sogclr, isogclr; --coreset "
                            "weights each kept query by its medoid's cluster size")
    group.add_argument("--steps", type=positive_int, default=None, help="--model: optimizer steps (default: --epochs passes)")
    group.add_argument("--mined-negatives", type=non_negative_int, default=0,
                       help="--model: hard negatives per pair mined with the pretrained model (sentence-transformers' "
                            "recipe: ranks 10-50, relative margin 0.05, max score 0.8; default 0)")
    group.add_argument("--guide", default=None, choices=["pretrained", "model"],
                       help="--model: GISTEmbed in-batch false-negative mask from this guide")
    group.add_argument("--mochi", nargs="*", type=mochi_setting, action=_MochiOptions, default=None, metavar="KEY=VALUE",
                       help="--model: MoCHi synthetic hard negatives mixed from each query's hardest in-batch keys "
                            "(info_nce, dcl); alone: num_hardest=16 num_synthetic=16 mix_query=8 query_weight_max=0.5, "
                            "or override some of them")
    group.add_argument("--time-budget", type=positive_float, default=None, metavar="SECONDS",
                       help="--model: wall seconds for teacher, mining, batches and steps (not evaluation); the "
                            "learning rate follows the share spent, --steps only caps the count; not resumable")
    group.add_argument("--cache-chunk", type=positive_int, default=None,
                       help="--model: encode batches in chunks of this many texts with cached gradients (large batches)")
    group.add_argument("--max-seq-length", type=positive_int, default=None, help="--model: token limit (default: the model's)")
    group.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="--model: bf16 autocast on CUDA")
    group.add_argument("--packages", nargs="*", default=(), help="--model with codesearch: also harvest these packages")
    # --resume is defined once in train.py (both branches read args.resume)


#: --model options that change the run, with their defaults (the shared ones are named by train.py)
MODEL_NAMED = {"model": None, "steps": None, "mined_negatives": 0, "guide": None, "mochi": None, "time_budget": None,
               "cache_chunk": None, "max_seq_length": None, "precision": "fp32", "packages": ()}


def _mochi_text(options: dict) -> str:
    """``default``, or the overrides that differ from the defaults: ``mix_query=0,num_hardest=8``."""
    changed = {k: v for k, v in sorted(options.items()) if v != MOCHI_DEFAULTS[k]}
    return ",".join(f"{k}={v}" for k, v in changed.items()) or "default"


def model_run_name(args, default_name: str) -> str:
    """``default_name`` (train.py's, from the shared options) plus every --model option not at its default."""
    parts = [default_name]
    for key, default in MODEL_NAMED.items():
        value = getattr(args, key, default)
        if value != default and value is not None:
            if key == "mochi":
                text = _mochi_text(value)
            else:
                text = "_".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            if key == "model" and text != "minilm":
                text = text.rstrip("/").rsplit("/", 1)[-1]  # a folder: its last part
            parts += [key.replace("_", "-"), text.replace("/", "_").replace(":", "")]
    return "-".join(parts)


def refusal(args) -> str | None:
    """Why this combination of flags cannot run with ``--model`` (one line), or None."""
    if args.dataset not in DATASETS or getattr(args, "data", None):
        return f"takes --dataset {' or '.join(DATASETS)} (no --data)"
    if args.loss not in LOSSES:
        return (f"--loss {args.loss} is a tiny-model loss; --model takes info_nce (sentence-transformers' "
                "MultipleNegativesRankingLoss, the default), dcl (one-way), sogclr or isogclr")
    if args.jest is not None:
        return "--jest is a tiny-model option (its reference is the tiny model's teacher); drop it"
    if args.impl != "auto":
        return "--impl chooses the tiny models' loss implementation; --model has none to choose, drop it"
    if args.loss in ("sogclr", "isogclr") and (args.mochi is not None or args.coreset is not None):
        flag = "--mochi" if args.mochi is not None else "--coreset"
        return (f"--loss {args.loss} takes no {flag} with --model (MoCHi's extra negatives and CoLM's per-query "
                "weights are defined for info_nce and dcl); drop one of them")
    if args.time_budget is not None and getattr(args, "resume", None):
        return "a run under --time-budget cannot --resume (its learning-rate schedule follows the clock)"
    return None


def run(args, default_name: str) -> int:
    import shutil
    from pathlib import Path

    if args.model is None:
        print("batchlab train: --dataset wordnet trains a pretrained encoder: add --model minilm (or a model folder)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    reason = refusal(args)
    if reason:
        print(f"batchlab train --model: error: {reason}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from batchlab.errors import BatchlabInputError
    from batchlab.recipes.finetune import finetune  # torch: only once the flags are known to be usable

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    teacher = None if args.teacher == "none" else args.teacher  # "model": from the pretrained weights, refreshed per epoch
    name = args.name or model_run_name(args, default_name)
    out = Path(args.out) / name
    if (out / "finetune.json").exists() or (out / "model").exists():
        if args.overwrite:
            shutil.rmtree(out)
        elif not getattr(args, "resume", None):
            print(f"batchlab train --model: error: a run named {name!r} exists ({out}); pass --overwrite to replace "
                  "it, --resume to continue it, or --name for a new one", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        from batchlab.datasets.text_pairs import load_pairs

        train, test = load_pairs(args.dataset, max_train=args.max_train, max_test=args.max_test,
                                 packages=args.packages, progress=args.progress)
        options = {"group_size": args.group_size} if args.group_size else {}
        result = finetune(
            args.model, train, test, sampler=args.sampler, batch_size=args.batch_size, steps=args.steps,
            epochs=args.epochs, lr=args.lr or 5e-5, loss=LOSSES[args.loss], teacher=teacher, sampler_options=options,
            mined_negatives=args.mined_negatives, guide=args.guide, mochi=args.mochi, coreset=args.coreset,
            cache_chunk=args.cache_chunk, time_budget=args.time_budget, max_seq_length=args.max_seq_length,
            precision=args.precision, device=args.device, seed=args.seed, order_seed=getattr(args, "data_seed", None),
            out=out, resume=getattr(args, "resume", None), progress=args.progress,
        )
    except BatchlabInputError as error:
        print(f"batchlab train --model: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for label, metrics in (("before", result.before), ("after", result.after)):
        print(f"{label:>6}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    budget = f" of a {args.time_budget:g} s budget" if args.time_budget is not None else ""
    print(f"{result.steps} steps, {result.examples} pairs seen, {result.seconds['wall']:.1f} s{budget} "
          f"(teacher {result.seconds['teacher']:.1f}, mining {result.seconds['mining']:.1f}, "
          f"batches {result.seconds['sampler']:.1f}, training {result.seconds['train']:.1f})")
    print(f"wrote {result.model_path} and {out / 'finetune.json'}")
    return 0
