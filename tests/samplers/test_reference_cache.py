"""ReferenceEmbeddingCache and model_hash: round trips, staleness, compute-on-miss, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.samplers.reference_cache import ReferenceEmbeddingCache, model_hash


def test_model_hash_tracks_weights_not_key_order():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    h = model_hash(m)
    reordered = dict(reversed(list(m.state_dict().items())))
    assert model_hash(reordered) == h
    with torch.no_grad():
        m[0].weight[0, 0] += 1e-3
    assert model_hash(m) != h
    assert model_hash(m.to(torch.bfloat16)) != model_hash(m.float())  # dtype is part of the hash


def test_round_trip_and_reopen(tmp_path, gen):
    q, k = torch.randn(20, 6, generator=gen), torch.randn(20, 6, generator=gen)
    cache = ReferenceEmbeddingCache(tmp_path / "c", "h1", num_examples=20, fields={"q": 6, "k": 6},
                                    dtype="float32", meta={"logit_scale": 14.3})
    ids = torch.tensor([3, 0, 17, 8])
    cache.put(ids, q=q[ids], k=k[ids])
    again = ReferenceEmbeddingCache(tmp_path / "c", "h1")
    assert again.num_filled == 4 and again.meta == {"logit_scale": 14.3}
    out = again.get(torch.tensor([17, 3]))
    assert torch.equal(out["q"], q[[17, 3]]) and torch.equal(out["k"], k[[17, 3]])
    assert again.contains([0, 1, 8]).tolist() == [True, False, True]


def test_float16_storage_is_close(tmp_path, gen):
    q = torch.nn.functional.normalize(torch.randn(10, 32, generator=gen), dim=1)
    cache = ReferenceEmbeddingCache(tmp_path, "h", num_examples=10, fields={"q": 32})
    cache.put(range(10), q=q)
    # float16 keeps 11 significant bits: relative error <= 2**-11 on unit-norm entries
    torch.testing.assert_close(cache.get(range(10))["q"], q, rtol=2**-11, atol=1e-6)


def test_get_or_compute_only_computes_missing(tmp_path, gen):
    table = torch.randn(30, 4, generator=gen)
    calls = []

    def encode(ids):
        calls.append(ids.tolist())
        return {"q": table[ids]}

    cache = ReferenceEmbeddingCache(tmp_path, "h", num_examples=30, fields={"q": 4}, dtype="float32")
    out = cache.get_or_compute(torch.tensor([5, 1, 5, 9]), encode)
    assert calls == [[1, 5, 9]] and torch.equal(out["q"], table[[5, 1, 5, 9]])
    cache.get_or_compute(torch.tensor([9, 2]), encode)
    assert calls[-1] == [2]
    cache.fill(encode, batch_size=7, progress=False)
    assert cache.num_filled == 30 and torch.equal(cache.get(range(30))["q"], table)
    assert len(calls) == 2 + 4  # 26 remaining ids in batches of 7


def test_stale_model_hash_raises(tmp_path):
    ReferenceEmbeddingCache(tmp_path, "old", num_examples=5, fields={"q": 2})
    with pytest.raises(StaleArtifactError, match="stale"):
        ReferenceEmbeddingCache(tmp_path, "new")
    with pytest.raises(StaleArtifactError, match="examples"):
        ReferenceEmbeddingCache(tmp_path, "old", num_examples=6)
    with pytest.raises(StaleArtifactError, match="fields"):
        ReferenceEmbeddingCache(tmp_path, "old", fields={"q": 3})
    fresh = ReferenceEmbeddingCache(tmp_path, "new", num_examples=5, fields={"q": 2}, overwrite=True)
    assert fresh.model_hash == "new" and fresh.num_filled == 0


def test_bad_input(tmp_path):
    with pytest.raises(BatchlabInputError, match="num_examples"):
        ReferenceEmbeddingCache(tmp_path / "none", "h")
    with pytest.raises(BatchlabInputError, match="dtype"):
        ReferenceEmbeddingCache(tmp_path / "a", "h", num_examples=4, fields={"q": 2}, dtype="bfloat16")
    with pytest.raises(BatchlabInputError, match="field names"):
        ReferenceEmbeddingCache(tmp_path / "b", "h", num_examples=4, fields={"../q": 2})
    cache = ReferenceEmbeddingCache(tmp_path / "c", "h", num_examples=4, fields={"q": 2})
    with pytest.raises(BatchlabInputError, match="not cached"):
        cache.get([1])
    with pytest.raises(BatchlabInputError, match=r"in \[0, 4\)"):
        cache.put([4], q=torch.zeros(1, 2))
    with pytest.raises(BatchlabInputError, match="shape"):
        cache.put([1], q=torch.zeros(1, 3))
    with pytest.raises(BatchlabInputError, match="fields"):
        cache.put([1], k=torch.zeros(1, 2))
    with pytest.raises(BatchlabInputError, match="non-finite"):
        cache.put([1], q=torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(BatchlabInputError, match="unique"):
        cache.put([1, 1], q=torch.zeros(2, 2))
    with pytest.raises(BatchlabInputError, match="integer"):
        cache.contains(np.array([0.5]))
    assert cache.num_filled == 0  # nothing half-written by the failed puts
