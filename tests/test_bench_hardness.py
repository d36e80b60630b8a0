"""`batchlab bench hardness`: the metric matches the library's, extras count as negatives, a tiny run."""

from __future__ import annotations

import json

import numpy as np
import torch

from batchlab import cli
from batchlab.bench.hardness import negative_stats
from batchlab.commands._common import EXIT_OK
from batchlab.samplers.community_sampler import batch_similarity_stats


def test_without_extras_it_is_batch_similarity_stats():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (60,), generator=g).numpy()
    batches = torch.randperm(60, generator=g).view(-1, 12).tolist()
    ours = negative_stats(x, batches, {"y": labels}, top_k=3)
    ref = batch_similarity_stats(x, batches, labels, top_k=3)
    assert abs(ours["neg_sim"] - ref["mean_negative_similarity"]) < 1e-6
    assert abs(ours["top_sim"] - ref["top_k_negative_similarity"]) < 1e-6
    assert abs(ours["fn_y"] - ref["same_label_rate"]) < 1e-9


def test_shared_extras_are_negatives_of_every_anchor():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    labels = {"y": np.array([0, 1, 0, 1])}
    # batch [0, 1], extras [2, 3]: anchor 0 sees 1, 2, 3 -> 0, 1, 0.6; anchor 1 sees 0, 2, 3 -> 0, 0, 0.8
    stats = negative_stats(x, [[0, 1]], labels, extras=[torch.tensor([2, 3])], top_k=1)
    assert abs(stats["neg_sim"] - 2.4 / 6) < 1e-6
    assert abs(stats["top_sim"] - (1.0 + 0.8) / 2) < 1e-6
    assert abs(stats["fn_y"] - 2 / 6) < 1e-9  # (0, 2) and (1, 3)


def test_tiny_run_writes_results_with_ratios_and_skips_illegal_cells(tmp_path, capsys):
    args = ["bench", "hardness", "--datasets", "planted", "--n", "3000", "--batch-sizes", "64,5000",
            "--group-sizes", "8,32", "--windows", "10:40,0:5000", "--extra", "0,2", "--epochs", "1",
            "--out", str(tmp_path)]
    assert cli.main(args) == EXIT_OK
    result = json.loads((tmp_path / "hardness-planted.json").read_text())
    assert (tmp_path / "hardness-planted.png").exists() and "python -m batchlab.bench.hardness" in result["command"]
    rows = result["rows"]
    assert {r["batch"] for r in rows} == {64, 3000}  # 5000 capped by N
    assert any("0, 5000" in s for s in result["skipped"])  # the window does not fit in N - 1 neighbours
    assert not any(r["batch"] == 3000 and r["K"] == 32 for r in rows)  # 32 does not divide 3000
    random = [r for r in rows if r["batches"] == "random"]
    assert all(r["neg_x_random"] == 1.0 for r in random)
    b3 = {(r["batch"], r["K"], r["h"]): r for r in rows if r["batches"].startswith("B3")}
    assert set(b3) == {(64, 8, 0), (64, 8, 2), (64, 32, 0), (64, 32, 2), (3000, 8, 0), (3000, 8, 2)}
    # planted topics: community batches of 64 are far harder than random ones, and the rank guard
    # (p = 10 skips the 3 copies of each item) keeps fewer copies together than plain top-k groups
    assert b3[64, 32, 0]["neg_x_random"] > 2
    assert b3[64, 32, 0]["fn_item_x_topk"] < 1
