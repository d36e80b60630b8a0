"""``batchlab demo``: what ``make demo`` runs.

On ``codesearch`` (docstring -> code pairs from the standard library, split by module),
or on your own pairs (``--data FILE``), train the tiny dual encoder with the tiled
InfoNCE under several batch constructions ("arms"), several seeds each, and print
held-out recall@1 / recall@10 / MRR as mean ± spread, each teacher-built arm checked
against random batches seed by seed (a verdict only from 3 seeds), and the time it took.

The machinery is the library's :mod:`batchlab.recipes.compare`; this module parses the
flags, loads the data, pins the CPU arithmetic (so that a seed gives the same numbers on
any x86 machine with the same library versions) and prints / writes the results.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from batchlab._argtypes import positive_float, positive_int
from batchlab.commands._common import EXIT_BAD_INPUT, add_common_arguments, add_subcommand


def arms_help() -> str:
    """The arms, grouped, one line each (no torch needed)."""
    from batchlab.recipes.compare import ARMS, DEFAULT_ARMS

    groups: dict[str, list[str]] = {}
    for arm in ARMS.values():
        mark = " (default)" if arm.name in DEFAULT_ARMS else ""
        groups.setdefault(arm.group, []).append(f"    {arm.name:<52} {arm.help}{mark}")
    text = "\n".join(f"  {group}:\n" + "\n".join(lines) for group, lines in groups.items())
    return (f"arms (--arms NAME ...; also any <sampler>-<batch>[-tfidf], e.g. random-32, community-128, "
            f"hard-negative-32-tfidf):\n{text}")


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "demo",
        help="the demo that `make demo` runs: random vs community vs hard-negative batches on codesearch",
        description="Train the tiny dual encoder on codesearch (or your --data file) with random batches of 64 and 256, "
        "community (B3) batches of 64 and hard-negative batches of 64 (the teacher-built batches come from the model's "
        "own embeddings, refreshed every epoch), 3 seeds each; print held-out recall@1/@10 and MRR (mean ± spread over "
        "seeds), each claim checked seed by seed (a verdict needs 3 seeds), and time; write <out>/demo.json and "
        "demo.png. Progress: bars in a terminal, a line every 10 s otherwise.\n\n" + arms_help(),
        example="batchlab demo --seeds 3 --epochs 3 --out results/demo\n"
        "  batchlab demo --data my_pairs.jsonl --arms random-32 community-32 hard-negative-32",
    )
    from batchlab.recipes.compare import DEFAULT_ARMS, MIN_SEEDS_FOR_VERDICT

    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), metavar="ARM",
                        help="which arms to run (listed above; default: %(default)s)")
    parser.add_argument("--seeds", type=positive_int, default=3,
                        help=f"seeds per arm (default: 3; verdicts need at least {MIN_SEEDS_FOR_VERDICT})")
    parser.add_argument("--epochs", type=positive_int, default=3, help="passes over the training split (default: 3)")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (default: 2e-3)")
    parser.add_argument("--impl", default="auto", help="loss implementation: auto, reference, tiled, ... (default: auto)")
    parser.add_argument("--group-size", type=positive_int, default=8, help="community: examples per B3 group (default: 8)")
    parser.add_argument("--rank-window", type=int, nargs=2, default=(2, 34), metavar=("P", "P_PLUS_M"),
                        help="community: teacher ranks that form the graph (default: 2 34)")
    parser.add_argument("--negatives", type=positive_int, default=8,
                        help="hard-negative: mined negatives per anchor (default: 8)")
    parser.add_argument("--skip-top", type=int, default=0,
                        help="hard-negative: teacher ranks skipped as likely false negatives (default: 0)")
    parser.add_argument("--config", default="batchlab-tiny-text",
                        help="tiny open_clip text config: batchlab-tiny-text (width 64) or batchlab-small-text (width 128, "
                        "about 3x slower)")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="your own pairs instead of codesearch: .jsonl with query, document (and optional label: "
                        "pairs sharing one are all relevant), .tsv or .csv; 20%% held out unless --test-data")
    parser.add_argument("--test-data", default=None, metavar="FILE", help="held-out pairs for --data (same formats)")
    parser.add_argument("--max-train", type=positive_int, default=None, help="use only the first N training pairs")
    parser.add_argument("--max-test", type=positive_int, default=None, help="use only the first N test pairs")
    parser.add_argument("--packages", nargs="+", default=[], metavar="PACKAGE",
                        help="also harvest these installed packages into codesearch (e.g. numpy scipy torch: tens "
                        "of thousands of pairs; the data then depends on the versions installed)")
    parser.add_argument("--jobs", type=positive_int, default=min(2, os.cpu_count() or 1),
                        help="runs trained at once, one torch thread each (default: min(2, cores))")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars or lines")
    add_common_arguments(parser, out="results/demo")
    parser.set_defaults(func=run)


def load_demo_data(*, data: str | None = None, test_data: str | None = None, packages: tuple[str, ...] = (),
                   max_train: int | None = None, max_test: int | None = None, progress: bool = True):
    """``(train, test, groups, description)``: codesearch (groups: modules) or a pairs file (no groups)."""
    if data:
        from batchlab.recipes.pairs import holdout, read_pairs

        pairs = read_pairs(data)
        train, test = (pairs, read_pairs(test_data)) if test_data else holdout(pairs)
        train = train.subset(range(min(len(train), max_train or len(train))))
        test = test.subset(range(min(len(test), max_test or len(test))))
        held = "from " + test_data if test_data else "held out by label / query hash"
        return train, test, None, f"{Path(data).name}: {len(train)} training pairs, {len(test)} test pairs ({held})"
    from batchlab.datasets import load_codesearch

    full_train = load_codesearch("train", packages=tuple(packages), progress=progress)
    full_test = load_codesearch("test", packages=tuple(packages), progress=progress)
    train = list(zip(full_train.queries, full_train.documents))[:max_train]
    test = list(zip(full_test.queries, full_test.documents))[:max_test]
    groups = list(full_train.modules)[: len(train)]
    return train, test, groups, f"codesearch: {len(train)} training pairs, {len(test)} test pairs (unseen modules)"


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run(args) -> int:
    from batchlab.recipes.progress import pin_cpu_arithmetic

    pinned = pin_cpu_arithmetic()  # before torch loads: the same numbers on any x86 machine with AVX2
    from batchlab.errors import BatchlabInputError
    from batchlab.recipes.compare import compare, format_check, resolve_arms

    try:
        arms = resolve_arms(args.arms)
    except BatchlabInputError as error:
        print(f"batchlab demo: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.test_data and not args.data:
        print("batchlab demo: error: --test-data needs --data (the training pairs)", file=sys.stderr)
        return EXIT_BAD_INPUT
    import torch

    from batchlab.bench._common import device_name, write_results

    torch.set_num_threads(1)
    load = _load_average()
    train, test, groups, description = load_demo_data(
        data=args.data, test_data=args.test_data, packages=tuple(args.packages), max_train=args.max_train,
        max_test=args.max_test, progress=args.progress)
    print(f"{description}; {len(arms)} arms x {args.seeds} seeds x {args.epochs} epochs, {args.jobs} job(s); "
          f"load average at start {load}", flush=True)
    sampler_options = {"community": {"group_size": args.group_size, "rank_window": tuple(args.rank_window)},
                       "hard_negative": {"num_negatives": args.negatives, "range_min": args.skip_top}}
    result = compare(train, test, arms=arms, seeds=[args.seed + s for s in range(args.seeds)], epochs=args.epochs,
                     lr=args.lr, groups=groups, sampler_options=sampler_options, jobs=args.jobs, threads=1,
                     device=args.device, config=args.config, impl=args.impl, loss="info_nce", progress=args.progress)
    print(result.report())
    cpu = sum(r["cpu_seconds"] for r in result.runs)
    print(f"total {result.seconds:.0f} s wall ({cpu:.0f} s of CPU in the runs) on {device_name(args.device)} with "
          f"{args.jobs} job(s); load average {load} at start, {_load_average()} at the end"
          + ("" if pinned else "; CPU arithmetic not pinned (torch was loaded first), so other machines may differ"))
    out = Path(args.out)
    payload = {"command": " ".join(["batchlab", *sys.argv[1:]]) if Path(sys.argv[0]).name == "batchlab" else None,
               "data": description, **result.to_dict(), "jobs": args.jobs, "load_average_at_start": load,
               "checks_text": [format_check(c) for c in result.checks]}
    import json

    path = write_results(out, "demo", json.loads(json.dumps(payload, default=str)))
    plot = plot_comparison(out / "demo.png", result.runs, [a.name for a in result.arms]) if result.runs else None
    print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    return 0


def plot_comparison(path: Path, runs: list[dict[str, Any]], arms: list[str]) -> Path:
    """Bars of the final metrics (mean ± sd over seeds) and the recall@1 curves per epoch."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, arm in enumerate(arms):
        mine = [r for r in runs if r["arm"] == arm]
        for key, offset, colour in (("recall@1", -0.15, "tab:blue"), ("recall@10", 0.15, "tab:orange")):
            values = [r["metrics"][key] for r in mine]
            left.bar(i + offset, statistics.fmean(values), width=0.3, color=colour,
                     yerr=statistics.stdev(values) if len(values) > 1 else 0, capsize=3,
                     label=key if i == 0 else None)
        epochs = sorted({h["epoch"] for r in mine for h in r["history"]})
        means = [statistics.fmean(h["recall@1"] for r in mine for h in r["history"] if h["epoch"] == e) for e in epochs]
        right.plot(epochs, means, "o-", label=arm)
    left.set_xticks(range(len(arms)), arms, rotation=15)
    left.set_ylabel("held-out retrieval (mean ± sd over seeds)")
    left.legend()
    left.set_title("test split")
    right.set_xlabel("epoch")
    right.set_xticks(sorted({h["epoch"] for r in runs for h in r["history"]}))
    right.set_ylabel("recall@1 (mean over seeds)")
    right.legend()
    right.set_title("training curves")
    from batchlab.bench._common import save_figure

    return save_figure(fig, path, dpi=110)
