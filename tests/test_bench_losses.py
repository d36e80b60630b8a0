"""``batchlab bench losses`` on the CPU at toy sizes: several widths in one run, ratios per width, replot."""

import json

from batchlab.bench import losses as bench


def test_sizes_and_widths_in_one_run_with_ratios_and_replot(tmp_path):
    argv = ["--sizes", "16,24", "--dim", "8", "12", "--methods", "batchlab reference", "batchlab tiled",
            "--repeats", "1", "--families", "info_nce", "--out", str(tmp_path), "--tag=-t"]
    assert bench.main(argv) == 0
    payload = json.loads((tmp_path / "losses-cpu-t.json").read_text())
    rows = payload["rows"]
    assert {(r["N"], r["d"], r["method"]) for r in rows} == {
        (n, d, m) for n in (16, 24) for d in (8, 12) for m in ("batchlab reference", "batchlab tiled")}
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0
        ref = next(x for x in rows if (x["N"], x["d"], x["method"]) == (r["N"], r["d"], "batchlab reference"))
        assert abs(r["x_reference"] - r["ms"] / ref["ms"]) < 1e-9  # the anchor of the same width
    for png in tmp_path.glob("*.png"):
        png.unlink()
    assert bench.main(["--replot", str(tmp_path / "losses-cpu-t.json")]) == 0
    assert sorted(p.name for p in tmp_path.glob("*-time.png")) == ["losses-cpu-t-d12-time.png",
                                                                   "losses-cpu-t-d8-time.png"]


def test_replot_of_a_missing_or_foreign_file_exits_2(tmp_path, capsys):
    assert bench.main(["--replot", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {tmp_path / 'missing.json'} (FileNotFoundError" in err
    (tmp_path / "other.json").write_text(json.dumps({"runs": []}))
    assert bench.main(["--replot", str(tmp_path / "other.json")]) == 2
    assert "is not a results file of this benchmark (no rows)" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
