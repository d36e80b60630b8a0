"""``batchlab train``: train a tiny model with a chosen sampler and loss (filled in with the recipes)."""

from __future__ import annotations

from batchlab.commands._common import add_common_arguments, add_subcommand


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "train",
        help="train a tiny dual encoder or CLIP model with any sampler and loss",
        description="Train with a chosen batch sampler and loss.",
        example="batchlab train --sampler community --batch-size 64 --epochs 2",
    )
    add_common_arguments(parser, out="results/train")
    parser.set_defaults(func=run)


def run(args) -> int:
    raise NotImplementedError("batchlab train lands with the recipes")
