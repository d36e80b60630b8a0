"""``batchlab train``: train a tiny model with a chosen batch sampler and loss, then evaluate it.

Outputs are named after every option that changes the run (``codesearch-community-64``,
``codesearch-random-64-loss-siglip-jest-0.5``, ...); an existing name is refused unless
``--overwrite`` replaces it or ``--resume`` continues it. The JSON record holds every
value the run used; ``batchlab.recipes.load_run(<out>/<name>.pt)`` loads the model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from batchlab._argtypes import positive_float, positive_int
from batchlab.commands._common import EXIT_BAD_INPUT, add_common_arguments, add_subcommand
from batchlab.commands._train_model import MODEL_NAMED, filter_ratio
from batchlab.commands._train_model import add_arguments as add_model_arguments, run as run_model

# Options that change a run, in the order the default name lists them, with their defaults:
# an option left at its default stays out of the name.
NAMED = {"epochs": 3, "lr": None, "loss": "info_nce", "impl": "auto", "teacher": "model", "group_size": None,
         "jest": None, "coreset": None, "max_train": None, "max_test": None, "seed": 0, "data_seed": None, "data": None,
         "test_data": None, "data_path": None, "device": "cpu", "threads": None}


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "train",
        help="train a tiny dual encoder (codesearch) or CLIP (fashion_mnist) with any sampler and loss",
        description="Train the tiny open_clip dual encoder on codesearch (or your own --data file), or the tiny CLIP on "
        "fashion_mnist, with the batches a batchlab sampler builds, and evaluate retrieval on the held-out split. "
        "Writes <out>/<name>.json (every setting used, metrics, history), <out>/<name>.pt (checkpoint at every "
        "epoch end; load it with batchlab.recipes.load_run) and <out>/<name>.png (curve).",
        example="batchlab train --dataset codesearch --sampler community --batch-size 64 --epochs 3",
    )
    parser.add_argument("--dataset", default="codesearch", choices=["codesearch", "fashion_mnist", "wordnet"],
                        help="codesearch trains the text dual encoder, fashion_mnist the tiny CLIP (default: codesearch)")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="train the text dual encoder on your own pairs instead: .jsonl (query, document[, label]), "
                        ".tsv or .csv (see docs/recipes.md); 20%% held out for testing unless --test-data is given")
    parser.add_argument("--test-data", default=None, metavar="FILE", help="held-out pairs for --data (same formats)")
    parser.add_argument("--sampler", default="random", choices=["random", "cluster", "community", "hard_negative", "tas"],
                        help="how batches are built (default: random)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="the batch the loss sees (default: 64)")
    parser.add_argument("--epochs", type=positive_int, default=NAMED["epochs"], help="passes over the training split (default: 3)")
    parser.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: 2e-3 text, 1e-3 CLIP)")
    parser.add_argument("--loss", default="info_nce", choices=["info_nce", "siglip", "dcl", "sogclr", "isogclr"],
                        help="(default: info_nce; sogclr / isogclr keep per-example state: text dual encoder and "
                        "--model only; --model takes info_nce, dcl (one-way), sogclr, isogclr)")
    parser.add_argument("--impl", default="auto", help="loss implementation: auto, reference, tiled, triton (default: auto)")
    parser.add_argument("--teacher", default="model", choices=["model", "tfidf", "pixels", "none"],
                        help="embeddings that build the batches: model (the model's own, refreshed every epoch after a "
                        "random first one; default), tfidf (text), pixels (fashion_mnist), none")
    parser.add_argument("--group-size", type=positive_int, default=None, help="community: examples per group (default: 8)")
    parser.add_argument("--jest", type=float, default=None, metavar="FILTER_RATIO",
                        help="choose each batch with JEST from a super-batch, filtering out this fraction (e.g. 0.5)")
    parser.add_argument("--coreset", type=filter_ratio, default=None, metavar="FILTER_RATIO",
                        help="choose each batch as a CoLM coreset (gradient matching) of a super-batch, filtering out "
                        "this fraction in (0, 1) (e.g. 0.75: 64 of 256); text dual encoder and --model (which also "
                        "weights each kept query's loss by its medoid's cluster size, as CoLM does)")
    parser.add_argument("--max-train", type=positive_int, default=None, help="use only the first N training examples")
    parser.add_argument("--max-test", type=positive_int, default=None, help="use only the first N test examples")
    parser.add_argument("--data-path", default=None, help="fashion_mnist: directory with the IDX files")
    parser.add_argument("--data-seed", type=int, default=None,
                        help="seed of the batch order (default: --seed, which also sets the initial weights)")
    parser.add_argument("--name", default=None,
                        help="file name stem for the outputs (default: the dataset, sampler, batch size and every "
                        "option not at its default, e.g. codesearch-random-64-loss-siglip)")
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT",
                        help="continue an interrupted run from its checkpoint with the same settings (tiny models: "
                        "<out>/<name>.pt; --model: <out>/<name>/checkpoints/step-<n>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of a run of the same name")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: torch's choice; use 1 on a busy machine, where more threads collapse)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_model_arguments(parser)  # --model (a pretrained encoder): batchlab/commands/_train_model.py
    add_common_arguments(parser, out="results/train")
    parser.set_defaults(func=run)


def run_name(args) -> str:
    """``<dataset>-<sampler>-<batch>`` plus ``-<option>-<value>`` for every option not at its default."""
    dataset = Path(args.data).stem if args.data else args.dataset
    parts = [dataset, args.sampler.replace("_", "-"), str(args.batch_size)]
    for key, default in NAMED.items():
        value = getattr(args, key, default)
        if key in ("data", "teacher") and value is not None and (key == "data" or value == default):
            continue  # the data file names the run already; the default teacher stays out
        if value != default and value is not None:
            text = Path(str(value)).stem if key in ("test_data", "data_path") else str(value)
            parts += [key.replace("_", "-"), text.replace("/", "_").replace(":", "")]
    return "-".join(parts)


def ignored_data_flags(args) -> str | None:
    """Why a data flag would be ignored with the others given (one line), or None."""
    if getattr(args, "test_data", None) and not getattr(args, "data", None):
        return ("--test-data is the held-out split of your --data file; add --data FILE (the datasets bring their own "
                "test split) or drop --test-data")
    if getattr(args, "data", None) and args.dataset == "fashion_mnist":
        return "--data trains the text dual encoder on your pairs, not fashion_mnist; drop --dataset fashion_mnist or --data"
    if getattr(args, "data_path", None) and (args.dataset != "fashion_mnist" or args.model is not None):
        return f"--data-path is the folder of fashion_mnist's IDX files; --dataset {args.dataset} does not read it, drop it"
    return None


def run(args) -> int:
    reason = ignored_data_flags(args)
    if reason:
        print(f"batchlab train: error: {reason}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.model is not None or args.dataset == "wordnet":
        return run_model(args, default_name=run_name(args))
    model_only = [key for key, default in MODEL_NAMED.items() if getattr(args, key, default) not in (default, None)]
    if model_only:
        flags = ", ".join("--" + key.replace("_", "-") for key in model_only)
        verb = "applies" if len(model_only) == 1 else "apply"
        print(f"batchlab train: error: {flags} only {verb} with --model (fine-tuning a pretrained encoder); add "
              "--model minilm or a model folder, or drop them", file=sys.stderr)
        return EXIT_BAD_INPUT
    name = args.name or run_name(args)
    out = Path(args.out)
    existing = [p for p in (out / f"{name}.json", out / f"{name}.pt") if p.exists()]
    if existing and not (args.overwrite or args.resume):
        print(f"batchlab train: error: a run named {name!r} exists ({', '.join(map(str, existing))}); pass --overwrite "
              f"to replace it, --resume {out / f'{name}.pt'} to continue it, or --name for a new one", file=sys.stderr)
        return EXIT_BAD_INPUT

    import torch

    from batchlab.recipes import train_clip, train_dual_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"group_size": args.group_size} if args.group_size else {}
    jest = None
    if args.jest is not None:
        from batchlab.samplers import JointExampleSelector

        jest = JointExampleSelector(filter_ratio=args.jest, seed=args.seed)
    if args.coreset is not None:
        from batchlab.samplers import CoLMSelector

        if jest is not None:
            print("batchlab train: error: --jest and --coreset both choose the batch; pass one", file=sys.stderr)
            return EXIT_BAD_INPUT
        jest = CoLMSelector(filter_ratio=args.coreset, seed=args.seed)
    teacher = None if args.teacher == "none" else args.teacher
    common = dict(sampler=args.sampler, batch_size=args.batch_size, epochs=args.epochs, loss=args.loss, impl=args.impl,
                  sampler_options=options, jest=jest, device=args.device, seed=args.seed, out=args.out, name=name,
                  progress=args.progress, resume=args.resume)
    if args.dataset == "fashion_mnist" and not args.data:
        from batchlab.datasets import load_fashion_mnist

        if teacher == "tfidf":
            print("batchlab train: error: --teacher tfidf needs text pairs; fashion_mnist takes model, pixels or none",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.loss in ("sogclr", "isogclr") or args.coreset is not None:
            print("batchlab train: error: --loss sogclr/isogclr and --coreset are wired into the text dual encoder "
                  "only; use the codesearch dataset or --data", file=sys.stderr)
            return EXIT_BAD_INPUT
        train = load_fashion_mnist("train", path=args.data_path, limit=args.max_train)
        test = load_fashion_mnist("test", path=args.data_path, limit=args.max_test)
        result = train_clip(train, test, teacher=teacher, lr=args.lr or 1e-3, data_seed=args.data_seed, **common)
    else:
        if teacher == "pixels":
            print("batchlab train: error: --teacher pixels is for fashion_mnist; text takes model, tfidf or none",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        train, test = text_pairs(args)
        result = train_dual_encoder(train, test, teacher=teacher, lr=args.lr or 2e-3, data_seed=args.data_seed, **common)
    summary = {"name": name, "command": " ".join(["batchlab", *sys.argv[1:]]), "record": result.record,
               "settings": {k: v for k, v in vars(args).items() if k != "func"}, "metrics": result.metrics,
               "history": result.history, "train_seconds": result.seconds, "sampler_seconds": result.sampler_seconds,
               "checkpoint": str(result.checkpoint), "plot": str(result.plot)}
    from batchlab._artifacts import write_text

    path = write_text(out / f"{name}.json", json.dumps(summary, indent=2, default=str))  # whole, or the old one
    print(" ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()) + f"  ({result.seconds:.1f} s training)")
    print(f"wrote {path}, {result.checkpoint} and {result.plot}")
    print(f"load the model with: batchlab.recipes.load_run({str(result.checkpoint)!r})")
    return 0


def text_pairs(args):
    """``(train, test)`` text pairs: codesearch, or ``--data`` (with ``--test-data`` or a 20% hold-out)."""
    if args.data:
        from batchlab.recipes.pairs import holdout, read_pairs

        pairs = read_pairs(args.data)
        train, test = (pairs, read_pairs(args.test_data)) if args.test_data else holdout(pairs)
        return train.subset(range(min(len(train), args.max_train or len(train)))), \
            test.subset(range(min(len(test), args.max_test or len(test))))
    from batchlab.datasets import load_codesearch

    train = load_codesearch("train", progress=args.progress)
    test = load_codesearch("test", progress=args.progress)
    return list(zip(train.queries, train.documents))[: args.max_train], list(zip(test.queries, test.documents))[: args.max_test]
