"""``batchlab bench hardness``: how much harder than random are B3 batches, by the teacher, and at what cost?

Issue #7's target, measured as written: *batch hardness* is the mean teacher cosine
over every ordered pair ``i != j`` of a batch (``x_i . x_j``; the pair's own positive is
``i`` itself, so it is excluded), ``neg_x_random`` its ratio to random batches of the
same size measured in the same run. Beside it: ``top10`` (each anchor's 10 most similar
negatives, averaged), and false negatives (share of anchor-negative pairs with the same
label) against *plain top-k groups* (an anchor and its ``K - 1`` nearest, no rank guard,
batches assembled the same way; :func:`batchlab.bench.communities.topk_groups`).

Grid: batch size ``|B|`` x group size ``K`` x rank window ``(p, p + m)`` x B3++'s shared
extra negatives ``h`` (METIS, the default method); only legal cells (``K`` divides
``|B|``, ``|B| <= N``, the window fits in ``N - 1`` neighbours). With ``h > 0`` the
batch itself is the same as with ``h = 0``; each anchor's negatives are then its batch
mates *plus* the ``h |B|`` shared extras (:meth:`CommunityBatchSampler.extra_negatives_for`),
and every metric is taken over those anchor-negative pairs.

With ``|B| / K`` groups per batch only ``(K - 1) / (|B| - 1)`` of an anchor's batch mates
are group mates, so the all-pairs ratio is about ``1 + (r_in - 1)(K - 1)/(|B| - 1)``,
``r_in`` = the mean cosine of group mates over random pairs' (``pred_x_random``).

Datasets: ``codesearch`` (the demo's: train split, the demo's TF-IDF teacher from
:func:`~batchlab.recipes.teachers.tfidf_views`, neighbours ranked by the exact sparse
TF-IDF rows and hardness by the dense LSA pair embeddings, exactly as ``batchlab demo``
builds and measures its batches; labels: the full module and the top-level package,
topic proxies since no two pairs share a query), ``planted`` (items in topics, each item
4 times: copies are true false negatives) and ``fashion-mnist`` (64-d PCA teacher,
labels = the 10 classes; skipped when not installed).

Run ``python -m batchlab.bench.hardness`` (or ``batchlab bench hardness``); writes
``<out>/hardness-<dataset>.json`` and ``.png`` (ratio against K, one line per window).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from batchlab.bench._common import format_table, save_figure, write_results

logger = logging.getLogger(__name__)

DATASETS = ("codesearch", "planted", "fashion-mnist")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchlab._argtypes import add_common_arguments

    add_common_arguments(parser, out="results/bench")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, from {', '.join(DATASETS)}")
    parser.add_argument("--batch-sizes", default="64,256,1024", help="comma-separated |B| (capped by N)")
    parser.add_argument("--group-sizes", default="8,16,32,64", help="comma-separated K")
    parser.add_argument("--windows", default="30:130,2:34,0:32", help="comma-separated rank windows P:P_PLUS_M")
    parser.add_argument("--extra", default="0,5", help="comma-separated B3++ shared extra negatives per example h")
    parser.add_argument("--method", default="metis", help="community method (metis, louvain, leiden)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of batches averaged (random and community)")
    parser.add_argument("--top-k", type=int, default=10, help="the top-k hardness variant")
    parser.add_argument("--n", type=int, default=10000, help="examples for planted and fashion-mnist")
    parser.add_argument("--max-train", type=int, default=None, help="codesearch: only the first N training pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch/faiss threads")


# -- the metric -----------------------------------------------------------------
def negative_stats(
    x: torch.Tensor,
    batches: Sequence[Sequence[int]],
    labels: dict[str, np.ndarray] | None = None,
    *,
    extras: Sequence[torch.Tensor] | None = None,
    top_k: int = 10,
) -> dict[str, float]:
    """Teacher hardness of ``batches``: each anchor against its batch mates (and shared extras).

    For a batch ``b`` with shared extra negatives ``e`` (B3++; none by default), anchor
    ``i`` in ``b`` has negatives ``(b \\ {i}) + e``. Per batch: ``neg_sim`` = mean of
    ``x_i . x_j`` over those anchor-negative pairs; ``top_sim`` = mean over anchors of
    their ``top_k`` most similar negatives; ``fn_<name>`` = share of the pairs with equal
    ``labels[name]``. Each is averaged over batches (of two or more members). Without
    extras, ``neg_sim``, ``top_sim`` and ``fn_*`` equal
    :func:`~batchlab.samplers.community_sampler.batch_similarity_stats`'s mean, top-k and
    same-label rates.
    """
    labels = {name: torch.as_tensor(np.asarray(v)) for name, v in (labels or {}).items()}
    sums: dict[str, list[float]] = {"neg_sim": [], "top_sim": [], **{f"fn_{n}": [] for n in labels}}
    for i, batch in enumerate(batches):
        b = len(batch)
        if b < 2:
            continue
        members = torch.as_tensor(list(batch), dtype=torch.int64)
        negatives = members if extras is None else torch.cat([members, torch.as_tensor(extras[i], dtype=torch.int64)])
        gram = x[members.to(x.device)].double() @ x[negatives.to(x.device)].double().T  # (b, b + e)
        self_pair = torch.zeros_like(gram, dtype=torch.bool)
        self_pair[:, :b] = torch.eye(b, dtype=torch.bool, device=gram.device)
        pairs = b * (negatives.numel() - 1)
        sums["neg_sim"].append(float(gram.masked_fill(self_pair, 0).sum()) / pairs)
        top = gram.masked_fill(self_pair, -float("inf")).topk(min(top_k, negatives.numel() - 1), dim=1).values
        sums["top_sim"].append(float(top.mean()))
        for name, lab in labels.items():
            same = lab[members][:, None] == lab[negatives][None, :]
            sums[f"fn_{name}"].append(float((same.sum() - b)) / pairs)
    if not sums["neg_sim"]:
        raise ValueError("negative_stats needs at least one batch with two or more members")
    return {k: float(np.mean(v)) for k, v in sums.items()} | {"n_batches": len(sums["neg_sim"])}


def group_mate_similarity(x: torch.Tensor, groups: np.ndarray) -> float:
    """Mean cosine over ordered pairs of group mates (all groups pooled)."""
    order = np.argsort(groups, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(groups))])
    total, pairs = 0.0, 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a < 2:
            continue
        g = x[torch.as_tensor(order[a:b]).to(x.device)].double()
        s = g.sum(0)
        total += float(s @ s - (g * g).sum())
        pairs += (b - a) * (b - a - 1)
    return total / max(pairs, 1)


# -- data -------------------------------------------------------------------------
def load(name: str, args: argparse.Namespace, depth: int):
    """``(x (N, d) unit rows for hardness, (scores, ids) neighbours to ``depth``, labels, teacher text)`` or None."""
    from batchlab.index import knn

    if name == "codesearch":
        from batchlab.datasets import load_codesearch
        from batchlab.recipes.teachers import tfidf_views

        train = load_codesearch("train", progress=False)
        n = len(train) if args.max_train is None else min(args.max_train, len(train))
        views = tfidf_views(train.queries[:n], train.documents[:n])  # the demo's teacher (batchlab demo's _load)
        labels = {
            "module": _codes(train.modules[:n]),
            "package": _codes([m.split(".")[0] for m in train.modules[:n]]),
        }
        neighbours = views.neighbours(min(depth, n - 1))  # the demo ranks with the exact sparse TF-IDF rows
        return views.pairs, neighbours, labels, "TF-IDF (demo: tfidf_views; sparse ranks, 256-d LSA pair cosines)"
    if name == "planted":
        from batchlab.bench.communities import planted_data

        x, topics, items = planted_data(args.n, 64, 500, 4, 1.0, 0.3, args.seed)
        labels = {"item": items, "topic": topics}
        teacher = "planted: N/4 items x 4 copies (dup_sigma 0.3) in topics of 500 (d=64, sigma 1.0)"
    elif name == "fashion-mnist":
        from batchlab.bench.samplers import load_dataset

        data = load_dataset("fashion-mnist", argparse.Namespace(n=args.n))
        if data is None:
            return None
        x, classes = data
        labels, teacher = {"class": classes.numpy()}, "64-d PCA of the pixels"
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    x = x.to(args.device)
    scores, ids = knn(x, min(depth, len(x) - 1), kind="torch", progress=False)
    return x, (scores.cpu(), ids.cpu()), labels, teacher


def _codes(values: Sequence[str]) -> np.ndarray:
    names = {v: i for i, v in enumerate(sorted(set(values)))}
    return np.asarray([names[v] for v in values], dtype=np.int64)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _windows(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in w.split(":")) for w in text.split(",") if w.strip()]  # type: ignore[misc]


# -- one dataset ------------------------------------------------------------------
def run_dataset(name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    from batchlab.bench.communities import topk_groups
    from batchlab.recipes.samplers import RandomBatchSampler
    from batchlab.samplers import CommunityBatchSampler

    windows, ks, hs = _windows(args.windows), _ints(args.group_sizes), _ints(args.extra)
    depth = max([stop for _, stop in windows] + [max(ks)])
    data = load(name, args, depth)
    if data is None:
        logger.warning("%s is not installed; skipped", name)
        return None
    x, (scores, ids), labels, teacher = data
    n = len(x)
    ids_np = ids.numpy()
    sizes = sorted({min(b, n) for b in _ints(args.batch_sizes)})
    epochs = range(args.epochs)

    def over_epochs(sampler, extras: bool = False) -> dict[str, float]:
        per = []
        for e in epochs:
            sampler.set_epoch(e)
            plan = sampler.global_batches()
            more = [sampler.extra_negatives_for(b) for b in plan] if extras else None
            per.append(negative_stats(x, plan, labels, extras=more, top_k=args.top_k))
        return {k: float(np.mean([p[k] for p in per])) for k in per[0]}

    # groups depend on (window, K), not on |B|: partition once per pair
    groups: dict[tuple, tuple[np.ndarray, float]] = {}
    skipped = []
    for window in windows:
        if not 0 <= window[0] < window[1] <= n - 1:
            skipped.append(f"window {window}: needs 0 <= p < p + m <= N - 1 = {n - 1}")
            continue
        for k in ks:
            if k > n:
                continue
            start = time.perf_counter()
            s = CommunityBatchSampler(None, k, group_size=k, rank_window=window, method=args.method, seed=args.seed,
                                      neighbours=(scores, ids))
            groups[window, k] = (s.groups, time.perf_counter() - start)
    for k in ks:
        if k <= n:
            start = time.perf_counter()
            groups["topk", k] = (topk_groups(ids_np, k, args.seed), time.perf_counter() - start)

    rows = []
    for size in sizes:
        base = over_epochs(RandomBatchSampler(n, size, seed=args.seed, drop_last=True))
        rows.append({"batch": size, "batches": "random", "K": None, "window": None, "h": None, **base})
        for k in ks:
            if size % k or k > n:
                continue
            topk = over_epochs(CommunityBatchSampler(None, size, group_size=k, groups=groups["topk", k][0],
                                                     seed=args.seed, drop_last=True))
            rows.append({"batch": size, "batches": "top-k groups (no guard)", "K": k, "window": None, "h": None,
                         **topk, "group_sim": group_mate_similarity(x, groups["topk", k][0]),
                         "build_s": groups["topk", k][1]})
            for window in windows:
                if (window, k) not in groups:
                    continue
                g, build_s = groups[window, k]
                group_sim = group_mate_similarity(x, g)
                for h in hs:
                    sampler = CommunityBatchSampler(None, size, group_size=k, groups=g, rank_window=window,
                                                    neighbours=(scores, ids) if h else None, extra_negatives=h,
                                                    seed=args.seed, drop_last=True)
                    stats = over_epochs(sampler, extras=bool(h))
                    rows.append({"batch": size, "batches": f"B3 {args.method}", "K": k, "window": f"{window[0]}..{window[1]}",
                                 "h": h, **stats, "group_sim": group_sim, "build_s": build_s})
                    logger.info("%s |B|=%d K=%d window=%s h=%d: %s", name, size, k, window, h, stats)
        _ratios([r for r in rows if r["batch"] == size], base, batch=size)
    label_names = list(labels)
    columns = ["batch", "batches", "K", "window", "h", "neg_sim", "neg_x_random", "pred_x_random", "top_sim",
               "top_x_random", *(c for lab in label_names for c in (f"fn_{lab}", f"fn_{lab}_x_topk")), "build_s"]
    print(f"\n## {name}: N={n}, d={x.shape[1]}, teacher: {teacher}; {args.epochs} epochs; METIS={args.method}")
    print(format_table(rows, columns))
    reached = [r for r in rows if r["batches"].startswith("B3") and r["neg_x_random"] >= 3]
    return {"n": n, "dim": int(x.shape[1]), "teacher": teacher, "labels": label_names, "skipped": skipped,
            "columns": columns, "rows": rows,
            "reach_3x_all_pairs": [{k: r[k] for k in ("batch", "K", "window", "h", "neg_x_random")} for r in reached]}


def _ratios(rows: list[dict], base: dict, *, batch: int) -> None:
    """Ratios to random batches of the same size, and false negatives to top-k groups of the same K."""
    topk = {r["K"]: r for r in rows if r["batches"].startswith("top-k")}
    for r in rows:
        r["neg_x_random"] = r["neg_sim"] / base["neg_sim"]
        r["top_x_random"] = r["top_sim"] / base["top_sim"]
        if r.get("group_sim") is not None:
            r_in = r["group_sim"] / base["neg_sim"]
            r["pred_x_random"] = 1 + (r_in - 1) * (r["K"] - 1) / (batch - 1)
        for key in [k for k in r if k.startswith("fn_") and not k.endswith("_x_topk")]:
            ref = topk.get(r["K"])
            r[f"{key}_x_topk"] = r[key] / ref[key] if ref and ref[key] > 0 else None


def plot(path: Path, result: dict[str, Any], *, title: str) -> Path:
    """Ratio to random against K: one panel per batch size, one line per (window, h); the 3x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    sizes = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(sizes), figsize=(4.2 * len(sizes), 7), squeeze=False)
    for col, size in enumerate(sizes):
        mine = [r for r in rows if r["batch"] == size and r["K"] is not None]
        lines: dict[tuple, list] = {}
        for r in mine:
            lines.setdefault((r["window"], r["h"]), []).append(r)
        windows = sorted({w for w, _ in lines if w is not None})
        for row, (key, name) in enumerate((("neg_x_random", "all pairs"), ("top_x_random", "top-10"))):
            ax = axes[row][col]
            for (window, h), rs in lines.items():
                rs = sorted(rs, key=lambda r: r["K"])
                if window is None:
                    label, colour, style = "top-k groups (no guard)", "black", ":"
                else:
                    label, colour, style = f"B3 window {window}, h={h}", f"C{windows.index(window)}", "-" if not h else "--"
                ax.plot([r["K"] for r in rs], [r[key] for r in rs], style, color=colour, marker="o", label=label)
            ax.axhline(3.0, color="red", lw=1, label="3x target")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("group size K")
            ax.set_ylabel(f"{name} hardness / random")
            ax.set_title(f"|B| = {size}: {name}")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    command = "python -m batchlab.bench.hardness " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items() if k != "func" and v is not None
    )
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        start = time.perf_counter()
        result = run_dataset(name, args)
        if result is None:
            continue
        payload = {"benchmark": "hardness", "dataset": name, "command": command,
                   "settings": {k: v for k, v in vars(args).items() if k != "func"},
                   "metric": "neg_sim: mean teacher cosine over ordered in-batch pairs i != j (plus the shared "
                             "extras when h > 0); x_random: over random batches of the same size, same run",
                   "seconds": time.perf_counter() - start, **result}
        path = write_results(args.out, f"hardness-{name}", payload)
        plot(path.with_suffix(".png"), result, title=f"B3 batch hardness on {name} (N={result['n']}, METIS)")
        print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def main(argv=None) -> int:
    from batchlab.bench._common import script_main

    return script_main("batchlab.bench.hardness", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
