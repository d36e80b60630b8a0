"""``batchlab demo``: what ``make demo`` runs.

On ``codesearch`` (docstring -> code pairs from the standard library, split by module),
train the tiny dual encoder with the tiled InfoNCE under several batch constructions
("arms"), several seeds each, and print held-out recall@1 / recall@10 as mean ± spread,
with the time each took. By default the community (B3) and hard-negative batches are
built from the model's own embeddings, refreshed every epoch after a first epoch of
random batches (NGAME / ANCE style); the arms without ``-self`` use a TF-IDF teacher on
the training pairs (offline), whose own retrieval is printed as the anchor. Each
teacher-built arm is checked against random batches, seed by seed.

Arms are a list of :class:`Arm` (name, sampler, batch size); an arm whose sampler is not
in this installation is skipped with a message, so the demo runs as samplers land.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlab.commands._common import EXIT_BAD_INPUT, add_common_arguments, add_subcommand

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    """One way of building batches: a sampler name (see ``make_sampler``), a batch size, options.

    ``teacher="tfidf"`` builds the batches from the TF-IDF teacher; ``"model"`` from the
    model's own embeddings, refreshed every epoch (random batches in the first epoch).
    ``random_epochs``: random batches for that many first epochs, then the sampler's (a
    curriculum). ``init="lsa"``: token embeddings warm-started from an LSA of the training
    split (see :func:`~batchlab.recipes.train_dual_encoder`). ``guide_margin``: GISTEmbed's
    guided in-batch false-negative masking with the TF-IDF teacher as the guide.
    """

    name: str
    sampler: str
    batch_size: int
    options: dict[str, Any] = field(default_factory=dict)
    teacher: str = "tfidf"
    random_epochs: int = 0
    init: str | None = None
    guide_margin: float | None = None

    def available(self) -> str | None:
        """``None`` when this installation has the sampler, else why not."""
        import importlib.util

        module = {
            "random": None,
            "cluster": "batchlab.samplers.clusters",
            "community": "batchlab.samplers.community_sampler",
            "hard_negative": "batchlab.samplers.hard_negatives",
        }[self.sampler]
        if module is None or importlib.util.find_spec(module) is not None:
            return None
        return f"{module} is not in this installation"


ARMS = [
    Arm("random-64", "random", 64),
    Arm("random-256", "random", 256),
    # the TF-IDF teacher (not in the default run since 2026-11-23: it loses to random batches)
    Arm("community-64", "community", 64),
    Arm("hard-negative-64", "hard_negative", 64),
    # the model as its own teacher (NGAME / ANCE style): the default teacher-built arms
    Arm("community-64-self", "community", 64, teacher="model"),
    Arm("hard-negative-64-self", "hard_negative", 64, teacher="model"),
    # not in the default run: a curriculum (random batches in epoch 1, teacher batches after)
    Arm("community-64-late", "community", 64, random_epochs=1),
    Arm("hard-negative-64-late", "hard_negative", 64, random_epochs=1),
    # not in the default run: token embeddings warm-started from an LSA of the training split
    Arm("random-64-lsa", "random", 64, init="lsa"),
    Arm("community-64-lsa", "community", 64, init="lsa"),
    Arm("hard-negative-64-lsa", "hard_negative", 64, init="lsa"),
    # not in the default run: mined negatives the teacher scores above 95% of the positive dropped (NV-Retriever)
    Arm("hard-negative-64-fnf", "hard_negative", 64, {"relative_margin": 0.05}),
    Arm("hard-negative-64-lsa-fnf", "hard_negative", 64, {"relative_margin": 0.05}, init="lsa"),
    # not in the default run: teacher neighbours from other modules only (same-module ones are often near-duplicates)
    Arm("community-64-xmod", "community", 64, {"cross_group": True}),
    Arm("hard-negative-64-xmod", "hard_negative", 64, {"cross_group": True}),
    # not in the default run: half of every batch from the teacher, half uniformly random
    Arm("community-64-mix", "community", 64, {"mix_random": 0.5}),
    Arm("hard-negative-64-mix", "hard_negative", 64, {"mix_random": 0.5}),
    Arm("community-64-xmod-mix", "community", 64, {"cross_group": True, "mix_random": 0.5}),
    Arm("hard-negative-64-xmod-mix", "hard_negative", 64, {"cross_group": True, "mix_random": 0.5}),
    # not in the default run: in-batch negatives the TF-IDF guide scores above 95% of the positive masked (GISTEmbed)
    Arm("random-64-gist", "random", 64, guide_margin=0.05),
    Arm("community-64-gist", "community", 64, guide_margin=0.05),
    Arm("hard-negative-64-gist", "hard_negative", 64, guide_margin=0.05),
]
DEFAULT_ARMS = ["random-64", "random-256", "community-64-self", "hard-negative-64-self"]


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "demo",
        help="the demo that `make demo` runs: random vs community vs hard-negative batches on codesearch",
        description="Train the tiny dual encoder on codesearch with random batches of 64 and 256, community (B3) "
        "batches of 64 and hard-negative batches of 64 (tiled InfoNCE; the teacher-built batches come from the model's "
        "own embeddings, refreshed every epoch), several seeds each; print held-out recall@1/@10 (mean ± spread over "
        "seeds), each claim checked seed by seed, and time; write <out>/demo.json and plots.",
        example="batchlab demo --seeds 3 --epochs 3 --out results/demo",
    )
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, metavar="ARM",
                        help=f"which arms to run, from {[a.name for a in ARMS]} (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default: 3)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training split (default: 3)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    parser.add_argument("--impl", default="auto", help="loss implementation: auto, reference, tiled, ... (default: auto)")
    parser.add_argument("--group-size", type=int, default=8, help="community: examples per B3 group (default: 8)")
    parser.add_argument("--rank-window", type=int, nargs=2, default=(2, 34), metavar=("P", "P_PLUS_M"),
                        help="community: teacher ranks that form the graph (default: 2 34)")
    parser.add_argument("--negatives", type=int, default=8, help="hard-negative: mined negatives per anchor (default: 8)")
    parser.add_argument("--skip-top", type=int, default=0,
                        help="hard-negative: teacher ranks skipped as likely false negatives (default: 0)")
    parser.add_argument("--config", default="batchlab-tiny-text",
                        help="tiny open_clip text config: batchlab-tiny-text (width 64) or batchlab-small-text (width 128, "
                        "about 3x slower)")
    parser.add_argument("--max-train", type=int, default=None, help="use only the first N training pairs (quick runs)")
    parser.add_argument("--max-test", type=int, default=None, help="use only the first N test pairs (quick runs)")
    parser.add_argument("--packages", nargs="+", default=[], metavar="PACKAGE",
                        help="also harvest these installed packages into codesearch (e.g. numpy scipy torch: tens "
                        "of thousands of pairs; the data then depends on the versions installed)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs trained at once, one torch thread each (default: min(2, cores))")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_common_arguments(parser, out="results/demo")
    parser.set_defaults(func=run)


# -- one run (in this process or a worker) --------------------------------------
_DATA: dict[str, Any] = {}


def _load(max_train: int | None, max_test: int | None, progress: bool, packages: tuple[str, ...] = (),
          device: str = "cpu") -> dict[str, Any]:
    """Data, tokens and the TF-IDF teacher (built once per process; deterministic; the
    teacher's neighbours are ranked on ``device``)."""
    key = (max_train, max_test, tuple(packages), device)
    if _DATA.get("key") != key:
        from batchlab.datasets import load_codesearch
        from batchlab.recipes.teachers import tfidf_views

        train = load_codesearch("train", packages=packages, progress=progress)
        test = load_codesearch("test", packages=packages, progress=progress)
        train_pairs = list(zip(train.queries, train.documents))[:max_train]
        test_pairs = list(zip(test.queries, test.documents))[:max_test]
        queries, documents = zip(*train_pairs)
        # the modules let arms with cross_group=True mine neighbours in other modules only
        views = tfidf_views(queries, documents, groups=train.modules[: len(train_pairs)], device=device)
        _DATA.update(key=key, train=train_pairs, test=test_pairs, views=views)
    return _DATA


def _worker_init(max_train, max_test, packages=(), device="cpu") -> None:
    import torch

    torch.set_num_threads(1)  # two 1-thread runs beat one 2-thread run on a shared 2-core box
    _load(max_train, max_test, progress=False, packages=packages, device=device)


def train_arm(arm: Arm, seed: int, settings: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Train one (arm, seed) and return its metrics, history and timings."""
    from batchlab.recipes import make_sampler, train_dual_encoder

    data = _load(settings["max_train"], settings["max_test"], progress, settings["packages"], settings["device"])
    start, cpu_start = time.perf_counter(), time.process_time()
    views = data["views"]
    options = {**settings["sampler_options"].get(arm.sampler, {}), **arm.options}
    if arm.teacher == "model":  # built inside the recipe from the model, epoch after epoch
        sampler, teacher, hardness = arm.sampler, "model", None
    else:
        sampler = make_sampler(arm.sampler, views, batch_size=arm.batch_size, seed=seed, **options)
        teacher, hardness = None, batch_hardness(views, sampler)
    sampler_seconds = time.perf_counter() - start
    result = train_dual_encoder(
        data["train"],
        data["test"],
        sampler=sampler,
        sampler_options=options,
        batch_size=arm.batch_size,
        teacher=views if arm.guide_margin is not None and teacher is None else teacher,  # the guide
        random_epochs=arm.random_epochs,
        init=arm.init,
        guide_margin=arm.guide_margin,
        config=settings["config"],
        epochs=settings["epochs"],
        lr=settings["lr"],
        loss="info_nce",
        impl=settings["impl"],
        device=settings["device"],
        seed=seed,
        progress=progress,
        name=f"{arm.name}-seed{seed}",
    )
    return {
        "arm": arm.name,
        "seed": seed,
        "metrics": result.metrics,
        "history": result.history,
        "train_seconds": result.seconds,
        "sampler_seconds": sampler_seconds + result.sampler_seconds,
        "hardness": hardness,
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,  # what the run costs, whatever else runs on the machine
    }


def batch_hardness(views, sampler) -> dict[str, float]:
    """How similar batch mates are by the teacher (TF-IDF LSA), over the first epoch's batches."""
    from batchlab.samplers.community_sampler import batch_similarity_stats

    sampler.set_epoch(0)
    return batch_similarity_stats(views.pairs, sampler.global_batches(), top_k=10)


# -- the command ------------------------------------------------------------------
def claim_checks(runs: list[dict[str, Any]], arms: list[Arm]) -> list[dict[str, Any]]:
    """The issue's claims, for every teacher-built arm in the run against the random arms.

    Community arms against random batches of 256 (B3's headline) and of their own size;
    hard-negative arms against random batches of their own size. Runs of the same seed
    start from the same weights, so when both arms ran the same seeds the difference is
    taken seed by seed (its standard error is then that of the paired differences);
    otherwise it is the difference of the means with the unpaired standard error. Below
    two standard errors a difference is "within seed noise".
    """
    by_arm: dict[str, dict[int, float]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r["metrics"]["recall@1"]
    kinds = {"community": "community", "hard_negative": "hard-negative"}
    checks = []
    for arm in arms:
        if arm.sampler not in kinds or arm.name not in by_arm:
            continue
        label = f"{kinds[arm.sampler]} batches ({arm.name})"
        if arm.sampler == "community":
            checks.append((arm.name, "random-256", f"B3 claim: {label} of {arm.batch_size} beat random batches of 256"))
        checks.append((arm.name, f"random-{arm.batch_size}", f"{label} beat random batches of the same size"))
    verdicts = []
    for better, worse, claim in checks:
        if worse not in by_arm:
            continue
        a, b = by_arm[better], by_arm[worse]
        seeds = sorted(set(a) & set(b))
        if len(seeds) >= 2 and len(seeds) == len(a) == len(b):
            diffs = [a[s] - b[s] for s in seeds]
            diff, se, basis = statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5, "paired by seed"
        else:
            def mean_var(x):
                values = list(x.values())
                return statistics.fmean(values), (statistics.variance(values) if len(values) > 1 else 0.0) / len(values)

            (ma, va), (mb, vb) = mean_var(a), mean_var(b)
            diff, se, basis = ma - mb, (va + vb) ** 0.5, "unpaired"
        verdict = "within seed noise" if abs(diff) < 2 * se or diff == 0 else ("held" if diff > 0 else "reversed")
        verdicts.append({"claim": claim, "difference": diff, "standard_error": se, "basis": basis, "verdict": verdict,
                         "wins": sum(a[s] > b[s] for s in seeds), "seeds": seeds})
    return verdicts


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def _teacher_anchor(data: dict[str, Any]) -> dict[str, float]:
    """The TF-IDF teacher's own retrieval on the test split (exact sparse scores)."""

    from batchlab.recipes.evaluate import retrieval_metrics
    from batchlab.recipes.teachers import TfidfTeacher

    queries, documents = zip(*data["train"])
    teacher = TfidfTeacher().fit(list(queries) + list(documents))
    test_q, test_d = zip(*data["test"])
    q = teacher.transform(test_q).to_dense()
    d = teacher.transform(test_d).to_dense()
    return retrieval_metrics(q, d) if len(q) else {}


def _plot(path: Path, runs: list[dict], arms: list[Arm]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, arm in enumerate(arms):
        mine = [r for r in runs if r["arm"] == arm.name]
        for key, offset, colour in (("recall@1", -0.15, "tab:blue"), ("recall@10", 0.15, "tab:orange")):
            values = [r["metrics"][key] for r in mine]
            left.bar(i + offset, statistics.fmean(values), width=0.3, color=colour,
                     yerr=statistics.stdev(values) if len(values) > 1 else 0, capsize=3,
                     label=key if i == 0 else None)
        epochs = sorted({h["epoch"] for r in mine for h in r["history"]})
        means = [statistics.fmean(h["recall@1"] for r in mine for h in r["history"] if h["epoch"] == e) for e in epochs]
        right.plot(epochs, means, "o-", label=arm.name)
    left.set_xticks(range(len(arms)), [a.name for a in arms], rotation=15)
    left.set_ylabel("held-out retrieval (mean ± sd over seeds)")
    left.legend()
    left.set_title("codesearch test split")
    right.set_xlabel("epoch")
    right.set_xticks(sorted({h["epoch"] for r in runs for h in r["history"]}))
    right.set_ylabel("recall@1 (mean over seeds)")
    right.legend()
    right.set_title("training curves")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from batchlab.bench._common import device_name, format_table, write_results

    known = {a.name: a for a in ARMS}
    unknown = [name for name in args.arms if name not in known]
    if unknown or args.seeds < 1 or args.epochs < 1 or args.jobs < 1:
        print(f"batchlab demo: unknown arms {unknown} (known: {list(known)}) or a count < 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    arms = []
    for name in args.arms:
        why = known[name].available()
        if why:
            print(f"skipping arm {name}: {why}", file=sys.stderr)
        else:
            arms.append(known[name])
    torch.set_num_threads(1)
    settings = {"epochs": args.epochs, "lr": args.lr, "impl": args.impl, "device": args.device, "config": args.config,
                "max_train": args.max_train, "max_test": args.max_test, "packages": tuple(args.packages),
                "sampler_options": {"community": {"group_size": args.group_size, "rank_window": tuple(args.rank_window)},
                                    "hard_negative": {"num_negatives": args.negatives, "range_min": args.skip_top}}}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    data = _load(args.max_train, args.max_test, args.progress, tuple(args.packages), args.device)
    anchor = _teacher_anchor(data)
    settings.update(train_pairs=len(data["train"]), test_pairs=len(data["test"]))
    print(f"codesearch: {len(data['train'])} training pairs, {len(data['test'])} test pairs (unseen modules); "
          f"{len(arms)} arms x {args.seeds} seeds x {args.epochs} epochs; load average at start {load}")
    tasks = [(arm, args.seed + s) for arm in arms for s in range(args.seeds)]
    runs = []
    bar = tqdm(total=len(tasks), desc="demo runs", unit="run", disable=not args.progress)
    if args.jobs == 1 or len(tasks) == 1:
        for arm, seed in tasks:
            runs.append(train_arm(arm, seed, settings, progress=args.progress))
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")  # no fork after torch has started threads
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_worker_init,
                                 initargs=(args.max_train, args.max_test, tuple(args.packages), args.device)) as pool:
            futures = [pool.submit(train_arm, arm, seed, settings) for arm, seed in tasks]
            for future in as_completed(futures):
                runs.append(future.result())
                bar.set_postfix(last=f"{runs[-1]['arm']} r@1={runs[-1]['metrics']['recall@1']:.3f}")
                bar.update()
    bar.close()
    total = time.perf_counter() - start

    rows = [{"arm": "TF-IDF teacher (anchor)", "batch": "-", "recall@1": f"{anchor.get('recall@1', 0):.3f}",
             "recall@10": f"{anchor.get('recall@10', 0):.3f}", "mrr": f"{anchor.get('mrr', 0):.3f}"}]
    for arm in arms:
        mine = sorted((r for r in runs if r["arm"] == arm.name), key=lambda r: r["seed"])
        r1 = [r["metrics"]["recall@1"] for r in mine]
        rows.append({
            "arm": arm.name,
            "batch": arm.batch_size,
            "recall@1": _spread(r1),
            "recall@10": _spread([r["metrics"]["recall@10"] for r in mine]),
            "mrr": _spread([r["metrics"]["mrr"] for r in mine]),
            "train s/run": statistics.fmean(r["train_seconds"] for r in mine),
            "sampler s/run": statistics.fmean(r["sampler_seconds"] for r in mine),
            "cpu s/run": statistics.fmean(r["cpu_seconds"] for r in mine),
            "teacher sim top-10": statistics.fmean(r["hardness"]["top_k_negative_similarity"] for r in mine)
            if mine[0]["hardness"] else None,
        })
    print(format_table(rows, ["arm", "batch", "recall@1", "recall@10", "mrr", "teacher sim top-10", "train s/run", "sampler s/run", "cpu s/run"]))
    verdicts = claim_checks(runs, arms)
    for v in verdicts:
        print(f"{v['claim']}: recall@1 {v['difference']:+.3f} ({v['basis']}, 2 SE = {2 * v['standard_error']:.3f}): "
              f"{v['verdict']}")
    cpu = sum(r["cpu_seconds"] for r in runs)
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"total {total:.0f} s wall ({cpu:.0f} s of CPU in the runs) on {device_name(args.device)} with {args.jobs} "
          f"job(s); load average {load} at start, {end_load} at the end")

    out = Path(args.out)
    payload = {"command": " ".join(["batchlab", *sys.argv[1:]]) if Path(sys.argv[0]).name == "batchlab" else None,
               "settings": settings, "arms": [a.__dict__ for a in arms], "teacher_anchor": anchor,
               "runs": runs, "checks": verdicts, "total_seconds": total, "jobs": args.jobs, "load_average_at_start": load}
    path = write_results(out, "demo", json.loads(json.dumps(payload, default=str)))
    plot = _plot(out / "demo.png", runs, arms) if runs else None
    print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    return 0
