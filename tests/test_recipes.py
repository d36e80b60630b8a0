"""Recipes: retrieval metrics, the TF-IDF teacher, samplers by name, and a few training steps on the CPU."""

from __future__ import annotations

import pytest
import torch

from batchlab.errors import BatchlabInputError
from batchlab.recipes import (
    RandomBatchSampler,
    SamplerSchedule,
    TeacherViews,
    TfidfTeacher,
    make_sampler,
    retrieval_metrics,
    tfidf_views,
    train_clip,
    train_dual_encoder,
)
from batchlab.recipes.teachers import analyze


# -- metrics ---------------------------------------------------------------------
def _brute_ranks(q, d, right):
    scores = q @ d.T
    ranks = []
    for i in range(len(q)):
        best = scores[i][right[i]].max()
        ranks.append(int(((scores[i] >= best) & ~right[i]).sum()) + 1)
    return torch.tensor(ranks, dtype=torch.float)


def test_retrieval_metrics_match_brute_force(gen):
    q = torch.nn.functional.normalize(torch.randn(50, 8, generator=gen), dim=1)
    d = torch.nn.functional.normalize(q + 0.8 * torch.randn(50, 8, generator=gen), dim=1)
    ranks = _brute_ranks(q, d, torch.eye(50, dtype=torch.bool))
    got = retrieval_metrics(q, d, ks=(1, 5), block=7)  # several blocks
    assert got["recall@1"] == pytest.approx(float((ranks <= 1).float().mean()))
    assert got["recall@5"] == pytest.approx(float((ranks <= 5).float().mean()))
    assert got["mrr"] == pytest.approx(float((1 / ranks).mean()), rel=1e-6)
    assert 0 < got["recall@1"] < 1  # the case is neither trivial nor hopeless


def test_retrieval_metrics_with_labels_and_ties(gen):
    q = torch.nn.functional.normalize(torch.randn(30, 4, generator=gen), dim=1)
    d = torch.nn.functional.normalize(torch.randn(40, 4, generator=gen), dim=1)
    ql, dl = torch.arange(30) % 3, torch.arange(40) % 3
    ranks = _brute_ranks(q, d, ql[:, None] == dl[None, :])
    got = retrieval_metrics(q, d, query_labels=ql, document_labels=dl, ks=(1,))
    assert got["mrr"] == pytest.approx(float((1 / ranks).mean()), rel=1e-6)
    # identical documents: ties count against the query (pessimistic), so recall@1 is 0
    same = torch.ones(3, 2) / 2**0.5
    assert retrieval_metrics(same, same, ks=(1,))["recall@1"] == 0.0


def test_retrieval_metrics_equal_torchmetrics_without_ties(gen):
    import torchmetrics  # in the test extras: the peer the metric must agree with
    q = torch.nn.functional.normalize(torch.randn(40, 6, generator=gen), dim=1)
    d = torch.nn.functional.normalize(torch.randn(50, 6, generator=gen), dim=1)
    ql, dl = torch.arange(40) % 7, torch.arange(50) % 7  # several relevant documents per query
    ours = retrieval_metrics(q, d, query_labels=ql, document_labels=dl, ks=(1, 10))
    scores, target = (q @ d.T).reshape(-1), (ql[:, None] == dl[None, :]).reshape(-1)
    indexes = torch.arange(40).repeat_interleave(50)
    for k in (1, 10):
        hit = torchmetrics.retrieval.RetrievalHitRate(top_k=k)(scores, target, indexes=indexes)
        assert ours[f"recall@{k}"] == pytest.approx(float(hit), abs=1e-6)
    assert ours["mrr"] == pytest.approx(float(torchmetrics.retrieval.RetrievalMRR()(scores, target, indexes=indexes)), abs=1e-6)


def test_retrieval_metrics_bad_input():
    x = torch.eye(3)
    with pytest.raises(BatchlabInputError, match="N must equal M"):
        retrieval_metrics(x, torch.eye(4, 3))
    with pytest.raises(BatchlabInputError, match="both"):
        retrieval_metrics(x, x, query_labels=torch.arange(3))
    with pytest.raises(BatchlabInputError, match="dimension"):
        retrieval_metrics(x, torch.eye(3, 2))
    with pytest.raises(BatchlabInputError):
        retrieval_metrics(torch.full((3, 3), float("nan")), x)


# -- the TF-IDF teacher -----------------------------------------------------------
TEXTS_Q = ["Parse the configuration file.", "Return the node identifier.", "Draw a circle on the canvas.",
           "Parse a date string into a datetime.", "Close the network socket."]
TEXTS_D = ["def parse_config(path):", "def getNodeId(self):", "def draw_circle(canvas, r):",
           "def parse_date(text):", "def close_socket(sock):"]


def test_analyze_splits_identifiers():
    assert analyze("getNodeID parse_args HTTPServer") == ["get", "node", "id", "parse", "args", "http", "server"]


def test_tfidf_neighbours_exact_and_deterministic():
    views = tfidf_views(TEXTS_Q, TEXTS_D, dim=3)
    again = tfidf_views(TEXTS_Q, TEXTS_D, dim=3)
    assert torch.equal(views.pairs, again.pairs)
    scores, ids = views.neighbours(2)
    assert ids.shape == (5, 2) and not (ids == torch.arange(5)[:, None]).any()
    # the two "parse" examples are each other's nearest neighbour (shared words)
    assert ids[0, 0] == 3 and ids[3, 0] == 0
    dense = views.sparse[0].to_dense()
    brute = dense @ dense.T
    brute.fill_diagonal_(float("-inf"))
    assert torch.allclose(scores, brute.topk(2, dim=1).values, atol=1e-6)
    # query -> document ranks (own pair excluded) use the separate sides
    _, qd = views.neighbours(1, between="query_document")
    assert qd[0, 0] == 3
    # cached per argument set: the same tensors again, equal to a fresh ranking; blocks of 2 rows agree
    assert views.neighbours(2)[1] is ids
    assert torch.equal(views.neighbours(2, block=2)[1], ids)
    explicit = tfidf_views(TEXTS_Q, TEXTS_D, dim=3, device="cpu")
    assert torch.equal(explicit.neighbours(1, between="query_document")[1], qd)


def test_tfidf_weights_follow_the_formula():
    """scikit-learn underneath, batchlab's weighting on top: sublinear tf x smoothed idf, L2 rows."""
    import math
    from collections import Counter

    teacher = TfidfTeacher(dim=2).fit(TEXTS_Q + TEXTS_D)
    words = [analyze(t) for t in TEXTS_Q + TEXTS_D]
    n, df = len(words), Counter(w for ws in words for w in set(ws))
    dense = teacher.transform(TEXTS_Q).to_dense()
    for row, ws in enumerate(words[: len(TEXTS_Q)]):
        weights = {w: (1 + math.log(c)) * (math.log((1 + n) / (1 + df[w])) + 1) for w, c in Counter(ws).items()}
        norm = math.sqrt(sum(v * v for v in weights.values()))
        expected = torch.zeros(len(teacher.vocabulary))
        for w, v in weights.items():
            expected[teacher.vocabulary[w]] = v / norm
        assert torch.allclose(dense[row], expected, atol=1e-6)
    assert torch.equal(teacher.embed(["zzz unknown"]), torch.zeros(1, 2))  # no known word: a zero row


def test_tfidf_bad_input():
    with pytest.raises(BatchlabInputError, match="no texts"):
        TfidfTeacher().fit([])
    with pytest.raises(BatchlabInputError, match="min_df"):
        TfidfTeacher(min_df=3).fit(["a b", "c d"])
    with pytest.raises(BatchlabInputError, match="fit"):
        TfidfTeacher().embed(["x"])
    with pytest.raises(BatchlabInputError, match="k must be"):
        tfidf_views(TEXTS_Q, TEXTS_D, dim=2).neighbours(5)


# -- samplers by name -------------------------------------------------------------
def test_random_batch_sampler_contract():
    sampler = RandomBatchSampler(10, 4, seed=3)
    first = list(sampler)
    assert [len(b) for b in first] == [4, 4, 2] and sorted(sum(first, [])) == list(range(10))
    assert list(RandomBatchSampler(10, 4, seed=3)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


@pytest.fixture(scope="module")
def views():
    from batchlab.datasets import gaussian_mixture

    x, _ = gaussian_mixture(128, 16, 8, seed=0)
    return TeacherViews(x)


@pytest.mark.parametrize("name", ["random", "cluster", "community", "hard_negative"])
def test_make_sampler_covers_every_example(name, views):
    options = {"community": {"group_size": 8, "rank_window": (1, 9)}}.get(name, {})
    sampler = make_sampler(name, views, batch_size=32, seed=0, drop_last=False, **options)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(sum(batches, [])) == list(range(128))


def test_make_sampler_bad_input(views):
    with pytest.raises(BatchlabInputError, match="unknown sampler"):
        make_sampler("clustre", views, batch_size=32)
    with pytest.raises(BatchlabInputError, match="teacher"):
        make_sampler("community", None, batch_size=32)
    with pytest.raises(BatchlabInputError, match="group_size"):  # an option the sampler does not take
        make_sampler("hard_negative", views, batch_size=32, group_size=8)


def test_model_teacher_schedule_refreshes():
    calls = []

    def model_views():
        calls.append(1)
        return TeacherViews(torch.nn.functional.normalize(torch.randn(64, 8), dim=1))

    schedule = SamplerSchedule("cluster", None, batch_size=16, num_examples=64, model_views=model_views, refresh_every=2)
    assert isinstance(schedule(0), RandomBatchSampler) and not calls  # first epoch: random batches
    first = schedule(1)
    assert len(calls) == 1 and not isinstance(first, RandomBatchSampler)
    assert schedule(2) is not first and len(calls) == 2  # refreshed at epoch 2
    assert schedule(3) is schedule(3) and len(calls) == 2


# -- a few training steps -----------------------------------------------------------
def _pairs(n):
    words = ["parse", "draw", "close", "open", "read", "write", "sort", "merge"]
    return [(f"{words[i % 8]} the {words[(i // 8) % 8]} item number {i}", f"def {words[i % 8]}_{i}(x):\n    return x")
            for i in range(n)]


def test_dual_encoder_steps_learn_and_write_files(tmp_path):
    train, test = _pairs(64), _pairs(80)[64:]
    result = train_dual_encoder(train, test, sampler="community", batch_size=32, epochs=2, progress=False,
                                sampler_options={"group_size": 8, "rank_window": (1, 9)}, out=tmp_path, name="t")
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert set(result.metrics) == {"recall@1", "recall@10", "mrr"}
    assert result.checkpoint.exists() and result.plot.exists()
    state = torch.load(result.checkpoint, weights_only=False)
    assert state["epoch"] == 2 and state["sampler"]["sampler"] == "CommunityBatchSampler"
    # the model moved away from its initialisation
    from batchlab.recipes.models import text_encoder

    fresh = text_encoder(seed=0).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in result.model.state_dict().items())


def test_dual_encoder_with_jest_and_siglip():
    from batchlab.samplers import JointExampleSelector

    selector = JointExampleSelector(n_chunks=2, filter_ratio=0.5, seed=0)
    result = train_dual_encoder(_pairs(64), _pairs(72)[64:], sampler="random", batch_size=16, epochs=1,
                                loss="siglip", jest=selector, progress=False, eval_every=0)
    assert len(result.losses) == 2  # 64 examples in super-batches of 32, each cut to 16
    assert selector.step == 2


def test_embedding_cache_gives_the_same_training():
    # GradCache computes the whole batch's gradient chunk by chunk: same losses as one pass
    kwargs = dict(sampler="random", batch_size=32, epochs=2, progress=False, eval_every=0)
    plain = train_dual_encoder(_pairs(64), _pairs(72)[64:], **kwargs)
    cached = train_dual_encoder(_pairs(64), _pairs(72)[64:], embedding_cache=8, **kwargs)
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4)
    assert cached.metrics == pytest.approx(plain.metrics, abs=1e-6)


def test_dual_encoder_bad_input():
    with pytest.raises(BatchlabInputError, match="epochs"):
        train_dual_encoder(_pairs(8), _pairs(8), epochs=0)
    with pytest.raises(BatchlabInputError, match="pairs"):
        train_dual_encoder([], _pairs(8))
    with pytest.raises(BatchlabInputError, match="loss"):
        train_dual_encoder(_pairs(8), _pairs(8), loss="hinge")
    with pytest.raises(BatchlabInputError, match="teacher"):
        train_dual_encoder(_pairs(8), _pairs(8), sampler="cluster", teacher="bm25")
    with pytest.raises(BatchlabInputError, match="batch_size=4"):
        train_dual_encoder(_pairs(8), _pairs(8), sampler=RandomBatchSampler(8, 2), batch_size=4)
    with pytest.raises(BatchlabInputError, match="batch_size=8"):
        train_clip(_TinyImages(16, 0), _TinyImages(8, 1), sampler=RandomBatchSampler(16, 4), batch_size=8)


class _TinyImages(torch.utils.data.Dataset):
    """Stand-in for fashion_mnist: 10 classes of 28x28 images whose brightness pattern is the class."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 10
        self.images = (torch.rand(n, 28, 28, generator=g) * 40 + self.labels[:, None, None] * 20).to(torch.uint8)

    def __len__(self):
        return len(self.labels)

    def caption(self, i):
        from batchlab.datasets.fashion_mnist import caption_for

        return caption_for(int(self.labels[i]), i)


def test_clip_steps_with_pixel_teacher(tmp_path):
    result = train_clip(_TinyImages(64, 0), _TinyImages(20, 1), sampler="cluster", teacher="pixels", batch_size=32,
                        epochs=1, progress=False, out=tmp_path)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert set(result.metrics) == {"recall@1", "recall@10", "mrr"}
    assert result.plot.exists()


def test_make_sampler_builds_tas_topic_batches():
    """TAS lives in make_sampler (the recipes and the fine-tuning recipe share it), strict options."""
    from batchlab.errors import BatchlabInputError
    from batchlab.recipes.samplers import make_sampler
    from batchlab.samplers import TASBalancedBatchSampler

    teacher = torch.nn.functional.normalize(torch.randn(400, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    sampler = make_sampler("tas", teacher, batch_size=32, seed=0)
    assert isinstance(sampler, TASBalancedBatchSampler)
    seen = [i for batch in sampler for i in batch]
    assert len(seen) == len(set(seen)) == 384  # drop_last: 12 full batches, no example twice
    with pytest.raises(BatchlabInputError, match="takes no option"):
        make_sampler("tas", teacher, batch_size=32, group_size=3)


def test_random_sampler_refuses_an_impossible_rank_split_at_construction():
    from batchlab.errors import BatchlabInputError
    from batchlab.recipes.samplers import RandomBatchSampler

    with pytest.raises(BatchlabInputError, match="equal, non-empty shares"):
        RandomBatchSampler(3, 2, num_replicas=2, rank=0)
    assert len(RandomBatchSampler(3, 2, num_replicas=2, rank=0, drop_last=True)) == 1
