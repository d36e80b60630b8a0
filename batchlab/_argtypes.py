"""``argparse`` value checks shared by the commands and the benchmarks.

Each function is an argparse ``type=``: it returns the parsed value or raises
``argparse.ArgumentTypeError``, which argparse reports as ``error: argument --flag:
<message>`` with exit code 2, before any work starts. Nothing here imports torch
unless a GPU device is asked for (the command line parses without torch).

>>> positive_int("3")
3
>>> positive_int("0")
Traceback (most recent call last):
...
argparse.ArgumentTypeError: expected an integer >= 1, got 0
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

__all__ = ["add_common_arguments", "device", "non_negative_int", "out_dir", "positive_float", "positive_int",
           "positive_int_list"]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, epochs)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1: ``"256,1024"`` -> [256, 1024] (an argparse error names a bad entry)."""
    return [positive_int(part) for part in text.split(",") if part.strip()] or [positive_int(text)]


def non_negative_int(text: str) -> int:
    """An integer >= 0 (ranks to skip, offsets)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (learning rates, temperatures)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")


def device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and only one this machine has."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda, cuda:N or mps")
    if text == "cpu":
        return text
    import torch  # only for a GPU request: checks it exists before any work starts

    if text.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no usable CUDA device (no GPU, or a CPU-only torch build)"
            raise argparse.ArgumentTypeError(f"{text} was asked for, but this machine has {have}; use --device cpu")
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError("mps was asked for, but this machine has no MPS device; use --device cpu")
    return text


def out_dir(text: str) -> str:
    """A directory path (existing or to be created), never an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; --out takes a directory (a new one is created)")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{parent} is a file, so {text} cannot be created as a directory")
    return text


def add_common_arguments(parser: argparse.ArgumentParser, *, out: str = "results") -> None:
    """Add ``--device``, ``--seed`` and ``--out`` (every subcommand and benchmark takes them).

    Lives here, below both :mod:`batchlab.commands` and :mod:`batchlab.bench`, so that a
    benchmark never imports upward from the commands.
    """
    parser.add_argument("--device", type=device, default="cpu",
                        help="torch device to run on: cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", type=out_dir, default=out,
                        help=f"directory for the JSON results and PNG plots (default: {out})")
