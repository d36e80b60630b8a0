"""EmbeddingIndex: exact kinds equal brute force, approximate kinds reach high recall on
planted clusters, exclude-self works with duplicates, save/load detects stale data."""

import numpy as np
import pytest
import torch

from batchlab.datasets.synthetic import gaussian_mixture
from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.index import EmbeddingIndex, content_hash, exact_search, knn


def brute_force(x, q, k, exclude=None):
    s = (q.double() @ x.double().T)
    if exclude is not None:
        s[torch.arange(len(q)), exclude] = float("-inf")
    return s.topk(min(k, x.shape[0]), dim=1)


@pytest.fixture(scope="module")
def data():
    x, labels = gaussian_mixture(3000, 24, 30, seed=3)
    return x, labels


@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_exact_kinds_equal_brute_force(data, kind):
    x, _ = data
    q = x[:500]
    idx = EmbeddingIndex(x, kind=kind, progress=False)
    s, i = idx.search(q, 7)
    rs, ri = brute_force(x, q, 7)
    # float32 dot products vs float64 reference: error ~ d * eps32
    torch.testing.assert_close(s, rs.float(), atol=1e-5, rtol=0)
    # ids equal wherever neighbours are not tied within float32 noise
    gap = (rs[:, :-1] - rs[:, 1:]).abs().min(dim=1).values > 1e-5
    assert gap.sum() > 400
    assert torch.equal(i[gap], ri[gap])
    assert s.dtype == torch.float32 and i.dtype == torch.int64


def test_torch_path_blocks_match_unblocked(data):
    x, _ = data
    excl = torch.arange(x.shape[0])
    s1, i1 = exact_search(x, x, 9, exclude_ids=excl)
    # tiny blocks: 37 query rows x 64-column corpus chunks; merges top-k across 47 chunks
    s2, i2 = exact_search(x, x, 9, exclude_ids=excl, batch_size=37, block_bytes=4 * 37 * 64)
    torch.testing.assert_close(s1, s2)
    assert torch.equal(i1, i2)
    assert not (i1 == excl[:, None]).any()


@pytest.mark.parametrize("kind", ["ivf", "ivf-gemm", "hnsw"])
def test_approximate_recall_on_planted_clusters(data, kind):
    x, _ = data
    idx = EmbeddingIndex(x, kind=kind, progress=False, nprobe=8 if "ivf" in kind else None)
    r = idx.recall(k=10, sample=300)
    assert r > 0.9, r
    s, i = idx.search(x[:50], 10)
    valid = i >= 0
    # returned scores are true inner products of the returned ids (fp16 storage for IVF)
    true = (x[:50, None, :] * x[i.clamp(min=0)]).sum(-1)
    torch.testing.assert_close(s[valid], true[valid], atol=2e-3, rtol=0)
    assert (s[:, :-1] >= s[:, 1:]).all()


def test_auto_reports_recall_and_picks_exact_below_threshold(data):
    x, _ = data
    small = EmbeddingIndex(x, kind="auto", progress=False)
    assert small.kind in ("flat", "torch") and not small.approximate
    big = EmbeddingIndex(x, kind="auto", auto_threshold=1000, progress=False)
    assert big.kind == "ivf-gemm" and 0.9 < big.info["recall@10"] <= 1.0


def test_ivf_gemm_probing_every_list_is_exact(data):
    x, _ = data
    q = x[:300]
    idx = EmbeddingIndex(x, kind="ivf-gemm", nlist=20, nprobe=20, progress=False)
    s, i = idx.search(q, 12, exclude_self=True, query_ids=torch.arange(300), batch_size=64)
    rs, ri = brute_force(x, q, 12, exclude=torch.arange(300))
    torch.testing.assert_close(s, rs.float(), atol=1e-5, rtol=0)
    gap = (rs[:, :-1] - rs[:, 1:]).abs().min(dim=1).values > 1e-5
    assert torch.equal(i[gap], ri[gap])


def test_ivf_gemm_one_probe_misses_and_tune_recovers():
    # loose clusters: one probed list misses neighbours, a few more probes recover them
    x, _ = gaussian_mixture(3000, 16, 30, sigma=1.0, seed=0)
    idx = EmbeddingIndex(x, kind="ivf-gemm", nlist=40, nprobe=1, progress=False)
    low = idx.recall(k=20, sample=200)
    assert low < 0.8
    r = idx.tune(20, target_recall=0.95, sample=200)
    assert r >= 0.95 and 1 < idx.nprobe <= 10 and not idx.exact_fallback
    assert idx.info["tuned"]["recall"] == r
    # probing every list is exhaustive: recall 1
    idx.nprobe = idx.nlist
    assert idx.recall(k=20, sample=200) == 1.0


@pytest.mark.parametrize("kind", ["ivf", "ivf-gemm"])
def test_tune_falls_back_to_exact_on_unclustered_data(kind):
    # isotropic random vectors: no list structure to exploit
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(3000, 16, generator=g), dim=1)
    idx = EmbeddingIndex(x, kind=kind, nlist=30, nprobe=1, progress=False)
    assert idx.tune(20, target_recall=0.97, sample=200) == 1.0 and idx.exact_fallback
    s, i = idx.search(x[:100], 20)
    rs, ri = brute_force(x, x[:100], 20)
    torch.testing.assert_close(s, rs.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["flat", "torch", "hnsw", "ivf-gemm"])
def test_exclude_self_with_duplicates(kind):
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    x = torch.cat([base, base[:10]])  # rows 50..59 duplicate rows 0..9
    s, i = knn(x, 3, kind=kind, progress=False)
    n = x.shape[0]
    assert not (i == torch.arange(n)[:, None]).any()
    # the duplicate is the nearest neighbour (score 1), not dropped as "the top hit"
    for r in range(10):
        assert i[r, 0].item() == 50 + r and i[50 + r, 0].item() == r
        assert s[r, 0].item() == pytest.approx(1.0, abs=1e-5)


def test_query_ids_subset_exclusion(data):
    x, _ = data
    idx = EmbeddingIndex(x, kind="torch", progress=False)
    qid = torch.tensor([5, 17, -1])
    s, i = idx.search(x[[5, 17, 0]], 4, exclude_self=True, query_ids=qid)
    assert 5 not in i[0].tolist() and 17 not in i[1].tolist()
    assert i[2, 0].item() == 0  # -1 means "not indexed": nothing excluded


def test_k_larger_than_n_pads_and_one_row():
    x = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    for kind in ("flat", "torch"):
        s, i = EmbeddingIndex(x, kind=kind, progress=False).search(x, 6)
        assert (i[:, 4:] == -1).all() and torch.isneginf(s[:, 4:]).all()
        assert sorted(i[0, :4].tolist()) == [0, 1, 2, 3]
    one = x[:1]
    s, i = knn(one, 2, kind="torch", progress=False)
    assert i.tolist() == [[-1, -1]]


def test_numpy_input_and_cosine_metric():
    g = np.random.default_rng(0)
    x = g.standard_normal((200, 10)).astype(np.float32) * 3.0
    idx = EmbeddingIndex(x, kind="flat", metric="cosine", progress=False)
    s, i = idx.search(x[:5], 3)
    xn = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    rs, ri = brute_force(xn, xn[:5], 3)
    torch.testing.assert_close(s, rs.float(), atol=1e-5, rtol=0)
    assert torch.equal(i, ri)


@pytest.mark.parametrize("kind", ["flat", "torch", "ivf", "ivf-gemm", "hnsw"])
def test_save_load_roundtrip_and_stale(tmp_path, data, kind):
    x, _ = data
    idx = EmbeddingIndex(x, kind=kind, progress=False, seed=1)
    s, i = idx.search(x[:20], 5)
    idx.save(tmp_path / "ix")
    loaded = EmbeddingIndex.load(tmp_path / "ix", x, progress=False)
    assert loaded.kind == kind and loaded.params() == idx.params()
    s2, i2 = loaded.search(x[:20], 5)
    assert torch.equal(i, i2)
    torch.testing.assert_close(s, s2)
    changed = x.clone()
    changed[7, 0] += 1e-3
    with pytest.raises(StaleArtifactError, match="do not match"):
        EmbeddingIndex.load(tmp_path / "ix", changed)
    with pytest.raises(StaleArtifactError):
        EmbeddingIndex.load(tmp_path / "ix", x[:100])


def test_bad_input():
    x = torch.randn(10, 4)
    with pytest.raises(BatchlabInputError, match="empty"):
        EmbeddingIndex(torch.empty(0, 4))
    with pytest.raises(BatchlabInputError, match=r"\(N, d\)"):
        EmbeddingIndex(torch.randn(5))
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(BatchlabInputError, match="row 3"):
        EmbeddingIndex(bad)
    idx = EmbeddingIndex(x, kind="torch", progress=False)
    with pytest.raises(BatchlabInputError, match="row 3"):
        idx.search(bad, 2)
    with pytest.raises(BatchlabInputError, match="dimension"):
        idx.search(torch.randn(2, 5), 2)
    with pytest.raises(BatchlabInputError, match="k must be"):
        idx.search(x, 0)
    with pytest.raises(BatchlabInputError, match="query row i must be"):
        idx.search(x[:3], 2, exclude_self=True)
    with pytest.raises(BatchlabInputError, match="one id per query"):
        idx.search(x[:3], 2, exclude_self=True, query_ids=[0, 1])
    with pytest.raises(BatchlabInputError, match="kind"):
        EmbeddingIndex(x, kind="lsh")
    with pytest.raises(BatchlabInputError, match="target_recall"):
        EmbeddingIndex(x, kind="ivf-gemm", target_recall=1.5)
    with pytest.raises(BatchlabInputError, match="nlist"):
        EmbeddingIndex(x, kind="ivf-gemm", nlist=11)
    with pytest.raises(BatchlabInputError, match="floating"):
        EmbeddingIndex(torch.randint(0, 3, (4, 2)))
    with pytest.raises(BatchlabInputError, match="meta.json"):
        EmbeddingIndex.load("/nonexistent/index")


def test_content_hash_native_bytes():
    x = torch.randn(70000, 3)  # more than one hashing block
    assert content_hash(x) == content_hash(x.clone()) == content_hash(torch.from_numpy(x.numpy().copy()))
    assert content_hash(x) == content_hash(x.T.contiguous().T)  # layout does not matter
    y = x.clone()
    y[69999, 2] += 1e-6
    assert content_hash(x) != content_hash(y)
    assert content_hash(x) != content_hash(x.half()) and content_hash(x) != content_hash(x[:, :2])


@pytest.mark.parametrize("kind", ["ivf", "ivf-gemm"])
def test_ivf_fills_k_when_probed_lists_are_small(kind):
    # 40 lists of ~25 rows, one probe, k=60: the probed list alone cannot fill a row
    x, _ = gaussian_mixture(1000, 8, 40, seed=0)
    idx = EmbeddingIndex(x, kind=kind, nlist=25, nprobe=1, progress=False)
    s, i = idx.search(x[:50], 60, exclude_self=True, query_ids=torch.arange(50))
    assert (i >= 0).all() and idx.nprobe == 1
    assert not (i == torch.arange(50)[:, None]).any()
    assert all(len(set(row)) == 60 for row in i.tolist())


def test_ivf_gemm_without_faiss_uses_torch_kmeans(monkeypatch, data):
    # the GPU image has no faiss: centroids come from the torch Lloyd loop there
    import sys

    from batchlab import _ivfgemm

    x, labels = data
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    cent = _ivfgemm.train_centroids(x, 30, seed=0, iters=10)
    assert cent.shape == (30, 24) and torch.allclose(cent.norm(dim=1), torch.ones(30), atol=1e-5)
    # on planted clusters, lists follow the planted clusters
    assign = _ivfgemm.assign_lists(x, cent, 1).squeeze(1)
    purity = sum(int(torch.bincount(labels[assign == c]).max()) for c in assign.unique()) / len(x)
    assert purity > 0.7  # random lists would give ~0.1; plain Lloyd (like faiss) finds local optima
    idx = EmbeddingIndex(x, kind="ivf-gemm", nprobe=4, progress=False)
    assert idx.recall(k=10, sample=200) > 0.95
