"""CommunityBatchSampler: the sampler contract, B3 hardness, B3++ extra negatives, artifacts, bad input."""

import json

import numpy as np
import pytest
import torch

from batchlab.datasets.synthetic import gaussian_mixture
from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.index import knn
from batchlab.samplers import CommunityBatchSampler
from batchlab.samplers.community_sampler import batch_similarity_stats

N, D, K, B = 2048, 32, 32, 256
WINDOW = (10, 60)


@pytest.fixture(scope="module")
def data():
    x, y = gaussian_mixture(N, D, 128, sigma=0.8, seed=0)  # clusters of 16 (labels = "same item")
    return x, y, knn(x, WINDOW[1], kind="torch", progress=False)


def make(data, **kw):
    x, _, neighbours = data
    kw.setdefault("group_size", K)
    kw.setdefault("rank_window", WINDOW)
    return CommunityBatchSampler(None, kw.pop("batch_size", B), neighbours=neighbours, **kw)


def test_coverage_exact_len_and_whole_groups(data):
    sampler = make(data)
    batches = list(sampler)
    assert len(batches) == len(sampler) == N // B
    assert sorted(i for b in batches for i in b) == list(range(N))
    assert all(len(b) == B for b in batches)
    sizes = np.bincount(sampler.groups)
    assert sizes.min() >= K - 1 and sizes.max() <= K + 1
    # a batch is B/K groups; a group of K+-1 can straddle a boundary, so at most 2 extra
    for b in batches:
        assert len(np.unique(sampler.groups[b])) <= B // K + 2


def test_uneven_n_last_batch_and_drop_last(data):
    x, _, (scores, ids) = data
    n = 2000  # not a multiple of B
    neighbours = (scores[:n], ids[:n].masked_fill(ids[:n] >= n, -1))
    sampler = CommunityBatchSampler(None, B, group_size=K, rank_window=WINDOW, neighbours=neighbours)
    batches = list(sampler)
    assert [len(b) for b in batches] == [B] * (n // B) + [n % B]
    assert sorted(i for b in batches for i in b) == list(range(n))
    dropped = CommunityBatchSampler(None, B, group_size=K, rank_window=WINDOW, neighbours=neighbours, drop_last=True)
    assert len(dropped) == n // B and all(len(b) == B for b in dropped)


def test_built_from_embeddings_equals_built_from_neighbours(data):
    x, _, _ = data
    from_x = CommunityBatchSampler(x, B, group_size=K, rank_window=WINDOW, index_kwargs={"kind": "torch"})
    np.testing.assert_array_equal(from_x.groups, make(data).groups)


def test_determinism_and_epochs(data):
    a, b = make(data, seed=7), make(data, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(make(data, seed=8)) != first


def test_mid_epoch_resumption(data):
    sampler = make(data, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2)
    it = iter(sampler)
    head = [next(it) for _ in range(3)]
    state = sampler.state_dict()
    resumed = make(data, seed=3)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    with pytest.raises(BatchlabInputError, match="group_size"):
        make(data, seed=3, group_size=16).load_state_dict(state)


def test_rank_split_unions_to_global_batch(data):
    global_batches = list(make(data, seed=1))
    ranks = [list(make(data, seed=1, num_replicas=4, rank=r)) for r in range(4)]
    for i, batch in enumerate(global_batches):
        assert sum((ranks[r][i] for r in range(4)), []) == batch
        assert all(len(ranks[r][i]) == B // 4 for r in range(4))


def test_batches_are_harder_than_random_with_fewer_false_negatives_than_topk(data):
    x, y, (_, ids) = data
    b3 = list(make(data))
    g = torch.Generator().manual_seed(0)
    random_batches = torch.randperm(N, generator=g).view(-1, B).tolist()
    # plain top-k batches: an anchor and its nearest neighbours, no rank guard
    topk = [[a] + ids[a, : B - 1].tolist() for a in range(0, N, B)] if ids.shape[1] >= B - 1 else None
    hard = batch_similarity_stats(x, b3, y)
    easy = batch_similarity_stats(x, random_batches, y)
    # group mates are only 31 of each anchor's 255 batch mates: the all-pairs mean rises a
    # little, the hardest negatives a lot
    assert hard["mean_negative_similarity"] > 2 * easy["mean_negative_similarity"]
    assert hard["top_k_negative_similarity"] > easy["top_k_negative_similarity"] + 0.05
    if topk is None:
        _, deep = knn(x, B - 1, kind="torch", progress=False)
        topk = [[a] + deep[a].tolist() for a in range(0, N, B)]
    assert hard["same_label_rate"] < batch_similarity_stats(x, topk, y)["same_label_rate"]


def test_batch_similarity_stats_matches_dense(gen):
    x = torch.nn.functional.normalize(torch.randn(50, 8, generator=gen), dim=1)
    labels = torch.randint(0, 4, (50,), generator=gen)
    batches = [list(range(0, 20)), list(range(20, 50))]
    got = batch_similarity_stats(x, batches, labels, top_k=3)
    sims, tops, same = [], [], []
    for b in batches:
        s = x[b] @ x[b].T
        off = ~torch.eye(len(b), dtype=torch.bool)
        sims.append(s[off].mean().item())
        tops.append(np.mean([sorted(s[i][off[i]].tolist())[-3:] for i in range(len(b))]))
        same.append((labels[b][:, None] == labels[b][None, :])[off].float().mean().item())
    # float32 products of unit vectors: 1e-6 absolute
    assert got["mean_negative_similarity"] == pytest.approx(np.mean(sims), abs=1e-6)
    assert got["top_k_negative_similarity"] == pytest.approx(np.mean(tops), abs=1e-6)
    assert got["same_label_rate"] == pytest.approx(np.mean(same), abs=1e-6)  # reference is a float32 mean


def test_extra_negatives_b3pp(data):
    _, _, (_, ids) = data
    sampler = make(data, extra_negatives=2)
    batch = next(iter(sampler))
    neg = sampler.extra_negatives_for(batch)
    assert neg.shape == (2 * B,) and len(set(neg.tolist())) == 2 * B
    assert set(neg.tolist()).isdisjoint(batch)
    window = set(ids[batch, WINDOW[0] : WINDOW[1]].flatten().tolist())
    assert set(neg.tolist()) <= window
    # deterministic, order-independent, and it changes with the epoch
    assert torch.equal(neg, sampler.extra_negatives_for(list(reversed(batch))))
    assert torch.equal(neg, make(data, extra_negatives=2).extra_negatives_for(batch))
    sampler.set_epoch(1)
    assert not torch.equal(neg, sampler.extra_negatives_for(batch))
    # frequent candidates are drawn more often than rare ones
    counts = np.bincount(ids[batch, WINDOW[0] : WINDOW[1]].flatten().numpy(), minlength=N)
    counts[batch] = 0
    drawn = np.zeros(N)
    for e in range(20):
        sampler.set_epoch(e)
        drawn[sampler.extra_negatives_for(batch).numpy()] += 1
    frequent, rare = counts >= np.quantile(counts[counts > 0], 0.9), (counts == 1)
    assert drawn[frequent].mean() > drawn[rare].mean()
    assert drawn[counts == 0].sum() == 0
    with pytest.raises(BatchlabInputError, match="extra_negatives"):
        make(data).extra_negatives_for(batch)
    with pytest.raises(BatchlabInputError, match="dataset ids"):
        sampler.extra_negatives_for([N + 5])


def test_all_equal_embeddings_warn_and_still_cover():
    x = torch.nn.functional.normalize(torch.ones(300, 8), dim=1)
    with pytest.warns(UserWarning, match="equal"):
        sampler = CommunityBatchSampler(x, 60, group_size=20, rank_window=(5, 40), index_kwargs={"kind": "torch"})
    assert sorted(i for b in sampler for i in b) == list(range(300))


def test_disconnected_examples_are_still_placed(data):
    x, _, (scores, ids) = data
    ids = ids.clone()
    ids[:50] = -1  # 50 examples with no neighbours at all: isolated nodes
    sampler = CommunityBatchSampler(None, B, group_size=K, rank_window=WINDOW, neighbours=(scores, ids))
    assert sampler.graph[:50].nnz == 0
    assert sorted(i for b in sampler for i in b) == list(range(N))


def test_bad_input(data):
    x, _, neighbours = data
    with pytest.raises(BatchlabInputError, match="multiple of group_size"):
        make(data, batch_size=100)
    with pytest.raises(BatchlabInputError, match="larger than the number of examples"):
        CommunityBatchSampler(x[:20], 64, group_size=32, rank_window=(2, 10), index_kwargs={"kind": "torch"})
    with pytest.raises(BatchlabInputError, match="pass embeddings"):
        CommunityBatchSampler(None, 64)
    with pytest.raises(BatchlabInputError, match="needs each example's rank-window"):
        CommunityBatchSampler(None, 64, groups=np.arange(N) // 32, extra_negatives=1)
    with pytest.raises(BatchlabInputError, match="groups must be"):
        CommunityBatchSampler(None, 64, groups=np.array([0.5, 1.0]))
    with pytest.raises(BatchlabInputError, match="num_replicas"):
        make(data, num_replicas=3)
    with pytest.raises(BatchlabInputError, match="smaller window"):
        CommunityBatchSampler(x[:30], 16, group_size=8, index_kwargs={"kind": "torch"})


def test_build_batches_command_round_trip(data, tmp_path):
    import argparse

    from batchlab.commands import build_batches

    x, _, _ = data
    path = tmp_path / "teacher.pt"
    torch.save(x, path)
    parser = argparse.ArgumentParser()
    build_batches.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["build-batches", str(path), "--out", str(tmp_path / "b3"), "--group-size", "32", "--batch-size", "256",
         "--rank-window", "10", "60", "--index-kind", "torch", "--save-window", "--no-progress"]
    )
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "b3" / "summary.json").read_text())
    assert summary["group_sizes"]["min"] >= 31 and summary["group_sizes"]["max"] <= 33
    hardness = summary["hardness"]["top10_negative_similarity"]
    assert hardness["community"] > hardness["random"]
    sampler = CommunityBatchSampler.from_artifacts(tmp_path / "b3", 256, embeddings=x, extra_negatives=1)
    expected = make(data, extra_negatives=1)
    np.testing.assert_array_equal(sampler.groups, expected.groups)
    batch = next(iter(sampler))
    assert torch.equal(sampler.extra_negatives_for(batch), expected.extra_negatives_for(batch))
    with pytest.raises(StaleArtifactError):
        CommunityBatchSampler.from_artifacts(tmp_path / "b3", 256, embeddings=x + 1e-3)
    # paired data: queries rank targets
    torch.save(x.flip(1), tmp_path / "targets.pt")
    args = parser.parse_args(["build-batches", str(path), "--targets", str(tmp_path / "targets.pt"), "--out",
                              str(tmp_path / "pairs"), "--batch-size", "256", "--rank-window", "10", "60",
                              "--index-kind", "torch", "--no-progress"])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "pairs" / "meta.json").read_text())["targets_hash"] is not None


@pytest.mark.parametrize("method", ["leiden", "louvain"])
def test_modularity_methods_give_the_same_contract(data, method):
    sampler = make(data, method=method, seed=2)
    sizes = np.bincount(sampler.groups)
    assert sizes.min() >= K - 1 and sizes.max() <= K + 1
    assert sorted(i for b in sampler for i in b) == list(range(N))
    np.testing.assert_array_equal(sampler.groups, make(data, method=method, seed=2).groups)


def test_dataloader_and_extra_negative_exclusions(data):
    from torch.utils.data import DataLoader, TensorDataset

    x, y, _ = data
    sampler = make(data, extra_negatives=1)
    loader = DataLoader(TensorDataset(x, y), batch_sampler=sampler)
    first = next(iter(loader))
    assert first[0].shape == (B, D)
    batch = sampler.global_batches()[0]
    excluded = sampler.extra_negatives_for(batch)[:10].tolist()
    again = sampler.extra_negatives_for(batch, exclude=excluded)
    assert set(again.tolist()).isdisjoint(excluded)


def test_benchmark_smoke(tmp_path):
    import argparse

    from batchlab.bench import communities as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--sizes", "1500", "--topic-size", "300", "--methods", "metis,leiden-igraph,louvain-networkx",
                              "--knn-d768", "flat:400", "--large-n", "3000", "--large-methods", "metis",
                              "--out", str(tmp_path)])
    assert bench.run(args) == 0
    result = json.loads((tmp_path / "communities-cpu.json").read_text())
    assert {r["method"] for r in result["partitions"]} == {"metis", "leiden-igraph", "louvain-networkx"}
    # exact groups of 32, plus one remainder group of 1500 % 32 = 28
    assert all(r["size_max"] == 32 and r["size_min"] == 1500 % 32 for r in result["partitions"])
    assert result["estimate_1M_x_768"]["knn_flat_s"] > 0 and (tmp_path / "communities-cpu.png").exists()


def test_paired_queries_and_targets(data):
    x, y, _ = data
    g = torch.Generator().manual_seed(5)
    targets = torch.nn.functional.normalize(x + 0.2 * torch.randn(x.shape, generator=g) / D**0.5, dim=1)
    sampler = CommunityBatchSampler((x, targets), B, group_size=K, rank_window=WINDOW, index_kwargs={"kind": "torch"})
    assert sorted(i for b in sampler for i in b) == list(range(N))
    hard = batch_similarity_stats(x, list(sampler), y)
    easy = batch_similarity_stats(x, torch.randperm(N, generator=g).view(-1, B).tolist(), y)
    assert hard["top_k_negative_similarity"] > easy["top_k_negative_similarity"] + 0.05


def whole_groups_in(sampler, batch):
    """True when ``batch`` is a union of whole groups of ``sampler``."""
    ids, counts = np.unique(sampler.groups[batch], return_counts=True)
    return bool((counts == np.bincount(sampler.groups)[ids]).all())


@pytest.mark.parametrize("n, batch_size, drop_last", [(N, B, False), (2000, B, False), (2000, B, True), (2000, 64, False)])
def test_every_full_batch_is_whole_groups(data, n, batch_size, drop_last):
    x, _, (scores, ids) = data
    neighbours = (scores[:n], ids[:n].masked_fill(ids[:n] >= n, -1))
    sampler = CommunityBatchSampler(None, batch_size, group_size=K, rank_window=WINDOW, neighbours=neighbours,
                                    drop_last=drop_last, seed=5)
    assert sampler.whole_groups
    sizes = np.bincount(sampler.groups)
    assert sorted(sizes.tolist(), reverse=True) == [K] * (n // K) + ([n % K] if n % K else [])
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == (n // batch_size if drop_last else -(-n // batch_size))
        full = [b for b in batches if len(b) == batch_size]
        assert len(full) == n // batch_size and batches[: len(full)] == full  # only the last may be short
        whole = [whole_groups_in(sampler, b) and len(set(sampler.groups[b])) == batch_size // K for b in full]
        # with drop_last the remainder group trades members with one full group each
        # epoch, so at most one full batch holds that mixed group
        assert all(whole) if not drop_last else sum(not w for w in whole) <= 1
        covered = sorted(i for b in batches for i in b)
        if drop_last:
            assert len(covered) == len(set(covered)) == n // batch_size * batch_size
        else:
            assert covered == list(range(n))
            assert whole_groups_in(sampler, batches[-1])  # left-over groups + the remainder group


def test_whole_groups_split_across_ranks_and_resume(data):
    global_batches = list(make(data, seed=2, batch_size=128))
    ranks = [list(make(data, seed=2, batch_size=128, num_replicas=4, rank=r)) for r in range(4)]
    for i, batch in enumerate(global_batches):
        assert sum((ranks[r][i] for r in range(4)), []) == batch
    # with K = 32 and 4 ranks of 32, each rank's share of a batch is one whole group
    sampler = make(data, seed=2, batch_size=128)
    assert all(len(set(sampler.groups[part])) == 1 for r in ranks for part in r)
    it = iter(sampler)
    head = [next(it) for _ in range(5)]
    resumed = make(data, seed=2, batch_size=128)
    resumed.load_state_dict(sampler.state_dict())
    assert head + list(resumed) == global_batches


def test_groups_that_are_not_exact_warn_and_keep_the_old_cut(data):
    groups = np.repeat(np.arange(N // 32), 32)
    groups[::33] = (groups[::33] + 1) % (N // 32)  # sizes 31..33
    with pytest.warns(UserWarning, match="straddle"):
        sampler = CommunityBatchSampler(None, B, group_size=K, groups=groups)
    assert not sampler.whole_groups
    batches = list(sampler)
    assert [len(b) for b in batches] == [B] * (N // B)
    assert sorted(i for b in batches for i in b) == list(range(N))
    # the old behaviour's groups, on request: sizes K +- 1
    with pytest.warns(UserWarning, match="straddle"):
        loose = make(data, method="louvain", partition_kwargs={"exact": False})
    assert np.bincount(loose.groups).max() > K


def test_drop_last_does_not_starve_the_remainder_group(data):
    # N % K examples form the remainder group, which always lands in the dropped last
    # batch; over epochs every example must still be trained on
    x, _, (scores, ids) = data
    n = 2000  # 2000 % 32 = 16 in the remainder group
    neighbours = (scores[:n], ids[:n].masked_fill(ids[:n] >= n, -1))
    sampler = CommunityBatchSampler(None, B, group_size=K, rank_window=WINDOW, neighbours=neighbours,
                                    drop_last=True, seed=1)
    remainder = np.flatnonzero(np.bincount(sampler.groups)[sampler.groups] < K)
    assert remainder.size == n % K
    seen = set()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        seen.update(i for b in sampler for i in b)
    assert set(remainder.tolist()) <= seen
