"""`batchlab bench quality` at CI size: a one-layer BERT built per seed, 24 synthetic pairs, 3 seeds."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sentence_transformers")

from batchlab.bench.quality import Models, arm_settings  # noqa: E402
from batchlab.errors import BatchlabInputError  # noqa: E402
from tests.test_finetune import make_pairs  # noqa: E402

ARMS = ["zero-shot", "random-8", "random-16", "random-16-same-examples", "random-16-cached", "st-mined-8", "community-8-self",
        "gist-8", "sogclr-8", "scratch-4", "jest-scratch-4"]


def test_arm_names():
    assert arm_settings("zero-shot", steps=10, base_batch=64) is None
    assert arm_settings("random-1024-cached", steps=10, base_batch=64) == {
        "sampler": "random", "batch_size": 1024, "steps": 10, "cache_chunk": 256}
    assert arm_settings("st-mined-64", steps=10, base_batch=64)["mined_negatives"] == 1
    assert arm_settings("gist-64-self", steps=10, base_batch=64)["guide"] == "model"
    for bad in ("random-64-self", "bogus-64", "random"):
        with pytest.raises(BatchlabInputError):
            arm_settings(bad, steps=10, base_batch=64)


def test_initial_weights_are_shared_by_the_arms_of_a_seed():
    models = Models("tiny", "cpu")
    a, b, c = (dict(m.state_dict()) for m in (models.initial(0), models.initial(0), models.initial(1)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bench_quality_cpu(tmp_path, capsys):
    from batchlab.cli import main

    pairs = make_pairs(40, seed=3)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy.json").write_text(json.dumps({"train": pairs[:24], "test": pairs[24:], "source": {}}))
    code = main(["bench", "quality", "--model", "tiny", "--data", str(tmp_path / "data"), "--datasets", "toy",
                 "--arms", *ARMS, "--baseline", "random-8", "--seeds", "3", "--steps", "2", "--lr", "1e-3",
                 "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert result["seeds_done"] == 3 and len(result["runs"]) == 3 * len(ARMS)
    summary = result["summary"]["toy"]
    assert summary["random-16-same-examples"]["steps"] == 1 and summary["random-16"]["steps"] == 2
    assert summary["random-16"]["examples"] == 2 * summary["random-8"]["examples"]
    diff = summary["community-8-self"]["ndcg@10_vs_random-8"]
    assert diff["basis"] == "paired by seed" and len(diff["seeds"]) == 3 and diff["standard_error"] is not None
    claims = {c["better"]: c for c in result["claims"]["toy"]}
    assert claims["community-8-self"]["verdict"] is not None  # 3 seeds: a verdict
    assert "st-mined-8" in {c["worse"] for c in result["claims"]["toy"]}
    jest = next(c for c in result["claims"]["toy"] if c["better"] == "jest-scratch-4")
    assert sorted(jest["share_of_steps"]) == ["0", "1", "2"] and isinstance(jest["target_half_steps"], bool)
    assert all(len(r["history"]) == 2 for r in result["runs"] if "scratch" in r["arm"])  # every steps / 8 = 1 step
    assert (tmp_path / "out" / "quality-toy.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
    assert main(["bench", "quality", "--model", "tiny", "--data", str(tmp_path / "data"), "--datasets", "toy",
                 "--arms", "random-8", "bogus-8", "--out", str(tmp_path / "bad")]) == 2
