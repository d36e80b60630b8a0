"""Artifacts on disk (issue 15, item 1): atomic writes, manifests with hashes, refusal of anything that does not match.

Every test can fail: each one changes, truncates, swaps or interrupts a real artifact and
checks that the loader refuses it (or that the previous artifact is still the one loaded).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from batchlab import _artifacts
from batchlab._artifacts import MANIFEST, atomic_file, read_manifest, write_directory
from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.index import EmbeddingIndex, content_hash
from batchlab.samplers import CommunityBatchSampler, MinedNegatives
from batchlab.samplers.communities import load_artifacts, save_artifacts
from batchlab.samplers.mining import mine_hard_negatives


def b3(n: int, *, k: int = 4, window: bool = False, seed: int = 0):
    """A small, valid build-batches payload for ``n`` examples (groups of ``k``)."""
    rng = np.random.default_rng(seed)
    x = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((n, 3)).astype(np.float32)), dim=1)
    groups = np.arange(n) // k
    meta = {"format": "batchlab-b3/1", "n": n, "d": 3, "group_size": k, "rank_window": [1, 3], "method": "metis",
            "teacher_hash": content_hash(x)}
    ids = np.stack([(np.arange(n) + s) % n for s in (1, 2)], axis=1).astype(np.int32) if window else None
    graph = sp.csr_matrix((n, n), dtype=np.float32)
    return x, dict(groups=groups, meta=meta, summary={"n": n}, graph=graph, window_ids=ids)


def tmp_siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# -- the manifest ------------------------------------------------------------------
def test_manifest_records_n_d_and_a_hash_of_every_file(tmp_path):
    x, payload = b3(12, window=True)
    save_artifacts(tmp_path / "b3", **payload)
    manifest = json.loads((tmp_path / "b3" / MANIFEST).read_text())
    assert manifest["n"] == 12 and manifest["d"] == 3 and manifest["kind"] == "b3-batches"
    assert sorted(manifest["files"]) == ["graph.npz", "groups.npy", "meta.json", "summary.json", "window_ids.npy"]
    for name, entry in manifest["files"].items():
        assert entry["blake2b"] == _artifacts.file_hash(tmp_path / "b3" / name)
    meta, groups, window = load_artifacts(tmp_path / "b3", embeddings=x)
    assert groups.tolist() == payload["groups"].tolist() and window.shape == (12, 2)
    assert tmp_siblings(tmp_path / "b3") == []  # no temporary left behind


@pytest.mark.parametrize("damage", ["changed", "truncated", "missing", "extra", "no-manifest", "bad-manifest", "kind"])
def test_any_file_that_does_not_match_is_refused(tmp_path, damage):
    x, payload = b3(12, window=True)
    d = save_artifacts(tmp_path / "b3", **payload)
    if damage == "changed":  # same shape, other values: only the hash can tell
        np.save(d / "groups.npy", payload["groups"][::-1].copy())
    elif damage == "truncated":
        raw = (d / "window_ids.npy").read_bytes()
        (d / "window_ids.npy").write_bytes(raw[: len(raw) // 2])
    elif damage == "missing":
        (d / "window_ids.npy").unlink()
    elif damage == "extra":  # e.g. a window_ids.npy copied in from another build
        np.save(d / "stale.npy", np.zeros(3))
    elif damage == "no-manifest":
        (d / MANIFEST).unlink()
    elif damage == "bad-manifest":
        (d / MANIFEST).write_text("{not json")
    else:
        manifest = json.loads((d / MANIFEST).read_text())
        (d / MANIFEST).write_text(json.dumps({**manifest, "kind": "embedding-index"}))
    with pytest.raises(StaleArtifactError):
        load_artifacts(d)
    with pytest.raises(StaleArtifactError):
        CommunityBatchSampler.from_artifacts(d, 8)


def test_swapped_groups_of_another_n_with_their_own_hash_are_refused(tmp_path):
    """The issue's case: groups.npy for N=600 beside meta.json for N=20,000 (here 8 beside 12)."""
    _, small = b3(8)
    _, large = b3(12)
    save_artifacts(tmp_path / "small", **small)
    save_artifacts(tmp_path / "large", **large)
    os.replace(tmp_path / "small" / "groups.npy", tmp_path / "large" / "groups.npy")
    with pytest.raises(StaleArtifactError, match="groups.npy"):
        load_artifacts(tmp_path / "large")


@pytest.mark.parametrize("bad", [12, -2])
def test_out_of_range_window_ids_are_refused_at_load(tmp_path, bad):
    x, payload = b3(12, window=True)
    payload["window_ids"][3, 1] = bad  # written with a valid manifest: only the range check can catch it
    save_artifacts(tmp_path / "b3", **payload)
    with pytest.raises(StaleArtifactError, match="outside"):
        CommunityBatchSampler.from_artifacts(tmp_path / "b3", 8, extra_negatives=1)


def test_out_of_range_group_ids_and_wrong_embeddings_are_refused(tmp_path):
    x, payload = b3(12)
    payload["groups"] = payload["groups"].copy()
    payload["groups"][0] = 10**12
    save_artifacts(tmp_path / "b3", **payload)
    with pytest.raises(StaleArtifactError, match="outside"):
        load_artifacts(tmp_path / "b3")
    x, payload = b3(12)
    save_artifacts(tmp_path / "ok", **payload)
    with pytest.raises(StaleArtifactError, match="shape"):
        load_artifacts(tmp_path / "ok", embeddings=x[:10])
    with pytest.raises(StaleArtifactError, match="hash"):
        load_artifacts(tmp_path / "ok", embeddings=x.flip(0))


def test_a_rebuild_removes_what_it_does_not_rewrite(tmp_path):
    x, with_window = b3(12, window=True)
    save_artifacts(tmp_path / "b3", **with_window)
    assert CommunityBatchSampler.from_artifacts(tmp_path / "b3", 8, extra_negatives=1).window_ids is not None
    _, without = b3(12, seed=1)
    save_artifacts(tmp_path / "b3", **without)  # a rebuild without --save-window
    assert not (tmp_path / "b3" / "window_ids.npy").exists()
    with pytest.raises(BatchlabInputError, match="extra_negatives"):
        CommunityBatchSampler.from_artifacts(tmp_path / "b3", 8, extra_negatives=1)


def test_a_writer_that_fails_after_the_first_file_leaves_the_previous_build(tmp_path, monkeypatch):
    x, old = b3(12, window=True)
    save_artifacts(tmp_path / "b3", **old)
    before = {p.name: p.read_bytes() for p in (tmp_path / "b3").iterdir()}
    real_save, calls = np.save, []

    def crash_after_first(*args, **kwargs):
        calls.append(args[0])
        if len(calls) > 1:
            raise KeyboardInterrupt("killed mid-write")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", crash_after_first)
    _, new = b3(20, window=True, seed=1)
    with pytest.raises(KeyboardInterrupt):
        save_artifacts(tmp_path / "b3", **new)
    monkeypatch.undo()
    assert len(calls) == 2 and Path(calls[0]).parent != tmp_path / "b3"  # it wrote beside, not in place
    assert {p.name: p.read_bytes() for p in (tmp_path / "b3").iterdir()} == before
    assert load_artifacts(tmp_path / "b3", embeddings=x)[1].size == 12
    assert tmp_siblings(tmp_path / "b3") == []


_KILLED_WRITER = """
import os, signal, sys
import numpy as np
from tests.test_artifacts import b3
from batchlab.samplers.communities import save_artifacts
real = np.save
def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # a preempted node: no cleanup, no finally
np.save = save_then_die
save_artifacts(sys.argv[1], **b3(20, window=True, seed=1)[1])
"""


def test_a_killed_writer_leaves_the_previous_build_and_its_temporary_is_cleaned_later(tmp_path):
    x, old = b3(12, window=True)
    target = tmp_path / "b3"
    save_artifacts(target, **old)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], cwd=root, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert load_artifacts(target, embeddings=x)[1].size == 12  # the previous build, intact and verified
    leftovers = tmp_siblings(target)
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0]  # what the killed writer was writing
    save_artifacts(target, **b3(16, seed=2)[1])  # the next writer removes it (its pid is gone)
    assert tmp_siblings(target) == [] and load_artifacts(target)[1].size == 16


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_concurrent_writers_never_leave_a_mixed_directory(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_artifacts, "_exchange", lambda a, b: False)
    target = tmp_path / "b3"
    payloads = {n: b3(n, window=True, seed=n)[1] for n in (8, 40)}
    errors: list[BaseException] = []
    seen: set[int] = set()
    stop = threading.Event()

    def writer(n):
        try:
            for _ in range(15):
                save_artifacts(target, **payloads[n])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader():
        while not stop.is_set():
            try:
                meta, groups, window = load_artifacts(target)
            except BatchlabInputError as exc:  # absent for an instant (two-rename fallback only)
                if exchange or "nothing there" not in str(exc):
                    errors.append(exc)
                continue
            if not (meta["n"] == groups.size == window.shape[0]):
                errors.append(AssertionError(f"mixed directory: meta n={meta['n']}, groups {groups.size}"))
            seen.add(meta["n"])

    save_artifacts(target, **payloads[8])
    threads = [threading.Thread(target=writer, args=(n,)) for n in (8, 40)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join()
    stop.set()
    threads[2].join()
    assert not errors, errors[:3]
    assert seen and seen <= {8, 40}  # the reader did read, and only whole builds
    meta, groups, _ = load_artifacts(target)  # the last complete writer's build, whole
    assert meta["n"] == groups.size in (8, 40)
    assert tmp_siblings(target) == []


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    _, payload = b3(12)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("do not delete")
    with pytest.raises(BatchlabInputError, match="not a b3-batches artifact"):
        save_artifacts(tmp_path / "mine", **payload)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "do not delete"
    (tmp_path / "file").write_text("x")
    with pytest.raises(BatchlabInputError, match="is a file"):
        save_artifacts(tmp_path / "file", **payload)
    # an older, manifest-less build (or an interrupted one) of the same files may be replaced
    (tmp_path / "old").mkdir()
    np.save(tmp_path / "old" / "groups.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(StaleArtifactError, match="no manifest"):
        load_artifacts(tmp_path / "old")
    save_artifacts(tmp_path / "old", **payload)
    assert load_artifacts(tmp_path / "old")[1].size == 12


def test_write_directory_and_atomic_file_keep_the_old_content_on_error(tmp_path):
    with write_directory(tmp_path / "a", kind="k", n=1, d=None) as tmp:
        (tmp / "x.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with write_directory(tmp_path / "a", kind="k", n=2, d=None) as tmp:
            (tmp / "x.txt").write_text("new")
            raise RuntimeError("boom")
    assert read_manifest(tmp_path / "a", kind="k")["n"] == 1 and (tmp_path / "a" / "x.txt").read_text() == "old"
    (tmp_path / "f.pt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "f.pt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert (tmp_path / "f.pt").read_text() == "old" and tmp_siblings(tmp_path / "f.pt") == []


# -- EmbeddingIndex ----------------------------------------------------------------
@pytest.fixture
def unit_rows():
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1)


def test_index_with_swapped_embeddings_is_refused(tmp_path, unit_rows):
    EmbeddingIndex(unit_rows, kind="torch", progress=False).save(tmp_path / "ix")
    np.save(tmp_path / "ix" / "embeddings.npy", unit_rows.flip(0).numpy())  # same shape, other rows
    with pytest.raises(StaleArtifactError, match="embeddings.npy"):
        EmbeddingIndex.load(tmp_path / "ix")


@pytest.mark.parametrize("kind,file", [("flat", "index.faiss"), ("ivf-gemm", "ivfgemm.npz")])
def test_index_with_a_corrupt_or_missing_file_is_refused(tmp_path, unit_rows, kind, file):
    pytest.importorskip("faiss") if kind == "flat" else None
    kwargs = {"nlist": 2} if kind == "ivf-gemm" else {}
    EmbeddingIndex(unit_rows, kind=kind, progress=False, **kwargs).save(tmp_path / "ix")
    (tmp_path / "ix" / file).write_bytes(b"garbage")
    with pytest.raises(StaleArtifactError, match=file):
        EmbeddingIndex.load(tmp_path / "ix", unit_rows)
    (tmp_path / "ix" / file).unlink()
    with pytest.raises(StaleArtifactError, match="missing"):
        EmbeddingIndex.load(tmp_path / "ix", unit_rows)


def test_index_save_is_atomic_and_replaces_the_old_kind(tmp_path, unit_rows, monkeypatch):
    EmbeddingIndex(unit_rows, kind="torch", progress=False).save(tmp_path / "ix")
    EmbeddingIndex(unit_rows, kind="ivf-gemm", nlist=2, progress=False).save(tmp_path / "ix")
    assert not (tmp_path / "ix" / "embeddings.npy").exists()  # no file of the old kind survives
    assert EmbeddingIndex.load(tmp_path / "ix", unit_rows).kind == "ivf-gemm"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        EmbeddingIndex(unit_rows[:30], kind="torch", progress=False).save(tmp_path / "ix")
    monkeypatch.undo()
    assert len(EmbeddingIndex.load(tmp_path / "ix", unit_rows)) == 60


# -- MinedNegatives ----------------------------------------------------------------
@pytest.fixture
def mined(unit_rows):
    return mine_hard_negatives(unit_rows, unit_rows, [[i] for i in range(60)], num_negatives=3, progress=False,
                               index_kwargs={"kind": "torch"})


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_mined_negatives_truncated_or_corrupt_are_refused(tmp_path, mined, damage):
    path = mined.save(tmp_path / "negatives.npz")
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"PK\x03\x04" + b"x" * 100, "empty": b""}[damage])
    with pytest.raises(StaleArtifactError, match="not a complete"):
        MinedNegatives.load(path)


def test_mined_negatives_that_disagree_are_refused(tmp_path, mined, unit_rows):
    short = MinedNegatives(mined.negative_ids[:10], mined.scores[:10], mined.positive_scores, mined.num_candidates,
                           params=mined.params, teacher_hash=mined.teacher_hash)
    with pytest.raises(StaleArtifactError, match="disagree"):  # 10 rows of ids for 60 queries
        MinedNegatives.load(short.save(tmp_path / "short.npz"))
    out_of_range = mined.negative_ids.clone()
    out_of_range[5, 0] = 60
    bad = MinedNegatives(out_of_range, mined.scores, mined.positive_scores, mined.num_candidates,
                         params=mined.params, teacher_hash=mined.teacher_hash)
    with pytest.raises(StaleArtifactError, match="outside"):
        MinedNegatives.load(bad.save(tmp_path / "range.npz"))
    path = mined.save(tmp_path / "ok.npz")
    with pytest.raises(StaleArtifactError, match="rows"):
        MinedNegatives.load(path, unit_rows[:50], unit_rows)
    # an array replaced inside the file: its saved hash no longer matches
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["negative_ids"] = arrays["negative_ids"][::-1].copy()
    np.savez(path, **arrays)
    with pytest.raises(StaleArtifactError, match="hash"):
        MinedNegatives.load(path)


def test_a_killed_mine_keeps_the_previous_negatives(tmp_path, mined, monkeypatch):
    path = mined.save(tmp_path / "negatives.npz")
    real = np.savez

    def half_then_die(file, **arrays):
        real(file, negative_ids=arrays["negative_ids"])
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(np, "savez", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        mined.save(path)
    monkeypatch.undo()
    assert torch.equal(MinedNegatives.load(path).negative_ids, mined.negative_ids)
    assert tmp_siblings(path) == []


# -- caches --------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["meta", "field", "shape"])
def test_reference_cache_with_a_damaged_file_is_refused(tmp_path, damage):
    from batchlab.samplers import ReferenceEmbeddingCache

    cache = ReferenceEmbeddingCache(tmp_path / "ref", "h", num_examples=5, fields={"q": 3})
    cache.put(torch.tensor([1]), q=torch.ones(1, 3))
    del cache
    if damage == "meta":
        (tmp_path / "ref" / "meta.json").write_text("{")
    elif damage == "field":
        (tmp_path / "ref" / "q.npy").write_bytes((tmp_path / "ref" / "q.npy").read_bytes()[:100])
    else:
        np.save(tmp_path / "ref" / "q.npy", np.zeros((4, 3), dtype=np.float16))
    with pytest.raises(StaleArtifactError, match="overwrite=True"):
        ReferenceEmbeddingCache(tmp_path / "ref", "h")
    assert ReferenceEmbeddingCache(tmp_path / "ref", "h", num_examples=5, fields={"q": 3}, overwrite=True).num_filled == 0
