"""``codesearch``: (docstring summary, code) pairs harvested offline from Python sources.

Every function, method or class with a docstring in the Python standard library (and, on
request, in installed packages) gives one pair: the *query* is the docstring's summary
(its first paragraph, kept when it has at least 4 words and 20 characters) and the
*document* is the function's signature plus the first lines of its body (the docstring
itself removed). That is about 7,000 pairs from the standard library. Nothing is
downloaded: the pairs are read with :mod:`ast` from the ``.py`` files on this machine.

The split is **by module**: a module goes to the test split when a hash of its name
falls below ``test_fraction``, so test functions come from modules the model never saw.
Duplicate summaries and duplicate documents are dropped (a retrieval test with two
identical queries has no single right answer). Harvesting takes a few seconds; the
result is cached as JSON under ``cache_dir`` (default ``~/.cache/batchlab``, or
``$BATCHLAB_CACHE``), keyed by a hash of the source files (path, size, mtime) and the
harvest settings, so a changed Python or package rebuilds it.

Example
-------
>>> train = load_codesearch("train")  # doctest: +SKIP
>>> query, document = train[0]  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import logging
import os
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from torch.utils.data import Dataset

from batchlab.errors import BatchlabInputError

logger = logging.getLogger(__name__)

# Bump when the harvest rules change, so stale caches are rebuilt.
HARVEST_VERSION = 2
MIN_WORDS = 4
MIN_CHARS = 20
# Directories never harvested: tests (their docstrings describe tests, not APIs),
# third-party code inside the stdlib tree, and bundled test data.
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "testing"})


@dataclass(frozen=True)
class CodePair:
    """One harvested pair (``query`` = docstring summary, ``document`` = code)."""

    query: str
    document: str
    module: str
    name: str


class CodeSearchPairs(Dataset):
    """A split of ``codesearch``: ``dataset[i] -> (query, document)``.

    Attributes ``queries``, ``documents``, ``modules`` and ``names`` are parallel
    lists of strings (length ``len(dataset)``).
    """

    def __init__(self, pairs: Sequence[CodePair], split: str, source_hash: str) -> None:
        self.split = split
        self.source_hash = source_hash
        self.queries = [p.query for p in pairs]
        self.documents = [p.document for p in pairs]
        self.modules = [p.module for p in pairs]
        self.names = [p.name for p in pairs]

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> tuple[str, str]:
        return self.queries[index], self.documents[index]

    def __repr__(self) -> str:
        return f"CodeSearchPairs(split={self.split!r}, pairs={len(self)}, modules={len(set(self.modules))})"


# -- harvesting ----------------------------------------------------------------
def summary_of(docstring: str) -> str | None:
    """The first paragraph of a docstring, on one line; ``None`` when too short to be a query.

    >>> summary_of("Return the sum of two numbers.\\n\\nMore text.")
    'Return the sum of two numbers.'
    >>> summary_of("Helper.") is None
    True
    """
    text = inspect.cleandoc(docstring).strip()
    first = text.split("\n\n", 1)[0]
    summary = " ".join(first.split())
    if len(summary) < MIN_CHARS or len(summary.split()) < MIN_WORDS:
        return None
    return summary


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in [*node.bases, *node.keywords])
        return f"class {node.name}({bases}):" if bases else f"class {node.name}:"
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"


def _document(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, lines: list[str], body_lines: int) -> str:
    """Signature plus the first ``body_lines`` source lines after the docstring (dedented)."""
    body = node.body[1:]  # node.body[0] is the docstring
    if not body:
        return _signature(node)
    start = body[0].lineno - 1
    end = min(node.end_lineno or start + body_lines, start + body_lines)
    snippet = textwrap.dedent("\n".join(lines[start:end])) if end > start else ""
    snippet = "\n".join(line for line in snippet.splitlines() if line.strip())
    return _signature(node) + ("\n    " + snippet.replace("\n", "\n    ") if snippet else "")


def harvest_file(path: Path, module: str, *, body_lines: int = 5) -> list[CodePair]:
    """All pairs in one source file (``[]`` if it does not parse)."""
    try:
        source = path.read_bytes()
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
        return []
    lines = source.decode("utf-8", errors="replace").splitlines()
    pairs = []
    # Walk with the enclosing class names so methods get a qualified name.
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        for child in reversed(list(ast.iter_child_nodes(node))):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                docstring = ast.get_docstring(child, clean=False)
                if docstring and not child.name.lower().startswith("test"):
                    summary = summary_of(docstring)
                    if summary:
                        pairs.append(CodePair(summary, _document(child, lines, body_lines), module, name))
                inner = "." if isinstance(child, ast.ClassDef) else ".<locals>."
                stack.append((child, f"{name}{inner}"))
    return pairs


def _python_files(root: Path, package: str) -> list[tuple[Path, str]]:
    """``(path, module name)`` for every ``.py`` file under ``root``, sorted, tests skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "test_")))
        rel = Path(dirpath).relative_to(root)
        for filename in sorted(filenames):
            if not filename.endswith(".py") or filename.startswith(("test_", "conftest")) or filename.endswith("_test.py"):
                continue
            parts = [*rel.parts, filename[:-3]]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            module = ".".join(p for p in [package, *parts] if p)
            found.append((Path(dirpath) / filename, module or package))
    return found


def source_files(packages: Iterable[str] = ()) -> list[tuple[Path, str]]:
    """The files to harvest: the standard library, then each named installed package."""
    files = _python_files(Path(sysconfig.get_paths()["stdlib"]), "")
    for package in packages:
        import importlib.util

        spec = importlib.util.find_spec(package)
        if spec is None:
            raise BatchlabInputError(
                f"codesearch: package {package!r} is not installed; pass names of installed packages (e.g. 'numpy')"
            )
        if spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                files += _python_files(Path(location), package)
        elif spec.origin and spec.origin.endswith(".py"):
            files.append((Path(spec.origin), package))
    return files


def _source_hash(files: Sequence[tuple[Path, str]], settings: dict) -> str:
    digest = hashlib.sha256(json.dumps({"v": HARVEST_VERSION, "python": sys.version, **settings}).encode())
    for path, module in files:
        stat = path.stat()
        digest.update(f"{path}\0{module}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def is_test_module(module: str, test_fraction: float) -> bool:
    """Deterministic split by module: a hash of the name below ``test_fraction`` means test."""
    h = int.from_bytes(hashlib.sha1(module.encode()).digest()[:8], "big") / 2**64
    return h < test_fraction


def harvest(files: Sequence[tuple[Path, str]], *, body_lines: int = 5, progress: bool = True) -> list[CodePair]:
    """Pairs from ``files``, with duplicate summaries and duplicate documents dropped (first kept)."""
    from tqdm.auto import tqdm

    pairs, seen_queries, seen_documents = [], set(), set()
    for path, module in tqdm(files, desc="harvesting codesearch", unit="file", disable=not progress, leave=False):
        for pair in harvest_file(path, module, body_lines=body_lines):
            if pair.query in seen_queries or pair.document in seen_documents:
                continue
            seen_queries.add(pair.query)
            seen_documents.add(pair.document)
            pairs.append(pair)
    return pairs


def default_cache_dir() -> Path:
    return Path(os.environ.get("BATCHLAB_CACHE", Path.home() / ".cache" / "batchlab"))


def load_codesearch(
    split: str = "train",
    *,
    packages: Sequence[str] = (),
    test_fraction: float = 0.2,
    body_lines: int = 5,
    cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
    progress: bool = True,
) -> CodeSearchPairs:
    """Load a split (``"train"``, ``"test"`` or ``"all"``) of the ``codesearch`` pairs.

    Parameters
    ----------
    split:
        ``"train"``, ``"test"`` (modules whose name hash is below ``test_fraction``) or ``"all"``.
    packages:
        Installed packages to harvest besides the standard library (e.g. ``("numpy",)``).
    test_fraction:
        Share of *modules* (not pairs) that go to the test split.
    body_lines:
        How many source lines of the body follow the signature in each document.
    cache_dir:
        Where the harvested pairs are cached (default ``~/.cache/batchlab`` or ``$BATCHLAB_CACHE``).
    refresh:
        Harvest again even when a cache entry exists.

    Returns
    -------
    CodeSearchPairs
        ``dataset[i] -> (query, document)``; parallel lists ``queries``, ``documents``,
        ``modules``, ``names``; ``source_hash`` identifies the sources and settings.
    """
    if split not in ("train", "test", "all"):
        raise BatchlabInputError(f"codesearch: split must be 'train', 'test' or 'all', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise BatchlabInputError(f"codesearch: test_fraction must be in (0, 1), got {test_fraction}")
    if body_lines < 0:
        raise BatchlabInputError(f"codesearch: body_lines must be >= 0, got {body_lines}")
    files = source_files(packages)
    source_hash = _source_hash(files, {"packages": list(packages), "body_lines": body_lines})
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"codesearch-{source_hash}.json"
    pairs = None
    if cache_file.exists() and not refresh:
        try:
            pairs = [CodePair(*row) for row in json.loads(cache_file.read_text())["pairs"]]
        except (ValueError, KeyError, TypeError):
            logger.warning("codesearch: ignoring an unreadable cache file %s", cache_file)
    if pairs is None:
        pairs = harvest(files, body_lines=body_lines, progress=progress)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        rows = [[p.query, p.document, p.module, p.name] for p in pairs]
        tmp.write_text(json.dumps({"source_hash": source_hash, "pairs": rows}))
        tmp.replace(cache_file)  # atomic, so a concurrent reader never sees half a file
        logger.info("codesearch: harvested %d pairs from %d files into %s", len(pairs), len(files), cache_file)
    if split != "all":
        want_test = split == "test"
        pairs = [p for p in pairs if is_test_module(p.module, test_fraction) == want_test]
    return CodeSearchPairs(pairs, split, source_hash)
