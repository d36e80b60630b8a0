"""``batchlab train --model PATH|minilm``: fine-tune a pretrained sentence-transformers encoder.

The ``--model`` branch of ``batchlab train`` (:mod:`batchlab.commands.train` adds the
flags below and hands over here). It runs :func:`batchlab.recipes.finetune.finetune`
on an offline dataset and writes ``<out>/<name>/model`` (loadable with
``SentenceTransformer(path)``), ``<out>/<name>/finetune.json`` and checkpoints.
"""

from __future__ import annotations

import argparse
import sys

from batchlab.commands._common import EXIT_BAD_INPUT
#: batchlab.datasets.text_pairs.TEXT_PAIR_DATASETS, written out because importing batchlab.datasets
#: loads torch and --help must not (tests/test_finetune.py checks that the two agree)
DATASETS = ("codesearch", "wordnet")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags only the ``--model`` branch reads (the shared ones live in ``train.py``)."""
    group = parser.add_argument_group("pretrained encoder (--model)")
    group.add_argument("--model", default=None, metavar="PATH|minilm",
                       help="fine-tune this sentence-transformers model (a folder, or 'minilm' for the offline "
                            "all-MiniLM-L6-v2) instead of training a tiny model from scratch; datasets: codesearch, wordnet")
    group.add_argument("--steps", type=int, default=None, help="--model: optimizer steps (default: --epochs passes)")
    group.add_argument("--mined-negatives", type=int, default=0,
                       help="--model: hard negatives per pair mined with the pretrained model (sentence-transformers' "
                            "recipe: ranks 10-50, relative margin 0.05, max score 0.8; default 0)")
    group.add_argument("--guide", default=None, choices=["pretrained", "model"],
                       help="--model: GISTEmbed in-batch false-negative mask from this guide")
    group.add_argument("--cache-chunk", type=int, default=None,
                       help="--model: encode batches in chunks of this many texts with cached gradients (large batches)")
    group.add_argument("--max-seq-length", type=int, default=None, help="--model: token limit (default: the model's)")
    group.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="--model: bf16 autocast on CUDA")
    group.add_argument("--packages", nargs="*", default=(), help="--model with codesearch: also harvest these packages")
    # --resume is defined once in train.py (both branches read args.resume)


#: --model options that change the run, with their defaults (the shared ones are named by train.py)
MODEL_NAMED = {"model": None, "steps": None, "mined_negatives": 0, "guide": None, "cache_chunk": None,
               "max_seq_length": None, "precision": "fp32", "packages": ()}


def model_run_name(args, default_name: str) -> str:
    """``default_name`` (train.py's, from the shared options) plus every --model option not at its default."""
    parts = [default_name]
    for key, default in MODEL_NAMED.items():
        value = getattr(args, key, default)
        if value != default and value is not None:
            text = "_".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            if key == "model" and text != "minilm":
                text = text.rstrip("/").rsplit("/", 1)[-1]  # a folder: its last part
            parts += [key.replace("_", "-"), text.replace("/", "_").replace(":", "")]
    return "-".join(parts)


def run(args, default_name: str) -> int:
    import shutil
    from pathlib import Path

    from batchlab.errors import BatchlabInputError
    from batchlab.recipes.finetune import finetune

    if args.model is None:
        print("batchlab train: --dataset wordnet trains a pretrained encoder: add --model minilm (or a model folder)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.dataset not in DATASETS or getattr(args, "data", None) or args.loss != "info_nce" or args.jest is not None \
            or getattr(args, "coreset", None) is not None:
        print(f"batchlab train --model: takes --dataset {' or '.join(DATASETS)}, the loss of sentence-transformers' "
              "MultipleNegativesRankingLoss (no --loss, --data, --jest or --coreset)", file=sys.stderr)
        return EXIT_BAD_INPUT
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
            epochs=args.epochs, lr=args.lr or 5e-5, teacher=teacher, sampler_options=options,
            mined_negatives=args.mined_negatives, guide=args.guide, cache_chunk=args.cache_chunk,
            max_seq_length=args.max_seq_length, precision=args.precision, device=args.device, seed=args.seed,
            order_seed=getattr(args, "data_seed", None), out=out, resume=getattr(args, "resume", None), progress=args.progress,
        )
    except BatchlabInputError as error:
        print(f"batchlab train --model: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for label, metrics in (("before", result.before), ("after", result.after)):
        print(f"{label:>6}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    print(f"{result.steps} steps, {result.examples} pairs seen, {result.seconds['wall']:.1f} s "
          f"(teacher {result.seconds['teacher']:.1f}, mining {result.seconds['mining']:.1f}, "
          f"batches {result.seconds['sampler']:.1f}, training {result.seconds['train']:.1f})")
    print(f"wrote {result.model_path} and {out / 'finetune.json'}")
    return 0
