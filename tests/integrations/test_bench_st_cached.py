"""``batchlab bench st-cached`` at a tiny size on the CPU: it runs, writes its results, and both losses agree."""

import json

from batchlab.cli import main


def test_st_cached_bench_tiny(tmp_path, capsys):
    code = main(["bench", "st-cached", "--tiny", "--device", "cpu", "--batch-size", "24", "--mini-batch-size", "8",
                 "--seq-len", "10", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert code == 0
    out = json.loads((tmp_path / "st-cached-cpu.json").read_text())
    assert set(out["steps"]) == {"sentence-transformers", "batchlab"}
    assert [(r["precision"], r["st_loss_chunk"], r["batchlab_impl"]) for r in out["loss_parts"]] == [
        (p, c, i) for p in ("fp32", "tf32") for i in ("auto", "tiled") for c in (8, 32)]
    summary = out["summary"]
    assert summary["loss_rel_diff"] <= 1e-5 and summary["grad_rel_diff"] <= 1e-5  # same loss, same gradients
    assert summary["loss_part_speedup"] > 0 and summary["step_ratio"] > 0
    assert out["targets"]["peak memory no higher"] == "not measured"  # CUDA only
    assert "targets:" in capsys.readouterr().out
