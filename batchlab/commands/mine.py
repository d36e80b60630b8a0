"""``batchlab mine``: mine hard negatives from teacher embeddings saved as ``.npy`` files.

Writes ``<out>/negatives.npz`` (negative ids, scores, positive scores, hyper-parameters,
teacher hash; read it with :meth:`batchlab.samplers.MinedNegatives.load`) and
``<out>/mine.json`` (summary, parameters, timing).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from batchlab.commands._common import add_common_arguments, add_subcommand
from batchlab.errors import BatchlabInputError

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "mine",
        help="mine hard negatives from teacher embeddings",
        description="Rank the corpus for every query with a teacher's embeddings, drop positives (and duplicate "
        "texts), keep a rank window, apply positive-aware margins and sample negatives. Embeddings are .npy "
        "files (N, d), memory-mapped. Positives: a .npy of shape (Q,) or (Q, P) padded with -1, a .json list of "
        "lists, a .txt with one line of ids per query, or the word `diagonal` (query i's positive is corpus row i).",
        example="batchlab mine --queries q.npy --corpus c.npy --positives diagonal --num-negatives 5 "
        "--range-min 10 --range-max 100 --relative-margin 0.05 --out mined/",
    )
    parser.add_argument("--queries", help="query embeddings .npy (Q, d); default: the corpus itself (self-mining)")
    parser.add_argument("--corpus", required=True, help="corpus embeddings .npy (N, d)")
    parser.add_argument("--positives", required=True, help="positive ids per query (.npy/.json/.txt) or `diagonal`")
    parser.add_argument("--num-negatives", type=int, default=5, help="negatives per query (default: 5)")
    parser.add_argument("--range-min", type=int, default=0, help="skip this many top ranks after exclusions (default: 0)")
    parser.add_argument("--range-max", type=int, default=None, help="keep ranks below this (default: see docs)")
    parser.add_argument("--absolute-margin", type=float, default=None, help="keep score <= pos - margin")
    parser.add_argument("--relative-margin", type=float, default=None, help="keep score <= pos - r*|pos| (0.05 = TopK-PercPos 95%%)")
    parser.add_argument("--max-score", type=float, default=None, help="keep score <= this")
    parser.add_argument("--min-score", type=float, default=None, help="keep score >= this")
    parser.add_argument("--sampling", choices=["top", "random"], default="top", help="top survivors or a random subset")
    parser.add_argument("--corpus-texts", default=None, help="text file, one line per corpus row: drops duplicates of positives")
    parser.add_argument("--query-texts", default=None, help="text file, one line per query (needs --corpus-texts)")
    parser.add_argument("--index", default="auto", choices=["auto", "flat", "torch", "ivf", "ivf-gemm", "hnsw"],
                        help="index kind (auto: exact below 200k corpus rows, ivf-gemm above)")
    parser.add_argument("--metric", default="ip", choices=["ip", "cosine"], help="inner product or cosine (default: ip)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (start value for tuning)")
    parser.add_argument("--target-recall", type=float, default=0.95,
                        help="tune an approximate index to this recall at the mining depth (default 0.95; 0 = no tuning)")
    parser.add_argument("--no-hash", dest="hash_inputs", action="store_false",
                        help="skip hashing the embeddings into the teacher hash (saves ~1 s per GB)")
    parser.add_argument("--batch-size", type=int, default=4096, help="queries per block (bounds memory)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_common_arguments(parser, out="mined")
    parser.set_defaults(func=run)


def _load_matrix(path: str, name: str):
    p = Path(path)
    if not p.exists():
        raise BatchlabInputError(f"--{name}: no file {p}")
    if p.suffix != ".npy":
        raise BatchlabInputError(f"--{name} must be a .npy file of shape (N, d), got {p.name}")
    return np.load(p, mmap_mode="r")


def _load_positives(spec: str, num_queries: int):
    if spec == "diagonal":
        return np.arange(num_queries)
    p = Path(spec)
    if not p.exists():
        raise BatchlabInputError(f"--positives: no file {p} (or pass `diagonal`)")
    if p.suffix == ".npy":
        return np.load(p)
    if p.suffix == ".json":
        return json.loads(p.read_text())
    lines = p.read_text().splitlines()
    try:
        return [[int(t) for t in line.replace(",", " ").split()] for line in lines]
    except ValueError as exc:
        raise BatchlabInputError(f"--positives {p}: each line must hold integer corpus ids ({exc})") from exc


def _load_texts(path: str | None):
    if path is None:
        return None
    return Path(path).read_text().splitlines()


def run(args) -> int:
    import torch

    from batchlab.samplers.mining import mine_hard_negatives

    torch.manual_seed(args.seed)
    corpus = _load_matrix(args.corpus, "corpus")
    queries = corpus if args.queries is None else _load_matrix(args.queries, "queries")
    positives = _load_positives(args.positives, queries.shape[0])
    q, c = queries, corpus
    if args.device != "cpu":
        c = torch.from_numpy(np.ascontiguousarray(corpus)).to(args.device)
        q = c if args.queries is None else torch.from_numpy(np.ascontiguousarray(queries)).to(args.device)
    index_kwargs = {"kind": args.index, "metric": args.metric}
    if args.nprobe is not None:
        index_kwargs["nprobe"] = args.nprobe
    start = time.perf_counter()
    mined = mine_hard_negatives(
        q, c, positives,
        num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max,
        absolute_margin=args.absolute_margin, relative_margin=args.relative_margin,
        max_score=args.max_score, min_score=args.min_score, sampling=args.sampling, seed=args.seed,
        corpus_texts=_load_texts(args.corpus_texts), query_texts=_load_texts(args.query_texts),
        index_kwargs=index_kwargs, batch_size=args.batch_size, progress=args.progress,
        target_recall=args.target_recall or None, hash_inputs=args.hash_inputs,
    )
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = mined.save(out / "negatives.npz")
    summary = {**mined.summary(), "seconds": seconds, "teacher_hash": mined.teacher_hash, "info": mined.info,
               "inputs": {"queries": args.queries or args.corpus, "corpus": args.corpus, "positives": args.positives},
               "params": mined.params}
    (out / "mine.json").write_text(json.dumps(summary, indent=2, default=str))
    for key in ("queries", "negatives_per_query", "filled_fraction", "queries_short", "mean_negative_score",
                "mean_positive_score", "seconds"):
        value = summary[key]
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"wrote {path} and {out / 'mine.json'}")
    return 0
