"""``batchlab bench samplers``: how hard are the batches each sampler builds, and at what cost?

For every sampler, on teacher embeddings with known labels, over one epoch's full
global batches:

* ``top10_sim`` — batch hardness: for each anchor, the mean teacher cosine of its 10
  most similar in-batch negatives, averaged over anchors (what a contrastive
  denominator mostly sees); ``hard_x_random`` is its ratio to random batches, the anchor
  measured in the same run. ``neg_sim`` is the mean cosine over all in-batch pairs.
* ``knn_in_batch`` — share of each anchor's 10 nearest teacher neighbours (over the
  whole dataset) that are in its batch; random batches give about ``(B - 1) / (N - 1)``.
* ``false_neg`` — share of in-batch pairs with the same label (the "negatives" that
  are really positives when labels are classes); random gives about ``1 / labels``.
* ``fit_s`` — one-off cost: clustering (or mining, or graph partitioning) plus the
  first epoch plan; ``plan_s`` — building a later epoch's plan from the cached clusters.

Datasets: ``planted`` (:func:`~batchlab.datasets.synthetic.gaussian_mixture`, labels =
planted clusters), ``fashion-mnist`` (real images when the Debian package is
installed; teacher = 64-d PCA of the pixels, labels = the 10 classes) and
``codesearch`` (docstring/code pairs of the standard library; teacher = hashed TF-IDF
projected to 256-d, labels = top-level module, a topic proxy rather than true duplicates). A second table
times balanced 2-means against faiss k-means (the anchor) at the same cluster count.

Run ``python -m batchlab.bench.samplers --n 20000`` (or ``batchlab bench samplers``).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from batchlab.bench._common import device_name, format_table, time_call, write_results
from batchlab.datasets.synthetic import gaussian_mixture

logger = logging.getLogger(__name__)

DATASETS = ("planted", "fashion-mnist", "codesearch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="device for the teacher similarities (cpu or cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench", help="results folder")
    parser.add_argument("--n", type=int, default=20000, help="examples per dataset")
    parser.add_argument("--dim", type=int, default=64, help="teacher embedding dimension (planted data)")
    parser.add_argument("--labels", type=int, default=100, help="planted clusters (labels)")
    parser.add_argument("--sigma", type=float, default=0.5, help="planted cluster noise (gaussian_mixture sigma)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-negatives", type=int, default=20, help="mined negatives per anchor (HardNegativeBatchSampler)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and faiss (1: stable timings on a shared machine)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, from {', '.join(DATASETS)}")
    parser.add_argument("--no-b3", action="store_true", help="skip the B3 CommunityBatchSampler rows")


# -- data ----------------------------------------------------------------------------
def load_dataset(name: str, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(embeddings (N, d) unit rows, labels (N,))`` or None when the dataset is missing."""
    if name == "planted":
        return gaussian_mixture(args.n, args.dim, args.labels, sigma=args.sigma, seed=args.seed)
    if name == "fashion-mnist":
        from batchlab.datasets import fashion_mnist_available, load_fashion_mnist

        if not fashion_mnist_available():
            logger.warning("fashion-mnist is not installed (apt-get install dataset-fashion-mnist); skipped")
            return None
        data = load_fashion_mnist("train", limit=args.n)
        pixels = data.images.reshape(len(data.images), -1).float() / 255.0
        pixels = pixels - pixels.mean(0)
        # a weak but real teacher: the top principal directions of the pixels
        _, _, v = torch.pca_lowrank(pixels, q=64, center=False, niter=4)
        return F.normalize(pixels @ v, dim=1), data.labels.clone()
    if name == "codesearch":
        from batchlab.datasets import load_codesearch

        data = load_codesearch("train")
        n = min(args.n, len(data))
        texts = [f"{q} {d}" for q, d in zip(data.queries[:n], data.documents[:n])]
        # labels: the top-level module (a topic proxy: same-module pairs are related, not duplicates)
        modules = [m.split(".")[0] for m in data.modules[:n]]
        names = {m: i for i, m in enumerate(sorted(set(modules)))}
        return hashed_tfidf(texts, seed=args.seed), torch.tensor([names[m] for m in modules])
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


def hashed_tfidf(texts: list[str], *, buckets: int = 4096, dim: int = 256, seed: int = 0) -> torch.Tensor:
    """A lexical teacher for text without a neural encoder: hashed TF-IDF, randomly projected.

    Tokens (identifier-like words) are hashed into ``buckets`` with CRC32, weighted
    ``(1 + log tf) * idf``, and projected to ``dim`` by a seeded Gaussian matrix (which
    keeps cosines roughly, Johnson-Lindenstrauss). Returns unit rows ``(len(texts), dim)``.
    """
    import zlib

    rows, cols = [], []
    for i, text in enumerate(texts):
        for token in re.findall(r"[a-z][a-z0-9]+", text.lower()):
            rows.append(i)
            cols.append(zlib.crc32(token.encode()) % buckets)
    tf = torch.zeros(len(texts), buckets)
    tf.index_put_((torch.tensor(rows), torch.tensor(cols)), torch.ones(len(rows)), accumulate=True)
    idf = torch.log(len(texts) / (1 + (tf > 0).sum(0).float()))
    weights = torch.where(tf > 0, 1 + torch.log(tf.clamp_min(1)), torch.zeros(())) * idf
    projection = torch.randn(buckets, dim, generator=torch.Generator().manual_seed(seed)) / dim**0.5
    return F.normalize(F.normalize(weights, dim=1) @ projection, dim=1)


# -- metrics -------------------------------------------------------------------------
def batch_metrics(x: torch.Tensor, labels: torch.Tensor, neighbours: torch.Tensor, batches: list[list[int]], top: int = 10) -> dict[str, float]:
    """Hardness and false-negative statistics of ``batches`` (full batches only)."""
    size = max(len(b) for b in batches)
    full = [b for b in batches if len(b) == size]
    batch_of = torch.full((len(x),), -1, dtype=torch.long)
    sums = {"neg_sim": 0.0, "top_sim": 0.0, "false_neg": 0.0, "pairs": 0, "anchors": 0}
    for i, batch in enumerate(full):
        idx = torch.as_tensor(batch)
        batch_of[idx] = i
        xb = x[idx.to(x.device)]
        sim = (xb @ xb.T).float()
        eye = torch.eye(len(idx), dtype=torch.bool, device=sim.device)
        sums["neg_sim"] += float(sim.masked_fill(eye, 0).sum())
        sums["top_sim"] += float(sim.masked_fill(eye, -math.inf).topk(min(top, len(idx) - 1), dim=1).values.mean(1).sum())
        lb = labels[idx]
        sums["false_neg"] += float(((lb[:, None] == lb[None, :]).sum() - len(idx)))
        sums["pairs"] += len(idx) * (len(idx) - 1)
        sums["anchors"] += len(idx)
    anchors = batch_of >= 0
    nb = neighbours[anchors]
    valid = nb >= 0
    same = (batch_of[nb.clamp(min=0)] == batch_of[anchors].unsqueeze(1)) & valid
    return {
        "neg_sim": sums["neg_sim"] / sums["pairs"],
        "top10_sim": sums["top_sim"] / sums["anchors"],
        "knn_in_batch": float(same.sum()) / max(1, int(valid.sum())),
        "false_neg": sums["false_neg"] / sums["pairs"],
        "batches": len(full),
    }


# -- the samplers --------------------------------------------------------------------
def sampler_factories(x: torch.Tensor, args: argparse.Namespace) -> list[tuple[str, Callable[[], Any]]]:
    """(name, build) pairs; ``build()`` returns a ready sampler (its one-off work included)."""
    from batchlab.samplers import ClusterBatchSampler, HardNegativeBatchSampler, TASBalancedBatchSampler

    b, seed, n = args.batch_size, args.seed, len(x)

    def hard_negatives(fraction: float, hops: int) -> Callable[[], Any]:
        def build():
            from batchlab.samplers.mining import mine_hard_negatives

            mined = mine_hard_negatives(
                x, x, torch.full((n, 1), -1), num_negatives=args.num_negatives, seed=seed, progress=False
            )
            return HardNegativeBatchSampler(mined, b, max_neighbourhood_fraction=fraction, hops=hops, seed=seed)

        return build

    rows: list[tuple[str, Callable[[], Any]]] = [
        ("random", lambda: ClusterBatchSampler(x, b, cluster_size=1, seed=seed)),
    ]
    for c in (8, 32, 128):
        rows.append((f"cluster balanced c={c}", lambda c=c: ClusterBatchSampler(x, b, cluster_size=c, seed=seed)))
    rows.append(("cluster kmeans c=32", lambda: ClusterBatchSampler(x, b, cluster_size=32, method="kmeans", seed=seed)))
    for per in (1, 4):
        rows.append(
            (
                f"tas n={per}",
                lambda per=per: TASBalancedBatchSampler(x, b, n_clusters=max(1, n // 200), clusters_per_batch=per, seed=seed),
            )
        )
    for fraction, hops in ((0.04, 1), (0.25, 1), (0.25, 2)):
        rows.append((f"hard-negative cap={fraction:g} hops={hops}", hard_negatives(fraction, hops)))
    if not args.no_b3:
        try:
            from batchlab.samplers import CommunityBatchSampler
        except ImportError:  # B3 lives in another module of the package; optional here
            CommunityBatchSampler = None
        if CommunityBatchSampler is not None:
            rows.append(("b3 community K=32", lambda: CommunityBatchSampler(x, b, group_size=32, seed=seed)))
    return rows


def measure(name: str, build: Callable[[], Any], x, labels, neighbours) -> dict[str, Any]:
    start = time.perf_counter()
    sampler = build()
    sampler.set_epoch(0)
    plan = sampler.global_batches()  # clustering / mining / partitioning happen here or in build
    fit_s = time.perf_counter() - start

    def later_plan():
        sampler.set_epoch(sampler.epoch + 1)
        sampler.global_batches()

    plan_s = time_call(later_plan, warmup=0, repeats=3)
    flat = sorted(i for b in plan for i in b)
    row = {"sampler": name, **batch_metrics(x, labels, neighbours, plan), "fit_s": fit_s, "plan_s": plan_s}
    row["covers_once"] = flat == list(range(len(x)))
    return row


def clustering_timings(x: torch.Tensor, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Balanced 2-means vs faiss k-means (the anchor) at the same number of clusters."""
    from batchlab.samplers.clusters import balanced_kmeans, kmeans

    rows = []
    for size in (32, 128):
        k = math.ceil(len(x) / size)
        t_kmeans = time_call(lambda: kmeans(x, k, seed=args.seed), warmup=0, repeats=1)
        t_balanced = time_call(lambda: balanced_kmeans(x, k, seed=args.seed), warmup=0, repeats=1)
        sizes = torch.bincount(kmeans(x, k, seed=args.seed), minlength=k)
        rows.append(
            {
                "clusters": k,
                "faiss_kmeans_s": t_kmeans,
                "balanced_2means_s": t_balanced,
                "balanced_x_kmeans": t_balanced / t_kmeans,
                "kmeans_size_min": int(sizes.min()),
                "kmeans_size_max": int(sizes.max()),
            }
        )
    return rows


def scatter_plot(path: str, rows: list[dict[str, Any]], *, title: str) -> None:
    """Hardness against false-negative rate, one labelled point per sampler (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for row in rows:
        ax.scatter(row["false_neg"], row["top10_sim"], s=30)
        ax.annotate(row["sampler"], (row["false_neg"], row["top10_sim"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("false-negative rate (same-label in-batch pairs)")
    ax.set_ylabel("hardness (mean top-10 in-batch negative cosine)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:  # the GPU image has no faiss: the k-means rows report an error
        pass
    tag = "cpu" if device.type == "cpu" else _slug(device_name(device))
    from batchlab.index import knn

    results: dict[str, Any] = {
        "benchmark": "samplers",
        "device": device_name(device),
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "datasets": {},
    }
    columns = ["sampler", "top10_sim", "hard_x_random", "neg_sim", "knn_in_batch", "knn_x_random", "false_neg", "fn_x_random", "fit_s", "plan_s", "covers_once"]
    for dataset in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        data = load_dataset(dataset, args)
        if data is None:
            continue
        x, labels = data
        x = x.to(device)
        _, neighbours = knn(x, 10, kind="torch", progress=False)
        neighbours = neighbours.cpu()
        rows = []
        for name, build in sampler_factories(x.cpu(), args):
            try:
                rows.append(measure(name, build, x, labels, neighbours))
            except Exception as err:  # one broken optional row must not lose the others
                logger.exception("sampler %s failed", name)
                rows.append({"sampler": name, "error": f"{type(err).__name__}: {err}"})
            logger.info("%s: %s", dataset, rows[-1])
        base = rows[0]
        for row in rows:
            if "error" in row:
                continue
            row["hard_x_random"] = row["top10_sim"] / base["top10_sim"]
            row["knn_x_random"] = row["knn_in_batch"] / base["knn_in_batch"]
            row["fn_x_random"] = row["false_neg"] / base["false_neg"]
        timings = clustering_timings(x.cpu(), args)
        print(f"\n## {dataset}: N={len(x)}, d={x.shape[1]}, labels={int(labels.max()) + 1}, batch={args.batch_size} ({device_name(device)})")
        print(format_table(rows, columns + (["error"] if any("error" in r for r in rows) else [])))
        print()
        print(format_table(timings))
        results["datasets"][dataset] = {"n": len(x), "dim": x.shape[1], "rows": rows, "clustering_timings": timings}
        ok = [r for r in rows if "error" not in r]
        scatter_plot(
            f"{args.out}/samplers-{tag}-{dataset}.png",
            [r for r in rows if "error" not in r],
            title=f"samplers on {dataset} (N={len(x)}, batch {args.batch_size})",
        )
    path = write_results(args.out, f"samplers-{tag}", results)
    print(f"\nwrote {path}")
    return 0


def main(argv=None) -> int:
    from batchlab.bench._common import script_main

    return script_main("batchlab.bench.samplers", __doc__, add_arguments, run,
                       argv)


if __name__ == "__main__":
    raise SystemExit(main())
