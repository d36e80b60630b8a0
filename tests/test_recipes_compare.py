"""recipes.compare: seed-paired statistics, verdicts only from 3 seeds, the arm registry, compare() on
user pairs with labels, pairs files, relevance labels, and the progress lines."""

from __future__ import annotations

import json
import statistics

import pytest

from batchlab.errors import BatchlabInputError
from batchlab.recipes.compare import (
    ARMS,
    DEFAULT_ARMS,
    MIN_SEEDS_FOR_VERDICT,
    SAMPLER_NAMES,
    Arm,
    Claim,
    claim_checks,
    compare,
    format_check,
    paired_difference,
    register_arm,
    resolve_arms,
    spread,
    train_arm,
)


def _runs(arm, values, seeds=None):
    return [{"arm": arm, "seed": s, "metrics": {"recall@1": v}} for s, v in zip(seeds or range(len(values)), values)]


def test_paired_difference_against_hand_computation():
    a, b = {0: 0.30, 1: 0.20, 2: 0.25, 3: 0.40}, {0: 0.28, 1: 0.19, 2: 0.26, 3: 0.35}
    d = paired_difference(a, b)
    diffs = [a[s] - b[s] for s in range(4)]
    assert d.basis == "paired by seed" and d.wins == 3 and d.seeds == (0, 1, 2, 3)
    assert d.difference == pytest.approx(statistics.fmean(diffs))
    assert d.standard_error == pytest.approx(statistics.stdev(diffs) / 2)
    unpaired = paired_difference(a, {4: 0.1, 5: 0.2})
    assert unpaired.basis == "unpaired" and unpaired.seeds == () and unpaired.n == 2
    var = statistics.variance(a.values()) / 4 + statistics.variance([0.1, 0.2]) / 2
    assert unpaired.standard_error == pytest.approx(var**0.5)
    assert paired_difference({0: 1.0}, {0: 0.5}).standard_error is None  # one seed: no spread to estimate
    with pytest.raises(BatchlabInputError):
        paired_difference({}, {0: 1.0})


def test_claim_checks_pair_by_seed_and_need_three_seeds():
    """Seed effects dominate the spread, but the community arm is ahead on every seed by 0.01 +- 0.001."""
    base = [0.10, 0.20, 0.15, 0.25]
    data = (_runs("random-64", base) + _runs("random-256", [b - 0.05 for b in base])
            + _runs("community-64", [b + 0.01 + 0.001 * (i % 2) for i, b in enumerate(base)])
            + _runs("hard-negative-64-tfidf", [b - 0.02 for b in base]))
    arms = ["random-64", "random-256", "community-64", "hard-negative-64-tfidf"]
    got = {v["claim"]: v for v in claim_checks(data, arms)}
    same = got["community batches (community-64) beat random batches of the same size"]
    assert same["basis"] == "paired by seed" and same["verdict"] == "held" and same["wins"] == 4
    assert same["difference"] == pytest.approx(0.0105)
    assert got["B3 claim: community batches (community-64) of 64 beat random batches of 256"]["verdict"] == "held"
    hard = got["hard-negative batches (hard-negative-64-tfidf) beat random batches of the same size"]
    assert hard["verdict"] == "reversed" and hard["wins"] == 0
    # unpaired (different seeds): the seed spread swamps the same 0.01
    unpaired = claim_checks(_runs("random-64", base) + _runs("community-64", [b + 0.01 for b in base], seeds=[4, 5, 6, 7]),
                            ["random-64", "community-64"])
    assert unpaired[0]["basis"] == "unpaired" and unpaired[0]["verdict"] == "within seed noise"
    # two seeds: the numbers are reported, the verdict is not, and the reason says why
    two = claim_checks(_runs("random-64", base[:2]) + _runs("community-64", [b + 0.02 for b in base[:2]]),
                       ["random-64", "community-64"])[0]
    assert two["verdict"] is None and f"at least {MIN_SEEDS_FOR_VERDICT}" in two["reason"]
    assert "no verdict" in format_check(two) and "held" not in format_check(two)
    custom = claim_checks(data, arms, claims=[Claim("random-64", "random-256", "small beats large")])
    assert [c["claim"] for c in custom] == ["small beats large"] and custom[0]["verdict"] == "held"


def test_spread_never_prints_a_zero_spread_for_one_seed():
    assert spread([0.1234]) == "0.123 (1 seed)"
    assert spread([0.1, 0.2]) == "0.150 ± 0.071"


def test_registry_names_defaults_and_validation():
    from batchlab.recipes.samplers import SAMPLERS

    assert SAMPLER_NAMES == SAMPLERS  # compare keeps a torch-free copy for --help
    assert set(DEFAULT_ARMS) <= set(ARMS)
    assert ARMS["community-64"].teacher == "model" and ARMS["community-64-tfidf"].teacher == "tfidf"
    assert all(arm.help and arm.group for arm in ARMS.values())
    with pytest.raises(BatchlabInputError, match="renamed"):
        resolve_arms(["hard-negative-64-self"])
    with pytest.raises(BatchlabInputError, match="unknown arm"):
        resolve_arms(["fancy-64"])
    with pytest.raises(BatchlabInputError, match="sampler"):
        Arm("x", "kmeans")
    with pytest.raises(BatchlabInputError, match="needs a teacher"):
        Arm("x", "community", teacher="none")
    built = resolve_arms(["random-16", "hard-negative-32-tfidf", "community-128"])
    assert [(a.sampler, a.batch_size, a.teacher) for a in built] == [
        ("random", 16, "none"), ("hard_negative", 32, "tfidf"), ("community", 128, "model")]
    mine = Arm("community-32-big-groups", "community", 32, "groups of 16", options={"group_size": 16})
    assert register_arm(mine) is ARMS["community-32-big-groups"]
    with pytest.raises(BatchlabInputError, match="exists"):
        register_arm(Arm("community-32-big-groups", "community", 32, "other"))
    kwargs = mine.train_kwargs({"community": {"group_size": 8, "rank_window": (1, 9)}})
    assert kwargs["sampler_options"] == {"group_size": 16, "rank_window": (1, 9)} and kwargs["teacher"] == "model"
    del ARMS["community-32-big-groups"]


def _labelled_pairs(n):
    words = ["parse", "draw", "close", "open", "read", "write", "sort", "merge"]
    # two documents per label: pairs 2i and 2i+1 are relevant to each other
    return [(f"{words[i % 8]} the {words[(i // 8) % 8]} item {i // 2}", f"def {words[i % 8]}_{i}(x): return x", i // 2)
            for i in range(n)]


def test_compare_on_labelled_pairs_is_deterministic(tmp_path):
    pairs = _labelled_pairs(120)
    kwargs = dict(arms=["random-16", "hard-negative-16-tfidf"], seeds=3, epochs=1, progress=False, tfidf_anchor=True)
    first = compare(pairs[:96], pairs[96:], **kwargs)
    again = train_arm("hard-negative-16-tfidf", 2, pairs[:96], pairs[96:], epochs=1)
    assert again["metrics"] == first.runs[-1]["metrics"]  # a seed gives the same numbers
    assert {(r["arm"], r["seed"]) for r in first.runs} == {(a, s) for a in ("random-16", "hard-negative-16-tfidf")
                                                           for s in range(3)}
    assert len(first.checks) == 1 and first.checks[0]["verdict"] is not None  # 3 seeds: a verdict
    assert first.runs[3]["hardness"] is not None and first.settings["train_pairs"] == 96
    report = first.report()
    assert "hard-negative-16-tfidf" in report and "TF-IDF teacher alone" in report
    json.dumps(first.to_dict(), default=str)  # the results file is JSON
    # one call from a file: without a test split, 20% is held out with a label's pairs together
    path = tmp_path / "pairs.tsv"
    path.write_text("\n".join("\t".join(map(str, p)) for p in pairs))
    from_file = compare(path, arms=["random-16"], seeds=1, epochs=1, progress=False, tfidf_anchor=False)
    assert from_file.settings["train_pairs"] + from_file.settings["test_pairs"] == 120
    with pytest.raises(BatchlabInputError, match="data_seeds"):
        compare(pairs[:96], pairs[96:], arms=["random-16"], seeds=2, data_seeds=[1], progress=False)


def test_relevance_labels_make_duplicates_and_labels_right_answers():
    import torch

    from batchlab.recipes.dual_encoder import relevance_labels, split_pairs
    from batchlab.recipes.evaluate import retrieval_metrics

    assert relevance_labels(["a", "b", "a", "c"], ["x", "y", "z", "y"]).tolist() == [0, 1, 0, 1]
    assert relevance_labels(["a", "b"], ["x", "y"], ["k", "k"]).tolist() == [0, 0]
    # document 1 is a duplicate text of document 0: retrieving it for query 0 is not a miss
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    labels = relevance_labels(["q0", "q1"], ["same code", "same code"])
    assert retrieval_metrics(q, d, query_labels=labels, document_labels=labels)["recall@1"] == 1.0
    assert retrieval_metrics(q, d)["recall@1"] == 0.0  # index matching: both queries "miss" the duplicate
    assert split_pairs([("q", "d", 3)], "train") == (["q"], ["d"], [3])
    with pytest.raises(BatchlabInputError, match="tuples"):
        split_pairs([("q",)], "train")


def test_read_pairs_formats_and_holdout(tmp_path):
    from batchlab.recipes.pairs import holdout, read_pairs

    (tmp_path / "p.jsonl").write_text('{"query": "a", "document": "x", "label": 1}\n\n{"anchor": "b", "positive": "y", '
                                      '"label": 1}\n')
    pairs = read_pairs(tmp_path / "p.jsonl")
    assert pairs.queries == ["a", "b"] and pairs.documents == ["x", "y"] and pairs.labels == [1, 1]
    (tmp_path / "p.tsv").write_text("a\tx\nb\ty\n")
    assert read_pairs(tmp_path / "p.tsv").labels is None
    (tmp_path / "p.csv").write_text("query,document\na,x\n")
    assert read_pairs(tmp_path / "p.csv")[0] == ("a", "x")
    (tmp_path / "bad.jsonl").write_text('{"query": "a"}\n')
    with pytest.raises(BatchlabInputError, match="document"):
        read_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "bad.tsv").write_text("only one column\n")
    with pytest.raises(BatchlabInputError, match="line 1"):
        read_pairs(tmp_path / "bad.tsv")
    with pytest.raises(BatchlabInputError, match="no file"):
        read_pairs(tmp_path / "missing.jsonl")
    many = read_pairs.__globals__["Pairs"]([f"q{i}" for i in range(200)], [f"d{i}" for i in range(200)],
                                           [i // 4 for i in range(200)])
    train, test = holdout(many, test_fraction=0.25)
    assert len(train) + len(test) == 200 and 20 < len(test) < 80
    assert not set(train.labels) & set(test.labels)  # a label's pairs stay on one side
    assert holdout(many, test_fraction=0.25)[1].queries == test.queries  # deterministic


def test_heartbeat_lines_when_stdout_is_not_a_terminal(capsys):
    import time

    from batchlab.recipes.progress import RunDisplay

    display = RunDisplay(["a seed 0", "b seed 0"], [10, 10], bars=False, lines=True, interval=0.05)
    display.note("loading the data")
    time.sleep(0.2)
    display.event(0, {"event": "epoch", "epoch": 1, "epochs": 2, "steps": 5})
    display.event(0, {"event": "step", "epoch": 1, "step": 3, "steps": 5, "loss": 1.0})
    time.sleep(0.3)
    display.finish(0, "a seed 0: recall@1=0.5")
    display.close()
    out = capsys.readouterr().out
    assert "0% of steps; loading the data" in out  # before any run reports, the stage is named
    assert "running: a seed 0 (epoch 1/2, step 3/5)" in out and "15% of steps" in out
    assert "finished a seed 0: recall@1=0.5" in out
    quiet = RunDisplay(["x"], [1], enabled=False)
    quiet.finish(0, "x")
    quiet.close()
    assert capsys.readouterr().out == ""
