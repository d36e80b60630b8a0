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


def test_train_bad_input_exits_2(tmp_path, capsys):
    assert cli.main(["train", "--epochs", "0", "--max-train", "64", "--max-test", "16", "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "epochs" in capsys.readouterr().err


def test_demo_tiny(tmp_path, capsys):
    args = ["demo", "--max-train", "128", "--max-test", "48", "--epochs", "1", "--seeds", "2", "--jobs", "1",
            "--arms", "random-64", "community-64", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert "random-64" in out and "community-64" in out and "±" in out
    result = json.loads((tmp_path / "demo.json").read_text())
    assert {(r["arm"], r["seed"]) for r in result["runs"]} == {(a, s) for a in ("random-64", "community-64") for s in (0, 1)}
    assert (tmp_path / "demo.png").exists()


def test_demo_packages_reach_the_harvest(monkeypatch):
    """``--packages`` goes to load_codesearch for both splits and keys the per-process data cache."""
    import batchlab.datasets
    from batchlab.commands import demo

    calls = []
    real = batchlab.datasets.load_codesearch

    def spy(split, **kwargs):
        calls.append((split, tuple(kwargs.get("packages", ()))))
        return real(split, progress=False)

    monkeypatch.setattr(batchlab.datasets, "load_codesearch", spy)
    monkeypatch.setattr(demo, "_DATA", {})
    data = demo._load(40, 20, False, ("ftfy",))
    assert calls == [("train", ("ftfy",)), ("test", ("ftfy",))]
    assert len(data["train"]) == 40 and len(data["test"]) == 20
    demo._load(40, 20, False, ("ftfy",))
    assert len(calls) == 2  # same settings: cached
    demo._load(40, 20, False, ())
    assert calls[-1] == ("test", ())  # other packages: loaded again


def test_demo_claim_checks_pair_by_seed():
    """Paired differences when the seeds match; the verdict follows 2 standard errors."""
    from batchlab.commands.demo import ARMS, claim_checks

    arms = {a.name: a for a in ARMS}

    def runs(arm, values, seeds=None):
        return [{"arm": arm, "seed": s, "metrics": {"recall@1": v}} for s, v in zip(seeds or range(len(values)), values)]

    # seed effects dominate the spread, but the community arm is ahead on every seed by 0.01 +- 0.001
    base = [0.10, 0.20, 0.15, 0.25]
    data = (runs("random-64", base) + runs("random-256", [b - 0.05 for b in base])
            + runs("community-64-self", [b + 0.01 + 0.001 * (i % 2) for i, b in enumerate(base)])
            + runs("hard-negative-64", [b - 0.02 for b in base]))
    got = {v["claim"]: v for v in claim_checks(data, [arms[n] for n in
                                                      ("random-64", "random-256", "community-64-self", "hard-negative-64")])}
    same = got["community batches (community-64-self) beat random batches of the same size"]
    assert same["basis"] == "paired by seed" and same["verdict"] == "held" and same["wins"] == 4
    assert abs(same["difference"] - 0.0105) < 1e-9
    assert got["B3 claim: community batches (community-64-self) of 64 beat random batches of 256"]["verdict"] == "held"
    hard = got["hard-negative batches (hard-negative-64) beat random batches of the same size"]
    assert hard["verdict"] == "reversed" and hard["wins"] == 0
    # unpaired (different seeds): the seed spread swamps the same 0.01
    unpaired = claim_checks(runs("random-64", base) + runs("community-64-self", [b + 0.01 for b in base], seeds=[4, 5, 6, 7]),
                            [arms["random-64"], arms["community-64-self"]])
    assert unpaired[0]["basis"] == "unpaired" and unpaired[0]["verdict"] == "within seed noise"


def test_demo_bad_arm_exits_2(capsys):
    assert cli.main(["demo", "--arms", "no-such-arm"]) == EXIT_BAD_INPUT
