"""``batchlab datasets``: list, build and inspect the offline datasets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from batchlab.commands._common import EXIT_BAD_INPUT, add_common_arguments, add_subcommand

NAMES = ("codesearch", "fashion_mnist", "wordnet")


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "datasets",
        help="list, build or inspect the offline datasets",
        description="The offline datasets: `list` shows them and whether they are available, `info NAME` "
        "builds (or loads from the cache) and summarises one, writing <out>/<name>.json with a few samples.",
        example="batchlab datasets info codesearch --samples 3",
    )
    parser.add_argument("action", nargs="?", default="list", choices=["list", "info"], help="what to do (default: list)")
    parser.add_argument("name", nargs="?", choices=NAMES, help="dataset for `info`")
    parser.add_argument("--samples", type=int, default=2, help="how many examples to print (default: 2)")
    parser.add_argument("--packages", nargs="*", default=(), help="codesearch: also harvest these installed packages")
    parser.add_argument("--cache-dir", default=None, help="codesearch cache (default: ~/.cache/batchlab)")
    parser.add_argument("--data-path", "--path", dest="path", default=None,
                        help="fashion_mnist: directory with the IDX files (the same flag as batchlab train's)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_common_arguments(parser, out="results/datasets")
    parser.set_defaults(func=run)


def _summary(name: str, args) -> dict:
    if name == "codesearch":
        from batchlab.datasets import load_codesearch

        kw = dict(packages=tuple(args.packages), cache_dir=args.cache_dir, progress=args.progress)
        train, test = load_codesearch("train", **kw), load_codesearch("test", **kw)
        return {
            "name": name,
            "train_pairs": len(train),
            "test_pairs": len(test),
            "train_modules": len({m for m in train.modules}),
            "test_modules": len({m for m in test.modules}),
            "source_hash": train.source_hash,
            "samples": [{"query": train.queries[i], "document": train.documents[i]} for i in range(min(args.samples, len(train)))],
        }
    if name == "wordnet":
        from batchlab.datasets.wordnet import load_wordnet

        train, test = load_wordnet("train"), load_wordnet("test")
        return {
            "name": name,
            "train_pairs": len(train),
            "test_pairs": len(test),
            "source_hash": train.source_hash,
            "samples": [{"query": train.queries[i], "document": train.documents[i]} for i in range(min(args.samples, len(train)))],
        }
    from batchlab.datasets import load_fashion_mnist

    train = load_fashion_mnist("train", path=args.path)
    test = load_fashion_mnist("test", path=args.path)
    return {
        "name": name,
        "train_images": len(train),
        "test_images": len(test),
        "classes": list(train.classes),
        "samples": [{"label": int(train.labels[i]), "caption": train.caption(i)} for i in range(min(args.samples, len(train)))],
    }


def run(args) -> int:
    if args.action == "list":
        from batchlab.datasets import fashion_mnist_available

        print("codesearch     (docstring summary, code) pairs from the Python standard library  [always available]")
        status = "available" if fashion_mnist_available(args.path) else "missing: apt-get install dataset-fashion-mnist"
        print(f"fashion_mnist  70,000 28x28 images with caption templates  [{status}]")
        from batchlab.datasets.wordnet import find_wordnet
        from batchlab.errors import BatchlabInputError

        try:
            status = f"available: {find_wordnet()}"
        except BatchlabInputError:
            status = "missing: apt-get install wordnet-base"
        print(f"wordnet        (words, definition) pairs from WordNet 3.0, for --model fine-tuning  [{status}]")
        return 0
    if args.name is None:
        print("batchlab datasets info: name which dataset, e.g. `batchlab datasets info codesearch`", file=sys.stderr)
        return EXIT_BAD_INPUT
    summary = _summary(args.name, args)
    from batchlab._artifacts import write_text

    write_text(Path(args.out) / f"{args.name}.json", json.dumps(summary, indent=2))
    for key, value in summary.items():
        if key != "samples":
            print(f"{key}: {value}")
    for sample in summary["samples"]:
        print("---")
        for key, value in sample.items():
            print(f"{key}: {value}")
    return 0
