"""``batchlab bench st-cached`` at a tiny size on the CPU: it runs, writes its results, and both losses agree."""

import json

import pytest

from batchlab.cli import main


def test_st_cached_bench_tiny(tmp_path, capsys):
    code = main(["bench", "st-cached", "--tiny", "--device", "cpu", "--batch-size", "24", "--mini-batch-size", "8",
                 "--seq-len", "10", "--repeats", "1", "--warmup", "0", "--tune",
                 "--variants", "tiled", "rows/0.001/2/0", "rows/1/1/0/3xtf32", "bf16", "--out", str(tmp_path)])
    assert code == 0
    out = json.loads((tmp_path / "st-cached-cpu.json").read_text())
    variants = ["auto", "tiled", "rows/0.001/2/0", "rows/1/1/0/3xtf32", "bf16"]
    assert [(r["precision"], r["batchlab"]) for r in out["loss_parts"]] == [
        (p, v) for p in ("highest", "high") for v in variants]
    for row in out["loss_parts"]:
        assert row["error"] is None and row["speedup"] > 0
        tol = 5e-2 if row["batchlab"] == "bf16" else 1e-5
        assert row["value_rel_diff"] <= tol and row["grad_rel_diff"] <= tol, row
    assert [s["precision"] for s in out["steps"]] == ["highest", "high"]
    for step in out["steps"]:
        assert step["batchlab_variant"] in ("auto", "rows/0.001/2/0")  # --tune: the faster of --impl and rows/...
        assert step["loss_rel_diff"] <= 1e-5 and step["grad_rel_diff"] <= 1e-5  # same loss, same gradients
        assert step["step_ratio"] > 0
    assert out["summary"]["highest"]["loss_part_variant"] == out["steps"][0]["batchlab_variant"]
    assert out["targets"]["peak memory no higher"] == "not measured"  # CUDA only
    assert out["stages_skipped"] == []
    assert "targets:" in capsys.readouterr().out


def test_st_cached_bench_time_limit(tmp_path):
    """Stages past --time-limit are skipped and named; the JSON is still written."""
    code = main(["bench", "st-cached", "--tiny", "--device", "cpu", "--batch-size", "8", "--mini-batch-size", "4",
                 "--seq-len", "6", "--repeats", "1", "--warmup", "0", "--variants", "--precisions", "highest",
                 "--time-limit", "0", "--out", str(tmp_path)])
    assert code == 0
    out = json.loads((tmp_path / "st-cached-cpu.json").read_text())
    assert out["stages_skipped"] == ["warm-up highest", "loss parts highest", "steps highest"]
    assert out["loss_parts"] == [] and out["steps"] == []


@pytest.mark.parametrize("bad, message", [
    (["--variants", "rows/256/8"], "rows/MiB/split/fused[/products], got 'rows/256/8'"),
    (["--variants", "rows/1/1/2"], "rows/MiB/split/fused[/products], got 'rows/1/1/2'"),
    (["--variants", "rows/1/1/1/x"], "products must be one of"),
    (["--variants", "tiled", "nope"], "impl must be one of"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
])
def test_st_cached_bench_bad_arguments_exit_2(tmp_path, capsys, bad, message):
    """A malformed --variants form or size stops the command line (exit 2) before the model loads."""
    assert main(["bench", "st-cached", "--tiny", "--device", "cpu", *bad, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_step_phases_name_where_the_peak_is():
    """The phase whose interval raised the running peak last; the memory held when the re-encode starts."""
    from batchlab.bench.st_cached import StepPhases

    phases = StepPhases(None, None, None)
    phases.marks = [("encode", 0, 5), ("encode", 10, 15), ("re-encode", 30, 60), ("re-encode", 30, 90),
                    ("optimizer", 40, 95), ("end", 40, 97)]
    assert phases.summary() == {"held_at_reencode_bytes": 30, "peak_before_reencode_bytes": 60, "peak_bytes": 97,
                                "peak_phase": "optimizer", "forwards": 4}
    phases.marks[-2:] = [("optimizer", 40, 90), ("end", 40, 90)]
    assert phases.summary()["peak_phase"] == "re-encode"
    phases.marks = [("encode", 0, 5), ("encode", 10, 15), ("re-encode", 30, 60), ("end", 30, 60)]
    assert phases.summary()["peak_phase"] == "loss"
