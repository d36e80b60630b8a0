"""The ``batchlab`` command.

Subcommands live in :mod:`batchlab.commands` (one module each, exposing
``add_parser(subparsers)`` and ``run(args) -> int``). A subcommand whose module is
missing or fails to import is still listed, and running it says why it is unavailable
(exit code 3) instead of breaking the whole command.

Exit codes: 0 success, 1 the command failed, 2 bad arguments or bad input data,
3 an optional dataset, dependency or subcommand is missing, 130 interrupted.

>>> from batchlab.cli import main
>>> main(["datasets", "--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
import warnings

from batchlab.commands._common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MISSING,
    EXIT_OK,
)

# (module in batchlab.commands, command name, one-line help used when the module is missing)
SUBCOMMANDS = [
    ("demo", "demo", "train a tiny dual encoder with random, community and hard-negative batches"),
    ("train", "train", "train a tiny dual encoder or CLIP model with any sampler and loss"),
    ("mine", "mine", "mine hard negatives from teacher embeddings"),
    ("build_batches", "build-batches", "build community (B3) batches from teacher embeddings"),
    ("bench", "bench", "run a benchmark (losses, samplers, communities, mining, ot, jest, distributed)"),
    ("datasets", "datasets", "list, build or inspect the offline datasets"),
]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("batchlab")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


def _unavailable(name: str, module: str, error: BaseException):
    def run(args) -> int:
        print(
            f"batchlab {name}: this subcommand is not available in this installation "
            f"(importing batchlab.commands.{module} failed: {type(error).__name__}: {error}).",
            file=sys.stderr,
        )
        return EXIT_MISSING

    return run


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (subcommands registered from :mod:`batchlab.commands`)."""
    parser = argparse.ArgumentParser(
        prog="batchlab",
        description="Batches that teach: samplers that choose which examples meet, and tiled contrastive losses.",
        epilog="examples:\n  batchlab demo\n  batchlab bench losses --help\n  batchlab datasets info codesearch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"batchlab {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, name, help_text in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"batchlab.commands.{module}")
            mod.add_parser(subparsers)
        except Exception as error:  # a missing or broken subcommand must not break the others
            sub = subparsers.add_parser(name, help=f"{help_text} (unavailable: {type(error).__name__})")
            sub.set_defaults(func=_unavailable(name, module, error))
    return parser


def _warning_printer(command: str, *, verbose: bool):
    """Warnings as one line naming the command; their source file and line only with ``-v``.

    A library warning's ``stacklevel`` points at its caller, which under the command line
    is often this module rather than the code that was wrong; the message is what helps.
    """

    def show(message, category, filename, lineno, file=None, line=None):
        where = f" [{category.__name__} from {filename}:{lineno}]" if verbose else ""
        print(f"batchlab {command}: warning: {message}{where}", file=file or sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    """Run the ``batchlab`` command; returns the exit code (see the module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # open_clip must never wait on the hub
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and argparse errors
        return int(exit_.code or 0) if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")

    from batchlab.errors import BatchlabInputError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(args.command, verbose=args.verbose > 0)
            return int(args.func(args) or EXIT_OK)
    except BatchlabInputError as error:
        print(f"batchlab {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModuleNotFoundError as error:  # an optional dependency (faiss, open_clip, ...) is missing
        print(f"batchlab {args.command}: error: {error}; install it with pip to use this command", file=sys.stderr)
        return EXIT_MISSING
    except FileNotFoundError as error:  # e.g. an optional dataset that is not installed
        print(f"batchlab {args.command}: error: {error}", file=sys.stderr)
        return EXIT_MISSING
    except KeyboardInterrupt:
        print(f"batchlab {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
