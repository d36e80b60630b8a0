"""Pieces every ``batchlab`` subcommand shares: common flags, exit codes, the help layout, and
input loading that turns a bad file into a one-line :class:`~batchlab.errors.BatchlabInputError`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from batchlab._argtypes import add_common_arguments  # noqa: F401  (re-exported: every subcommand adds them)
from batchlab.errors import BatchlabInputError

# Exit codes that mean something (documented in docs/cli.md).
EXIT_OK = 0
EXIT_FAILED = 1  # the command ran but failed (an unexpected error; the traceback is printed)
EXIT_BAD_INPUT = 2  # bad arguments or bad input data (argparse uses 2 as well)
EXIT_MISSING = 3  # an optional dataset, dependency or subcommand is not installed
EXIT_INTERRUPTED = 130


def add_subcommand(subparsers, name: str, *, help: str, description: str, example: str) -> argparse.ArgumentParser:
    """Register a subcommand whose ``--help`` ends with a worked example."""
    return subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# -- input files ---------------------------------------------------------------
_READ_ERRORS = (ValueError, OSError, EOFError)  # truncated / corrupt .npy, unreadable file


def _existing_file(path: str | Path, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise BatchlabInputError(f"{flag}: no file {p}")
    if not p.is_file():
        raise BatchlabInputError(f"{flag}: {p} is a directory, expected a file")
    return p


def load_matrix(path: str | Path, flag: str, *, torch_files: bool = False) -> Any:
    """``(N, d)`` float embeddings from a ``.npy`` file (memory-mapped numpy array) or, with
    ``torch_files``, a ``.pt`` tensor or dict with key ``"embeddings"`` (torch tensor).

    Refuses, with :class:`BatchlabInputError` naming ``flag``: a missing file, another
    suffix, a truncated or corrupt file, a shape other than ``(N, d)`` with ``N, d >= 1``,
    and non-float values.
    """
    import numpy as np

    p = _existing_file(path, flag)
    shape_hint = "a float array of shape (N, d), e.g. np.save(path, embeddings.astype(np.float32))"
    if p.suffix == ".npy":
        try:
            x = np.load(p, mmap_mode="r", allow_pickle=False)
        except _READ_ERRORS as exc:
            raise BatchlabInputError(
                f"{flag}: cannot read {p} as a .npy array ({type(exc).__name__}: {exc}); the file is truncated "
                f"or not a numpy array file. Expected {shape_hint}"
            ) from None
        dtype_ok = np.issubdtype(x.dtype, np.floating)
    elif torch_files and p.suffix in (".pt", ".pth"):
        import pickle

        import torch

        try:
            x = torch.load(p, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, *_READ_ERRORS) as exc:
            raise BatchlabInputError(f"{flag}: cannot read {p} as a torch file ({type(exc).__name__}: {exc})") from None
        x = x.get("embeddings") if isinstance(x, dict) else x
        if not isinstance(x, torch.Tensor):
            raise BatchlabInputError(
                f"{flag}: {p} holds {type(x).__name__}, expected a (N, d) tensor or a dict with key 'embeddings'"
            )
        dtype_ok = x.is_floating_point()
    else:
        kinds = "a .npy array or a .pt tensor" if torch_files else "a .npy array"
        raise BatchlabInputError(f"{flag}: {p.name} is not {kinds}; expected {shape_hint}")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise BatchlabInputError(f"{flag}: {p} has shape {tuple(x.shape)}; expected {shape_hint}")
    if not dtype_ok:
        raise BatchlabInputError(f"{flag}: {p} holds {x.dtype} values; expected {shape_hint}")
    return x


def load_json(path: str | Path, flag: str) -> Any:
    """A JSON file's content; a corrupt file is a :class:`BatchlabInputError` naming the line."""
    p = _existing_file(path, flag)
    try:
        return json.loads(p.read_text())
    except UnicodeDecodeError as exc:
        raise BatchlabInputError(f"{flag}: {p} is not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BatchlabInputError(f"{flag}: {p} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def load_lines(path: str | Path, flag: str) -> list[str]:
    """The lines of a UTF-8 text file."""
    p = _existing_file(path, flag)
    try:
        return p.read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise BatchlabInputError(f"{flag}: {p} is not UTF-8 text ({exc})") from None
