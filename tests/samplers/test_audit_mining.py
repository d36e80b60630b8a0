"""Audit of mine_hard_negatives against a brute-force reference written from docs/mining.md:
candidates in (score desc, id asc) order, exclusions (positives, the query itself, texts of
the positives / the query, repeated texts after the first), ranks counted after exclusions,
the window, the four score filters with pos = the smallest positive score, then ``top`` or a
``random`` subset of the survivors. Small-integer embeddings make the float32 scores exact,
so ties and duplicate vectors are real, and the ids must match exactly."""

import logging

import numpy as np
import pytest
import torch

from batchlab.index import faiss_available
from batchlab.samplers import mine_hard_negatives
from tests.samplers.test_mining import brute_force_survivors

EXACT = ["torch"] + (["flat"] if faiss_available() else [])


def survivors(q, c, positives, range_min, range_max, *, absolute_margin=None, relative_margin=None, max_score=None,
              min_score=None, self_ids=None, corpus_texts=None, query_texts=None):
    """Per query, the ids that pass exclusions, window and filters, in rank order (float64;
    test_mining's reference, whose stable sort orders equal scores by id)."""
    rows = brute_force_survivors(
        torch.from_numpy(np.asarray(q, np.float64)), torch.from_numpy(np.asarray(c, np.float64)), positives,
        range_min=range_min, range_max=range_max, abs_m=absolute_margin, rel_m=relative_margin, max_s=max_score,
        min_s=min_score, self_ids=self_ids, ctexts=corpus_texts, qtexts=query_texts)
    return [[j for j, _ in row] for row in rows]


def random_case(rng):
    n = int(rng.integers(3, 40))
    c = rng.integers(-2, 3, size=(n, 3)).astype(np.float32)
    if rng.random() < 0.5:
        c[n // 2 :] = c[: n - n // 2]  # duplicate vectors
    same = rng.random() < 0.4
    q = c if same else rng.integers(-2, 3, size=(int(rng.integers(1, 10)), 3)).astype(np.float32)
    kw = {"num_negatives": int(rng.integers(1, 5)), "range_min": int(rng.integers(0, min(4, n)))}
    if rng.random() < 0.5:
        kw["range_max"] = kw["range_min"] + int(rng.integers(1, 8))
    for name, values, p in (("absolute_margin", [0.0, 1.0], 0.3), ("relative_margin", [0.0, 0.25, 0.5], 0.3),
                            ("max_score", [-1.0, 0.0, 2.0], 0.2), ("min_score", [-3.0, -1.0, 0.0], 0.2)):
        if rng.random() < p:
            kw[name] = float(rng.choice(values))
    if rng.random() < 0.5:
        kw["corpus_texts"] = [f"t{v}" for v in rng.integers(0, max(2, n // 2), size=n)]
        if not same and rng.random() < 0.5:
            kw["query_texts"] = [f"t{v}" for v in rng.integers(0, n, size=len(q))]
    positives = [list(rng.choice(n, size=int(rng.integers(1, 3)), replace=False)) for _ in range(len(q))]
    return q, c, same, positives, kw


def run_case(q, c, same, positives, kw, kind, **extra):
    qt = torch.from_numpy(q)
    ct = qt if same else torch.from_numpy(c)
    mined = mine_hard_negatives(qt, ct, positives, index_kwargs={"kind": kind}, progress=False, **kw, **extra)
    ref_kw = {k: v for k, v in kw.items() if k not in ("num_negatives", "range_min", "range_max", "sampling")}
    ref = survivors(q, c, positives, kw["range_min"], mined.params["range_max"],
                    self_ids=np.arange(len(q)) if same else None, **ref_kw)
    return mined, ref


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.ERROR)  # short rows warn; expected here


@pytest.mark.parametrize("kind", EXACT)
def test_top_sampling_equals_the_brute_force_reference(kind):
    rng = np.random.default_rng(7)
    for trial in range(60):
        q, c, same, positives, kw = random_case(rng)
        mined, ref = run_case(q, c, same, positives, kw, kind, batch_size=int(rng.integers(1, 5)))
        num = kw["num_negatives"]
        expected = np.array([(row + [-1] * num)[:num] for row in ref])
        assert np.array_equal(mined.negative_ids.numpy(), expected), (trial, kw)
        # scores are the exact scores of the chosen ids, -inf padded
        full = q.astype(np.float64) @ c.astype(np.float64).T
        got = np.where(expected >= 0, np.take_along_axis(full, np.maximum(expected, 0), 1), -np.inf)
        assert np.array_equal(mined.scores.numpy(), got.astype(np.float32)), trial
        pmin = [min(full[r, p] for p in positives[r]) for r in range(len(q))]
        assert np.array_equal(mined.positive_scores.numpy(), np.float32(pmin)), trial


def test_random_sampling_draws_from_the_survivors_and_ignores_the_block_size():
    rng = np.random.default_rng(11)
    for trial in range(30):
        q, c, same, positives, kw = random_case(rng)
        kw["sampling"] = "random"
        mined, ref = run_case(q, c, same, positives, kw, "torch", seed=3, batch_size=1)
        again, _ = run_case(q, c, same, positives, kw, "torch", seed=3, batch_size=64)
        assert torch.equal(mined.negative_ids, again.negative_ids), trial
        for r, row in enumerate(mined.negative_ids.tolist()):
            got = [j for j in row if j >= 0]
            assert len(got) == min(kw["num_negatives"], len(ref[r])), (trial, r)
            assert set(got) <= set(ref[r]), (trial, r)
            # returned in rank order (descending score), -1 padding last
            assert got == [j for j in ref[r] if j in got] and row[len(got):] == [-1] * (len(row) - len(got))


@pytest.mark.parametrize("kind", EXACT)
def test_a_duplicate_group_straddling_the_window_edge_gives_the_lowest_ids(kind):
    # 30 identical corpus rows tie for every rank: the window [2, 5) is ids 2, 3, 4 for every
    # kind and block size (the exact search once chose other ids by chunk width)
    c = torch.zeros(30, 4)
    c[:, 0] = 1
    q = torch.ones(3, 4)
    mined = mine_hard_negatives(q, c, [[29], [28], [0]], num_negatives=3, range_min=2, index_kwargs={"kind": kind},
                                progress=False, batch_size=2)
    assert mined.negative_ids.tolist() == [[2, 3, 4], [2, 3, 4], [3, 4, 5]]


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_a_duplicate_of_the_positive_passes_a_zero_margin_for_every_kind_and_block_size(metric):
    # corpus row n+i repeats positive i: its score equals pos, and `score <= pos - 0` keeps it; the
    # search's product and the positive's dot product once rounded it in or out by kind and block size
    g = torch.Generator().manual_seed(0)
    n = 200
    c = torch.nn.functional.normalize(torch.randn(n, 37, generator=g), dim=1)
    c = torch.cat([c, c]) * 3
    q = torch.nn.functional.normalize(c[:n] + 0.3 * torch.randn(n, 37, generator=g), dim=1) * 2
    for kind in EXACT:
        for batch_size in (1, 7, 4096):
            for margin in ({"absolute_margin": 0.0}, {"relative_margin": 0.0}):
                mined = mine_hard_negatives(q, c, [[i] for i in range(n)], num_negatives=1, range_max=1,
                                            index_kwargs={"kind": kind, "metric": metric}, progress=False,
                                            batch_size=batch_size, **margin)
                assert torch.equal(mined.negative_ids[:, 0], torch.arange(n) + n), (kind, batch_size, margin)
