"""Benchmark: hard-negative mining time, peak memory and recall of the approximate index.

Target (issue 6): mining 1M anchors x 1M candidates, d=768, k=50, on a 2-core machine in
under 15 minutes with an approximate index at recall@50 >= 0.9 against exact search,
peak memory under 8 GiB; on one H100, exact search in under 30 s.

Data: a planted mixture (``gaussian_mixture``, one cluster per ``--cluster-size`` rows),
corpus ``(N, d)`` and queries ``(N, d)`` = noisy copies of the corpus rows, query ``i``'s
positive being corpus row ``i``. Random isotropic vectors would be the worst case for
IVF/HNSW (no structure to exploit); real embeddings sit in between, so the recall
measured here is for clustered data and must be checked on real embeddings.

Methods, measured in the same run:

* ``anchor``: the plain dense torch path that sentence-transformers' ``mine_hard_negatives``
  takes without faiss (``similarity(query_block, corpus)`` then ``topk``), over blocks of
  1,024 queries; kNN only (no filtering), so it is a lower bound on that tool's time.
  sentence-transformers itself is not run: its miner needs a model to encode texts.
* ``torch``: :func:`mine_hard_negatives` with the exact blocked torch index (CPU or CUDA).
* ``flat``: the same with faiss ``IndexFlatIP`` (exact, CPU).
* ``ivf`` / ``hnsw``: the same with approximate faiss indexes (CPU), and ``ivf-gemm``
  (IVF lists scanned by matrix products, torch), each tuned to ``--target-recall`` at the
  mining depth first (the tuning is timed), with recall@k of the index against exact
  search on ``--recall-sample`` queries, and the recall of the mined negatives against
  exactly mined ones on the same queries.
* cuda only: ``search`` / ``search-fp32``: the exact kNN alone (``EmbeddingIndex`` torch
  kind, k+1 neighbours, own id excluded) in the embeddings' dtype (float16) / float32.

Exact methods at large N run on the first ``--exact-query-cap`` queries only (their cost
is linear in the number of queries: every query block does the same work) and the time
is scaled to all queries; the table marks those rows (``scaled``).

Time: wall seconds and, on CPU, the process CPU seconds (all threads; 1 thread by default).
This machine's cores are shared with other jobs, which stretches wall times by 2-5x
unpredictably; CPU time is far steadier, so ratios and extrapolations use it.

Peak memory: on CPU, the peak resident set size above the level before the call, sampled
every 5 ms from ``/proc/self/statm`` (inputs excluded; they exist before); on CUDA,
``torch.cuda.max_memory_allocated`` above the start.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from batchlab.bench._common import device_name, format_table, peak_memory_call, plot_series, synchronize, write_results

logger = logging.getLogger(__name__)

NAME = "mining"
TARGET_N, TARGET_D = 1_000_000, 768


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench", help="results directory")
    parser.add_argument("--sizes", default=None, help="comma-separated N (queries = corpus = N); "
                        "default 10000,30000,100000 on cpu, 1000000 on cuda")
    parser.add_argument("--dim", type=int, default=None, help="embedding dim (default 256 cpu, 768 cuda)")
    parser.add_argument("--k", type=int, default=50, help="rank window range_max = k (default 50)")
    parser.add_argument("--num-negatives", type=int, default=10)
    parser.add_argument("--cluster-size", type=int, default=100, help="planted cluster size (default 100)")
    parser.add_argument("--spread", type=float, default=0.6,
                        help="within-cluster noise (default 0.6, tight; 3+ is close to random vectors)")
    parser.add_argument("--tag", default="", help="suffix for the results file name, e.g. --tag=-d768")
    parser.add_argument("--methods", default=None, help="comma-separated subset of anchor,torch,flat,ivf,ivf-gemm,hnsw "
                        "(default: all on cpu; anchor,torch on cuda)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and faiss threads on cpu (default 1: with other jobs on the cores, "
                        "OpenMP spinning makes 2 threads slower than 1; see feasibility.md)")
    parser.add_argument("--target-recall", type=float, default=0.95,
                        help="approximate indexes are tuned to this recall@depth on the queries (default 0.95)")
    parser.add_argument("--exact-query-cap", type=int, default=20000,
                        help="exact methods time at most this many queries and scale linearly (default 20000)")
    parser.add_argument("--recall-sample", type=int, default=1000)
    parser.add_argument("--hnsw-max", type=int, default=100000, help="skip HNSW above this N (slow build)")
    parser.add_argument("--ivf-only-above", type=int, default=100000,
                        help="above this N only the approximate index runs (exact would take too long here)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16"],
                        help="embedding dtype (default float32 on cpu, float16 on cuda)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF nprobe (default: index default)")
    parser.add_argument("--gpu-query-cap", type=int, default=None,
                        help="cuda: exact methods time at most this many queries (default: all)")
    parser.add_argument("--gpu-fp32-cap", type=int, default=100000,
                        help="cuda: the search-fp32 method times at most this many queries (default 100000)")


class _RSSPeak:
    """Peak RSS of this process while a block runs, sampled from /proc/self/statm."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()

        def watch():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def planted_data(n: int, d: int, cluster_size: int, seed: int, device: str, dtype: torch.dtype,
                 spread: float = 0.6):
    """Corpus (n, d) with planted clusters and queries = noisy copies (positive of i = i).

    ``spread`` is the within-cluster noise relative to the unit centre (0.6: tight
    clusters; 3 and above: close to isotropic random vectors, the worst case for IVF).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    n_clusters = max(1, n // cluster_size)
    centres = F.normalize(torch.randn(n_clusters, d, generator=g, device=device), dim=1)
    labels = torch.randint(n_clusters, (n,), generator=g, device=device)
    corpus = torch.empty(n, d, dtype=dtype, device=device)
    queries = torch.empty(n, d, dtype=dtype, device=device)
    step = 65536
    for s in range(0, n, step):
        c = centres[labels[s : s + step]] + spread * torch.randn(min(step, n - s), d, generator=g, device=device) / d**0.5
        c = F.normalize(c, dim=1)
        corpus[s : s + step] = c.to(dtype)
        qn = c + 0.3 * torch.randn(c.shape, generator=g, device=device) / d**0.5
        queries[s : s + step] = F.normalize(qn, dim=1).to(dtype)
    return queries, corpus


def dense_topk_anchor(queries: torch.Tensor, corpus: torch.Tensor, k: int, block: int = 1024):
    """The dense path of sentence-transformers' miner: similarity per query block, positive masked, topk."""
    out = []
    for s in range(0, queries.shape[0], block):
        sim = queries[s : s + block] @ corpus.T
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, rows + s] = float("-inf")  # the positive of query i is corpus row i
        out.append(torch.topk(sim.float(), k, dim=1).indices)
    return torch.cat(out)


def _measure(fn, device: str):
    """(wall seconds, CPU seconds of this process, peak extra MiB, result) of one call.

    On a shared CPU the wall time depends on what else runs; the process CPU time (all
    threads) does much less, so extrapolations use it.
    """
    if torch.device(device).type == "cuda":
        synchronize(device)
        start, cpu0 = time.perf_counter(), time.process_time()
        result_holder = {}
        peak = peak_memory_call(lambda: result_holder.setdefault("r", fn()), device)
        synchronize(device)
        return time.perf_counter() - start, time.process_time() - cpu0, (peak or 0) / 2**20, result_holder["r"]
    with _RSSPeak() as rss:
        start, cpu0 = time.perf_counter(), time.process_time()
        result = fn()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return seconds, cpu, rss.extra_mb, result


def _neg_recall(mined_ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    hits = total = 0
    for a, e in zip(mined_ids.tolist(), exact_ids.tolist()):
        truth = {x for x in e if x >= 0}
        hits += len(truth.intersection(a))
        total += len(truth)
    return hits / max(1, total)


def run(args) -> int:
    from batchlab.index import EmbeddingIndex
    from batchlab.samplers.mining import mine_hard_negatives

    device = args.device
    on_cuda = torch.device(device).type == "cuda"
    sizes = [int(s) for s in (args.sizes or ("1000000" if on_cuda else "10000,30000,100000")).split(",")]
    d = args.dim or (768 if on_cuda else 256)
    dtype = getattr(torch, args.dtype or ("float16" if on_cuda else "float32"))
    methods = (args.methods or ("search,torch,anchor,search-fp32" if on_cuda
                                else "anchor,torch,flat,ivf,ivf-gemm,hnsw")).split(",")
    if not on_cuda:
        torch.set_num_threads(args.threads)
        if any(m in ("flat", "ivf", "hnsw") for m in methods):
            import faiss

            faiss.omp_set_num_threads(args.threads)
    if on_cuda and any(m in ("flat", "ivf", "hnsw") for m in methods):
        raise SystemExit("faiss methods run on the CPU; on cuda use --methods search,search-fp32,anchor,torch")
    k, nneg = args.k, args.num_negatives
    mine_kw = dict(num_negatives=nneg, range_min=0, range_max=k, progress=False)
    rows, series = [], {}
    for n in sizes:
        queries, corpus = planted_data(n, d, args.cluster_size, args.seed, device, dtype, spread=args.spread)
        positives = torch.arange(n)
        g = torch.Generator().manual_seed(args.seed + 1)
        sample = torch.randperm(n, generator=g)[: min(args.recall_sample, n)].sort().values
        exact_sample = mine_hard_negatives(queries[sample.to(queries.device)], corpus, positives[sample],
                                           index_kwargs={"kind": "torch"}, hash_inputs=False, **mine_kw).negative_ids
        anchor_s = None
        for method in methods:
            if method == "hnsw" and n > args.hnsw_max:
                continue
            if method in ("anchor", "torch", "flat") and n > args.ivf_only_above and not on_cuda:
                continue
            exact = method in ("anchor", "torch", "flat", "search", "search-fp32")
            cap = args.exact_query_cap if not on_cuda else args.gpu_query_cap
            if method == "search-fp32":
                cap = min(cap or n, args.gpu_fp32_cap)
            qn = min(n, cap) if exact and cap else n
            qs = queries[:qn]
            row = {"N": n, "d": d, "method": method, "queries_timed": qn}
            if method == "anchor":
                seconds, cpu, mem, _ = _measure(lambda: dense_topk_anchor(qs, corpus, k), device)
                row.update(build_s=0.0)
            elif method in ("search", "search-fp32"):
                # the exact kNN alone (k + 1 neighbours, own id excluded), the "exact search" target
                c_use = corpus.float() if method == "search-fp32" else corpus
                q_use = qs.float() if method == "search-fp32" else qs
                index = EmbeddingIndex(c_use, kind="torch", progress=False)
                seconds, cpu, mem, _ = _measure(
                    lambda: index.search(q_use, k + 1, exclude_self=True, query_ids=torch.arange(qn)), device)
                row.update(build_s=0.0, recall_at_k=1.0)
                del index, c_use, q_use
            else:
                kind = method

                def work():
                    # IVF kinds start from one probe (or --nprobe) and mining tunes them up to the target,
                    # as mine_hard_negatives does with an index it builds itself
                    extra = {"nprobe": args.nprobe or 1} if "ivf" in kind else {}
                    index = EmbeddingIndex(corpus, kind=kind, progress=False, seed=args.seed, **extra)
                    return index, mine_hard_negatives(qs, corpus, positives[:qn], index=index,
                                                      target_recall=args.target_recall, **mine_kw)

                seconds, cpu, mem, (index, mined) = _measure(work, device)
                row.update(build_s=index.info.get("build_s"), hash_s=mined.info["hash_s"])
                if index.approximate:
                    row["recall@k"] = index.recall(queries[sample], k=k, sample=len(sample))
                    row["neg_recall"] = _neg_recall(mined.negative_ids[sample], exact_sample)
                    row["nlist"], row["nprobe"] = (index.nlist, index.nprobe) if "ivf" in kind else (None, None)
                    row["tune_s"] = mined.info.get("index_tune_s")
                else:
                    row["recall@k"] = 1.0
                    in_cap = sample < qn
                    row["neg_recall"] = _neg_recall(mined.negative_ids[sample[in_cap]], exact_sample[in_cap])
                del index, mined
            row["seconds_timed"] = seconds
            row["seconds"] = seconds * n / qn
            row["cpu_s"] = cpu * n / qn
            row["scaled"] = qn < n
            row["peak_extra_MiB"] = mem
            logger.info("%s", row)
            print(format_table([row]), flush=True)
            rows.append(row)
            _anchor_ratios(rows, on_cuda)
            _write(args, device, on_cuda, dtype, rows, None)  # partial results survive a time limit
            series.setdefault(method, ([], []))
            series[method][0].append(n)
            series[method][1].append(row["seconds"] if on_cuda else row["cpu_s"])
        del queries, corpus

    extrapolation = _extrapolate(rows, d, on_cuda)
    columns = ["N", "d", "method", "queries_timed", "scaled", "build_s", "tune_s", "hash_s", "seconds", "cpu_s",
               "peak_extra_MiB", "nlist", "nprobe", "recall@k", "neg_recall", "anchor_over_this"]
    print(format_table(rows, columns))
    for line in extrapolation["notes"]:
        print(line)
    out, tag = _write(args, device, on_cuda, dtype, rows, extrapolation)
    if len(sizes) > 1:
        plot_series(out / f"{NAME}-{tag}.png", series, xlabel="N (queries = corpus)",
                    ylabel="mining time (s)" if on_cuda else "mining CPU time (s, 1 thread)",
                    title=f"hard-negative mining, d={d}, k={k} ({device_name(device)[:40]})")
    return 0


def _anchor_ratios(rows, on_cuda):
    """anchor time / method time for every row with an anchor at the same N (CPU time on cpu)."""
    key = "seconds" if on_cuda else "cpu_s"
    anchors = {r["N"]: r[key] for r in rows if r["method"] == "anchor"}
    for r in rows:
        r["anchor_over_this"] = anchors[r["N"]] / r[key] if r["N"] in anchors and r[key] else None


def _write(args, device, on_cuda, dtype, rows, extrapolation):
    tag = ("gpu-" + device_name(device).replace(" ", "-").lower() if on_cuda else "cpu") + args.tag
    out = Path(args.out)
    write_results(out, f"{NAME}-{tag}", {
        "benchmark": NAME, "device": device_name(device), "dtype": str(dtype), "k": args.k,
        "num_negatives": args.num_negatives, "cluster_size": args.cluster_size, "spread": args.spread, "rows": rows,
        "extrapolation": extrapolation, "torch_threads": torch.get_num_threads(),
        "target_recall": args.target_recall, "complete": extrapolation is not None,
    })
    return out, tag


def _extrapolate(rows, d, on_cuda):
    """Scale measured times to 1M x 1M x 768 (estimates, labelled as such)."""
    notes, est = [], {}
    if on_cuda:
        return {"notes": ["cuda: times above are measured at the sizes shown (no extrapolation)"], "estimates": est}
    dim_factor = TARGET_D / d
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        big = max(rs, key=lambda r: r["N"])
        if method in ("anchor", "torch", "flat"):
            # exact: cost ~ Q * N * d
            t = big["cpu_s"] * (TARGET_N / big["N"]) ** 2 * dim_factor
            est[method] = t
            notes.append(f"estimate {method}: {t / 60:.0f} CPU-min (1 thread) for 1M x 1M x {TARGET_D} "
                         f"(from N={big['N']}: x (1M/N)^2 x {dim_factor:.0f})")
        elif method in ("ivf", "ivf-gemm") and len(rs) >= 2:
            # nlist ~ 4 sqrt(N), nprobe ~ nlist/64: list scan ~ N^2 d / 64, quantizer + training ~ N^1.5 d
            import numpy as np

            ns = np.array([r["N"] for r in rs], dtype=float)
            ts = np.array([r["cpu_s"] for r in rs])
            a = np.stack([ns**2, ns**1.5], 1)
            coef, *_ = np.linalg.lstsq(a, ts, rcond=None)
            coef = np.clip(coef, 0, None)
            t = float((coef[0] * TARGET_N**2 + coef[1] * TARGET_N**1.5) * dim_factor)
            est[method] = t
            notes.append(f"estimate {method}: {t / 60:.1f} CPU-min (1 thread) for 1M x 1M x {TARGET_D} (fit t = a N^2 + b N^1.5 over "
                         f"N={[int(x) for x in ns]}, x {dim_factor:.0f} for d)")
    if "ivf" in by_method:
        big = max(by_method["ivf"], key=lambda r: r["N"])
        # memory: the fp16 IVF lists (N d 2 bytes) dominate what mining adds; inputs are the caller's
        lists_gib = TARGET_N * TARGET_D * 2 / 2**30
        inputs_gib = 2 * TARGET_N * TARGET_D * 2 / 2**30
        notes.append(f"estimate memory at 1M x {TARGET_D}: IVF fp16 lists {lists_gib:.1f} GiB + per-block work "
                     f"(measured extra RSS at N={big['N']}: {big['peak_extra_MiB']:.0f} MiB, of which lists "
                     f"{big['N'] * d * 2 / 2**20:.0f} MiB) + inputs {inputs_gib:.1f} GiB in fp16 "
                     f"({2 * inputs_gib:.1f} GiB in fp32)")
    return {"notes": notes, "estimates_s": est}


def main(argv=None) -> int:
    from batchlab.bench._common import script_main

    return script_main("batchlab.bench.mining", __doc__, add_arguments, run,
                       argv)


if __name__ == "__main__":
    raise SystemExit(main())
