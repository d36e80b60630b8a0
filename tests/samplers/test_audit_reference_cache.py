"""Audit: ReferenceEmbeddingCache deletes or overwrites only what is its own.

``overwrite=True`` ran ``shutil.rmtree(root)`` on any existing path, and creating a cache in a
directory without ``meta.json`` wrote ``<field>.npy`` over same-named files there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchlab.errors import BatchlabInputError
from batchlab.samplers import ReferenceEmbeddingCache


def test_a_directory_of_other_files_is_neither_deleted_nor_overwritten(tmp_path):
    mine = tmp_path / "q.npy"
    np.save(mine, np.arange(3))
    (tmp_path / "notes.txt").write_text("keep me")
    for overwrite in (True, False):
        with pytest.raises(BatchlabInputError, match="is not a reference cache artifact"):
            ReferenceEmbeddingCache(tmp_path, "h", num_examples=4, fields={"q": 2}, overwrite=overwrite)
        assert np.load(mine).tolist() == [0, 1, 2] and (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_cache_or_an_interrupted_creation_is_replaced(tmp_path):
    cache = ReferenceEmbeddingCache(tmp_path / "c", "old", num_examples=4, fields={"q": 2})
    cache.put(torch.tensor([1]), q=torch.ones(1, 2))
    fresh = ReferenceEmbeddingCache(tmp_path / "c", "new", num_examples=4, fields={"k": 3}, overwrite=True)
    assert fresh.num_filled == 0 and not (tmp_path / "c" / "q.npy").exists()
    (tmp_path / "c" / "meta.json").unlink()  # killed before meta.json: only field files and filled.npy left
    again = ReferenceEmbeddingCache(tmp_path / "c", "new", num_examples=4, fields={"k": 3})
    assert again.num_filled == 0 and ReferenceEmbeddingCache(tmp_path / "c", "new").fields == {"k": 3}
