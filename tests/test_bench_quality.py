"""`batchlab bench quality` at CI size: a one-layer BERT built per seed, 24 synthetic pairs, 3 seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")

from batchlab.bench.quality import Models, arm_settings  # noqa: E402
from batchlab.errors import BatchlabInputError  # noqa: E402
from tests.test_finetune import make_pairs  # noqa: E402

ARMS = ["zero-shot", "random-8", "random-16", "random-16-same-examples", "random-16-cached", "random-32", "st-mined-8",
        "community-8-self", "gist-8", "sogclr-8", "isogclr-8", "colm-8", "mochi-8", "random-16-cached-same-wall",
        "scratch-4", "jest-scratch-4"]


def test_arm_names():
    assert arm_settings("zero-shot", steps=10, base_batch=64) is None
    assert arm_settings("random-1024-cached", steps=10, base_batch=64) == {
        "sampler": "random", "batch_size": 1024, "steps": 10, "cache_chunk": 256}
    assert arm_settings("st-mined-64", steps=10, base_batch=64)["mined_negatives"] == 1
    assert arm_settings("gist-64-self", steps=10, base_batch=64)["guide"] == "model"
    assert arm_settings("isogclr-64", steps=10, base_batch=64)["loss"] == "isogclr"
    assert arm_settings("colm-64", steps=10, base_batch=64)["coreset"] == 0.75
    assert arm_settings("mochi-64", steps=10, base_batch=64)["mochi"] is True
    assert arm_settings("dcl-64", steps=10, base_batch=64)["loss"] == "dcl"
    assert arm_settings("sogclr-nogamma-64", steps=10, base_batch=64)["loss_options"] == {"gamma": 1.0}
    assert arm_settings("sogclr-rescaled-64", steps=10, base_batch=64)["loss_options"] == {"rescale": True}
    assert arm_settings("mochi-noquery-64", steps=10, base_batch=64)["mochi"] == {"mix_query": 0}
    wall = arm_settings("community-1024-cached-same-wall", steps=10, base_batch=64)
    assert wall["time_budget"] == "same-wall" and wall["sampler"] == "community" and wall["steps"] == 80
    for bad in ("random-64-self", "bogus-64", "random", "random-64-same-examples-same-wall"):
        with pytest.raises(BatchlabInputError):
            arm_settings(bad, steps=10, base_batch=64)


def test_initial_weights_are_shared_by_the_arms_of_a_seed():
    models = Models("tiny", "cpu")
    a, b, c = (dict(m.state_dict()) for m in (models.initial(0), models.initial(0), models.initial(1)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pretrained_weights_are_copied_back_into_one_model(tmp_path):
    from batchlab.integrations.sentence_transformers.testing import save_tiny_model

    models = Models(str(save_tiny_model(tmp_path / "m", hidden_size=16)), "cpu")
    first = models.initial(0)
    original = {k: v.clone() for k, v in first.state_dict().items()}
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)
    first.max_seq_length = 5
    again = models.initial(1)
    assert again is first and again.max_seq_length == 32
    assert all(torch.equal(original[k], v) for k, v in again.state_dict().items())


def test_bench_quality_cpu(tmp_path, capsys):
    from batchlab.cli import main

    pairs = make_pairs(56, seed=3)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy.json").write_text(json.dumps({"train": pairs[:40], "test": pairs[40:], "source": {}}))
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
    per_seed = claims["community-8-self"]["per_seed"]
    assert sorted(per_seed) == ["0", "1", "2"]
    assert sum(per_seed.values()) / 3 == pytest.approx(claims["community-8-self"]["difference"])
    assert "st-mined-8" in {c["worse"] for c in result["claims"]["toy"]}
    by_claim = {c["claim"]: c for c in result["claims"]["toy"]}
    for arm in ("isogclr-8", "sogclr-8", "colm-8"):
        check = by_claim[f"issue 19: {arm} at least matches random-32 (same steps)"]
        assert isinstance(check["target_at_least_matches"], bool) and len(check["seeds"]) == 3
    wall_runs = [r for r in result["runs"] if r["arm"] == "random-16-cached-same-wall"]
    reference = {r["seed"]: r["seconds"]["wall"] for r in result["runs"] if r["arm"] == "st-mined-8"}
    assert all(r["time_budget"] == reference[r["seed"]] for r in wall_runs)  # the reference's own wall time
    assert "random-16-cached-same-wall beats st-mined-8 by >= +0.02 on every seed (same wall time)" in by_claim
    assert any(c["selected_on_test"] for c in result["claims"]["toy"])
    jest = next(c for c in result["claims"]["toy"] if c["better"] == "jest-scratch-4")
    assert sorted(jest["share_of_steps"]) == ["0", "1", "2"] and isinstance(jest["target_half_steps"], bool)
    assert all(len(r["history"]) == 2 for r in result["runs"] if "scratch" in r["arm"])  # every steps / 8 = 1 step
    assert (tmp_path / "out" / "quality-toy.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
    assert main(["bench", "quality", "--model", "tiny", "--data", str(tmp_path / "data"), "--datasets", "toy",
                 "--arms", "random-8", "bogus-8", "--out", str(tmp_path / "bad")]) == 2


def test_same_wall_arm_without_its_reference_run_is_an_error_not_a_crash(tmp_path, capsys, monkeypatch):
    """A failed --wall-reference run leaves its same-wall arms without a budget: each is recorded as failed
    (seed by seed) and the study goes on."""
    import batchlab.recipes.finetune as recipe
    from batchlab.cli import main

    real = recipe.finetune

    def finetune(model, *args, **kw):
        if kw.get("mined_negatives"):
            raise RuntimeError("broken reference")
        return real(model, *args, **kw)

    monkeypatch.setattr(recipe, "finetune", finetune)
    pairs = make_pairs(40, seed=6)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy.json").write_text(json.dumps({"train": pairs[:24], "test": pairs[24:], "source": {}}))
    assert main(["bench", "quality", "--model", "tiny", "--data", str(tmp_path / "data"), "--datasets", "toy",
                 "--arms", "random-8", "st-mined-8", "random-16-same-wall", "--baseline", "random-8", "--seeds", "1",
                 "--steps", "2", "--lr", "1e-3", "--no-progress", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert [r["arm"] for r in result["runs"]] == ["random-8"]
    assert [(e["arm"], e["error"]) for e in result["errors"]] == [
        ("st-mined-8", "RuntimeError: broken reference"),
        ("random-16-same-wall", "RuntimeError: --wall-reference st-mined-8 has no run on toy, seed 0")]


def test_merge_combines_seeds_run_in_separate_calls(tmp_path, capsys):
    """Seeds 0-1 with one extra arm, then seeds 2-3 without it: one study, each claim paired on the common seeds."""
    from batchlab.cli import main

    pairs = make_pairs(40, seed=4)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy.json").write_text(json.dumps({"train": pairs[:24], "test": pairs[24:], "source": {}}))
    common = ["--model", "tiny", "--data", str(tmp_path / "data"), "--datasets", "toy", "--baseline", "random-8",
              "--steps", "2", "--lr", "1e-3", "--no-progress"]
    assert main(["bench", "quality", *common, "--arms", "random-8", "community-8", "mochi-8", "--seeds", "2",
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["bench", "quality", *common, "--arms", "random-8", "community-8", "--seed", "2", "--seeds", "2",
                 "--out", str(tmp_path / "b")]) == 0
    files = [str(tmp_path / x / "quality.json") for x in ("a", "b")]
    assert main(["bench", "quality", "--merge", *files, "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "quality.json").read_text())
    summary = merged["summary"]["toy"]
    assert summary["community-8"]["seeds"] == 4 and summary["mochi-8"]["seeds"] == 2
    mochi = summary["mochi-8"]["ndcg@10_vs_random-8"]
    assert mochi["basis"] == "paired by seed" and mochi["seeds"] == [0, 1]
    claims = {c["better"]: c for c in merged["claims"]["toy"]}
    assert claims["community-8"]["seeds"] == [0, 1, 2, 3] and claims["mochi-8"]["seeds"] == [0, 1]
    assert (tmp_path / "m" / "quality-toy.png").stat().st_size > 0
    assert "repeats" not in merged and "repeated runs" not in capsys.readouterr().out
    # the same file twice, or another study, are refused
    assert main(["bench", "quality", "--merge", files[0], files[0], "--out", str(tmp_path / "x")]) == 2
    other = json.loads(Path(files[1]).read_text())
    other["settings"]["steps"] = 3
    Path(tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["bench", "quality", "--merge", files[0], str(tmp_path / "other.json"), "--out", str(tmp_path / "y")]) == 2
    assert "another study" in capsys.readouterr().err


def test_merge_refuses_unreadable_files_with_exit_2(tmp_path, capsys):
    """A missing file, a file that is not JSON, or JSON that is not a quality.json: exit 2 naming the file."""
    from batchlab.cli import main

    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"runs": []}))
    for name, message in (("missing.json", "cannot read it as a quality.json (FileNotFoundError"),
                          ("garbage.json", "cannot read it as a quality.json (JSONDecodeError"),
                          ("other.json", "is not a quality.json of this benchmark (no settings, datasets, arm_settings, "
                                         "command)")):
        path = str(tmp_path / name)
        assert main(["bench", "quality", "--merge", path, "--out", str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert f"{path}: " in err or f"{path} is" in err
        assert message in err
    assert not (tmp_path / "m").exists()
    assert main(["bench", "quality", "--cache-chunk", "0", "--out", str(tmp_path / "m")]) == 2
    assert "--cache-chunk: expected an integer >= 1" in capsys.readouterr().err


def test_merge_keeps_the_first_files_repeated_runs_and_reports_the_differences(tmp_path, capsys):
    """Every call runs the baseline: a (dataset, arm, seed) run in two files keeps the first file's, and the
    differences of each metric between the files are reported; a repeat with other arm settings is refused."""
    from batchlab.cli import main
    from batchlab.recipes._evaluation import METRICS

    pairs = make_pairs(40, seed=5)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy.json").write_text(json.dumps({"train": pairs[:24], "test": pairs[24:], "source": {}}))
    assert main(["bench", "quality", "--model", "tiny", "--data", str(tmp_path / "data"), "--datasets", "toy",
                 "--baseline", "random-8", "--steps", "2", "--lr", "1e-3", "--no-progress", "--arms", "random-8",
                 "gist-8", "--seeds", "2", "--out", str(tmp_path / "a")]) == 0
    a = json.loads((tmp_path / "a" / "quality.json").read_text())
    # a second call: the baseline again on both seeds (shifted metrics), a new arm, and another --time-budget
    b = json.loads(json.dumps(a))
    b["settings"]["time_budget"] = 99.0
    shift = {0: 0.01, 1: -0.03}
    b["runs"] = [r for r in b["runs"] if r["arm"] == "random-8"]
    for r in b["runs"]:
        r["metrics"] = {m: v + shift[r["seed"]] * (i + 1) for i, (m, v) in enumerate(r["metrics"].items())}
        r["seconds"]["wall"] += 0.5
    b["runs"] += [{**r, "arm": "colm-8"} for r in a["runs"] if r["arm"] == "gist-8"]
    b["arm_settings"] = {"random-8": a["arm_settings"]["random-8"], "colm-8": {"coreset": 0.75}}
    (tmp_path / "b.json").write_text(json.dumps(b))
    files = [str(tmp_path / "a" / "quality.json"), str(tmp_path / "b.json")]
    assert main(["bench", "quality", "--merge", *files, "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "quality.json").read_text())
    kept = {(r["arm"], r["seed"]): r["metrics"] for r in merged["runs"]}
    assert len(merged["runs"]) == 6 and all(kept[("random-8", s)] == r["metrics"]
                                            for s, r in ((r["seed"], r) for r in a["runs"] if r["arm"] == "random-8"))
    repeats = merged["repeats"]
    assert [(x["arm"], x["seed"], x["kept_from"], x["repeat_from"]) for x in repeats["runs"]] == [
        ("random-8", 0, files[0], files[1]), ("random-8", 1, files[0], files[1])]
    for x in repeats["runs"]:
        assert x["difference"] == pytest.approx({m: shift[x["seed"]] * (i + 1) for i, m in enumerate(METRICS)})
        assert x["wall_seconds_difference"] == pytest.approx(0.5)
    assert repeats["max_abs_difference"] == pytest.approx({m: 0.03 * (i + 1) for i, m in enumerate(METRICS)})
    assert merged["summary"]["toy"]["colm-8"]["seeds"] == 2 and "colm-8" in merged["arm_settings"]
    out = capsys.readouterr().out
    assert "repeated runs: 2 (random-8 x2; the first file's run kept)" in out and "ndcg@10 0.0300" in out
    # an arm whose settings differ (repeated or not), a run twice in one file, or a study setting that differs: refused
    b["arm_settings"]["random-8"] = {**a["arm_settings"]["random-8"], "steps": 3}
    (tmp_path / "c.json").write_text(json.dumps(b))
    assert main(["bench", "quality", "--merge", files[0], str(tmp_path / "c.json"), "--out", str(tmp_path / "x")]) == 2
    assert "arm random-8 has other settings" in capsys.readouterr().err
    b["arm_settings"]["random-8"] = a["arm_settings"]["random-8"]
    b["arm_settings"]["gist-8"] = {**a["arm_settings"]["gist-8"], "guide": "model"}  # an arm without repeated runs
    (tmp_path / "c.json").write_text(json.dumps(b))
    assert main(["bench", "quality", "--merge", files[0], str(tmp_path / "c.json"), "--out", str(tmp_path / "x")]) == 2
    assert "arm gist-8 has other settings" in capsys.readouterr().err
    del b["arm_settings"]["gist-8"]
    twice = json.loads(json.dumps(a))
    twice["runs"].append(twice["runs"][0])
    (tmp_path / "d.json").write_text(json.dumps(twice))
    assert main(["bench", "quality", "--merge", str(tmp_path / "d.json"), files[1], "--out", str(tmp_path / "y")]) == 2
    assert "in the file twice" in capsys.readouterr().err
    b["arm_settings"]["random-8"] = a["arm_settings"]["random-8"]
    b["settings"]["max_seq_length"] = 17
    (tmp_path / "e.json").write_text(json.dumps(b))
    assert main(["bench", "quality", "--merge", files[0], str(tmp_path / "e.json"), "--out", str(tmp_path / "z")]) == 2
    assert "max_seq_length differ" in capsys.readouterr().err


def test_default_arms_are_the_committed_study():
    """``bench quality`` without ``--arms`` reruns the 25 arms of the committed 5-seed study, in its order."""
    import json
    from pathlib import Path

    from batchlab.bench.quality import DEFAULT_ARMS, arm_settings

    study = Path(__file__).resolve().parents[1] / "benchmarks/results/quality-h200-5seeds/quality.json"
    summary = json.loads(study.read_text())["summary"]
    for dataset in ("codesearch", "wordnet"):
        assert list(summary[dataset]) == list(DEFAULT_ARMS)
    for arm in DEFAULT_ARMS:
        arm_settings(arm, steps=8, base_batch=64)  # every default arm is a valid name
