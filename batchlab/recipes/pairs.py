"""Your own (query, document[, label]) pairs from a file, for the recipes and ``batchlab demo --data``.

Formats, chosen by the suffix:

* ``.jsonl``: one JSON object per line with ``"query"`` and ``"document"`` (and optionally
  ``"label"``); ``"anchor"`` / ``"positive"`` (sentence-transformers' column names) work too.
* ``.tsv``: ``query<TAB>document[<TAB>label]`` per line, no header.
* ``.csv``: a header naming the columns (``query,document[,label]``; other named columns are
  ignored), read with :mod:`csv`: a cell holding a comma or a line break is quoted, and a row
  with more or fewer cells than the header is refused (naming its line).

Files are UTF-8 (a leading byte-order mark is dropped; CRLF line ends are fine). A label is
a string or a number.

Pairs with the same label are relevant to each other (several relevant documents per
query). :func:`holdout` splits one file into training and test pairs.

>>> from batchlab.recipes.pairs import Pairs, holdout
>>> pairs = Pairs(["parse a file", "draw a circle", "read a file"], ["def parse", "def circle", "def read"])
>>> train, test = holdout(pairs, test_fraction=0.34)
>>> len(train) + len(test)
3
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from batchlab.errors import BatchlabInputError


@dataclass
class Pairs:
    """Parallel lists of queries, documents and (optional) labels; indexing gives tuples."""

    queries: list[str]
    documents: list[str]
    labels: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> tuple:
        if self.labels is None:
            return self.queries[i], self.documents[i]
        return self.queries[i], self.documents[i], self.labels[i]

    def subset(self, indices: Sequence[int]) -> "Pairs":
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return Pairs([self.queries[i] for i in indices], [self.documents[i] for i in indices], labels)


_QUERY, _DOCUMENT = ("query", "anchor"), ("document", "positive")


def _field(row: dict, names: tuple[str, ...], where: str) -> str:
    for name in names:
        if name in row:
            value = row[name]
            if not isinstance(value, str):
                raise BatchlabInputError(f"{where}: {name!r} must be a string, got {type(value).__name__}")
            return value
    raise BatchlabInputError(f"{where}: no {' or '.join(repr(n) for n in names)} field (got {sorted(row)})")


def read_pairs(path: str | Path) -> Pairs:
    """Read a ``.jsonl``, ``.tsv`` or ``.csv`` file of pairs (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise BatchlabInputError(f"no file {path}; expected a .jsonl, .tsv or .csv file of (query, document[, label])")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel, Notepad) is not part of the text
    except UnicodeDecodeError as error:
        raise BatchlabInputError(f"{path} is not UTF-8 text ({error})") from None
    rows: list[dict] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise BatchlabInputError(f"{path} line {n}: not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise BatchlabInputError(f"{path} line {n}: expected an object with query and document")
            rows.append(row)
    elif path.suffix == ".tsv":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) not in (2, 3):
                raise BatchlabInputError(f"{path} line {n}: expected query<TAB>document[<TAB>label], got {len(cells)} "
                                         f"column(s)")
            rows.append(dict(zip(("query", "document", "label"), cells)))
    elif path.suffix == ".csv":
        # from the whole text, not its lines: a quoted cell may hold a line break
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            cells = len(reader.fieldnames or ())
            if None in row:  # more cells than the header names: an unquoted comma split a cell
                raise BatchlabInputError(f"{path} line {reader.line_num}: {cells + len(row[None])} cells but the header "
                                         f"names {cells}; quote cells that hold a comma (\"a, b\")")
            if any(value is None for value in row.values()):
                missing = [k for k, v in row.items() if v is None]
                raise BatchlabInputError(f"{path} line {reader.line_num}: {cells - len(missing)} cell(s) but the header "
                                         f"names {cells} (no {', '.join(map(repr, missing))})")
            rows.append(row)
    else:
        raise BatchlabInputError(f"{path.name}: unknown format; use .jsonl, .tsv or .csv")
    if not rows:
        raise BatchlabInputError(f"{path} holds no pairs")
    where = lambda i: f"{path} pair {i + 1}"  # noqa: E731
    queries = [_field(r, _QUERY, where(i)) for i, r in enumerate(rows)]
    documents = [_field(r, _DOCUMENT, where(i)) for i, r in enumerate(rows)]
    has_label = ["label" in r and r["label"] not in (None, "") for r in rows]
    if any(has_label) and not all(has_label):
        raise BatchlabInputError(f"{path}: {sum(has_label)} of {len(rows)} pairs have a label; give every pair one or none")
    labels = [r["label"] for r in rows] if all(has_label) else None
    bad = next((i for i, label in enumerate(labels or ()) if not isinstance(label, (str, int, float))), None)
    if bad is not None:
        raise BatchlabInputError(f"{where(bad)}: a label must be a string or a number, got "
                                 f"{type(labels[bad]).__name__} {labels[bad]!r}")
    return Pairs(queries, documents, labels)


def holdout(pairs: Pairs, *, test_fraction: float = 0.2) -> tuple[Pairs, Pairs]:
    """Split into ``(train, test)`` by a hash of each pair's label (or query text): deterministic,
    and pairs that share a label (or a query) land on the same side, so no answer leaks."""
    if not 0 < test_fraction < 1:
        raise BatchlabInputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    keys = pairs.labels if pairs.labels is not None else pairs.queries
    bucket = [int(hashlib.blake2b(str(k).encode(), digest_size=8).hexdigest(), 16) / 2**64 for k in keys]
    test = [i for i, b in enumerate(bucket) if b < test_fraction]
    train = [i for i, b in enumerate(bucket) if b >= test_fraction]
    if not test or not train:
        raise BatchlabInputError(f"holding out {test_fraction:.0%} of {len(pairs)} pairs left one side empty; use more "
                                 f"pairs or give a separate test file")
    return pairs.subset(train), pairs.subset(test)
