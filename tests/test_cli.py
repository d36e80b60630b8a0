"""The `batchlab` command: every subcommand's --help, tiny runs, and exit codes that mean something."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest

from batchlab import cli
from batchlab.commands import bench
from batchlab.commands._common import EXIT_BAD_INPUT, EXIT_MISSING, EXIT_OK


def test_top_level_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    for _, name, _ in cli.SUBCOMMANDS:
        assert name in out


def test_no_subcommand_is_a_usage_error(capsys):
    assert cli.main([]) == EXIT_BAD_INPUT
    assert cli.main(["no-such-command"]) == EXIT_BAD_INPUT


@pytest.mark.parametrize("name", [name for _, name, _ in cli.SUBCOMMANDS])
def test_every_subcommand_has_help_with_an_example_and_common_flags(name, capsys):
    parser = cli.build_parser()
    action = next(a for a in parser._subparsers._group_actions if a.choices)
    func = action.choices[name].get_default("func")
    # every subcommand ships with batchlab: one reported as unavailable failed to import
    assert not func.__qualname__.startswith("_unavailable"), f"batchlab {name} is unavailable (import failed)"
    assert cli.main([name, "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "example" in out
    if name != "bench":  # bench's flags belong to each benchmark (see the next test)
        for flag in ("--device", "--seed", "--out"):
            assert flag in out


@pytest.mark.parametrize("name", [n for n in bench.BENCHMARKS if bench.available(n)])
def test_available_benchmarks_have_help(name, capsys):
    assert cli.main(["bench", name, "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    for flag in ("--device", "--seed", "--out"):
        assert flag in out


def test_missing_benchmark_says_so_with_exit_3(monkeypatch, capsys):
    monkeypatch.setitem(bench.BENCHMARKS, "nonexistent", "a benchmark nobody wrote")
    assert cli.main(["bench", "nonexistent"]) == EXIT_MISSING
    assert "not available" in capsys.readouterr().err


def test_bench_dispatches_arguments_to_the_module(monkeypatch, capsys):
    module = types.ModuleType("batchlab.bench.fake")
    module.__spec__ = importlib.machinery.ModuleSpec("batchlab.bench.fake", None)
    module.add_arguments = lambda p: (p.add_argument("--size", type=int, default=1), p.add_argument("--out"))
    seen = {}

    def run(args):
        seen.update(vars(args))
        return 7

    module.run = run
    monkeypatch.setitem(sys.modules, "batchlab.bench.fake", module)
    monkeypatch.setitem(bench.BENCHMARKS, "fake", "a fake benchmark")
    assert cli.main(["bench", "fake", "--size", "5", "--out", "x"]) == 7
    assert seen == {"size": 5, "out": "x"}
    assert cli.main(["bench", "fake", "--size", "notanint"]) == EXIT_BAD_INPUT


def test_benchmark_whose_import_fails_exits_3(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "batchlab.bench.broken", None)  # None in sys.modules: import raises
    monkeypatch.setattr(bench, "available", lambda name: True)
    monkeypatch.setitem(bench.BENCHMARKS, "broken", "a benchmark that cannot import")
    assert cli.main(["bench", "broken"]) == EXIT_MISSING
    assert "cannot run here" in capsys.readouterr().err


def test_unavailable_subcommand_exits_3(monkeypatch, capsys):
    monkeypatch.setattr(cli, "SUBCOMMANDS", cli.SUBCOMMANDS + [("does_not_exist", "ghost", "a missing command")])
    assert cli.main(["ghost"]) == EXIT_MISSING
    assert "not available" in capsys.readouterr().err


def test_datasets_list_and_info(tmp_path, capsys):
    assert cli.main(["datasets"]) == EXIT_OK
    assert "codesearch" in capsys.readouterr().out
    assert cli.main(["datasets", "info", "codesearch", "--samples", "1", "--out", str(tmp_path), "--no-progress"]) == EXIT_OK
    summary = json.loads((tmp_path / "codesearch.json").read_text())
    assert summary["train_pairs"] > 0 and summary["test_pairs"] > 0 and len(summary["samples"]) == 1
    assert cli.main(["datasets", "info"]) == EXIT_BAD_INPUT


def test_missing_optional_dataset_exits_3_with_install_hint(tmp_path, capsys):
    code = cli.main(["datasets", "info", "fashion_mnist", "--path", str(tmp_path), "--out", str(tmp_path)])
    assert code == EXIT_MISSING
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_train_tiny(tmp_path, capsys):
    args = ["train", "--max-train", "96", "--max-test", "32", "--epochs", "1", "--batch-size", "32",
            "--sampler", "hard_negative", "--out", str(tmp_path), "--name", "tiny", "--no-progress"]
    assert cli.main(args) == EXIT_OK
    summary = json.loads((tmp_path / "tiny.json").read_text())
    assert set(summary["metrics"]) == {"recall@1", "recall@10", "mrr"}
    assert (tmp_path / "tiny.pt").exists() and (tmp_path / "tiny.png").exists()
    # the record holds the values used, not the flags' None
    record = summary["record"]
    assert record["lr"] == 2e-3 and record["teacher"] == "model" and record["data_seed"] == 0
    assert record["sampler_options"]["num_negatives"] == 8 and record["train_pairs"] == 96
    # the name exists: refused unless --overwrite
    capsys.readouterr()
    assert cli.main(args) == EXIT_BAD_INPUT
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == EXIT_OK


def test_train_names_list_every_option_that_changes_the_run():
    from batchlab.commands.train import run_name

    parser = cli.build_parser()
    plain = parser.parse_args(["train"])
    assert run_name(plain) == "codesearch-random-64"
    other = parser.parse_args(["train", "--loss", "siglip", "--jest", "0.5", "--teacher", "tfidf", "--data-seed", "3",
                               "--lr", "0.001"])
    name = run_name(other)
    for part in ("loss-siglip", "jest-0.5", "teacher-tfidf", "data-seed-3", "lr-0.001"):
        assert part in name, name
    assert run_name(parser.parse_args(["train", "--data", "dir/my_pairs.jsonl"])) == "my_pairs-random-64"


def test_train_bad_input_exits_2(tmp_path, capsys):
    assert cli.main(["train", "--epochs", "0", "--max-train", "64", "--max-test", "16", "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "epochs" in capsys.readouterr().err
    assert cli.main(["train", "--teacher", "pixels", "--out", str(tmp_path), "--max-train", "8"]) == EXIT_BAD_INPUT


def test_demo_tiny(tmp_path, capsys):
    args = ["demo", "--max-train", "128", "--max-test", "48", "--epochs", "1", "--seeds", "2", "--jobs", "1",
            "--arms", "random-64", "community-64-tfidf", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert "random-64" in out and "community-64-tfidf" in out and "±" in out
    # two seeds: the claim is shown with its numbers but gets no verdict, and says why
    assert "no verdict: 2 seed(s)" in out and "held" not in out and "within seed noise" not in out
    result = json.loads((tmp_path / "demo.json").read_text())
    assert {(r["arm"], r["seed"]) for r in result["runs"]} == {(a, s) for a in ("random-64", "community-64-tfidf")
                                                               for s in (0, 1)}
    assert result["checks"][0]["verdict"] is None and result["settings"]["arithmetic"]["torch_threads"] == 1
    assert isinstance(result["load_average_at_start"], (float, type(None)))
    assert (tmp_path / "demo.png").exists()


def test_demo_on_a_pairs_file(tmp_path, capsys):
    """``demo --data FILE``: the same comparison on the user's own (query, document, label) pairs."""
    words = ["parse", "draw", "close", "open", "read", "write", "sort", "merge"]
    lines = [json.dumps({"query": f"{words[i % 8]} the item {i}", "document": f"def {words[i % 8]}_{i}(x): pass",
                         "label": i // 2}) for i in range(120)]  # two relevant documents per query
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    args = ["demo", "--data", str(tmp_path / "pairs.jsonl"), "--arms", "random-16", "hard-negative-16", "--seeds", "1",
            "--epochs", "1", "--jobs", "1", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert "pairs.jsonl" in out and "hard-negative-16" in out and "(1 seed)" in out and "± 0.000" not in out
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["settings"]["train_pairs"] + result["settings"]["test_pairs"] == 120


def test_demo_data_loader_passes_packages(monkeypatch):
    """``--packages`` goes to load_codesearch for both splits; groups are the training modules."""
    import batchlab.datasets
    from batchlab.commands.demo import load_demo_data

    calls = []
    real = batchlab.datasets.load_codesearch

    def spy(split, **kwargs):
        calls.append((split, tuple(kwargs.get("packages", ()))))
        return real(split, progress=False)

    monkeypatch.setattr(batchlab.datasets, "load_codesearch", spy)
    train, test, groups, _ = load_demo_data(packages=("ftfy",), max_train=40, max_test=20, progress=False)
    assert calls == [("train", ("ftfy",)), ("test", ("ftfy",))]
    assert len(train) == 40 and len(test) == 20 and len(groups) == 40


def test_demo_bad_arm_exits_2(capsys):
    assert cli.main(["demo", "--arms", "no-such-arm"]) == EXIT_BAD_INPUT
    assert cli.main(["demo", "--arms", "community-64-self"]) == EXIT_BAD_INPUT
    assert "renamed 'community-64'" in capsys.readouterr().err


def test_demo_help_groups_the_arms_one_line_each(capsys):
    from batchlab.recipes.compare import ARMS

    assert cli.main(["demo", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "baselines" in out and "model as its own teacher" in out
    for name, arm in ARMS.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert arm.help.split()[0] in line


HELP_CHECK = """
import sys, time
start = time.perf_counter()
from batchlab.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules, "the CLI imported torch to answer " + repr(sys.argv[1:])
print("exit", code, "seconds", round(time.perf_counter() - start, 3))
"""


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["train", "--help"], ["mine", "--help"],
                                  ["build-batches", "--help"], ["bench", "--help"], ["datasets", "--help"],
                                  ["train", "--epochs", "0"], ["demo", "--seeds", "x"], ["no-such-command"],
                                  ["train", "--model", "minilm", "--mochi", "num_hardest=0"],
                                  ["train", "--model", "minilm", "--loss", "siglip"], ["train", "--mochi"]])
def test_help_and_bad_usage_answer_without_torch(argv):
    """Parsing never imports torch (it alone takes seconds to import); timing is not asserted on a shared box."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", HELP_CHECK, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exit 0" in proc.stdout or argv[-1] != "--help"


def test_benchmarks_write_under_results_by_default():
    """Benchmarks never overwrite the committed benchmarks/results unless --out says so."""
    import importlib

    for name in (n for n in bench.BENCHMARKS if bench.available(n)):
        parser = bench.build_bench_parser(name, importlib.import_module(bench.module_of(name)))
        assert parser.get_default("out").startswith("results"), (name, parser.get_default("out"))


def test_warnings_name_the_command_and_numpy_maps_do_not_warn(tmp_path, capsys):
    import warnings

    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32))
    args = ["build-batches", str(tmp_path / "x.npy"), "--out", str(tmp_path / "b"), "--batch-size", "16",
            "--group-size", "4", "--rank-window", "2", "500", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # pytest may have seen the warnings before: show them again
        assert cli.main(args) == EXIT_OK
    err = capsys.readouterr().err
    assert "batchlab build-batches: warning: rank_window=(2, 500)" in err
    assert "cli.py" not in err and "not writable" not in err
