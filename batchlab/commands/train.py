"""``batchlab train``: train a tiny model with a chosen batch sampler and loss, then evaluate it."""

from __future__ import annotations

import json
from pathlib import Path

from batchlab.commands._common import add_common_arguments, add_subcommand


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "train",
        help="train a tiny dual encoder (codesearch) or CLIP (fashion_mnist) with any sampler and loss",
        description="Train the tiny open_clip dual encoder on codesearch, or the tiny CLIP on fashion_mnist, with "
        "the batches a batchlab sampler builds, and evaluate retrieval on the held-out split. Writes "
        "<out>/<name>.json (metrics and history), <out>/<name>.pt (checkpoint) and <out>/<name>.png (curve).",
        example="batchlab train --dataset codesearch --sampler community --batch-size 64 --epochs 3",
    )
    parser.add_argument("--dataset", default="codesearch", choices=["codesearch", "fashion_mnist"],
                        help="codesearch trains the text dual encoder, fashion_mnist the tiny CLIP (default: codesearch)")
    parser.add_argument("--sampler", default="random", choices=["random", "cluster", "community", "hard_negative"],
                        help="how batches are built (default: random)")
    parser.add_argument("--batch-size", type=int, default=64, help="the batch the loss sees (default: 64)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training split (default: 3)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-3 text, 1e-3 CLIP)")
    parser.add_argument("--loss", default="info_nce", choices=["info_nce", "siglip", "dcl"], help="(default: info_nce)")
    parser.add_argument("--impl", default="auto", help="loss implementation: auto, reference, tiled, triton (default: auto)")
    parser.add_argument("--teacher", default=None, choices=["tfidf", "model", "pixels", "none"],
                        help="embeddings that build the batches (default: tfidf for codesearch, model for fashion_mnist)")
    parser.add_argument("--group-size", type=int, default=None, help="community: examples per group (default: 8)")
    parser.add_argument("--jest", type=float, default=None, metavar="FILTER_RATIO",
                        help="choose each batch with JEST from a super-batch, filtering out this fraction (e.g. 0.5)")
    parser.add_argument("--max-train", type=int, default=None, help="use only the first N training examples")
    parser.add_argument("--max-test", type=int, default=None, help="use only the first N test examples")
    parser.add_argument("--data-path", default=None, help="fashion_mnist: directory with the IDX files")
    parser.add_argument("--name", default=None, help="file name stem for the outputs (default: <dataset>-<sampler>)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; use 1 on a busy machine, where more threads collapse)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_common_arguments(parser, out="results/train")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from batchlab.recipes import train_clip, train_dual_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or f"{args.dataset}-{args.sampler}-{args.batch_size}"
    options = {"group_size": args.group_size} if args.group_size else {}
    jest = None
    if args.jest is not None:
        from batchlab.samplers import JointExampleSelector

        jest = JointExampleSelector(filter_ratio=args.jest, seed=args.seed)
    teacher = None if args.teacher == "none" else args.teacher
    common = dict(sampler=args.sampler, batch_size=args.batch_size, epochs=args.epochs, loss=args.loss, impl=args.impl,
                  sampler_options=options, jest=jest, device=args.device, seed=args.seed, out=args.out, name=name,
                  progress=args.progress)
    if args.dataset == "codesearch":
        from batchlab.datasets import load_codesearch

        train = load_codesearch("train", progress=args.progress)
        test = load_codesearch("test", progress=args.progress)
        train = list(zip(train.queries, train.documents))[: args.max_train]
        test = list(zip(test.queries, test.documents))[: args.max_test]
        result = train_dual_encoder(train, test, teacher=teacher if args.teacher else "tfidf", lr=args.lr or 2e-3, **common)
    else:
        from batchlab.datasets import load_fashion_mnist

        train = load_fashion_mnist("train", path=args.data_path, limit=args.max_train)
        test = load_fashion_mnist("test", path=args.data_path, limit=args.max_test)
        result = train_clip(train, test, teacher=teacher if args.teacher else "model", lr=args.lr or 1e-3, **common)
    summary = {"name": name, "settings": {k: v for k, v in vars(args).items() if k != "func"},
               "metrics": result.metrics, "history": result.history, "train_seconds": result.seconds,
               "sampler_seconds": result.sampler_seconds, "checkpoint": str(result.checkpoint), "plot": str(result.plot)}
    path = Path(args.out) / f"{name}.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(" ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()) + f"  ({result.seconds:.1f} s training)")
    print(f"wrote {path}, {result.checkpoint} and {result.plot}")
    return 0
