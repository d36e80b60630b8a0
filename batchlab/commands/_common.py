"""Pieces every ``batchlab`` subcommand shares: common flags, exit codes and the help layout."""

from __future__ import annotations

import argparse

# Exit codes that mean something (documented in docs/cli.md).
EXIT_OK = 0
EXIT_FAILED = 1  # the command ran but failed (an unexpected error; the traceback is printed)
EXIT_BAD_INPUT = 2  # bad arguments or bad input data (argparse uses 2 as well)
EXIT_MISSING = 3  # an optional dataset, dependency or subcommand is not installed
EXIT_INTERRUPTED = 130


def add_common_arguments(parser: argparse.ArgumentParser, *, out: str = "results") -> None:
    """Add ``--device``, ``--seed`` and ``--out`` (every subcommand takes them)."""
    parser.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", default=out, help=f"directory for the JSON results and PNG plots (default: {out})")


def add_subcommand(subparsers, name: str, *, help: str, description: str, example: str) -> argparse.ArgumentParser:
    """Register a subcommand whose ``--help`` ends with a worked example."""
    return subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
