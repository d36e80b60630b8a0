"""Audit of finetune's (`batchlab train --model`) checkpoints: a damaged checkpoint (a truncated
trainer_state.pt or model file, as a copy cut short leaves) is refused with what and how to fix it,
through the API and in one line on the command line, instead of a torch / safetensors traceback."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("sentence_transformers")

from batchlab import cli  # noqa: E402
from batchlab.commands._common import EXIT_BAD_INPUT, EXIT_OK  # noqa: E402
from batchlab.errors import BatchlabInputError  # noqa: E402
from batchlab.integrations.sentence_transformers.testing import save_tiny_model  # noqa: E402
from batchlab.recipes.finetune import finetune  # noqa: E402
from tests.test_finetune import TRAIN  # noqa: E402


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_checkpoint_is_refused_with_the_fix(tmp_path, capsys):
    tiny = save_tiny_model(tmp_path / "tiny", hidden_size=16)
    base = ["train", "--model", str(tiny), "--dataset", "codesearch", "--max-train", "24", "--max-test", "8",
            "--steps", "4", "--batch-size", "8", "--no-progress", "--threads", "1", "--out", str(tmp_path)]
    assert cli.main(base + ["--name", "first"]) == EXIT_OK, capsys.readouterr().err
    good = tmp_path / "first" / "checkpoints" / "step-3"  # 3 steps an epoch
    weights = [p.name for p in good.iterdir() if p.suffix in (".safetensors", ".bin")]
    assert weights, list(good.iterdir())
    for damaged, what in (("trainer_state.pt", "not a readable finetune checkpoint"), (weights[0], "is not readable")):
        bad = tmp_path / f"bad-{damaged}"
        shutil.copytree(good, bad)
        _cut(bad / damaged)
        if damaged == "trainer_state.pt":  # read before the settings are compared
            with pytest.raises(BatchlabInputError, match=what):
                finetune(tiny, TRAIN, None, batch_size=8, steps=4, resume=bad, progress=False)
        capsys.readouterr()
        assert cli.main(base + ["--name", f"again-{damaged}", "--resume", str(bad)]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and what in last and "intact <out>/checkpoints/step-<n>" in last, err


class _RunsOnLoad:
    """A pickle payload that would call ``record`` if the loader unpickled arbitrary objects."""

    calls: list = []

    def __reduce__(self):
        return (_RunsOnLoad.calls.append, ("ran",))


def test_a_checkpoint_is_read_without_running_pickled_code(tmp_path):
    """trainer_state.pt is read with ``weights_only=True``: a state holding arbitrary objects (what a
    tampered or foreign file may carry) is refused as unreadable and nothing in it runs."""
    import torch

    tiny = save_tiny_model(tmp_path / "tiny", hidden_size=16)
    finetune(tiny, TRAIN, None, batch_size=16, steps=4, out=tmp_path / "run", progress=False)
    good = tmp_path / "run" / "checkpoints" / "step-2"  # 2 steps an epoch
    state = torch.load(good / "trainer_state.pt", weights_only=True)  # what finetune writes loads safely
    state["settings"] = dict(state["settings"], extra=_RunsOnLoad())
    torch.save(state, good / "trainer_state.pt")
    _RunsOnLoad.calls.clear()
    with pytest.raises(BatchlabInputError, match="not a readable finetune checkpoint"):
        finetune(tiny, TRAIN, None, batch_size=16, steps=4, resume=good, progress=False)
    assert _RunsOnLoad.calls == []
