"""Audit of EmbeddingIndex's exact kinds against a brute-force numpy reference on data with
exact ties (small integer vectors, duplicates): the ids are the (score desc, id asc) order
of the reference, whatever the kind, the chunking (block_bytes), the input dtype or layout.
Also: save/load round-trips give the same results for every kind."""

import numpy as np
import pytest
import torch

from batchlab.index import EmbeddingIndex, exact_search, faiss_available

EXACT = ["torch"] + (["flat"] if faiss_available() else [])


def reference(x, q, k, exclude=None, cosine=False):
    """Brute force in float64: per query, ids sorted by (score desc, id asc), -1 padded."""
    x, q = np.asarray(x, np.float64), np.asarray(q, np.float64)
    if cosine:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = q @ x.T
    out = np.full((len(q), k), -1, dtype=np.int64)
    scores = np.full((len(q), k), -np.inf)
    for r in range(len(q)):
        cand = [j for j in range(len(x)) if exclude is None or exclude[r] != j]
        best = sorted(cand, key=lambda j: (-s[r, j], j))[:k]
        out[r, : len(best)] = best
        scores[r, : len(best)] = s[r, best]
    return scores, out


def integer_rows(n, d=4, seed=0, duplicate=False):
    """Small-integer vectors: float32 dot products are exact, so ties are real ties."""
    x = np.random.default_rng(seed).integers(-2, 3, size=(n, d)).astype(np.float32)
    x[np.abs(x).sum(1) == 0, 0] = 1  # no zero rows (cosine)
    if duplicate and n > 2:
        x[n // 2 :] = x[: n - n // 2]
    return x


@pytest.mark.parametrize("kind", EXACT)
@pytest.mark.parametrize("n,duplicate", [(1, False), (2, False), (7, True), (40, False), (40, True)])
def test_exact_ids_follow_score_then_id_order(kind, n, duplicate):
    x = integer_rows(n, seed=n, duplicate=duplicate)
    idx = EmbeddingIndex(x, kind=kind, progress=False)
    for k in sorted({1, 3, n, n + 2}):
        for exclude_self in (False, True):
            s, i = idx.search(x, k, exclude_self=exclude_self)
            rs, ri = reference(x, x, k, exclude=np.arange(n) if exclude_self else None)
            assert np.array_equal(i.numpy(), ri), (kind, n, duplicate, k, exclude_self)
            assert np.array_equal(s.numpy(), rs.astype(np.float32))


def test_ties_at_the_boundary_do_not_depend_on_the_chunking():
    # 50 identical rows: every id ties; torch.topk chose other ids for each chunk width
    x = torch.zeros(50, 4)
    x[:, 0] = 1
    expected = torch.arange(3).expand(3, 3)
    for block_bytes in (1 << 20, 4 * 3 * 8, 4 * 3 * 13):
        _, i = exact_search(x, x[:3], 3, block_bytes=block_bytes)
        assert torch.equal(i, expected), block_bytes
    # and with integer data: all chunk widths give the reference
    x = torch.from_numpy(integer_rows(120, d=3, seed=5, duplicate=True))
    _, ri = reference(x, x, 5)
    for block_bytes in (1 << 20, 5 * 4 * 20, 5 * 4 * 33):
        _, i = exact_search(x, x, 5, block_bytes=block_bytes, batch_size=17)
        assert np.array_equal(i.numpy(), ri), block_bytes


@pytest.mark.skipif(not faiss_available(), reason="flat needs faiss (torch is covered above)")
def test_flat_and_torch_return_the_same_ids_for_duplicates():
    x = integer_rows(200, d=3, seed=1, duplicate=True)
    flat = EmbeddingIndex(x, kind="flat", progress=False)
    exact = EmbeddingIndex(x, kind="torch", progress=False)
    for k, ex in ((1, True), (4, False), (9, True)):
        sf, i_f = flat.search(x, k, exclude_self=ex)
        st, i_t = exact.search(x, k, exclude_self=ex)
        assert torch.equal(i_f, i_t) and torch.equal(sf, st), (k, ex)


@pytest.mark.parametrize("kind", EXACT)
def test_dtype_and_layout_of_the_input_do_not_change_the_result(kind):
    x = integer_rows(30, d=6, seed=2, duplicate=True)
    base = EmbeddingIndex(x, kind=kind, progress=False).search(x, 6, exclude_self=True)
    wide = np.zeros((30, 12), np.float32)
    wide[:, ::2] = x
    variants = {
        "fp16": torch.from_numpy(x).half(),
        "fp64": torch.from_numpy(x).double(),
        "numpy fp64": x.astype(np.float64),
        "strided": torch.from_numpy(wide)[:, ::2],
        "transposed": torch.from_numpy(np.ascontiguousarray(x.T)).T,
    }
    for name, v in variants.items():
        got = EmbeddingIndex(v, kind=kind, progress=False).search(v, 6, exclude_self=True)
        assert torch.equal(got[1], base[1]), name
        assert torch.equal(got[0], base[0]), name


@pytest.mark.parametrize("kind", EXACT)
def test_cosine_ranks_like_normalised_rows_and_ignores_row_scale(kind):
    x = integer_rows(40, seed=3)
    scale = np.random.default_rng(0).uniform(0.5, 4, size=(40, 1)).astype(np.float32)
    s, i = EmbeddingIndex(x * scale, kind=kind, metric="cosine", progress=False).search(x, 5, exclude_self=True)
    rs, _ = reference(x, x, 5, exclude=np.arange(40), cosine=True)
    # cosine is not exact in float32: compare scores, and ids through their reference scores
    np.testing.assert_allclose(s.numpy(), rs, atol=1e-6)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    got = np.take_along_axis(xn @ xn.T, i.numpy(), axis=1)
    np.testing.assert_allclose(got, rs, atol=1e-6)


def _kinds_for_save():
    kinds = ["torch", "ivf-gemm"]
    if faiss_available():
        kinds += ["flat", "ivf", "hnsw"]
    return kinds


@pytest.mark.parametrize("kind", _kinds_for_save())
def test_save_load_gives_the_same_search_results(tmp_path, kind):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(400, 8, generator=g), dim=1)
    kw = {"nlist": 8, "nprobe": 2} if kind.startswith("ivf") else {}
    idx = EmbeddingIndex(x, kind=kind, progress=False, **kw)
    before = idx.search(x[:50], 7)
    idx.save(tmp_path / "i")
    for emb in ((x,) if kind.startswith("ivf") else (None, x)):  # IVF kinds keep no vectors: pass them
        back = EmbeddingIndex.load(tmp_path / "i", emb, progress=False)
        assert (back.kind, back.nlist, back.nprobe, back.content_hash) == (idx.kind, idx.nlist, idx.nprobe, idx.content_hash)
        after = back.search(x[:50], 7)
        assert torch.equal(after[1], before[1]) and torch.equal(after[0], before[0]), (kind, emb is None)


@pytest.mark.parametrize("kind", ["ivf-gemm"] + (["ivf"] if faiss_available() else []))
def test_ivf_fills_every_row_when_query_ids_exclude_nothing(kind):
    # lists of 79 and 1 rows, one probe: a query outside the index (query_ids -1) must still get
    # all 80 rows at k=80; the refill once stopped at 79 (it allowed one missing row for everyone)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(79, 4, generator=g) * 0.01 + torch.tensor([1.0, 0, 0, 0]),
                   torch.tensor([[-1.0, 0, 0, 0]])])
    idx = EmbeddingIndex(x, kind=kind, nlist=2, nprobe=1, progress=False)
    _, i = idx.search(x[:3], 80, exclude_self=True, query_ids=[-1, 1, -1])
    assert (i >= 0).sum(1).tolist() == [80, 79, 80]
    assert set(i[0].tolist()) == set(range(80)) and 1 not in i[1].tolist()


@pytest.mark.parametrize("method", ["metis", "louvain"])
def test_b3_graph_and_groups_do_not_depend_on_the_exact_kind_or_chunking_with_duplicates(method):
    # every vector three times: rank windows cut through groups of equal scores
    from batchlab.samplers.communities import partition_graph
    from batchlab.samplers.graph import knn_graph

    base = integer_rows(40, d=3, seed=4)
    x = torch.from_numpy(np.concatenate([base, base, base]))
    runs = [{"kind": "torch"}, {"kind": "torch", "block_bytes": 4 * 120 * 9}] + ([{"kind": "flat"}] * faiss_available())
    graphs = [knn_graph(x, window=(2, 9), progress=False, **kw) for kw in runs]
    for g in graphs[1:]:
        assert (g != graphs[0]).nnz == 0 and np.array_equal(g.indices, graphs[0].indices)
    groups = [partition_graph(g, 6, method=method, seed=3, exact=True) for g in graphs + graphs[:1]]
    for gr in groups[1:]:
        assert np.array_equal(gr, groups[0])
