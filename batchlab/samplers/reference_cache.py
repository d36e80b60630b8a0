"""Reference-model embeddings cached on disk, so the JEST reference costs nothing in training.

JEST scores every super-batch with a frozen reference model. Its embeddings of an
example never change, so they are computed once per example (dataset index) and
stored in memory-mapped ``.npy`` files next to a ``meta.json`` that records the
reference model's hash (:func:`model_hash`, a SHA-256 of its ``state_dict``). Opening a
cache with another model's hash raises :class:`~batchlab.errors.StaleArtifactError`
instead of silently scoring with embeddings of a different model.

Layout of ``root``::

    meta.json        {"model_hash", "num_examples", "fields": {name: dim}, "dtype", "meta"}
    <field>.npy      (num_examples, dim) memory-mapped rows, one per example id
    filled.npy       (num_examples,) bool: which rows hold an embedding

Rows are written, flushed, and only then marked filled, so an interrupted fill leaves
rows "missing", never half-written. One writer at a time; any number of readers.

Example
-------
>>> import tempfile, torch
>>> root = tempfile.mkdtemp()
>>> cache = ReferenceEmbeddingCache(root, "abc123", num_examples=10, fields={"q": 4, "k": 4})
>>> cache.put(torch.tensor([2, 5]), q=torch.ones(2, 4), k=torch.zeros(2, 4))
>>> cache.contains(torch.tensor([2, 3])).tolist()
[True, False]
>>> ReferenceEmbeddingCache(root, "abc123").get(torch.tensor([5]))["q"].shape
torch.Size([1, 4])
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from batchlab._artifacts import check_writable_directory, write_text
from batchlab._checks import check_finite, check_positive_int
from batchlab.errors import BatchlabInputError, StaleArtifactError

logger = logging.getLogger(__name__)

__all__ = ["ReferenceEmbeddingCache", "model_hash"]

_DTYPES = {"float16": np.float16, "float32": np.float32}
_META = "meta.json"
_FILLED = "filled.npy"


def model_hash(model: torch.nn.Module | Mapping[str, object]) -> str:
    """SHA-256 (hex) of a model's ``state_dict``: names, dtypes, shapes and bytes, in sorted order.

    Parameters
    ----------
    model : nn.Module or a state_dict mapping

    Examples
    --------
    >>> m = torch.nn.Linear(2, 2)
    >>> model_hash(m) == model_hash(m.state_dict())
    True
    """
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    if not isinstance(state, Mapping):
        raise BatchlabInputError(f"model must be an nn.Module or a state_dict mapping, got {type(model).__name__}")
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(value.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


class ReferenceEmbeddingCache:
    """Open (or create) an on-disk cache of one reference model's embeddings per example id.

    Parameters
    ----------
    root : str or Path
        Directory of the cache.
    model_hash : str
        The reference model's :func:`model_hash`. An existing cache built with another
        hash raises :class:`~batchlab.errors.StaleArtifactError`.
    num_examples : int, optional
        Number of example ids (``0 .. num_examples - 1``); needed to create the cache.
    fields : dict[str, int], optional
        Embedding name -> dimension, e.g. ``{"q": 512, "k": 512}``; needed to create.
    dtype : "float16" | "float32"
        Storage dtype (float16 halves the disk; ``get`` returns float32 by default).
    meta : dict, optional
        JSON-serialisable extras stored on creation (e.g. the reference ``logit_scale``).
    overwrite : bool
        Delete whatever is at ``root`` and create a fresh cache.
    """

    def __init__(
        self,
        root: str | Path,
        model_hash: str,
        *,
        num_examples: int | None = None,
        fields: Mapping[str, int] | None = None,
        dtype: str = "float16",
        meta: Mapping | None = None,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(model_hash, str) or not model_hash:
            raise BatchlabInputError(f"model_hash must be a non-empty string (see model_hash(model)), got {model_hash!r}")
        self.root = Path(root)
        if overwrite and self.root.exists():
            # only a cache (or what an interrupted creation left) is ours to delete, never a directory
            # of the user's files passed by mistake
            check_writable_directory(self.root, kind="reference cache", owned=self._owned(fields))
            shutil.rmtree(self.root)
        if (self.root / _META).exists():
            self._open(model_hash, num_examples, fields)
        else:
            self._create(model_hash, num_examples, fields, dtype, meta)

    # ------------------------------------------------------------------ create / open

    def _create(self, model_hash, num_examples, fields, dtype, meta) -> None:
        if num_examples is None or fields is None:
            raise BatchlabInputError(
                f"no cache at {self.root}; pass num_examples= and fields= (e.g. {{'q': 512, 'k': 512}}) to create one"
            )
        check_positive_int("num_examples", num_examples)
        if not isinstance(fields, Mapping) or not fields:
            raise BatchlabInputError(f"fields must be a non-empty dict name -> dim, got {fields!r}")
        for name, dim in fields.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise BatchlabInputError(f"field names must be identifiers (they become file names), got {name!r}")
            check_positive_int(f"fields[{name!r}]", dim)
        if dtype not in _DTYPES:
            raise BatchlabInputError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        # the field files would overwrite same-named files of a directory that is not a cache
        check_writable_directory(self.root, kind="reference cache", owned=self._owned(fields))
        self.root.mkdir(parents=True, exist_ok=True)
        info = {"model_hash": model_hash, "num_examples": int(num_examples), "fields": dict(fields),
                "dtype": dtype, "meta": dict(meta or {})}
        for name, dim in fields.items():
            np.lib.format.open_memmap(self.root / f"{name}.npy", mode="w+", dtype=_DTYPES[dtype],
                                      shape=(num_examples, dim)).flush()
        np.lib.format.open_memmap(self.root / _FILLED, mode="w+", dtype=np.bool_, shape=(num_examples,)).flush()
        # meta.json last: a directory without it is not a cache yet
        write_text(self.root / _META, json.dumps(info, indent=2))  # atomic: never a half-written meta.json
        self._load(info)
        logger.info("created reference cache at %s (%d examples, fields %s)", self.root, num_examples, dict(fields))

    def _owned(self, fields: Mapping[str, int] | None) -> set[str]:
        """The file names a cache at ``root`` may hold: ``meta.json``, ``filled.npy`` and the field arrays."""
        names = {str(name) for name in (fields or {})}
        try:
            names |= {str(name) for name in json.loads((self.root / _META).read_text())["fields"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no (readable) meta.json: only the given fields' files
        return {_META, _FILLED} | {f"{name}.npy" for name in names}

    def _open(self, model_hash, num_examples, fields) -> None:
        try:
            info = json.loads((self.root / _META).read_text())
            info = {key: info[key] for key in ("model_hash", "num_examples", "fields", "dtype", "meta")}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise StaleArtifactError(
                f"the reference cache at {self.root} has an unreadable {_META} ({type(exc).__name__}: {exc}); "
                "pass overwrite=True to rebuild it"
            ) from exc
        if info["model_hash"] != model_hash:
            raise StaleArtifactError(
                f"the reference cache at {self.root} holds embeddings of model {info['model_hash'][:16]}..., "
                f"but the reference model now hashes to {model_hash[:16]}...; the cached embeddings are stale. "
                "Use a new directory, or pass overwrite=True to rebuild"
            )
        if num_examples is not None and num_examples != info["num_examples"]:
            raise StaleArtifactError(
                f"the reference cache at {self.root} has {info['num_examples']} examples, not {num_examples}; "
                "the dataset changed: pass overwrite=True to rebuild"
            )
        if fields is not None and dict(fields) != info["fields"]:
            raise StaleArtifactError(
                f"the reference cache at {self.root} stores fields {info['fields']}, not {dict(fields)}; "
                "pass overwrite=True to rebuild"
            )
        self._load(info)

    def _load(self, info: dict) -> None:
        self.model_hash: str = info["model_hash"]
        self.num_examples: int = info["num_examples"]
        self.fields: dict[str, int] = info["fields"]
        self.dtype: str = info["dtype"]
        self.meta: dict = info["meta"]
        expected = {name: (self.num_examples, dim) for name, dim in self.fields.items()}
        try:
            self._arrays = {name: np.load(self.root / f"{name}.npy", mmap_mode="r+") for name in self.fields}
            self._filled = np.load(self.root / _FILLED, mmap_mode="r+")
        except (ValueError, OSError) as exc:  # a missing or truncated field file
            raise StaleArtifactError(
                f"the reference cache at {self.root} is incomplete ({type(exc).__name__}: {exc}); "
                "pass overwrite=True to rebuild it"
            ) from exc
        shapes = {name: arr.shape for name, arr in self._arrays.items()}
        if shapes != expected or self._filled.shape != (self.num_examples,):
            raise StaleArtifactError(
                f"the reference cache at {self.root} holds arrays of shapes {shapes} (filled "
                f"{self._filled.shape}), expected {expected}; pass overwrite=True to rebuild it"
            )

    # ------------------------------------------------------------------ reading and writing

    @property
    def num_filled(self) -> int:
        """How many examples have cached embeddings."""
        return int(self._filled.sum())

    def contains(self, ids) -> torch.Tensor:
        """BoolTensor (len(ids),): which ids are cached."""
        return torch.from_numpy(self._filled[self._ids(ids)].copy())

    def put(self, ids, **values: torch.Tensor) -> None:
        """Store the rows ``values[name][j]`` for example ``ids[j]`` (every field at once)."""
        idx = self._ids(ids)
        if len(np.unique(idx)) != len(idx):
            raise BatchlabInputError("ids passed to put() must be unique")
        if set(values) != set(self.fields):
            raise BatchlabInputError(f"put() needs exactly the fields {sorted(self.fields)}, got {sorted(values)}")
        for name, value in values.items():
            if not isinstance(value, torch.Tensor) or value.shape != (len(idx), self.fields[name]):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise BatchlabInputError(
                    f"{name} must be a tensor of shape ({len(idx)}, {self.fields[name]}), got {shape}"
                )
            check_finite(name, value)
        for name, value in values.items():
            self._arrays[name][idx] = value.detach().float().cpu().numpy().astype(_DTYPES[self.dtype])
            self._arrays[name].flush()
        self._filled[idx] = True
        self._filled.flush()

    def get(self, ids, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> dict:
        """Cached embeddings of ``ids``: ``{name: Tensor (len(ids), dim)}``; every id must be cached."""
        idx = self._ids(ids)
        missing = idx[~self._filled[idx]]
        if missing.size:
            raise BatchlabInputError(
                f"{missing.size} of {idx.size} ids are not cached (first: {missing[:5].tolist()}); "
                "fill the cache first (fill / get_or_compute)"
            )
        return {name: torch.from_numpy(np.asarray(arr[idx])).to(device=device, dtype=dtype)
                for name, arr in self._arrays.items()}

    def get_or_compute(self, ids, compute: Callable[[torch.Tensor], Mapping[str, torch.Tensor]], **get_kwargs) -> dict:
        """Like :meth:`get`, computing (and storing) missing rows with ``compute(missing_ids)``.

        ``compute`` receives a LongTensor of the missing ids and returns ``{name: (m, dim)}``.
        """
        idx = self._ids(ids)
        missing = np.unique(idx[~self._filled[idx]])
        if missing.size:
            ids_t = torch.from_numpy(missing)
            with torch.no_grad():
                self.put(ids_t, **compute(ids_t))
        return self.get(idx, **get_kwargs)

    def fill(self, compute: Callable[[torch.Tensor], Mapping[str, torch.Tensor]], *, ids: Iterable[int] | None = None,
             batch_size: int = 1024, progress: bool = True) -> None:
        """Compute every missing row of ``ids`` (default: all) in batches, with a progress bar."""
        from tqdm.auto import tqdm

        check_positive_int("batch_size", batch_size)
        idx = np.arange(self.num_examples) if ids is None else self._ids(ids)
        todo = np.unique(idx[~self._filled[idx]])
        for lo in tqdm(range(0, todo.size, batch_size), disable=not progress, desc="reference embeddings"):
            chunk = torch.from_numpy(todo[lo:lo + batch_size])
            with torch.no_grad():
                self.put(chunk, **compute(chunk))

    def _ids(self, ids) -> np.ndarray:
        arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(list(ids) if not
                                                                                      isinstance(ids, np.ndarray) else ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise BatchlabInputError(f"ids must be a 1-D sequence of integer example ids, got {arr.dtype} of shape {arr.shape}")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_examples):
            raise BatchlabInputError(
                f"ids must be in [0, {self.num_examples}), got values in [{arr.min()}, {arr.max()}]"
            )
        return arr
