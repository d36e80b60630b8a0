"""``batchlab build-batches``: B3 community batches from teacher embeddings, as reusable artifacts.

Stages (each with a progress bar): kNN search -> mutual rank-window graph ->
partition into groups of K -> summary. Writes to ``--out``:

* ``graph.npz``: the mutual rank-window graph (``scipy.sparse.save_npz``, CSR);
* ``groups.npy``: ``(N,)`` int64 group id of each example;
* ``window_ids.npy`` (with ``--save-window``): ``(N, m)`` rank-window neighbours, for B3++;
* ``meta.json``: hyper-parameters, the teacher embeddings' content hash, N and d;
* ``summary.json``: group sizes, modularity and edge cut, batch hardness against
  random batches, and the time of each stage;
* ``manifest.json``: N, d and the size and hash of every file above.

The directory is written to a temporary sibling and swapped in whole when the build
is complete (:mod:`batchlab._artifacts`): an interrupted build leaves the previous
one intact, and a rebuild leaves no file of the old one behind. ``--out`` must be a
new or empty directory or an earlier build.

Load them with :meth:`batchlab.samplers.CommunityBatchSampler.from_artifacts`, which
checks every file against the manifest.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from batchlab._argtypes import non_negative_int, positive_int
from batchlab.commands._common import add_common_arguments, add_subcommand, load_matrix

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "build-batches",
        help="build community (B3) batches from teacher embeddings",
        description="B3 (arXiv 2505.11293): rank each example's neighbours with the teacher embeddings, keep "
        "mutual neighbours at ranks p..p+m, partition the graph into groups of K (METIS by default), and "
        "write the graph, the groups, the hyper-parameters with the teacher hash, and a summary.",
        example="batchlab build-batches teacher.npy --group-size 32 --batch-size 1024 --out b3/   "
        "# or: batchlab build-batches --demo 20000 --out b3-demo/",
    )
    parser.add_argument("embeddings", nargs="?", help="teacher embeddings (N, d): a .npy file or a .pt tensor")
    parser.add_argument("--targets", default=None, metavar="PATH",
                        help="paired data: teacher embeddings of each row's positive target; each query then "
                        "ranks all targets but its own (B3's setting)")
    parser.add_argument("--demo", type=positive_int, default=None, metavar="N",
                        help="instead of a file, use N synthetic gaussian-mixture embeddings (d=64)")
    parser.add_argument("--group-size", type=positive_int, default=32, help="K, examples per group (default: 32, as B3)")
    parser.add_argument("--batch-size", type=positive_int, default=1024,
                        help="|B| used for the hardness summary, a multiple of --group-size (default: 1024)")
    parser.add_argument("--rank-window", type=non_negative_int, nargs=2, default=(30, 130), metavar=("P", "STOP"),
                        help="keep neighbour ranks P..STOP-1 (default: 30 130, B3's p=30, m=100)")
    parser.add_argument("--method", default="metis", choices=["metis", "louvain", "leiden"],
                        help="partition (default: metis, as B3)")
    parser.add_argument("--backend", default=None, choices=["igraph", "networkx"],
                        help="louvain/leiden backend (default: igraph)")
    parser.add_argument("--weights", default="similarity", choices=["similarity", "rank"], help="edge weights")
    parser.add_argument("--index-kind", default="auto", help="EmbeddingIndex kind: auto, flat, torch, ivf, hnsw")
    parser.add_argument("--save-window", action="store_true", help="also save the (N, m) window ids (for B3++)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_common_arguments(parser, out="b3-batches")
    parser.set_defaults(func=run)


def load_embeddings(path: str | Path, flag: str = "embeddings"):
    """``(N, d)`` float32 torch embeddings from a ``.npy`` file or a ``.pt`` tensor (or dict with ``"embeddings"``)."""
    import numpy as np
    import torch

    x = load_matrix(path, flag, torch_files=True)
    # np.array copies: the memory-mapped file is read-only, and torch warns on (and must not write to) such arrays
    return torch.from_numpy(np.array(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x.float()


def run(args) -> int:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from batchlab._artifacts import check_writable_directory
    from batchlab.errors import BatchlabInputError
    from batchlab.index import content_hash
    from batchlab.samplers import CommunityBatchSampler
    from batchlab.samplers.communities import ARTIFACT_FILES, ARTIFACT_KIND, partition_graph, partition_quality, save_artifacts
    from batchlab.samplers.community_sampler import batch_similarity_stats
    from batchlab.samplers.graph import clamp_window, rank_neighbours, rank_window_graph

    if (args.embeddings is None) == (args.demo is None):
        raise BatchlabInputError("give either an embeddings file or --demo N (not both, not neither)")
    if args.rank_window[0] >= args.rank_window[1]:
        raise BatchlabInputError(f"--rank-window P STOP needs P < STOP, got {args.rank_window[0]} {args.rank_window[1]}")
    if args.batch_size < args.group_size:
        raise BatchlabInputError(
            f"--batch-size {args.batch_size} is smaller than --group-size {args.group_size}: a batch is whole groups; "
            f"use a multiple of {args.group_size}, e.g. {args.group_size * max(1, 1024 // args.group_size)}"
        )
    out = check_writable_directory(args.out, kind=ARTIFACT_KIND, owned=ARTIFACT_FILES)  # fail before the work
    if args.demo is not None:
        from batchlab.datasets.synthetic import gaussian_mixture

        x, _ = gaussian_mixture(args.demo, 64, max(2, args.demo // 200), sigma=1.0, seed=args.seed)
    else:
        x = load_embeddings(args.embeddings)
    targets = load_embeddings(args.targets, "--targets") if args.targets else None
    if targets is not None and targets.shape != x.shape:
        raise BatchlabInputError(f"--targets has shape {tuple(targets.shape)}, expected {tuple(x.shape)} (one per row)")
    x = x.to(args.device)
    targets = targets.to(args.device) if targets is not None else None
    n, d = x.shape
    if args.group_size > n:
        raise BatchlabInputError(f"--group-size {args.group_size} is larger than the number of examples N={n}")
    timings: dict[str, float] = {}
    stages = tqdm(total=4, desc="build-batches", disable=not args.progress)

    stages.set_postfix_str("kNN")
    t = time.perf_counter()
    start, stop = clamp_window(tuple(args.rank_window), n)
    scores, ids = rank_neighbours(
        x, stop, targets=targets, kind=args.index_kind, progress=args.progress, seed=args.seed
    )
    timings["knn_s"] = time.perf_counter() - t
    stages.update()

    stages.set_postfix_str("graph")
    t = time.perf_counter()
    graph = rank_window_graph(ids, scores, window=(start, stop), weights=args.weights, num_nodes=n)
    window_ids = None
    if args.save_window:
        window_ids = ids[:, start:stop].cpu().numpy().astype(np.int32 if n < 2**31 else np.int64)
    timings["graph_s"] = time.perf_counter() - t
    stages.update()

    stages.set_postfix_str(args.method)
    t = time.perf_counter()
    groups = partition_graph(graph, args.group_size, method=args.method, backend=args.backend, seed=args.seed,
                             exact=True)  # groups of exactly K (+ one remainder): whole groups per batch
    timings["partition_s"] = time.perf_counter() - t
    stages.update()

    stages.set_postfix_str("summary")
    t = time.perf_counter()
    batch_size = args.batch_size - args.batch_size % args.group_size
    if batch_size != args.batch_size:
        logger.warning("--batch-size %d is not a multiple of --group-size %d; the summary uses %d",
                       args.batch_size, args.group_size, batch_size)
    sampler = CommunityBatchSampler(None, batch_size, group_size=args.group_size, groups=groups, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    random_order = torch.randperm(n, generator=generator).tolist()
    random_batches = [random_order[i : i + batch_size] for i in range(0, n, batch_size)]
    community = batch_similarity_stats(x, list(sampler))
    random_ = batch_similarity_stats(x, random_batches)

    def compare(key: str) -> dict:
        c, r = community[key], random_[key]
        return {"community": c, "random": r, "ratio": c / r if r > 0 else None}

    sizes = np.bincount(groups)
    meta = {
        "format": "batchlab-b3/1",
        "teacher_hash": content_hash(x),
        "targets_hash": content_hash(targets) if targets is not None else None,
        "n": n,
        "d": d,
        "group_size": args.group_size,
        "rank_window": [start, stop],
        "method": args.method,
        "backend": args.backend,
        "weights": args.weights,
        "seed": args.seed,
        "index_kind": args.index_kind,
        "source": args.embeddings or f"demo:{args.demo}",
    }
    summary = {
        "group_sizes": {"min": int(sizes.min()), "max": int(sizes.max()), "mean": float(sizes.mean()),
                        "n_groups": int(sizes.size), "counts": {int(s): int((sizes == s).sum()) for s in np.unique(sizes)}},
        "graph": {"edges": int(graph.nnz // 2), "isolated": int((np.diff(graph.indptr) == 0).sum())},
        "quality": partition_quality(graph, groups),
        "hardness": {
            "batch_size": batch_size,
            "mean_negative_similarity": compare("mean_negative_similarity"),
            "top10_negative_similarity": compare("top_k_negative_similarity"),
            "what": "teacher cosine of in-batch negatives over one epoch: the mean over all pairs, and each "
            "anchor's 10 most similar batch mates (batch_similarity_stats)",
        },
        "timings": timings,
    }
    timings["summary_s"] = time.perf_counter() - t
    stages.update()
    stages.close()
    # one atomic write of every file: a kill before this line leaves the previous build untouched
    save_artifacts(out, groups=groups, meta=meta, summary=summary, graph=graph, window_ids=window_ids)
    print(
        f"{n} examples -> {sizes.size} groups of {sizes.min()}..{sizes.max()} ({args.method}); "
        f"modularity {summary['quality']['modularity']:.3f}, cut fraction {summary['quality']['cut_fraction']:.3f}; "
        f"top-10 negative similarity {community['top_k_negative_similarity']:.3f} vs random "
        f"{random_['top_k_negative_similarity']:.3f}; wrote {out}/"
    )
    return 0


if __name__ == "__main__":  # until `batchlab build-batches` dispatches here
    import argparse
    import sys

    _parser = argparse.ArgumentParser(prog="batchlab")
    add_parser(_parser.add_subparsers())
    _args = _parser.parse_args(["build-batches", *sys.argv[1:]])
    sys.exit(_args.func(_args))
