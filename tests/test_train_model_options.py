"""`batchlab train --model`'s options that reach finetune(): --loss dcl/sogclr/isogclr, --mochi, --coreset,
--time-budget. Each one is checked where it lands (finetune.json's settings, the run's name), and each
bad value or combination is refused with exit code 2 and a one-line message naming the flag.

A one-layer BERT (integrations' save_tiny_model, hidden size 16) on 24 codesearch pairs, 2 steps of 8.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sentence_transformers")

from batchlab import cli  # noqa: E402
from batchlab.commands._common import EXIT_BAD_INPUT, EXIT_OK  # noqa: E402
from batchlab.integrations.sentence_transformers.testing import save_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=16)


def base(tiny_path, out) -> list[str]:
    return ["train", "--model", str(tiny_path), "--dataset", "codesearch", "--max-train", "24", "--max-test", "8",
            "--steps", "2", "--batch-size", "8", "--no-progress", "--threads", "1", "--out", str(out)]


@pytest.mark.parametrize("flags, name_part, expected", [
    (["--loss", "isogclr"], "loss-isogclr", {"loss": "isogclr"}),
    (["--loss", "sogclr"], "loss-sogclr", {"loss": "sogclr"}),
    (["--loss", "dcl", "--mochi", "mix_query=0"], "loss-dcl", {"loss": "dcl", "mochi": {
        "num_hardest": 16, "num_synthetic": 16, "mix_query": 0, "query_weight_max": 0.5}}),
    ([], None, {"loss": "mnrl", "mochi": None, "coreset": None, "time_budget": None}),
    (["--mochi"], "mochi-default", {"mochi": {"num_hardest": 16, "num_synthetic": 16, "mix_query": 8,
                                              "query_weight_max": 0.5}}),
    (["--mochi", "num-hardest=4", "mix_query=0"], "mochi-mix_query=0,num_hardest=4",
     {"mochi": {"num_hardest": 4, "num_synthetic": 16, "mix_query": 0, "query_weight_max": 0.5}}),
    (["--coreset", "0.5"], "coreset-0.5", {"coreset": 0.5}),
    (["--time-budget", "600"], "time-budget-600.0", {"time_budget": 600.0, "total_steps": None}),
])
def test_option_reaches_finetune_and_names_the_run(tiny_path, tmp_path, capsys, flags, name_part, expected):
    assert cli.main(base(tiny_path, tmp_path) + flags) == EXIT_OK, capsys.readouterr().err
    (run,) = [p for p in tmp_path.iterdir() if (p / "finetune.json").exists()]
    if name_part is None:
        assert not any(part in run.name for part in ("loss", "mochi", "coreset", "time-budget")), run.name
    else:
        assert name_part in run.name, run.name
    record = json.loads((run / "finetune.json").read_text())
    for key, value in expected.items():
        assert record["settings"][key] == value, key
    assert record["steps"] == 2  # the budget is far from spent: --steps caps the count
    if "--coreset" in flags:  # CoLM keeps 8 of each super-batch of 16 (filter ratio 0.5)
        assert record["examples"] == 2 * 8


def test_run_names_hold_the_new_options():
    from batchlab.commands._train_model import model_run_name

    parser = cli.build_parser()
    name = model_run_name(parser.parse_args(["train", "--model", "minilm", "--mochi", "num_hardest=16", "--time-budget",
                                             "90"]), "codesearch-random-64")
    # an override equal to the default is the default run
    assert name == "codesearch-random-64-model-minilm-mochi-default-time-budget-90.0"
    from batchlab.commands.train import run_name

    assert "coreset-0.75" in run_name(parser.parse_args(["train", "--model", "minilm", "--coreset", "0.75"]))


def test_mochi_defaults_are_finetunes():
    from batchlab.commands._train_model import MOCHI_DEFAULTS
    from batchlab.recipes.finetune import MOCHI_DEFAULTS as RECIPE

    assert MOCHI_DEFAULTS == RECIPE


@pytest.mark.parametrize("flags, message", [
    (["--mochi", "num_hardest=0"], "argument --mochi: num_hardest must be an integer >= 1, got 0"),
    (["--mochi", "num_hardest=2.5"], "argument --mochi: num_hardest must be an integer >= 1, got '2.5'"),
    (["--mochi", "hardest=4"], "argument --mochi: expected KEY=VALUE with KEY one of"),
    (["--mochi", "num_hardest"], "argument --mochi: expected KEY=VALUE"),
    (["--mochi", "query_weight_max=1.5"], "query_weight_max must be a number in [0, 1], got 1.5"),
    (["--mochi", "query_weight_max=nan"], "query_weight_max must be a number in [0, 1], got nan"),
    (["--mochi", "mix_query=-1"], "mix_query must be an integer >= 0, got -1"),
    (["--mochi", "num_synthetic=0", "mix_query=0"], "synthesise no negative"),
    (["--mochi", "mix_query=1", "mix_query=2"], "mix_query given twice"),
    (["--coreset", "1"], "argument --coreset: expected a filter ratio in (0, 1)"),
    (["--coreset", "0"], "argument --coreset: expected a filter ratio in (0, 1)"),
    (["--coreset", "half"], "argument --coreset: expected a filter ratio in (0, 1)"),
    (["--time-budget", "0"], "argument --time-budget: expected a finite number > 0"),
    (["--time-budget", "-5"], "argument --time-budget: expected a finite number > 0"),
    (["--time-budget", "inf"], "argument --time-budget: expected a finite number > 0"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    (["--mined-negatives", "-1"], "argument --mined-negatives: expected an integer >= 0, got -1"),
    (["--cache-chunk", "0"], "argument --cache-chunk: expected an integer >= 1, got 0"),
    (["--max-seq-length", "0"], "argument --max-seq-length: expected an integer >= 1, got 0"),
    (["--loss", "siglip"], "--loss siglip is a tiny-model loss; --model takes info_nce"),
    (["--loss", "isogclr", "--coreset", "0.5"], "--loss isogclr takes no --coreset with --model"),
    (["--loss", "sogclr", "--mochi"], "--loss sogclr takes no --mochi with --model"),
    (["--time-budget", "30", "--resume", "somewhere"], "a run under --time-budget cannot --resume"),
    (["--jest", "0.5"], "--jest is a tiny-model option"),
    (["--impl", "triton"], "--impl chooses the tiny models' loss implementation"),
    (["--coreset", "0.9"], "super-batch (80) is larger than the training set (24 pairs)"),  # finetune's own check
])
def test_bad_values_are_refused_in_one_line(tiny_path, tmp_path, capsys, flags, message):
    assert cli.main(base(tiny_path, tmp_path) + flags) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("batchlab train") and message in last, err
    assert "Traceback" not in err
    assert not any((p / "finetune.json").exists() for p in tmp_path.iterdir())


@pytest.mark.parametrize("flags", [["--mochi"], ["--time-budget", "60"], ["--steps", "3"]])
def test_model_options_without_model_are_refused(tmp_path, capsys, flags):
    assert cli.main(["train", "--max-train", "8", "--out", str(tmp_path)] + flags) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("batchlab train: error: --") and "only applies with --model" in err and "\n" not in err


def test_resume_with_changed_options_is_refused_in_one_line(tiny_path, tmp_path, capsys):
    first = base(tiny_path, tmp_path) + ["--steps", "4", "--mochi", "--name", "first"]  # 3 steps an epoch: step-3
    assert cli.main(first) == EXIT_OK, capsys.readouterr().err
    checkpoint = tmp_path / "first" / "checkpoints" / "step-3"
    assert (checkpoint / "trainer_state.pt").exists()
    capsys.readouterr()
    again = base(tiny_path, tmp_path) + ["--steps", "4", "--mochi", "mix_query=0", "--name", "again",
                                         "--resume", str(checkpoint)]
    assert cli.main(again) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (above it: the weights' loading bar)
    assert last.startswith("batchlab train --model: error: the checkpoint") and "mochi=" in last, err
    assert "Traceback" not in err
    assert not (tmp_path / "again" / "finetune.json").exists()
