"""Benchmark: JEST selection time against the training step it filters for.

Target (issue 8): choosing 4,096 of a 20,480 super-batch (filter 0.8, 16 chunks, d=512)
takes under 5% of one training step, where the step is a forward+backward of the
symmetric InfoNCE loss on 4,096 pairs plus a ViT-B/32-sized encoder step on 4,096
images (torchvision ``vit_b_32(weights=None)``, AdamW, bf16 autocast on CUDA).

Measured in the same run:

* ``JointExampleSelector.select`` for InfoNCE and SigLIP (and InfoNCE in full float32);
* anchor 1, the training step above. The encoder is timed on micro-batches of
  ``--vit-micro-batch`` images (4,096 ViT-B/32 activations do not fit one GPU without
  accumulation) and multiplied by ``batch / micro-batch``, which is what gradient
  accumulation costs;
* anchor 2, a reimplementation-style JEST for SigLIP that materialises the ``N x N``
  learnability matrix and does one masked reduction over it per chunk (the paper's
  pseudo-code), for time and peak memory.

Run ``python -m batchlab.bench.jest --device cuda`` (or ``batchlab bench jest``). On the
CPU the defaults shrink (N=2,560, d=256, a 2-image encoder micro-batch).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from batchlab.bench._common import device_name, format_table, peak_memory_call, plot_series, time_call, write_results
from batchlab.samplers.jest import JointExampleSelector

logger = logging.getLogger(__name__)

NAME = "jest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench", help="results directory")
    parser.add_argument("--n", type=int, default=None, help="super-batch size (default 20480 on cuda, 2560 on cpu)")
    parser.add_argument("--filter-ratio", type=float, default=0.8)
    parser.add_argument("--dim", type=int, default=None, help="embedding dim (default 512 on cuda, 256 on cpu)")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--vit-micro-batch", type=int, default=None,
                        help="images per encoder micro-step (default 256 on cuda, 2 on cpu)")
    parser.add_argument("--no-vit", action="store_true", help="skip the encoder anchor")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5 cuda, 2 cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine two threads collapse)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one selection per loss (torch.profiler): device time vs wall time")
    parser.add_argument("--quality", action="store_true",
                        help="run the quality experiment instead (codesearch, JEST vs uniform, CPU, a few minutes)")
    parser.add_argument("--quality-steps", type=int, default=300)
    parser.add_argument("--quality-seeds", type=int, default=3)
    parser.add_argument("--quality-recipe", action="store_true",
                        help="run the quality experiment through train_dual_encoder (open_clip tiny text tower) "
                             "instead of the bag-of-words learner (batchlab.bench.jest_quality)")
    parser.add_argument("--reference", choices=("heldout", "tfidf"), default="heldout",
                        help="--quality-recipe: the reference model: the text tower trained on held-out modules, "
                             "or the recipe's TF-IDF teacher")
    parser.add_argument("--first-chunk", choices=("random", "score"), default="random",
                        help="--quality-recipe: how JEST draws its first chunk")
    parser.add_argument("--quality-scores", default=None,
                        help="JEST scores to compare with uniform batches (learnability always included; default: "
                             "all three for --quality, learnability for --quality-recipe)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--quality-batch", type=int, default=None, help="default 128 (--quality), 64 (--quality-recipe)")
    parser.add_argument("--reference-steps", type=int, default=None, help="default 300 (--quality), 400 (--quality-recipe)")
    parser.add_argument("--reference-fraction", type=float, default=0.3,
                        help="share of training modules held out to train the reference model")


def _unit(n, d, device, gen):
    return F.normalize(torch.randn(n, d, generator=gen).to(device), dim=1)


def _embeddings(n, d, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q_l, q_r = _unit(n, d, device, gen), _unit(n, d, device, gen)
    # keys near their queries (a trained-ish reference, a weaker learner)
    k_l = F.normalize(q_l + 1.0 * _unit(n, d, device, gen), dim=1)
    k_r = F.normalize(q_r + 0.5 * _unit(n, d, device, gen), dim=1)
    return (q_l, k_l), (q_r, k_r)


def naive_siglip_jest(learner, reference, n_chunks, filter_ratio, gen_device):
    """The paper's pseudo-code: a full N x N learnability matrix, one masked reduction per chunk."""
    def pair_losses(q, k, scale, bias):
        logits = scale * q @ k.T + bias
        labels = 2 * torch.eye(q.shape[0], device=q.device) - 1
        return F.softplus(-labels * logits)

    scores = pair_losses(*learner) - pair_losses(*reference)
    n = scores.shape[0]
    draws = int(round((1 - filter_ratio) * n)) // n_chunks
    diag = scores.diagonal()
    chosen = torch.zeros(n, device=scores.device)
    gumbel = -torch.log(-torch.log(torch.rand(n_chunks, n, device=scores.device).clamp_min(1e-20)))
    inds = torch.topk(gumbel[0], draws).indices
    chosen[inds] = 1
    picks = [inds]
    for c in range(1, n_chunks):
        logits = diag + chosen @ scores + scores @ chosen
        logits = logits.masked_fill(chosen.bool(), float("-inf"))
        inds = torch.topk(logits + gumbel[c], draws).indices
        chosen[inds] = 1
        picks.append(inds)
    return torch.cat(picks)


def _train_step_anchor(b, d, device, micro, repeats, with_vit, gen):
    from batchlab.losses import info_nce

    q = _unit(b, d, device, gen).requires_grad_()
    k = _unit(b, d, device, gen).requires_grad_()
    scale = torch.tensor(14.3, device=device, requires_grad=True)

    def loss_step():
        loss = info_nce(q, k, scale, impl="reference")
        loss.backward()

    loss_s = time_call(loss_step, device=device, warmup=1, repeats=repeats)
    if not with_vit:
        return loss_s, None, None
    from torchvision.models import vit_b_32

    model = vit_b_32(weights=None).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(micro, 3, 224, 224, generator=gen).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else None

    def vit_micro_step():
        if autocast is not None:
            with autocast:
                out = model(images)
        else:
            out = model(images)
        out.float().square().mean().backward()

    def vit_step_tail():
        opt.step()
        opt.zero_grad(set_to_none=True)

    micro_s = time_call(vit_micro_step, device=device, warmup=1, repeats=repeats)
    opt_s = time_call(vit_step_tail, device=device, warmup=1, repeats=repeats)
    vit_s = micro_s * (b / micro) + opt_s
    return loss_s, vit_s, micro_s


def _time_variant(args, device, sizes, n, d, repeats, loss, impl, precision, label, rows, reference_out):
    xs, ys = [], []
    for size in sizes:
        (q_l, k_l), (q_r, k_r) = _embeddings(size, d, device, args.seed)
        extra = (-10.0,) if loss == "siglip" else ()
        sel = JointExampleSelector(n_chunks=args.chunks, filter_ratio=args.filter_ratio, loss=loss,
                                   seed=args.seed, precision=precision, impl=impl)
        learner, reference = (q_l, k_l, 10.0, *extra), (q_r, k_r, 10.0, *extra)
        fn = lambda: sel.select(learner=learner, reference=reference, step=0)  # noqa: E731
        secs = time_call(fn, device=device, warmup=1, repeats=repeats)
        xs.append(size)
        ys.append(secs * 1e3)
        if size != n:
            continue
        row = {"what": label, "N": size, "ms": secs * 1e3, "peak_MB": _mb(peak_memory_call(fn, device))}
        out = sel.select(learner=learner, reference=reference, step=0, return_scores=True)
        if precision == "float32":
            reference_out[loss] = out
        elif loss in reference_out:
            # step 1 is comparable across variants: the first chunk is random with the same noise
            ref = reference_out[loss]
            fin = torch.isfinite(ref.scores[1])
            row["max |dscore| step 1"] = float((out.scores[1][fin] - ref.scores[1][fin]).abs().max())
            row["same picks"] = float(torch.isin(out.indices, ref.indices).float().mean())
        rows.append(row)
    return xs, ys


def _profile_selection(device, n, d, args) -> dict:
    """Device-busy time of one selection per loss against its wall time (launch overhead = the rest)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    out = {}
    (q_l, k_l), (q_r, k_r) = _embeddings(n, d, device, args.seed)
    for loss in ("info_nce", "siglip"):
        extra = (-10.0,) if loss == "siglip" else ()
        sel = JointExampleSelector(n_chunks=args.chunks, filter_ratio=args.filter_ratio, loss=loss, seed=args.seed,
                                   precision="bf16" if loss == "info_nce" and device.type == "cuda" else "tf32")
        fn = lambda: sel.select(learner=(q_l, k_l, 10.0, *extra), reference=(q_r, k_r, 10.0, *extra), step=0)  # noqa: E731
        fn()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            wall = time.perf_counter() - start
        events = prof.key_averages()
        dev_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
        top = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0) or 0, reverse=True)[:6]
        out[loss] = {"wall_ms": wall * 1e3, "device_busy_ms": dev_us / 1e3,
                     "aten_calls": sum(e.count for e in events if e.key.startswith("aten::")),
                     "top_device_ops_ms": {e.key[:60]: (getattr(e, "self_device_time_total", 0) or 0) / 1e3
                                           for e in top}}
        print(f"profile {loss}: wall {wall * 1e3:.2f} ms, device busy {dev_us / 1e3:.2f} ms, "
              f"{out[loss]['aten_calls']} aten calls; top: {out[loss]['top_device_ops_ms']}")
    return out


def run(args) -> int:
    torch.set_num_threads(args.threads)
    if args.quality_recipe:
        from batchlab.bench import jest_quality

        args.quality_batch = args.quality_batch or 64
        args.reference_steps = args.reference_steps or 400
        return jest_quality.run(args)
    if args.quality:
        args.quality_batch = args.quality_batch or 128
        args.reference_steps = args.reference_steps or 300
        return run_quality(args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (20480 if cuda else 2560)
    d = args.dim or (512 if cuda else 256)
    micro = args.vit_micro_batch or (256 if cuda else 2)
    repeats = args.repeats or (5 if cuda else 2)
    b = int(round((1 - args.filter_ratio) * n))
    gen = torch.Generator().manual_seed(args.seed)
    logger.info("JEST bench on %s: N=%d b=%d d=%d chunks=%d", device, n, b, d, args.chunks)

    sizes = sorted({max(args.chunks * 8, n // 8), n // 4, n // 2, n})
    # (loss, impl, precision); the torch float32 run is the accuracy reference
    variants = [("info_nce", "torch", "float32"), ("info_nce", "torch", "tf32"), ("siglip", "torch", "tf32")]
    if cuda:
        variants += [("info_nce", "triton", "tf32"), ("info_nce", "triton", "bf16")]
    rows, series, reference_out = [], {}, {}
    for loss, impl, precision in variants:
        label = f"JEST {loss} {impl} {precision}"
        try:
            xs, ys = _time_variant(args, device, sizes, n, d, repeats, loss, impl, precision, label, rows,
                                   reference_out)
        except Exception as exc:  # one failing variant (e.g. a kernel on a new GPU) must not lose the rest
            logger.exception("variant %s failed", label)
            rows.append({"what": label, "N": n, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        series[label] = (xs, ys)

    xs, ys = [], []
    for size in sizes:
        (q_l, k_l), (q_r, k_r) = _embeddings(size, d, device, args.seed)
        fn = lambda: naive_siglip_jest((q_l, k_l, 10.0, -10.0), (q_r, k_r, 10.0, -10.0), args.chunks,  # noqa: E731
                                       args.filter_ratio, device)
        try:
            secs = time_call(fn, device=device, warmup=1, repeats=repeats)
        except torch.OutOfMemoryError:
            continue
        xs.append(size)
        ys.append(secs * 1e3)
        if size == n:
            rows.append({"what": "anchor: naive N x N SigLIP JEST", "N": size, "ms": secs * 1e3,
                         "peak_MB": _mb(peak_memory_call(fn, device))})
    series["anchor: naive N x N SigLIP JEST"] = (xs, ys)

    loss_s, vit_s, micro_s = _train_step_anchor(b, d, device, micro, repeats, not args.no_vit, gen)
    step_ms = (loss_s + (vit_s or 0.0)) * 1e3
    rows.append({"what": f"anchor: InfoNCE fwd+bwd on {b} pairs", "N": b, "ms": loss_s * 1e3, "peak_MB": None})
    if vit_s is not None:
        rows.append({"what": f"anchor: ViT-B/32 step on {b} images ({micro}/micro-batch x {b // micro})",
                     "N": b, "ms": vit_s * 1e3, "peak_MB": None})
    rows.append({"what": "anchor: training step (sum)", "N": b, "ms": step_ms, "peak_MB": None})
    for row in rows:
        row["% of step"] = 100.0 * row["ms"] / step_ms if "ms" in row else None
    naive = next((r["ms"] for r in rows if r["what"].startswith("anchor: naive")), None)
    for row in rows:
        row["x vs naive"] = (naive / row["ms"]) if naive and "ms" in row and row["what"].startswith("JEST") else None

    print(f"device: {device_name(device)}; N={n}, b={b}, d={d}, chunks={args.chunks}")
    print(format_table(rows, ["what", "N", "ms", "% of step", "x vs naive", "peak_MB", "max |dscore| step 1",
                              "same picks", "error"]))
    tag = "cpu" if not cuda else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    payload = {
        "benchmark": NAME, "device": device_name(device),
        "config": {"n": n, "batch": b, "dim": d, "chunks": args.chunks, "filter_ratio": args.filter_ratio,
                   "vit_micro_batch": micro, "repeats": repeats, "seed": args.seed},
        "rows": rows, "series_ms": {k: {"N": v[0], "ms": v[1]} for k, v in series.items()},
        "vit_micro_step_ms": None if micro_s is None else micro_s * 1e3,
        "target": "JEST selection < 5% of the training step",
        "profile": _profile_selection(device, n, d, args) if args.profile else None,
    }
    path = write_results(args.out, f"{NAME}-{tag}", payload)
    series[f"5% of the step at b={b}"] = (sizes, [0.05 * step_ms] * len(sizes))
    plot_series(Path(args.out) / f"{NAME}-{tag}.png", series, xlabel="super-batch N", ylabel="ms",
                title=f"JEST selection time ({device_name(device)[:40]})")
    print(f"wrote {path}")
    return 0



# ---------------------------------------------------------------------------- quality


class _BagEncoder(torch.nn.Module):
    """Hashed bag of words -> linear -> unit vector: a dual-encoder tower cheap enough for 2 CPU cores."""

    def __init__(self, bag: torch.nn.EmbeddingBag, width: int, dim: int):
        super().__init__()
        self.bag = bag
        self.proj = torch.nn.Linear(width, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.bag(tokens)), dim=-1)


class _DualEncoder(torch.nn.Module):
    """Two towers sharing one word table (so lexical overlap counts from the start), own projections."""

    def __init__(self, buckets=1 << 14, width=64, dim=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        bag = torch.nn.EmbeddingBag(buckets, width, mode="mean", padding_idx=0)
        self.query, self.doc = _BagEncoder(bag, width, dim), _BagEncoder(bag, width, dim)


class _Tokenized:
    """Hashed token ids of texts, padded to (n, max_tokens) with 0 (EmbeddingBag's padding_idx)."""

    def __init__(self, texts, buckets, max_tokens=48):
        import zlib

        from batchlab.recipes.teachers import analyze

        self.ids = torch.zeros(len(texts), max_tokens, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [1 + zlib.crc32(w.encode()) % (buckets - 1) for w in analyze(text)[:max_tokens]]
            self.ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        return self.ids[idx]


def _encode(model, q_tok, d_tok, idx):
    return model.query(q_tok.take(idx)), model.doc(d_tok.take(idx))


def _train(model, q_tok, d_tok, pool, steps, batch, scale, seed, selector=None, super_factor=5,
           ref_cache=None, evaluate=None, eval_every=25, lr=3e-3):
    from batchlab.losses import info_nce

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, steps + 1):
        if selector is None:
            chosen = pool[torch.randperm(pool.numel(), generator=gen)[:batch]]
        else:
            # JEST: draw a super-batch, score it with the learner (no grad) and the cached reference
            cand = pool[torch.randperm(pool.numel(), generator=gen)[:batch * super_factor]]
            with torch.no_grad():
                lq, ld = _encode(model, q_tok, d_tok, cand)
            ref = ref_cache.get(cand)
            pick = selector.select(learner=(lq, ld, scale), reference=(F.normalize(ref["q"], dim=1),
                                                                        F.normalize(ref["d"], dim=1), scale))
            chosen = cand[pick]
        q, d = _encode(model, q_tok, d_tok, chosen)
        loss = info_nce(q, d, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if evaluate is not None and (step % eval_every == 0 or step == steps):
            curve.append((step, evaluate(model)))
    return curve


def _quality_seed(seed, args, data, evaluate):
    """One seed: a reference trained on held-out modules, then uniform and JEST learners from scratch."""
    import tempfile

    from batchlab.samplers.reference_cache import ReferenceEmbeddingCache, model_hash

    train, q_tok, d_tok, buckets = data
    scale, batch = 20.0, args.quality_batch
    # the reference's data: a held-out share of the training *modules* (like the test split)
    modules = sorted(set(train.modules))
    perm = torch.randperm(len(modules), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {modules[i] for i in perm[: int(len(modules) * args.reference_fraction)]}
    ref_pool = torch.tensor([i for i, m in enumerate(train.modules) if m in held])
    pool = torch.tensor([i for i, m in enumerate(train.modules) if m not in held])

    reference = _DualEncoder(buckets, seed=seed + 1000)
    _train(reference, q_tok, d_tok, ref_pool, args.reference_steps, batch, scale, seed + 1)
    cache = ReferenceEmbeddingCache(tempfile.mkdtemp(prefix="jest-ref-"), model_hash(reference),
                                    num_examples=len(train), fields={"q": 64, "d": 64})
    cache.fill(lambda ids: dict(zip(("q", "d"), _encode(reference, q_tok, d_tok, ids))), ids=pool, progress=False)

    curves = {}
    for name in _quality_runs(args):
        selector = None
        if name != "uniform":
            selector = JointExampleSelector(n_chunks=args.chunks, filter_ratio=0.8, seed=seed,
                                            score=name.split()[-1])
        learner = _DualEncoder(buckets, seed=seed)
        curves[name] = _train(learner, q_tok, d_tok, pool, args.quality_steps, batch, scale, seed + 2,
                              selector=selector, ref_cache=cache, evaluate=evaluate, eval_every=args.eval_every)
        logger.info("seed %d %s: final %s", seed, name, curves[name][-1])
    return curves, evaluate(reference), (pool.numel(), ref_pool.numel())


def _quality_runs(args) -> list[str]:
    scores = [s for s in (args.quality_scores or "learnability,hard_learner,easy_reference").split(",") if s]
    if "learnability" not in scores:
        scores.insert(0, "learnability")
    return ["uniform"] + [f"JEST {s}" for s in scores]


def _steps_to(curve, target):
    return next((s for s, m in curve if m >= target), None)


def run_quality(args) -> int:
    """Learner from scratch, JEST (reference trained on held-out data) vs uniform batches, on codesearch."""
    from batchlab.datasets.codesearch import load_codesearch
    from batchlab.recipes.evaluate import retrieval_metrics

    buckets = 1 << 14
    train, test = load_codesearch("train", progress=False), load_codesearch("test", progress=False)
    q_tok, d_tok = _Tokenized(train.queries, buckets), _Tokenized(train.documents, buckets)
    tq_tok, td_tok = _Tokenized(test.queries, buckets), _Tokenized(test.documents, buckets)
    all_test = torch.arange(len(test))

    def evaluate(model):
        with torch.no_grad():
            q, d = _encode(model, tq_tok, td_tok, all_test)
        return retrieval_metrics(q, d, ks=(1, 10))

    seeds = [args.seed + i for i in range(args.quality_seeds)]
    per_seed, ref_metrics = {}, {}
    for seed in seeds:
        curves, ref_metrics[seed], sizes = _quality_seed(seed, args, (train, q_tok, d_tok, buckets), evaluate)
        per_seed[seed] = curves

    steps = [s for s, _ in per_seed[seeds[0]]["uniform"]]
    mean = {name: [sum(per_seed[sd][name][i][1]["mrr"] for sd in seeds) / len(seeds) for i in range(len(steps))]
            for name in _quality_runs(args)}
    target = mean["uniform"][-1]
    reach = _steps_to(list(zip(steps, mean["JEST learnability"])), target)
    ratio = None if reach is None else reach / args.quality_steps
    ratio_by_run = {}
    for name in _quality_runs(args)[1:]:
        r = _steps_to(list(zip(steps, mean[name])), target)
        ratio_by_run[name] = None if r is None else r / args.quality_steps
    seed_ratios = {}
    for sd in seeds:
        u_final = per_seed[sd]["uniform"][-1][1]["mrr"]
        r = _steps_to([(s, m["mrr"]) for s, m in per_seed[sd]["JEST learnability"]], u_final)
        seed_ratios[sd] = None if r is None else r / args.quality_steps

    rows = []
    for name in _quality_runs(args):
        finals = [per_seed[sd][name][-1][1] for sd in seeds]
        rows.append({"run": name, **{f"{k} @{args.quality_steps}": sum(f[k] for f in finals) / len(finals)
                                     for k in finals[0]}})
    rows.append({"run": f"reference ({args.reference_steps} steps, held-out modules)",
                 **{f"{k} @{args.quality_steps}": sum(ref_metrics[sd][k] for sd in seeds) / len(seeds)
                    for k in ref_metrics[seeds[0]]}})
    print(f"codesearch, mean of {len(seeds)} seeds; learner pool {sizes[0]}, reference pool {sizes[1]}, test {len(test)}")
    print(format_table(rows))
    print(f"JEST reaches uniform's final mean MRR ({target:.4f} at step {args.quality_steps}) at step {reach} "
          f"(ratio {ratio}; per seed {seed_ratios}); target: <= 0.5")
    print(f"step ratio to uniform's final mean MRR, by score: {ratio_by_run}")
    payload = {
        "benchmark": "jest-quality", "device": device_name("cpu"),
        "dataset": f"codesearch (train {len(train)}: learner pool {sizes[0]}, reference pool {sizes[1]} "
                   f"from held-out modules; test {len(test)})",
        "model": "hashed bag-of-words dual encoder (shared EmbeddingBag 2^14 x 64, a linear 64 per tower), "
                 "InfoNCE, scale 20, Adam 3e-3",
        "config": {"batch": args.quality_batch, "super_batch": args.quality_batch * 5, "chunks": args.chunks,
                   "steps": args.quality_steps, "reference_steps": args.reference_steps,
                   "reference_fraction": args.reference_fraction, "seeds": seeds, "eval_every": args.eval_every},
        "reference_metrics": ref_metrics,
        "mean_mrr": {"step": steps, **mean},
        "curves": {sd: {k: [{"step": s, **m} for s, m in v] for k, v in c.items()} for sd, c in per_seed.items()},
        "uniform_final_mean_mrr": target, "jest_steps_to_uniform_final": reach, "step_ratio": ratio,
        "step_ratio_per_seed": seed_ratios, "step_ratio_by_score": ratio_by_run,
        "target": "JEST reaches uniform's final retrieval quality in at most half the steps",
    }
    path = write_results(args.out, "jest-quality-cpu", payload)
    series = {f"{k} (mean of {len(seeds)} seeds)": (steps, v) for k, v in mean.items()}
    ref_mean = sum(ref_metrics[sd]["mrr"] for sd in seeds) / len(seeds)
    series["reference model"] = ([steps[0], steps[-1]], [ref_mean, ref_mean])
    plot_series(Path(args.out) / "jest-quality-cpu.png", series, xlabel="learner step", ylabel="test MRR",
                title="JEST vs uniform batches (codesearch, CPU)", logx=False, logy=False)
    print(f"wrote {path}")
    return 0


def _mb(nbytes):
    return None if nbytes is None else nbytes / 2**20


def main(argv=None) -> int:
    from batchlab.bench._common import script_main

    return script_main("batchlab.bench.jest", __doc__, add_arguments, run,
                       argv, log_level=logging.INFO)


if __name__ == "__main__":
    raise SystemExit(main())
