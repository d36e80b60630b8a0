"""Audit of the on-disk artifacts' loaders against foreign files: a file of another format
under the expected name is a StaleArtifactError (never a TypeError from deep inside numpy),
whether it comes alone (negatives.npz) or inside a directory with a manifest that matches it
(a hand-assembled index directory)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from batchlab._artifacts import read_npz, write_directory
from batchlab.errors import StaleArtifactError
from batchlab.index import ARTIFACT_KIND, EmbeddingIndex
from batchlab.samplers import MinedNegatives


@pytest.mark.parametrize("foreign", ["npy", "npy-pickle"])
def test_a_single_npy_array_saved_as_npz_is_refused(tmp_path, foreign):
    path = tmp_path / "negatives.npz"
    with open(path, "wb") as f:  # np.save on a file object keeps the name: a .npy under .npz
        np.save(f, np.arange(5) if foreign == "npy" else np.array([{"a": 1}], dtype=object))
    with pytest.raises(StaleArtifactError, match="not a complete"):
        MinedNegatives.load(path)
    with pytest.raises(StaleArtifactError, match="not a complete"):
        read_npz(path, ("meta",), what="teacher-embeddings", rebuild="x")


def test_an_index_directory_with_a_foreign_lists_file_is_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(200, 4, generator=g), dim=1)
    EmbeddingIndex(x, kind="ivf-gemm", nlist=4, progress=False).save(tmp_path / "good")
    meta = json.loads((tmp_path / "good" / "meta.json").read_text())
    # the same meta.json, but ivfgemm.npz is a plain .npy array, and the manifest hashes it
    with write_directory(tmp_path / "bad", kind=ARTIFACT_KIND, n=200, d=4) as tmp:
        (tmp / "meta.json").write_text(json.dumps(meta))
        with open(tmp / "ivfgemm.npz", "wb") as f:
            np.save(f, np.zeros((4, 4), np.float32))
    with pytest.raises(StaleArtifactError, match="not a complete .npz"):
        EmbeddingIndex.load(tmp_path / "bad", x, progress=False)
    assert len(EmbeddingIndex.load(tmp_path / "good", x, progress=False)) == 200


def test_an_index_directory_with_an_npz_as_its_embeddings_is_refused(tmp_path):
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    EmbeddingIndex(x, kind="torch", progress=False).save(tmp_path / "good")
    meta = json.loads((tmp_path / "good" / "meta.json").read_text())
    with write_directory(tmp_path / "bad", kind=ARTIFACT_KIND, n=20, d=4) as tmp:
        (tmp / "meta.json").write_text(json.dumps(meta))
        with open(tmp / "embeddings.npy", "wb") as f:  # an archive under the .npy name, hashed by the manifest
            np.savez(f, embeddings=x.numpy())
    with pytest.raises(StaleArtifactError, match="not a readable .npy"):
        EmbeddingIndex.load(tmp_path / "bad", progress=False)
    assert torch.equal(EmbeddingIndex.load(tmp_path / "good", progress=False).embeddings, x)


@pytest.mark.parametrize("damage", ["entries are strings", "no n", "no d"])
def test_a_manifest_of_the_wrong_shape_is_refused(tmp_path, damage):
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(2))
    EmbeddingIndex(x, kind="torch", progress=False).save(tmp_path / "i")
    path = tmp_path / "i" / "manifest.json"
    manifest = json.loads(path.read_text())
    if damage == "entries are strings":
        manifest["files"] = {name: "x" for name in manifest["files"]}
    else:
        del manifest[damage[-1]]
    path.write_text(json.dumps(manifest))
    with pytest.raises(StaleArtifactError, match="unreadable"):
        EmbeddingIndex.load(tmp_path / "i", progress=False)


def test_a_build_directory_without_a_method_loads_with_the_default(tmp_path):
    from batchlab.samplers import CommunityBatchSampler
    from batchlab.samplers.communities import save_artifacts

    meta = {"n": 4, "d": 2, "group_size": 2, "rank_window": [0, 2], "teacher_hash": "x"}  # what save_artifacts requires
    save_artifacts(tmp_path / "b", groups=np.array([0, 0, 1, 1]), meta=meta)
    sampler = CommunityBatchSampler.from_artifacts(tmp_path / "b", 2)
    assert sampler.method == "metis" and sorted(sorted(b) for b in sampler) == [[0, 1], [2, 3]]
