"""mine_hard_negatives against a brute-force per-query implementation on small planted data."""

import math

import numpy as np
import pytest
import torch

from batchlab.datasets.synthetic import gaussian_mixture
from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.index import EmbeddingIndex
from batchlab.samplers.mining import MinedNegatives, mine_hard_negatives


def brute_force_survivors(q, c, positives, *, range_min, range_max, abs_m=None, rel_m=None, max_s=None, min_s=None,
                          self_ids=None, ctexts=None, qtexts=None):
    """Per query: the list of (id, score) that survive exclusions, window and filters, in rank order."""
    scores = (q @ c.T).tolist()
    out = []
    for i, row in enumerate(scores):
        pos = positives[i]
        pos_min = min(row[p] for p in pos) if pos else math.nan
        banned = set(pos)
        if self_ids is not None and self_ids[i] >= 0:
            banned.add(self_ids[i])
        banned_keys = set()
        if ctexts is not None:
            banned_keys = {ctexts[p] for p in pos}
            if qtexts is not None:
                banned_keys.add(qtexts[i])
        order = sorted(range(len(row)), key=lambda j: -row[j])
        seen_keys, ranked = set(), []
        for j in order:
            if j in banned:
                continue
            if ctexts is not None:
                if ctexts[j] in banned_keys or ctexts[j] in seen_keys:
                    continue
                seen_keys.add(ctexts[j])
            ranked.append(j)
        keep = []
        for r, j in enumerate(ranked):
            s = row[j]
            if not (range_min <= r < range_max):
                continue
            if abs_m is not None and not s <= pos_min - abs_m:
                continue
            if rel_m is not None and not s <= pos_min - rel_m * abs(pos_min):
                continue
            if max_s is not None and not s <= max_s:
                continue
            if min_s is not None and not s >= min_s:
                continue
            keep.append((j, s))
        out.append(keep)
    return out


@pytest.fixture(scope="module")
def planted():
    # corpus: 8 clusters; queries: noisy copies of the first 60 corpus rows (their positives)
    c, labels = gaussian_mixture(240, 16, 8, sigma=0.6, seed=5)
    g = torch.Generator().manual_seed(7)
    q = torch.nn.functional.normalize(c[:60] + 0.2 * torch.randn(60, 16, generator=g) / 4, dim=1)
    positives = [[i] if i % 3 else [i, (i + 1) % 240] for i in range(60)]
    return q, c, positives


@pytest.mark.parametrize("kind", ["torch", "flat"])
@pytest.mark.parametrize(
    "filters",
    [
        dict(range_min=0, range_max=None),
        dict(range_min=5, range_max=25),
        dict(range_min=2, range_max=40, abs_m=0.05),
        dict(range_min=0, range_max=60, rel_m=0.05),
        dict(range_min=3, range_max=80, max_s=0.7, min_s=0.1),
    ],
)
def test_top_matches_brute_force(planted, kind, filters):
    q, c, positives = planted
    num_neg = 6
    mined = mine_hard_negatives(
        q, c, positives, num_negatives=num_neg, range_min=filters["range_min"], range_max=filters["range_max"],
        absolute_margin=filters.get("abs_m"), relative_margin=filters.get("rel_m"), max_score=filters.get("max_s"),
        min_score=filters.get("min_s"), index_kwargs={"kind": kind}, batch_size=17, progress=False,
    )
    range_max = mined.params["range_max"]
    ref = brute_force_survivors(q, c, positives, range_min=filters["range_min"], range_max=range_max,
                                abs_m=filters.get("abs_m"), rel_m=filters.get("rel_m"),
                                max_s=filters.get("max_s"), min_s=filters.get("min_s"))
    for i, keep in enumerate(ref):
        want = [j for j, _ in keep[:num_neg]]
        got = mined.negative_ids[i].tolist()
        assert got == want + [-1] * (num_neg - len(want)), i
        assert mined.num_candidates[i].item() == len(keep)
        torch.testing.assert_close(mined.scores[i, : len(want)], torch.tensor([s for _, s in keep[:num_neg]]),
                                   atol=1e-5, rtol=0)
    assert torch.isneginf(mined.scores[mined.negative_ids < 0]).all()
    # positive score is the smaller of the positives' scores
    torch.testing.assert_close(mined.positive_scores[0], (q[0] @ c[[0, 1]].T).min(), atol=1e-6, rtol=0)


def test_default_window_and_no_positive_in_output(planted):
    q, c, positives = planted
    mined = mine_hard_negatives(q, c, positives, num_negatives=4, progress=False)
    assert mined.params["range_max"] == 4
    for i, pos in enumerate(positives):
        assert not set(pos) & set(mined.negative_ids[i].tolist())
    assert (mined.negative_ids >= 0).all()  # nothing filtered: rows full


def test_relative_margin_with_negative_positive_scores():
    # positives are anti-aligned with their queries (score -0.5); candidates span [-1, 1]
    d = 2
    angles = torch.linspace(0, math.pi, 181)
    c = torch.stack([torch.cos(angles), torch.sin(angles)], 1)  # unit circle, upper half
    q = torch.tensor([[1.0, 0.0]])
    pos_id = int(torch.argmin((c @ q.T).squeeze(1).sub(-0.5).abs()))  # score ~ -0.5
    pos = float(c[pos_id] @ q[0])
    r = 0.2
    mined = mine_hard_negatives(q, c, [[pos_id]], num_negatives=5, relative_margin=r, range_max=181, progress=False)
    s = mined.scores[0]
    assert (mined.negative_ids[0] >= 0).all()
    # documented convention: score <= pos - r*|pos| = -0.6, below the positive
    assert (s <= pos - r * abs(pos) + 1e-6).all()
    assert s.max() < pos
    # the (1 - r) * pos convention (sentence-transformers#3819) would have allowed -0.4 > pos
    assert (1 - r) * pos > pos
    assert mined.positive_scores[0].item() == pytest.approx(pos, abs=1e-6)


def test_random_sampling_subset_seeded_and_block_invariant(planted):
    q, c, positives = planted
    kw = dict(num_negatives=5, range_min=2, range_max=30, sampling="random", progress=False, index_kwargs={"kind": "torch"})
    a = mine_hard_negatives(q, c, positives, seed=1, batch_size=64, **kw)
    b = mine_hard_negatives(q, c, positives, seed=1, batch_size=7, **kw)
    other = mine_hard_negatives(q, c, positives, seed=2, **kw)
    assert torch.equal(a.negative_ids, b.negative_ids)
    assert not torch.equal(a.negative_ids, other.negative_ids)
    ref = brute_force_survivors(q, c, positives, range_min=2, range_max=30)
    top = mine_hard_negatives(q, c, positives, seed=1, **{**kw, "sampling": "top"})
    assert not torch.equal(a.negative_ids, top.negative_ids)
    for i, keep in enumerate(ref):
        allowed = {j for j, _ in keep}
        got = a.negative_ids[i].tolist()
        assert set(got) <= allowed and len(set(got)) == 5
        s = a.scores[i]
        assert (s[:-1] >= s[1:]).all()  # returned in rank order


def test_self_exclusion_and_text_duplicates():
    c, _ = gaussian_mixture(120, 8, 4, seed=2)
    # rows 100..119 duplicate the texts (and vectors) of rows 0..19
    c = torch.cat([c[:100], c[:20]])
    texts = [f"doc {i % 100}" for i in range(120)]
    positives = [[(i + 1) % 120] for i in range(120)]
    mined = mine_hard_negatives(c, c, positives, num_negatives=8, range_max=40, corpus_texts=texts,
                                query_texts=texts, progress=False, batch_size=50)
    ref = brute_force_survivors(c, c, positives, range_min=0, range_max=40, self_ids=list(range(120)),
                                ctexts=texts, qtexts=texts)
    for i, keep in enumerate(ref):
        got = mined.negative_ids[i].tolist()
        assert got == [j for j, _ in keep[:8]] + [-1] * (8 - min(8, len(keep)))
        kept_texts = [texts[j] for j in got if j >= 0]
        assert len(set(kept_texts)) == len(kept_texts)  # at most one per text
        assert texts[i] not in kept_texts and texts[positives[i][0]] not in kept_texts
    # without texts, the duplicate vector of row 0 (row 100) is its hardest negative
    plain = mine_hard_negatives(c, c, positives, num_negatives=1, progress=False)
    assert plain.negative_ids[0, 0].item() == 100 and plain.negative_ids[100, 0].item() == 0


def test_dedup_key_and_deep_duplicates():
    # 30 copies of one text near every query: the window must search past them
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1)
    q = base[:1]
    c = torch.cat([base[:1].repeat(30, 1) + 1e-3 * torch.randn(30, 8, generator=g), base[1:]])
    texts = ["Same"] * 15 + ["same "] * 15 + [f"t{i}" for i in range(59)]
    mined = mine_hard_negatives(q, c, [[0]], num_negatives=3, corpus_texts=texts,
                                dedup_key=lambda t: t.strip().lower(), progress=False)
    got = mined.negative_ids[0].tolist()
    assert all(j >= 30 for j in got) and len(got) == 3


@pytest.mark.parametrize("kind", ["hnsw", "ivf-gemm", "ivf"])
def test_ann_index_candidates(planted, kind):
    q, c, positives = planted
    exact = mine_hard_negatives(q, c, positives, num_negatives=5, range_min=3, range_max=20, progress=False,
                                index_kwargs={"kind": "torch"})
    approx = mine_hard_negatives(q, c, positives, num_negatives=5, range_min=3, range_max=20, progress=False,
                                 index_kwargs={"kind": kind}, target_recall=0.99)
    assert approx.info["index_tuned"]["recall"] >= 0.99
    agree = (exact.negative_ids == approx.negative_ids).float().mean().item()
    assert agree > 0.95
    # re-scored exactly: the scores of the returned ids are true inner products
    ids = approx.negative_ids.clamp(min=0)
    true = (q[:, None, :] * c[ids]).sum(-1)
    valid = approx.negative_ids >= 0
    torch.testing.assert_close(approx.scores[valid], true[valid], atol=1e-5, rtol=0)


def test_target_recall_tunes_a_weak_index():
    g = torch.Generator().manual_seed(3)
    c = torch.nn.functional.normalize(torch.randn(2000, 16, generator=g), dim=1)  # no clusters: hard for IVF
    q = torch.nn.functional.normalize(c[:300] + 0.1 * torch.randn(300, 16, generator=g), dim=1)
    index = EmbeddingIndex(c, kind="ivf-gemm", nlist=40, nprobe=1, progress=False)
    assert index.recall(q, k=21, sample=300) < 0.8
    mined = mine_hard_negatives(q, c, torch.arange(300), num_negatives=5, range_max=20, index=index,
                                target_recall=0.95, progress=False)
    assert index.nprobe > 1 and mined.info["index_recall@21"] >= 0.95
    exact = mine_hard_negatives(q, c, torch.arange(300), num_negatives=5, range_max=20, progress=False,
                                index_kwargs={"kind": "torch"})
    assert (mined.negative_ids == exact.negative_ids).float().mean() > 0.9


def test_prebuilt_index_and_numpy_and_tensor_positives(planted):
    q, c, positives = planted
    index = EmbeddingIndex(c, kind="flat", progress=False)
    a = mine_hard_negatives(q.numpy(), c.numpy(), np.arange(60), num_negatives=3, index=index, progress=False)
    padded = torch.full((60, 2), -1)
    padded[:, 0] = torch.arange(60)
    b = mine_hard_negatives(q, c, padded, num_negatives=3, progress=False)
    assert torch.equal(a.negative_ids, b.negative_ids)


def test_save_load_pairs_and_stale(tmp_path, planted):
    q, c, positives = planted
    mined = mine_hard_negatives(q, c, positives, num_negatives=4, range_min=2, range_max=8, absolute_margin=0.3,
                                progress=False)
    path = mined.save(tmp_path / "neg")
    assert path.suffix == ".npz"
    back = MinedNegatives.load(path, q, c)
    assert torch.equal(back.negative_ids, mined.negative_ids) and back.params == mined.params
    assert back.params["absolute_margin"] == 0.3 and back.teacher_hash == mined.teacher_hash
    anchors, negs, scores = back.as_pairs()
    valid = mined.negative_ids >= 0
    assert len(anchors) == int(valid.sum())
    assert torch.equal(negs, mined.negative_ids[valid])
    assert torch.equal(anchors, torch.nonzero(valid)[:, 0])
    torch.testing.assert_close(scores, (q[anchors] * c[negs]).sum(1), atol=1e-5, rtol=0)
    with pytest.raises(StaleArtifactError, match="mine again"):
        MinedNegatives.load(path, q, c + 1e-3)
    s = back.summary()
    assert 0 < s["filled_fraction"] <= 1 and s["queries"] == 60
    unhashed = mine_hard_negatives(q, c, positives, num_negatives=2, progress=False, hash_inputs=False)
    assert unhashed.teacher_hash == "" and set(unhashed.info) >= {"mine_s", "hash_s", "index_build_s"}
    with pytest.raises(StaleArtifactError, match="hash_inputs=False"):
        MinedNegatives.load(unhashed.save(tmp_path / "u.npz"), q, c)


def test_bad_input(planted):
    q, c, positives = planted
    with pytest.raises(BatchlabInputError, match="empty"):
        mine_hard_negatives(q[:0], c, [], num_negatives=2)
    nan = q.clone()
    nan[1, 1] = float("nan")
    with pytest.raises(BatchlabInputError, match="NaN"):
        mine_hard_negatives(nan, c, positives, num_negatives=2)
    with pytest.raises(BatchlabInputError, match="dimension"):
        mine_hard_negatives(q[:, :8], c, positives, num_negatives=2)
    with pytest.raises(BatchlabInputError, match="one entry per query"):
        mine_hard_negatives(q, c, positives[:10], num_negatives=2)
    with pytest.raises(BatchlabInputError, match="outside the corpus"):
        mine_hard_negatives(q, c, [[999]] * 60, num_negatives=2)
    with pytest.raises(BatchlabInputError, match="empty"):
        mine_hard_negatives(q, c, positives, num_negatives=2, range_min=5, range_max=5)
    with pytest.raises(BatchlabInputError, match="skips every candidate"):
        mine_hard_negatives(q, c, positives, num_negatives=2, range_min=240, range_max=300)
    with pytest.raises(BatchlabInputError, match="no positive"):
        mine_hard_negatives(q, c, [[]] * 60, num_negatives=2, absolute_margin=0.1)
    with pytest.raises(BatchlabInputError, match="sampling"):
        mine_hard_negatives(q, c, positives, num_negatives=2, sampling="hardest")
    with pytest.raises(BatchlabInputError, match="relative_margin"):
        mine_hard_negatives(q, c, positives, num_negatives=2, relative_margin=-0.1)
    with pytest.raises(BatchlabInputError, match="corpus_texts"):
        mine_hard_negatives(q, c, positives, num_negatives=2, corpus_texts=["a"] * 3)
    with pytest.raises(BatchlabInputError, match="num_negatives"):
        mine_hard_negatives(q, c, positives, num_negatives=0)
    with pytest.raises(BatchlabInputError, match="target_recall"):
        mine_hard_negatives(q, c, positives, num_negatives=2, target_recall=1.5)


def test_k_larger_than_corpus_and_one_row():
    x = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    mined = mine_hard_negatives(x, x, [[0]] * 5, num_negatives=10, progress=False)
    # row 0: positive = itself, 4 others; rows 1..4: self and 0 excluded, 3 others
    assert (mined.negative_ids[0] >= 0).sum() == 4 and (mined.negative_ids[1:] >= 0).sum(1).eq(3).all()
    one = mine_hard_negatives(x[:1], x[:1], [[0]], num_negatives=2, progress=False)
    assert one.negative_ids.tolist() == [[-1, -1]] and one.num_candidates.item() == 0


def test_filters_that_leave_nothing_pad(planted):
    q, c, positives = planted
    mined = mine_hard_negatives(q, c, positives, num_negatives=3, max_score=-5.0, progress=False)
    assert (mined.negative_ids == -1).all() and mined.summary()["filled_fraction"] == 0


def test_mine_command_writes_file_matching_the_function(tmp_path, planted):
    from batchlab.cli import main

    q, c, positives = planted
    np.save(tmp_path / "q.npy", q.numpy())
    np.save(tmp_path / "c.npy", c.numpy())
    (tmp_path / "pos.txt").write_text("\n".join(" ".join(map(str, p)) for p in positives))
    code = main(["mine", "--queries", str(tmp_path / "q.npy"), "--corpus", str(tmp_path / "c.npy"),
                 "--positives", str(tmp_path / "pos.txt"), "--num-negatives", "3", "--range-min", "2",
                 "--relative-margin", "0.05", "--index", "torch", "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 0
    back = MinedNegatives.load(tmp_path / "out" / "negatives.npz", q, c)
    want = mine_hard_negatives(q, c, positives, num_negatives=3, range_min=2, relative_margin=0.05,
                               index_kwargs={"kind": "torch"}, progress=False)
    assert torch.equal(back.negative_ids, want.negative_ids)
    assert back.params["relative_margin"] == 0.05 and (tmp_path / "out" / "mine.json").exists()
    # bad input is exit code 2 with a message, not a traceback
    assert main(["mine", "--corpus", str(tmp_path / "c.npy"), "--positives", str(tmp_path / "pos.txt"),
                 "--no-progress", "--out", str(tmp_path / "bad")]) == 2
    assert main(["mine", "--corpus", str(tmp_path / "missing.npy"), "--positives", "diagonal"]) == 2
