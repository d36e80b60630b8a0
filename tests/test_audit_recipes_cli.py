"""Audit of `batchlab train`'s artifacts: an interrupted write of the JSON summary or the PNG curve
leaves the previous file whole (and no temporary beside it), as the checkpoint already did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchlab import cli
from batchlab.commands._common import EXIT_OK
from tests.test_recipes_runs import _pairs


@pytest.fixture
def tiny_run(tmp_path):
    data = tmp_path / "pairs.tsv"
    data.write_text("".join(f"{q}\t{d!r}\n" for q, d in _pairs(40)))
    args = ["train", "--data", str(data), "--epochs", "1", "--batch-size", "8", "--max-test", "8", "--threads", "1",
            "--out", str(tmp_path / "out"), "--name", "run", "--no-progress"]
    assert cli.main(args) == EXIT_OK
    return tmp_path / "out", args


def _killed_half_way(original, suffix):
    def write(self, data, *args, **kwargs):
        if suffix in Path(self).name:
            original(self, data[: len(data) // 2], *args, **kwargs)
            raise KeyboardInterrupt("killed mid-write")
        return original(self, data, *args, **kwargs)

    return write


@pytest.mark.parametrize("artifact", ["json", "png"])
def test_an_interrupted_overwrite_keeps_the_previous_summary_and_plot(tiny_run, monkeypatch, artifact):
    out, args = tiny_run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["run.json", "run.png", "run.pt"]
    if artifact == "json":
        monkeypatch.setattr(Path, "write_text", _killed_half_way(Path.write_text, ".json"))
    else:
        from matplotlib.figure import Figure

        def savefig(self, fname, **kwargs):  # the PNG writer dies after the first bytes
            Path(fname).write_bytes(before["run.png"][:100])
            raise KeyboardInterrupt("killed mid-write")

        monkeypatch.setattr(Figure, "savefig", savefig)
    assert cli.main(args + ["--overwrite"]) != EXIT_OK
    assert (out / f"run.{artifact}").read_bytes() == before[f"run.{artifact}"]
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "run.png", "run.pt"]  # no temporary left
    json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("flags, message", [
    (["--test-data", "t.tsv"], "--test-data is the held-out split of your --data file; add --data FILE"),
    (["--test-data", "t.tsv", "--model", "minilm"], "--test-data is the held-out split of your --data file"),
    (["--dataset", "fashion_mnist", "--data", "p.tsv"], "--data trains the text dual encoder on your pairs, not fashion_mnist"),
    (["--data-path", "idx"], "--data-path is the folder of fashion_mnist's IDX files; --dataset codesearch does not"),
    (["--data-path", "idx", "--data", "p.tsv"], "--data-path is the folder of fashion_mnist's IDX files"),
])
def test_a_data_flag_that_would_be_ignored_is_refused(tmp_path, capsys, flags, message):
    """These ran to exit 0 with the flag silently unused (codesearch's own test split instead of --test-data)."""
    from batchlab.commands._common import EXIT_BAD_INPUT

    (tmp_path / "p.tsv").write_text("".join(f"{q}\t{d!r}\n" for q, d in _pairs(40)))
    small = ["--max-train", "16", "--max-test", "8", "--epochs", "1", "--batch-size", "8", "--threads", "1"]
    out = tmp_path / "out"
    flags = [str(tmp_path / f) if f.endswith(".tsv") else f for f in flags]
    assert cli.main(["train", "--out", str(out), "--no-progress", *small, *flags]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"batchlab train: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()
