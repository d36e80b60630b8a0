"""Atomic, self-checking artifacts on disk: write beside, fsync, rename into place; verify on load.

Every artifact batchlab writes (``build-batches`` directories, saved
:class:`~batchlab.index.EmbeddingIndex` directories, ``negatives.npz``, checkpoints)
goes through this module, so that

* **a killed writer leaves the previous good artifact intact**: files are written to
  a unique temporary name in the same parent directory, flushed to disk (``fsync``)
  and only then renamed over the old one (a rename within one file system is atomic);
* **two concurrent writers cannot produce a mixed artifact**: each writes its own
  temporary directory and swaps it in whole; the last complete writer wins;
* **a rebuild removes what it does not rewrite**: the whole directory is replaced, so
  no file of an older build (a stale ``window_ids.npy``) survives beside a new one;
* **a loader trusts nothing it did not check**: a directory artifact holds
  ``manifest.json`` with its kind, ``N``, ``d`` and the size and blake2b hash of every
  file; :func:`read_manifest` refuses any missing, extra, truncated or changed file
  with :class:`~batchlab.errors.StaleArtifactError`.

Single-file artifacts (``.npz``) carry the hashes of their arrays inside and are
checked by their loaders with :func:`array_hash` and :func:`read_npz`.

Example
-------
>>> import tempfile, numpy as np
>>> root = Path(tempfile.mkdtemp())
>>> with write_directory(root / "art", kind="demo", n=3, d=2) as tmp:
...     np.save(tmp / "x.npy", np.zeros((3, 2)))
>>> manifest = read_manifest(root / "art", kind="demo")
>>> manifest["n"], sorted(manifest["files"])
(3, ['x.npy'])
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import stat
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from batchlab.errors import BatchlabInputError, StaleArtifactError

__all__ = [
    "MANIFEST",
    "array_hash",
    "atomic_file",
    "check_writable_directory",
    "file_hash",
    "open_directory",
    "read_manifest",
    "read_npz",
    "write_directory",
    "write_text",
]

MANIFEST = "manifest.json"
FORMAT = "batchlab-artifact/1"
_CHUNK = 1 << 22  # bytes read per hashing step (bounded memory)


# -- hashing -------------------------------------------------------------------
def file_hash(path: str | Path) -> str:
    """blake2b (128-bit, hex) of a file's bytes, streamed in 4 MiB chunks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def array_hash(a: np.ndarray) -> str:
    """blake2b (128-bit, hex) of an array's shape, dtype and C-order bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.shape} {a.dtype.str}".encode())
    h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()


# -- durable writes ------------------------------------------------------------
def _fsync_path(path: Path, *, directory: bool = False) -> None:
    """Flush a file's (or a directory entry's) data to disk; a no-op where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path, tag: str) -> Path:
    """A unique sibling of ``path`` (same directory, so the final rename stays on one file system)."""
    return path.with_name(f".{path.name}.{tag}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove_dead_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` left by writers on this host that were killed (their pid is gone)."""
    host = socket.gethostname()
    for tag in ("tmp", "old"):
        for stale in path.parent.glob(f"{glob.escape(f'.{path.name}.{tag}-{host}-')}*"):
            pid = stale.name[len(f".{path.name}.{tag}-{host}-") :].split("-")[0]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # still running: maybe a concurrent writer
            except ProcessLookupError:
                pass
            except OSError:  # no permission to signal: it is alive
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    stale.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, fsync it and rename it onto ``path``.

    If the block raises (or the process dies), ``path`` keeps its previous content
    and the temporary file is removed (or, after a kill, left to the next writer to clean up).

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_file(target) as tmp:
    ...     _ = tmp.write_text("hello")
    >>> target.read_text()
    'hello'
    """
    path = Path(path)
    if path.is_dir():
        raise BatchlabInputError(f"{path} is a directory; expected a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(path)
    tmp = _temp_name(path, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to the temporary file {tmp}")
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write a small text file (JSON summaries) atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def check_writable_directory(path: str | Path, *, kind: str, owned: Iterable[str] = ()) -> Path:
    """Refuse to replace ``path`` unless it is absent, empty, or an artifact we may overwrite.

    A directory is ours to replace when it holds a :data:`MANIFEST` of the same
    ``kind``, or only files named in ``owned`` (the layout an older batchlab wrote,
    or what an interrupted writer of that layout left). Anything else (``--out .``, a
    directory of the user's files, a file) is refused with :class:`BatchlabInputError`,
    because replacing it would delete files we did not write.
    """
    path = Path(path)
    for _ in range(10):  # a concurrent writer may be swapping the directory while we look
        try:
            return _check_writable(path, kind, set(owned))
        except FileNotFoundError:
            continue
    return _check_writable(path, kind, set(owned))


def _check_writable(path: Path, kind: str, owned: set[str]) -> Path:
    if path.exists() and not path.is_dir():
        raise BatchlabInputError(
            f"{path} is a file, but the {kind} artifact is a directory; pass a directory path "
            "(a new one, or one written by the same command)"
        )
    if not path.is_dir():
        return path
    entries = set(os.listdir(path))
    if not entries:
        return path
    if MANIFEST in entries:
        try:
            found = json.loads((path / MANIFEST).read_text()).get("kind")
        except (ValueError, AttributeError):
            found = None
        if found == kind:
            return path
    elif entries <= owned | {MANIFEST}:
        return path
    raise BatchlabInputError(
        f"{path} already exists and is not a {kind} artifact (it holds {sorted(entries)[:5]}"
        f"{' ...' if len(entries) > 5 else ''}); writing would replace the whole directory. "
        "Choose a new or empty directory"
    )


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.ENOENT):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Make the complete directory ``tmp`` appear at ``path``; the old one (if any) is deleted.

    With ``renameat2`` (Linux) the swap is one atomic step. Elsewhere it is two renames
    (old aside, new in); a concurrent writer may slip in between, in which case the loop
    puts its directory aside too, so the last writer to finish wins and no directory is
    ever a mix of two writers. Only there, a writer killed between the two renames leaves
    ``path`` absent, with the previous artifact intact in ``.<name>.old-<host>-<pid>-*``.
    """
    aside: list[Path] = []
    while True:
        try:
            os.rename(tmp, path)  # path absent (or an empty directory)
            break
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if _exchange(tmp, path):  # tmp now holds the old artifact
            shutil.rmtree(tmp, ignore_errors=True)
            break
        old = _temp_name(path, "old")
        try:
            os.rename(path, old)
            aside.append(old)  # deleted only once the new one is in place
        except FileNotFoundError:
            continue  # a concurrent writer moved it aside first
    for old in aside:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def write_directory(
    path: str | Path, *, kind: str, n: int, d: int | None, owned: Iterable[str] = (), extra: dict | None = None
) -> Iterator[Path]:
    """Yield an empty temporary directory; on success, seal it with a manifest and swap it in at ``path``.

    Parameters
    ----------
    path : where the artifact lives (checked with :func:`check_writable_directory`).
    kind : the artifact's kind (e.g. ``"b3-batches"``); :func:`read_manifest` checks it.
    n, d : number of rows and their dimension, recorded for loaders to check.
    owned : file names an older, manifest-less version of this artifact held (may be replaced).
    extra : more JSON-serialisable facts for the manifest.

    Everything written into the yielded directory becomes the artifact; files of the
    previous artifact that are not rewritten are gone afterwards. If the block raises,
    the temporary directory is removed and ``path`` is untouched.
    """
    path = check_writable_directory(path, kind=kind, owned=owned)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(path)
    tmp = _temp_name(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        files = {}
        for entry in sorted(tmp.iterdir()):
            if not entry.is_file() or entry.name == MANIFEST:
                raise RuntimeError(f"artifact directories hold plain files only, found {entry.name}")
            _fsync_path(entry)
            files[entry.name] = {"bytes": entry.stat().st_size, "blake2b": file_hash(entry)}
        manifest = {"format": FORMAT, "kind": kind, "n": int(n), "d": None if d is None else int(d),
                    "files": files, **(extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync_path(tmp / MANIFEST)
        _fsync_path(tmp, directory=True)
        _swap_into_place(tmp, path)
        _fsync_path(path.parent, directory=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- verified reads ------------------------------------------------------------
class OpenArtifact:
    """A directory artifact whose files are all open and hash-checked: a consistent snapshot.

    The files were opened through one handle on the directory right after its manifest
    was read, so a writer swapping a new build in meanwhile cannot mix its files into
    this one (the open files keep their content even when the old directory is deleted).

    Attributes
    ----------
    path : the artifact's directory.
    manifest : its manifest (``kind``, ``n``, ``d``, ``files``).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], files: dict[str, BinaryIO], what: str, rebuild: str):
        self.path, self.manifest, self._files, self._what, self._rebuild = path, manifest, files, what, rebuild

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def file(self, name: str) -> BinaryIO:
        """The open file ``name``, rewound."""
        f = self._files[name]
        f.seek(0)
        return f

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.file(name).read().decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise StaleArtifactError(f"{self.path / name} is not valid JSON ({exc}); {self._rebuild}") from exc

    def npy(self, name: str) -> np.ndarray:
        try:
            loaded = np.load(self.file(name), allow_pickle=False)
            if not isinstance(loaded, np.ndarray):  # an .npz archive under a .npy name
                loaded.close()
                raise ValueError("it is an .npz archive, not a single .npy array")
            return loaded
        except (ValueError, OSError, EOFError) as exc:
            raise StaleArtifactError(f"{self.path / name} is not a readable .npy array ({exc}); {self._rebuild}") from exc

    def npz(self, name: str, names: Iterable[str]) -> dict[str, np.ndarray]:
        try:
            return _npz_arrays(self.file(name), names)
        except _NPZ_ERRORS as exc:
            raise StaleArtifactError(f"{self.path / name} is not a complete .npz file ({exc}); {self._rebuild}") from exc

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _open_all(path: Path) -> tuple[dict[str, Any], dict[str, BinaryIO], set[str], tuple[int, int]]:
    """Open ``manifest.json`` and the files it lists through one directory handle.

    Returns the manifest, the open files, the names present and the directory's identity
    (device, inode), which the caller compares with ``path`` afterwards: if they differ, a
    writer swapped the directory meanwhile and the listing may be of a half-deleted one.
    """
    if os.open in os.supports_dir_fd:
        dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        opener = lambda name, flags: os.open(name, flags, dir_fd=dfd)  # noqa: E731
        present = set(os.listdir(dfd))
        identity = _identity(os.fstat(dfd))
    else:  # pragma: no cover - Windows: by name (a concurrent swap is then caught by the hashes)
        dfd = None
        opener = lambda name, flags: os.open(path / name, flags)  # noqa: E731
        identity = _identity(os.stat(path))
        present = set(os.listdir(path))
    files: dict[str, BinaryIO] = {}
    try:
        if MANIFEST not in present:
            return {}, files, present, identity
        files[MANIFEST] = open(MANIFEST, "rb", opener=opener)
        manifest_bytes = files[MANIFEST].read()
        try:
            manifest = json.loads(manifest_bytes)
            listed = manifest["files"]
            if (not isinstance(listed, dict) or not all(isinstance(e, dict) for e in listed.values())
                    or not {"kind", "n", "d"} <= manifest.keys()):
                raise TypeError("no 'files' mapping of entries, or no 'kind', 'n' or 'd'")
        except (ValueError, KeyError, TypeError) as exc:
            manifest = {"_error": f"{type(exc).__name__}: {exc}"}
            return manifest, files, present, identity
        for name in listed:
            if name in present:
                files[name] = open(name, "rb", opener=opener)
        return manifest, files, present, identity
    except BaseException:
        for f in files.values():
            f.close()
        raise
    finally:
        if dfd is not None:
            os.close(dfd)


@contextlib.contextmanager
def open_directory(
    path: str | Path, *, kind: str, what: str | None = None, rebuild: str = "rebuild it"
) -> Iterator[OpenArtifact]:
    """Open every file of the directory artifact at ``path`` and check it against the manifest.

    Raises :class:`BatchlabInputError` when ``path`` is not a directory, and
    :class:`StaleArtifactError` when the manifest is missing, unreadable or of another
    kind, or when a file is missing, extra, or differs in size or hash. ``rebuild``
    finishes each message: how the user makes a good artifact.
    """
    path = Path(path)
    what = what or f"{kind} artifact"
    for attempt in range(5):
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except FileNotFoundError:
            raise BatchlabInputError(f"no {what} at {path} (nothing there); {rebuild}") from None
        if not is_dir:
            raise BatchlabInputError(f"no {what} at {path} (a file, not a directory); {rebuild}")
        try:
            manifest, files, present, identity = _open_all(path)
        except FileNotFoundError:  # a writer swapped a new build in while we opened this one: again
            continue
        try:
            swapped = _identity(os.stat(path)) != identity
        except FileNotFoundError:
            swapped = True
        if not swapped:
            break
        for f in files.values():  # the listing may be of a directory being deleted: again
            f.close()
    else:
        raise StaleArtifactError(f"{path} kept changing while it was read (concurrent writers?); try again")
    artifact = OpenArtifact(path, manifest, {k: v for k, v in files.items() if k != MANIFEST}, what, rebuild)
    try:
        _verify(artifact, present - {MANIFEST}, kind, files.get(MANIFEST) is not None)
        yield artifact
    finally:
        artifact.close()
        if MANIFEST in files:
            files[MANIFEST].close()


def _verify(artifact: OpenArtifact, present: set[str], kind: str, has_manifest: bool) -> None:
    path, manifest, rebuild, what = artifact.path, artifact.manifest, artifact._rebuild, artifact._what
    if not has_manifest:
        raise StaleArtifactError(
            f"{path} has no {MANIFEST}, so its files cannot be checked: it was written by an older batchlab or "
            f"by a writer that did not finish; {rebuild}"
        )
    if "_error" in manifest:
        raise StaleArtifactError(f"{path / MANIFEST} is unreadable ({manifest['_error']}); {rebuild}")
    if manifest["kind"] != kind:
        raise StaleArtifactError(f"{path} holds a {manifest['kind']!r} artifact, not a {what}; {rebuild}")
    listed = manifest["files"]
    missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
    if missing or extra:
        parts = [f"missing {missing}" if missing else "", f"not written with it {extra}" if extra else ""]
        raise StaleArtifactError(f"{path} does not match its manifest: {'; '.join(p for p in parts if p)}; {rebuild}")
    for name, entry in listed.items():
        f = artifact.file(name)
        size = os.fstat(f.fileno()).st_size
        h = hashlib.blake2b(digest_size=16)
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
        if size != entry.get("bytes") or h.hexdigest() != entry.get("blake2b"):
            raise StaleArtifactError(
                f"{path / name} is not the file this {what} was written with ({size} bytes, expected "
                f"{entry.get('bytes')}; or its content hash differs): it was changed, truncated or replaced; {rebuild}"
            )


def read_manifest(path: str | Path, *, kind: str, what: str | None = None, rebuild: str = "rebuild it") -> dict[str, Any]:
    """The manifest of the directory artifact at ``path``, after checking every file against it
    (see :func:`open_directory`, which loaders use to read the checked files themselves)."""
    with open_directory(path, kind=kind, what=what, rebuild=rebuild) as artifact:
        return artifact.manifest


_NPZ_ERRORS = (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError, zlib.error)


def _npz_arrays(source: Any, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` archive; a single ``.npy`` array (np.load returns no
    archive then) is a ValueError, like the other ways a file can fail to be one."""
    loaded = np.load(source, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"it holds a single .npy array of shape {getattr(loaded, 'shape', '?')}, not an .npz archive")
    with loaded as f:
        return {k: f[k] for k in names}


def read_npz(path: str | Path, names: Iterable[str], *, what: str, rebuild: str) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` file, loaded in full; a truncated or corrupt file is a
    :class:`StaleArtifactError`, a missing one a :class:`BatchlabInputError`."""
    path = Path(path)
    if not path.is_file():
        raise BatchlabInputError(f"no {what} file at {path}; {rebuild}")
    try:
        return _npz_arrays(path, names)
    except _NPZ_ERRORS as exc:
        raise StaleArtifactError(
            f"{path} is not a complete {what} file ({type(exc).__name__}: {exc}): truncated, corrupt or of "
            f"another kind; {rebuild}"
        ) from exc
