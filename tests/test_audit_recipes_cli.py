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
