"""``batchlab mine``: mine hard negatives from teacher embeddings saved as ``.npy`` files.

Writes ``<out>/negatives.npz`` (negative ids, scores, positive scores, hyper-parameters,
teacher hash, a hash of every array; read it with :meth:`batchlab.samplers.MinedNegatives.load`,
which checks them) and ``<out>/mine.json`` (summary, parameters, timing). Both are
written atomically: a killed run leaves the previous files intact.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from batchlab._argtypes import non_negative_int, positive_int
from batchlab.commands._common import add_common_arguments, add_subcommand, load_json, load_lines, load_matrix
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
    parser.add_argument("--num-negatives", type=positive_int, default=5, help="negatives per query (default: 5)")
    parser.add_argument("--range-min", type=non_negative_int, default=0, help="skip this many top ranks after exclusions (default: 0)")
    parser.add_argument("--range-max", type=positive_int, default=None, help="keep ranks below this (default: see docs)")
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
    parser.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists probed (start value for tuning)")
    parser.add_argument("--target-recall", type=float, default=0.95,
                        help="tune an approximate index to this recall at the mining depth (default 0.95; 0 = no tuning)")
    parser.add_argument("--no-hash", dest="hash_inputs", action="store_false",
                        help="skip hashing the embeddings into the teacher hash (saves ~1 s per GB)")
    parser.add_argument("--batch-size", type=positive_int, default=4096, help="queries per block (bounds memory)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_common_arguments(parser, out="mined")
    parser.set_defaults(func=run)


def _load_positives(spec: str, num_queries: int):
    import numpy as np

    if spec == "diagonal":
        return np.arange(num_queries)
    p = Path(spec)
    if p.suffix == ".npy":
        if not p.is_file():
            raise BatchlabInputError(f"--positives: no file {p} (or pass `diagonal`)")
        try:
            return np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise BatchlabInputError(f"--positives: cannot read {p} as a .npy array ({type(exc).__name__}: {exc})") from None
    if p.suffix == ".json":
        return load_json(p, "--positives")
    lines = load_lines(p, "--positives")
    try:
        return [[int(t) for t in line.replace(",", " ").split()] for line in lines]
    except ValueError as exc:
        raise BatchlabInputError(f"--positives {p}: each line must hold integer corpus ids ({exc})") from exc


def _load_texts(path: str | None, flag: str):
    return None if path is None else load_lines(path, flag)


def run(args) -> int:
    import numpy as np
    import torch

    from batchlab._artifacts import write_text
    from batchlab.samplers.mining import mine_hard_negatives

    torch.manual_seed(args.seed)
    corpus = load_matrix(args.corpus, "--corpus")
    queries = corpus if args.queries is None else load_matrix(args.queries, "--queries")
    positives = _load_positives(args.positives, queries.shape[0])
    q, c = queries, corpus
    if args.device != "cpu":
        c = torch.from_numpy(np.array(corpus)).to(args.device)  # a copy: the memory map is read-only
        q = c if args.queries is None else torch.from_numpy(np.array(queries)).to(args.device)
    index_kwargs = {"kind": args.index, "metric": args.metric}
    if args.nprobe is not None:
        index_kwargs["nprobe"] = args.nprobe
    start = time.perf_counter()
    mined = mine_hard_negatives(
        q, c, positives,
        num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max,
        absolute_margin=args.absolute_margin, relative_margin=args.relative_margin,
        max_score=args.max_score, min_score=args.min_score, sampling=args.sampling, seed=args.seed,
        corpus_texts=_load_texts(args.corpus_texts, "--corpus-texts"),
        query_texts=_load_texts(args.query_texts, "--query-texts"),
        index_kwargs=index_kwargs, batch_size=args.batch_size, progress=args.progress,
        target_recall=args.target_recall or None, hash_inputs=args.hash_inputs,
    )
    seconds = time.perf_counter() - start
    out = Path(args.out)
    path = mined.save(out / "negatives.npz")
    summary = {**mined.summary(), "seconds": seconds, "teacher_hash": mined.teacher_hash, "info": mined.info,
               "inputs": {"queries": args.queries or args.corpus, "corpus": args.corpus, "positives": args.positives},
               "params": mined.params}
    write_text(out / "mine.json", json.dumps(summary, indent=2, default=str))
    for key in ("queries", "negatives_per_query", "filled_fraction", "queries_short", "mean_negative_score",
                "mean_positive_score", "seconds"):
        value = summary[key]
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"wrote {path} and {out / 'mine.json'}")
    return 0
