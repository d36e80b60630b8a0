"""``batchlab bench communities``: B3's graph, partition and batches, against networkx and pymetis.

On planted data whose structure is known, at several sizes ``N`` on this machine:

* time of each stage: kNN (:func:`batchlab.index.knn`), the mutual rank-window graph,
  and, side by side on the *same* graph, pymetis (B3's METIS, batchlab's default),
  python-igraph Louvain and Leiden, and networkx's ``louvain_communities`` (the
  anchor most users would reach for); "partition" times include batchlab's size repair;
* quality: modularity of the raw communities and ARI against the planted topics,
  then for the size-``K`` groups: cut fraction, purity (share of a group in its
  majority topic) and group sizes;
* batches (one epoch, ``|B| / K`` random groups each): hardness (``top10``: each
  anchor's 10 most similar batch mates; ``neg_sim``: all pairs) against random batches
  measured in the same run, and false negatives (share of in-batch pairs that are
  copies of the same item) against *plain top-k groups* (an anchor and its ``K - 1``
  nearest neighbours, no rank guard, same batch assembly).

Data ("planted"): ``N / dup`` items in topics of ``topic_size`` items (a gaussian
mixture), each item present ``dup`` times with small noise. Copies of one item are
the false negatives B3's guard ``p`` is meant to skip; topics are the communities.

``--large-n 1000000`` also times graph + partitions at that size on a synthetic
neighbour table (random neighbours inside planted topics, no kNN), so that the 1M
figures are measured, not extrapolated. The 1M x 768 kNN time is extrapolated from a
kNN measured at d=768 (exact ``flat`` and approximate ``ivf-gemm``, the index's choice for
large N; search cost ~ N^2 d for both with the index's default ``nprobe``, a fixed share
of the lists); the JSON says which numbers are which.

Run ``python -m batchlab.bench.communities --sizes 10000,100000`` (or ``batchlab bench communities``).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import numpy as np
import torch

from batchlab.bench._common import device_name, format_table, plot_series, write_results
from batchlab.datasets.synthetic import gaussian_mixture

logger = logging.getLogger(__name__)

# metis-loose: METIS with ufactor=100 (10% imbalance allowed), then batchlab's size repair
METHODS = ("metis", "metis-loose", "louvain-igraph", "leiden-igraph", "louvain-networkx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="device for the kNN (cpu or cuda); partitions run on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench", help="results folder")
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated N (quality is reported for each)")
    parser.add_argument("--dim", type=int, default=64, help="teacher embedding dimension")
    parser.add_argument("--topic-size", type=int, default=500, help="examples per planted topic (community)")
    parser.add_argument("--dup", type=int, default=4, help="copies of each item (false negatives)")
    parser.add_argument("--sigma", type=float, default=1.0, help="topic noise (gaussian_mixture sigma)")
    parser.add_argument("--dup-sigma", type=float, default=0.3, help="noise between copies of an item")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--rank-window", type=int, nargs=2, default=(30, 130))
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--networkx-max-n", type=int, default=100000, help="skip networkx above this N")
    parser.add_argument("--index-kind", default="flat", help="EmbeddingIndex kind for the kNN (flat = exact faiss)")
    parser.add_argument("--knn-d768", default="flat:20000,ivf-gemm:100000",
                        help="also time kNN at d=768 as KIND:N pairs, for the 1M estimate ('' to skip)")
    parser.add_argument("--large-n", type=int, default=0, help="also time graph + partitions at this N (synthetic neighbours)")
    parser.add_argument("--large-methods", default="metis,louvain-igraph,leiden-igraph")
    parser.add_argument("--threads", type=int, default=1, help="torch/faiss threads (1: stable timings on a shared box)")
    parser.add_argument("--no-batches", action="store_true", help="timings and partition quality only (no batch statistics)")
    parser.add_argument("--tag", default="", help="suffix of the results file name (e.g. 1M)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="cpu: process CPU seconds (default on --device cpu: a shared box's load does not count); "
                        "wall: elapsed seconds (default on cuda)")


# -- data ----------------------------------------------------------------------
def planted_data(n: int, d: int, topic_size: int, dup: int, sigma: float, dup_sigma: float, seed: int):
    """``(x (n, d) unit, topics (n,), items (n,))``: items in topics, each item ``dup`` times."""
    n_items = n // dup
    items_x, topics_of_items = gaussian_mixture(n_items, d, max(1, n // topic_size), sigma=sigma, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    items = torch.arange(n) % n_items
    x = items_x[items] + dup_sigma * torch.randn(n, d, generator=g) / d**0.5
    return torch.nn.functional.normalize(x, dim=1), topics_of_items[items].numpy(), items.numpy()


def synthetic_neighbours(n: int, k: int, topic_size: int, seed: int) -> np.ndarray:
    """``(n, k)`` ids: ``k`` distinct-ish random members of each node's topic (a stand-in for a kNN table)."""
    rng = np.random.default_rng(seed)
    topic = np.arange(n) // topic_size
    base = topic[:, None] * topic_size
    size = np.minimum(topic_size, n - base)
    ids = base + (rng.random((n, k)) * size).astype(np.int64)
    return ids


# -- baselines -----------------------------------------------------------------
def topk_groups(ids: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Plain top-k groups: a random unassigned anchor plus its nearest unassigned neighbours."""
    n = ids.shape[0]
    rng = np.random.default_rng(seed)
    groups = np.full(n, -1, dtype=np.int64)
    g = 0
    leftovers = []
    for a in rng.permutation(n):
        if groups[a] != -1:  # -2: already a leftover, which must not be picked again
            continue
        members = [a]
        for j in ids[a]:
            if len(members) == k:
                break
            if j >= 0 and groups[j] == -1 and j != a:
                members.append(j)
        if len(members) < k:
            leftovers.extend(members)
            groups[members] = -2
            continue
        groups[members] = g
        g += 1
    leftovers = np.asarray(leftovers, dtype=np.int64)
    for i in range(0, len(leftovers), k):  # what no neighbour list could fill: random groups
        groups[leftovers[i : i + k]] = g
        g += 1
    return groups


def purity(groups: np.ndarray, truth: np.ndarray) -> float:
    """Share of examples whose group's majority topic is their own."""
    joint = np.unique(groups * (truth.max() + 1) + truth, return_counts=True)
    g_of, counts = joint[0] // (truth.max() + 1), joint[1]
    best = np.zeros(groups.max() + 1)
    np.maximum.at(best, g_of, counts)
    return float(best.sum() / groups.size)


_CLOCK = {"fn": time.perf_counter}


def _timed(fn):
    """``(fn(), seconds)`` by the run's clock: wall time, or this process's CPU time.

    On a shared CPU box, CPU time measures the single-threaded work (METIS, igraph,
    networkx, numpy, 1-thread faiss) without the time lost to other processes.
    """
    clock = _CLOCK["fn"]
    start = clock()
    out = fn()
    return out, clock() - start


def _partition(graph, method: str, k: int, seed: int) -> dict[str, Any]:
    """Raw communities + size repair for one method, timed separately."""
    from batchlab.samplers.communities import (
        _metis_parts,
        detect_communities,
        locality_order,
        repair_sizes,
    )

    if method.startswith("metis"):
        ufactor = 100 if method == "metis-loose" else None
        raw, t_raw = _timed(lambda: _metis_parts(graph, max(1, round(graph.shape[0] / k)), seed, True, ufactor))
    else:
        algo, backend = method.split("-")
        target = graph
        t_convert = 0.0
        if backend == "networkx":
            from batchlab.samplers.graph import to_networkx

            target, t_convert = _timed(lambda: to_networkx(graph))
        raw, t_raw = _timed(lambda: detect_communities(target, method=algo, backend=backend, seed=seed))
        t_raw += t_convert
    # exact sizes, as CommunityBatchSampler asks for: batches are whole groups
    groups, t_repair = _timed(lambda: repair_sizes(raw, k, position=locality_order(graph), exact=True))
    return {"raw": raw, "groups": groups, "detect_s": t_raw, "repair_s": t_repair}


def _batches(groups: np.ndarray, batch_size: int, k: int, seed: int) -> list[list[int]]:
    from batchlab.samplers import CommunityBatchSampler

    return list(CommunityBatchSampler(None, batch_size, group_size=k, groups=groups, seed=seed))


# -- one size ------------------------------------------------------------------
def run_size(args, n: int, methods: list[str]) -> tuple[list[dict], list[dict], dict]:
    from batchlab.index import knn
    from batchlab.samplers.communities import adjusted_rand_index, partition_quality
    from batchlab.samplers.community_sampler import batch_similarity_stats
    from batchlab.samplers.graph import clamp_window, rank_window_graph

    k = args.group_size
    x, topics, items = planted_data(n, args.dim, args.topic_size, args.dup, args.sigma, args.dup_sigma, args.seed)
    start, stop = clamp_window(tuple(args.rank_window), n)
    xd = x.to(args.device)
    (scores, ids), t_knn = _timed(lambda: knn(xd, stop, kind=args.index_kind, progress=False, seed=args.seed))
    ids_np, scores_np = ids.cpu().numpy(), scores.cpu().numpy()
    graph, t_graph = _timed(lambda: rank_window_graph(ids_np, scores_np, window=(start, stop)))
    stage = {"n": n, "knn_s": t_knn, "graph_s": t_graph, "edges": graph.nnz // 2,
             "isolated": int((np.diff(graph.indptr) == 0).sum())}
    logger.info("N=%d: knn %.1fs, graph %.1fs (%d edges)", n, t_knn, t_graph, graph.nnz // 2)
    rows, batch_rows = [], []
    if not args.no_batches:
        gen = torch.Generator().manual_seed(args.seed)
        perm = torch.randperm(n, generator=gen).tolist()
        random_batches = [perm[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
        base = batch_similarity_stats(xd, random_batches, items)
        batch_rows.append({"n": n, "batches": "random", **_batch_cols(base, base)})
        topk, t_topk = _timed(lambda: topk_groups(ids_np, k, args.seed))
        stats = batch_similarity_stats(xd, _batches(topk, args.batch_size, k, args.seed), items)
        batch_rows.append({"n": n, "batches": "top-k groups (no guard)", **_batch_cols(stats, base), "build_s": t_topk})
    for method in methods:
        if method == "louvain-networkx" and n > args.networkx_max_n:
            continue
        result = _partition(graph, method, k, args.seed)
        raw_q = partition_quality(graph, result["raw"])
        q = partition_quality(graph, result["groups"])
        rows.append({
            "n": n, "method": method,
            "detect_s": result["detect_s"], "repair_s": result["repair_s"],
            "total_s": result["detect_s"] + result["repair_s"],
            "raw_comms": raw_q["n_groups"], "raw_Q": raw_q["modularity"],
            "raw_ARI": adjusted_rand_index(topics, result["raw"]),
            "groups": q["n_groups"], "size_min": q["size_min"], "size_max": q["size_max"],
            "groups_Q": q["modularity"], "cut_frac": q["cut_fraction"],
            "purity": purity(result["groups"], topics),
        })
        logger.info("N=%d %s: %s", n, method, rows[-1])
        if not args.no_batches:
            stats = batch_similarity_stats(xd, _batches(result["groups"], args.batch_size, k, args.seed), items)
            batch_rows.append({"n": n, "batches": f"B3 {method}", **_batch_cols(stats, base)})
    anchor = next((r for r in rows if r["method"] == "louvain-networkx"), None)
    for r in rows:
        r["x_vs_networkx"] = anchor["total_s"] / r["total_s"] if anchor else None
    return rows, batch_rows, stage


def _batch_cols(stats: dict, base: dict) -> dict:
    return {
        "top10_sim": stats["top_k_negative_similarity"],
        "top10_x_random": stats["top_k_negative_similarity"] / base["top_k_negative_similarity"],
        "neg_sim": stats["mean_negative_similarity"],
        "neg_sim_minus_random": stats["mean_negative_similarity"] - base["mean_negative_similarity"],
        "false_neg": stats["same_label_rate"],
    }


# -- large graph, no kNN -------------------------------------------------------
def run_large(args, n: int, methods: list[str]) -> list[dict]:
    from batchlab.samplers.communities import partition_quality
    from batchlab.samplers.graph import rank_window_graph

    start, stop = args.rank_window
    ids, t_ids = _timed(lambda: synthetic_neighbours(n, stop, args.topic_size, args.seed))
    graph, t_graph = _timed(lambda: rank_window_graph(ids, None, window=(start, stop), weights="rank"))
    del ids
    rows = [{"n": n, "stage": "graph (synthetic neighbours)", "seconds": t_graph, "edges": graph.nnz // 2}]
    logger.info("large N=%d: graph %.1fs, %d edges", n, t_graph, graph.nnz // 2)
    for method in methods:
        result = _partition(graph, method, args.group_size, args.seed)
        q = partition_quality(graph, result["groups"])
        rows.append({"n": n, "stage": method, "seconds": result["detect_s"] + result["repair_s"],
                     "detect_s": result["detect_s"], "repair_s": result["repair_s"],
                     "size_min": q["size_min"], "size_max": q["size_max"], "cut_frac": q["cut_fraction"]})
        logger.info("large N=%d %s: %s", n, method, rows[-1])
    return rows


def _fit_exponent(points: list[tuple[int, float]]) -> float | None:
    points = [(n, t) for n, t in points if t > 0]
    if len(points) < 2:
        return None
    (n0, t0), (n1, t1) = points[-2], points[-1]
    return math.log(t1 / t0) / math.log(n1 / n0)


def run(args) -> int:
    from batchlab.index import EmbeddingIndex

    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    _CLOCK["fn"] = time.process_time if clock == "cpu" else time.perf_counter
    sizes = [int(s) for s in args.sizes.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    rows, batch_rows, stages = [], [], []
    for n in sizes:
        r, b, s = run_size(args, n, methods)
        rows += r
        batch_rows += b
        stages.append(s)
    print(format_table(stages))
    print(format_table(rows, ["n", "method", "detect_s", "repair_s", "total_s", "x_vs_networkx", "raw_comms", "raw_Q",
                              "raw_ARI", "groups", "size_min", "size_max", "groups_Q", "cut_frac", "purity"]))
    if batch_rows:
        print(format_table(batch_rows, ["n", "batches", "top10_sim", "top10_x_random", "neg_sim",
                                        "neg_sim_minus_random", "false_neg"]))
    knn768 = []
    for spec in filter(None, args.knn_d768.split(",")):
        kind, n768 = spec.split(":")
        x768, _, _ = planted_data(int(n768), 768, args.topic_size, args.dup, args.sigma, args.dup_sigma, args.seed)
        x768 = x768.to(args.device)
        index, t_build = _timed(lambda: EmbeddingIndex(x768, kind=kind, progress=False, seed=args.seed))
        _, t_search = _timed(lambda: index.search(x768, args.rank_window[1], exclude_self=True, progress=False))
        recall = index.recall(k=10, sample=500) if index.approximate else 1.0
        knn768.append({"kind": kind, "n": int(n768), "d": 768, "build_s": t_build, "search_s": t_search,
                       "recall@10": recall, "nlist": getattr(index, "nlist", None), "nprobe": getattr(index, "nprobe", None)})
        del x768, index
    if knn768:
        print(format_table(knn768))
    large = run_large(args, args.large_n, [m for m in args.large_methods.split(",") if m]) if args.large_n else []
    if large:
        print(format_table(large))

    # 1M x 768 end to end: measured where --large-n 1000000 ran, else extrapolated
    target = 1_000_000
    estimate: dict[str, Any] = {"n": target, "d": 768}
    for row in knn768:
        # search: flat is N^2 d, and so is IVF with the index's default nprobe (a fixed share
        # of the lists); build (IVF k-means on a sample, then adding N rows) taken as linear in N
        scale = target / row["n"]
        estimate[f"knn_{row['kind']}_s"] = row["build_s"] * scale + row["search_s"] * scale**2
        estimate[f"knn_{row['kind']}_how"] = (
            f"estimated: build x N + search x N^2 from N={row['n']}, d=768 ({args.threads} thread(s)); "
            f"recall@10 there {row['recall@10']:.3f}"
        )
    measured_large = {r["stage"]: r["seconds"] for r in large if r["n"] == target}
    for stage, key in [("graph", "graph_s"), *[(m, m) for m in methods if m != "louvain-networkx"]]:
        large_key = "graph (synthetic neighbours)" if stage == "graph" else stage
        if large_key in measured_large:
            estimate[f"{stage}_s"] = measured_large[large_key]
            estimate[f"{stage}_how"] = "measured at 1M (synthetic neighbour table)"
            continue
        pts = [(s["n"], s["graph_s"]) for s in stages] if stage == "graph" else [(r["n"], r["total_s"]) for r in rows if r["method"] == stage]
        exp = _fit_exponent(pts)
        if pts and exp is not None:
            estimate[f"{stage}_s"] = pts[-1][1] * (target / pts[-1][0]) ** exp
            estimate[f"{stage}_how"] = f"estimated: N^{exp:.2f} fitted on the two largest sizes"
    print(format_table([{k: v for k, v in estimate.items() if not k.endswith("_how")}]))

    tag = "gpu-" + device_name(args.device).replace(" ", "-") if args.device.startswith("cuda") else "cpu"
    payload = {
        "benchmark": "communities",
        "device": device_name(args.device),
        "args": vars(args),
        "stages": stages,
        "partitions": rows,
        "batches": batch_rows,
        "knn_d768": knn768,
        "large": large,
        "estimate_1M_x_768": estimate,
        "clock": "process CPU seconds" if clock == "cpu" else "wall-clock seconds",
        "notes": "one timed run per cell (no repeats: the anchors take minutes); partition times include "
        "batchlab's size repair; networkx times include building the networkx graph",
    }
    path = write_results(args.out, f"communities-{tag}" + (f"-{args.tag}" if args.tag else ""), payload)
    series = {}
    for method in methods:
        pts = [(r["n"], r["total_s"]) for r in rows if r["method"] == method]
        pts += [(r["n"], r["seconds"]) for r in large if r["stage"] == method]
        if pts:
            series[method] = ([p[0] for p in pts], [p[1] for p in pts])
    series["kNN (" + args.index_kind + f", d={args.dim})"] = ([s["n"] for s in stages], [s["knn_s"] for s in stages])
    series["graph"] = ([s["n"] for s in stages] + [r["n"] for r in large if r["stage"].startswith("graph")],
                       [s["graph_s"] for s in stages] + [r["seconds"] for r in large if r["stage"].startswith("graph")])
    plot = plot_series(path.with_suffix(".png"), series, xlabel="N (examples)", ylabel=f"seconds ({clock} clock)",
                       title=f"B3 stages on {device_name(args.device)[:40]}")
    print(f"wrote {path} and {plot}")
    return 0


def main(argv=None) -> int:
    from batchlab.bench._common import script_main

    return script_main("batchlab.bench.communities", __doc__, add_arguments, run,
                       argv)


if __name__ == "__main__":
    raise SystemExit(main())
