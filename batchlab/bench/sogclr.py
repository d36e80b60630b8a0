"""Benchmark: the cost of SogCLR / iSogCLR per step against plain InfoNCE at the same batch.

Forward + backward of one training step's loss on fresh random unit embeddings (N, d),
through the modules a training loop uses: :class:`~batchlab.losses.SogCLRLoss` and
:class:`~batchlab.losses.ISogCLRLoss` (symmetric image-text, state for N examples,
``ids = arange(N)``; state reads, moving-average and temperature updates included) and
:func:`~batchlab.losses.info_nce` (symmetric CLIP) as the anchor, measured in the same
run. Methods are ``<loss> <impl>``: ``info_nce auto`` (Triton on CUDA), ``info_nce tiled``
(the same tiled engine family), ``sogclr reference|tiled|triton``, ``isogclr
reference|tiled|triton`` (``triton``: the fused kernels with per-row temperatures).
The reference materialises (N, N) logits per direction and is skipped above
``--reference-max-n``. Timing is interleaved: after two warm-up calls of every method (which
also fill the state, so every timed call updates seen examples), each of ``--repeats`` rounds
times every method once (wall clock, device synchronised, the order rotated per round), so
that drift of the machine between calls (one H200 run measured InfoNCE at 1.07 ms, another
at 0.66 ms) hits all methods alike. Each row reports the median and quartiles of its calls,
the peak memory above the inputs (CUDA), and the ratio to ``info_nce auto``: the median over
rounds of the per-round ratio (``x_info_nce_auto``) and the ratio of the medians.
``--data clustered`` times embeddings around 64 centres (same-centre cosine ~0.89) besides
random ones. The issue's target: SogCLR/iSogCLR within 1.2x of InfoNCE's time at N = 4,096
and 65,536 on one H200.

    python -m batchlab.bench.sogclr                          # CPU, N = 1,024 and 4,096, d = 256
    python -m batchlab.bench.sogclr --device cuda --out DIR  # GPU, N = 4,096 and 65,536, d = 512, bf16

``--check`` first compares the fast paths (tiled, and Triton where it runs) with the float64
reference on the device: every mode, fp32 and bf16, per-example temperatures and the extreme
temperatures 0.005 and 1.0, at a ragged N (1,500; one_way with 200 extra keys).

``--aot`` (no GPU needed) compiles every Triton kernel variant of the SogCLR path for sm_90 as the
JIT would specialise it (launches captured from calls on CPU tensors, nothing runs) and reports
registers, spill instructions, shared memory and CTAs per SM (``bench.losses_triton._aot_compile``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from batchlab._argtypes import add_common_arguments, positive_int, positive_int_list
from batchlab.bench._common import device_name, format_table, peak_memory_call, plot_series, synchronize, write_results

log = logging.getLogger(__name__)

METHODS = ["info_nce auto", "info_nce tiled", "sogclr reference", "sogclr tiled", "sogclr triton", "isogclr reference",
           "isogclr tiled", "isogclr triton"]


#: Embedding kinds of ``--data`` (see :func:`embeddings`).
DATA_KINDS = ("random", "clustered")


def _data_kinds(text: str) -> list[str]:
    """argparse type of ``--data``: comma-separated :data:`DATA_KINDS` (exit 2 before any work otherwise)."""
    kinds = [x.strip() for x in text.split(",") if x.strip()]
    if not kinds or set(kinds) - set(DATA_KINDS):
        raise argparse.ArgumentTypeError(f"takes random and/or clustered, got {text!r}")
    return kinds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=positive_int_list, default=None,
                        help="comma-separated N (default: 1024,4096 CPU; 4096,65536 CUDA)")
    parser.add_argument("--dim", type=positive_int, default=None, help="embedding width (default 256 CPU, 512 CUDA)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="embedding dtype (default float32 CPU, bfloat16 CUDA)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="what to time (default: all)")
    parser.add_argument("--reference-max-n", type=positive_int, default=32768,
                        help="largest N for the reference, which materialises the logits (default 32768)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed rounds (every method once per round), median (default 20 CUDA, 5 CPU)")
    parser.add_argument("--data", type=_data_kinds, default=["random"],
                        help="comma-separated embedding kinds: random, clustered (default random)")
    parser.add_argument("--aot", action="store_true",
                        help="compile the Triton kernels for sm_90 on this machine and report registers and spills "
                             "(no GPU; --dtype picks the inputs' dtype)")
    parser.add_argument("--check", action="store_true",
                        help="first check the tiled and Triton paths against the float64 reference on this device "
                             "(every mode, fp32 and bf16, extreme temperatures)")
    add_common_arguments(parser, out="results/bench")  # --device, --seed, --out (sogclr-<device>.json and .png)


def _step(method: str, n: int, q: torch.Tensor, k: torch.Tensor):
    """A closure running one forward + backward of ``method`` (its state lives in the closure)."""
    from batchlab.losses import ISogCLRLoss, SogCLRLoss, info_nce

    loss_name, impl = method.split()
    if loss_name == "info_nce":
        scale = torch.tensor(1 / 0.07, device=q.device, requires_grad=True)
        return lambda: torch.autograd.grad(info_nce(q, k, scale, impl=impl), [q, k, scale])
    cls = ISogCLRLoss if loss_name == "isogclr" else SogCLRLoss
    loss_fn = cls(n, mode="symmetric", impl=impl).to(q.device)
    ids = torch.arange(n, device=q.device)
    return lambda: torch.autograd.grad(loss_fn(q, k, ids), [q, k])


#: ``--check``'s tolerances on the normwise error (max abs error / max abs value of the float64
#: reference on the same rounded inputs), per input dtype: (values and temperature gradients, embedding
#: gradients). fp32: statistics and products in fp32; at tau = 0.005 an fp32 logit error of 1e-7 becomes
#: 2e-5 in ``h / tau``, so the bound scales with 0.05 / tau below 0.05. bf16: the Triton and tiled
#: backwards round ``dLoss/dS`` to bf16 (2**-9) before the two gradient products, and each gradient is
#: returned in bf16.
CHECK_TOL = {"float32": (1e-5, 1e-5), "bfloat16": (1e-3, 2e-2)}


def _check_inputs(mode: str, n: int, dim: int, tau_kind: str, gen: torch.Generator):
    m = n + 200 if mode == "one_way" else n
    q64, k64 = (F.normalize(torch.randn(r, dim, generator=gen, dtype=torch.float64), dim=1) for r in (n, m))
    rows = 1 if mode == "one_way" else 2
    log_u = torch.randn(rows, n, generator=gen, dtype=torch.float64) + 3.0
    log_u[:, ::7] = float("-inf")  # first visits
    if tau_kind == "per-example":
        tau = 0.02 + 0.05 * torch.rand(rows, n, generator=gen, dtype=torch.float64)
    else:
        tau = torch.full((rows, n), float(tau_kind.split()[-1]), dtype=torch.float64)
    return q64, k64, log_u, tau


def check(device: torch.device, n: int = 1500, dim: int = 128, impls=None,
          dtypes=(torch.float32, torch.bfloat16),
          tau_kinds=("per-example", "0.005", "1.0", "float 0.01", "float 0.005"), modes=None) -> list[dict]:
    """The fast paths against the float64 reference on ``device``, normwise (max abs error / max abs
    value; :data:`CHECK_TOL`): every mode, fp32 and bf16, per-example temperatures and tau = 0.005 and
    1.0 (tensors), and tau = 0.01 and 0.005 as floats (the kernels' one-temperature path); values, new
    ``log u``, temperature gradients and the gradients of both inputs. ``modes``: a subset of MODES."""
    from batchlab.losses import sogclr
    from batchlab.losses.sogclr import MODES

    if impls is None:
        impls = ["tiled"] + (["triton"] if device.type == "cuda" else [])
    gen = torch.Generator().manual_seed(0)
    results = []
    for mode in modes or MODES:
        for dtype in dtypes:
            for tau_kind in tau_kinds:
                q64, k64, log_u, tau64 = _check_inputs(mode, n, dim, tau_kind, gen)
                q, k = (x.to(device, dtype).requires_grad_(True) for x in (q64, k64))
                # the reference sees the same rounded inputs, in float64 on the CPU
                rq, rk = (x.detach().double().cpu().requires_grad_(True) for x in (q, k))
                rtau = tau64.clone().requires_grad_(True)
                ref = sogclr(rq, rk, log_u=log_u, tau=rtau, rho=1.0, mode=mode, impl="reference", check_inputs=False)
                want = [ref.loss.detach(), ref.log_u, ref.tau_grad] + list(torch.autograd.grad(ref.loss, [rq, rk, rtau]))
                name = str(dtype).replace("torch.", "")
                value_tol, grad_tol = CHECK_TOL[name]
                scale = max(1.0, 0.05 / float(tau64.min())) if dtype == torch.float32 else 1.0
                one = tau_kind.startswith("float")  # a float tau: the kernels' one-temperature path
                names = ["loss", "log_u", "tau_grad", "dq", "dk"] + ([] if one else ["dtau"])
                for impl in impls:
                    tau = float(tau_kind.split()[-1]) if one else tau64.float().to(device).requires_grad_(True)
                    out = sogclr(q, k, log_u=log_u.float().to(device), tau=tau, rho=1.0, mode=mode, impl=impl)
                    got = [out.loss.detach(), out.log_u, out.tau_grad] + list(
                        torch.autograd.grad(out.loss, [q, k] + ([] if one else [tau])))
                    row = {"impl": impl, "mode": mode, "dtype": name, "tau": tau_kind, "n": n}
                    tols = [value_tol, value_tol, value_tol, grad_tol, grad_tol, value_tol]
                    for what, a, b, tol in zip(names, got, want, tols):
                        a = a.double().cpu()
                        finite = torch.isfinite(b)
                        err = float((a[finite] - b[finite]).abs().max() / b[finite].abs().max().clamp_min(1e-300))
                        row[f"{what}_err"] = err
                        row[f"{what}_ok"] = err <= tol * scale and bool(torch.equal(torch.isfinite(a), finite))
                    row["pass"] = all(v for key, v in row.items() if key.endswith("_ok"))
                    results.append(row)
                    errs = " ".join(f"{w}={row[w + '_err']:.1e}" for w in names)
                    print(f"check {impl} {mode} {name} tau={tau_kind}: {'PASS' if row['pass'] else 'FAIL'} {errs}")
    return results


#: ``--aot``'s variants: (name, forward config key, call) with the call's temperatures and state.
AOT_VARIANTS = [
    ("per-row temperatures (iSogCLR, sogclr(tau=tensor))", "fwd", dict(one=False, step=False), {}),
    ("per-row temperatures, weighted sums in their own reductions", "fwd", dict(one=False, step=False), {"PAIR": 0}),
    ("one temperature (sogclr(tau=float), temperature gradient)", "fwd_one", dict(one=True, step=False), {}),
    ("SogCLRLoss step (one temperature, no temperature gradient)", "fwd_one", dict(one=True, step=True), {}),
    ("SogCLRLoss step, per-row/per-column loop only", "fwd_one", dict(one=True, step=True), {"FAST": 0}),
    ("ISogCLRLoss step (state read and written by the finish)", "fwd", dict(one=False, step=True), {}),
    ("ISogCLRLoss step, temperatures read at the ids in-kernel", "fwd", dict(one=False, step=True, gather=True), {}),
    ("ISogCLRLoss step, SPLIT (two row-only passes, 128 x 64)", "split", dict(one=False, step=True),
     {"SPLIT": 1, "BN": 64}),
    ("ISogCLRLoss step, SPLIT (two row-only passes, 128 x 128)", "split", dict(one=False, step=True), {"SPLIT": 1}),
    ("SogCLRLoss step, SPLIT (two row-only passes, 128 x 128)", "split", dict(one=True, step=True), {"SPLIT": 1}),
    ("ISogCLRLoss step, TILE (one 128 x 128 tile per program)", "tile", dict(one=False, step=True, gather=True),
     {"TILE": 1}),
    ("SogCLRLoss step, TILE (one 128 x 128 tile per program)", "tile", dict(one=True, step=True), {"TILE": 1}),
    ("SogCLRLoss step, TILE, FAST (one exponential, tiles redone)", "tile", dict(one=True, step=True),
     {"TILE": 1, "FAST": 1}),
]


def run_aot(dtype: torch.dtype, n: int = 1024, dim: int = 512, warps=(4, 8)) -> list[dict]:
    """Every kernel of each :data:`AOT_VARIANTS` entry compiled for sm_90 at each forward warp count."""
    import math

    from batchlab.bench.losses_triton import _aot_rows, capture_launches
    from batchlab.losses.triton import _sogclr

    rows = []
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(n, dim, generator=gen).to(dtype) for _ in range(2))
    ids = torch.arange(n)
    for name, key, var, options in AOT_VARIANTS:
        for w in warps:
            with capture_launches(_sogclr.CONFIGS) as captured:
                shape = {k2: v for k2, v in options.items() if k2 not in ("SPLIT", "TILE")}
                for opt in ("SPLIT", "TILE"):  # the forward's thresholds; the variant's shape goes to its key
                    if opt in options:
                        _sogclr.CONFIGS["fwd"][opt] = _sogclr.CONFIGS["fwd_one"][opt] = options[opt]
                _sogclr.CONFIGS[key].update(shape, num_warps=w)
                tau = None if var["one"] else torch.full((2, n), 0.05)
                table = torch.zeros(2, n)
                log_u = table if var["step"] else torch.zeros(2, n)
                isog = var["step"] and not var["one"]
                _, stats, _ = _sogclr._forward(
                    q, k, k, tau, 0.05, log_u, [0], [n], [0], True, math.log(n - 1), 0.9, 0.0, 1.0,
                    ids=ids if var["step"] else None, tau_table=table if isog else None, mom=table if isog else None,
                    update=var["step"], isog=isog, wsum=not (var["step"] and var["one"]),
                    gather_tau=var.get("gather", False))
                _sogclr._backward(q, k, tau, 0.05, stats, torch.ones(()), [0], [n], [0], True, 1.0, True, True)
            # the other kernels do not depend on the forward's warp count: compiled once
            for kw, row in _aot_rows(captured, keep=lambda fn: fn.startswith("sog_fwd") or w == warps[0]):
                cfg = {k2: kw.get(k2) for k2 in ("BM", "BN", "num_warps", "num_stages", "TMA")}
                rows.append({"variant": name, **cfg, **row})
    print(format_table(rows, ["variant", "kernel_fn", "BM", "BN", "num_warps", "regs", "spill_ops", "stack_bytes",
                              "shared_kib", "ctas_per_sm", "status"]))
    return rows


def embeddings(n: int, dim: int, gen: torch.Generator, *, clustered: bool = False, centres: int = 64):
    """Two (n, dim) fp32 unit batches on the CPU: random (cosines within ~+-0.15 at d = 512), or
    around ``centres`` shared centres (same-centre cosine ~0.89: what trained embeddings look like)."""
    if not clustered:
        return [F.normalize(torch.randn(n, dim, generator=gen), dim=1) for _ in range(2)]
    c = F.normalize(torch.randn(centres, dim, generator=gen), dim=1)
    label = torch.randint(0, centres, (n,), generator=gen)
    return [F.normalize(c[label] + 0.35 * torch.randn(n, dim, generator=gen) / dim ** 0.5, dim=1) for _ in range(2)]


def interleaved(steps: dict, device, repeats: int, warmup: int = 2) -> dict:
    """Seconds of each of ``repeats`` calls per step: every round times every step once (wall clock,
    device synchronised), in an order rotated per round; ``warmup`` untimed calls of each first."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    names = list(steps)
    times: dict = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _quartiles(xs):
    xs = sorted(xs)
    return xs[len(xs) // 4], statistics.median(xs), xs[(3 * len(xs)) // 4]


def _time_methods(methods, n, q, k, device, repeats: int, reference_max_n: int, base: dict) -> list[dict]:
    """One row per method: interleaved timing (:func:`interleaved`), peak memory, ratios to ``info_nce auto``."""
    rows, steps = [], {}
    for method in methods:
        row = {**base, "method": method}
        if method.endswith("reference") and n > reference_max_n:
            rows.append({**row, "ms": None, "note": f"skipped above --reference-max-n {reference_max_n}"})
            continue
        steps[method] = _step(method, n, q, k)
        peak = peak_memory_call(steps[method], device)
        rows.append({**row, "peak_extra_MiB": None if peak is None else peak / 2**20})
    times = interleaved(steps, device, repeats)
    anchor = times.get("info_nce auto")
    for row in rows:
        ts = times.get(row["method"])
        if ts is None:
            continue
        p25, med, p75 = _quartiles(ts)
        row.update(ms=med * 1e3, ms_p25=p25 * 1e3, ms_p75=p75 * 1e3, x_info_nce_auto=None, x_medians=None)
        if anchor is not None:
            row["x_info_nce_auto"] = statistics.median(t / a for t, a in zip(ts, anchor))
            row["x_medians"] = med / statistics.median(anchor)
            row["x_p25"], _, row["x_p75"] = _quartiles([t / a for t, a in zip(ts, anchor)])
        log.info("%s", row)
    steps.clear()
    return rows


def run(args) -> int:
    device = torch.device(args.device)
    if args.aot:
        import triton

        dtype = getattr(torch, args.dtype or "bfloat16")
        rows = run_aot(dtype)
        write_results(args.out, f"sogclr-aot-sm90-triton{triton.__version__}-{args.dtype or 'bfloat16'}",
                      {"triton": triton.__version__, "target": "cuda:90", "dtype": str(dtype), "rows": rows})
        return 0
    kinds = args.data  # parsed (and refused with exit 2) by argparse, before the (long) --check
    checks = check(device) if args.check else None
    cuda = device.type == "cuda"
    sizes = args.sizes if args.sizes else ([4096, 65536] if cuda else [1024, 4096])
    dim = args.dim or (512 if cuda else 256)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    repeats = args.repeats or (20 if cuda else 5)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    rows = []
    for n in sizes:
        for kind in kinds:
            q, k = embeddings(n, dim, gen, clustered=kind == "clustered")
            q, k = (x.to(device, dtype).requires_grad_(True) for x in (q, k))
            rows += _time_methods(args.methods, n, q, k, device, repeats, args.reference_max_n,
                                  {"N": n, "d": dim, "dtype": str(dtype).replace("torch.", ""), "data": kind})
            del q, k
            if cuda:
                torch.cuda.empty_cache()
    table = format_table(rows, ["N", "data", "method", "ms", "ms_p25", "ms_p75", "x_info_nce_auto", "x_medians",
                                "peak_extra_MiB", "note"])
    print(f"SogCLR / iSogCLR vs InfoNCE, forward + backward, {device_name(device)}, d={dim}, {dtype}")
    print(table)
    tag = "cpu" if not cuda else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    configs = None
    if any(m.endswith("triton") for m in args.methods):
        from batchlab.losses.triton import _sogclr

        configs = _sogclr.CONFIGS
    payload = {"benchmark": "sogclr", "device": device_name(device), "dim": dim, "dtype": str(dtype),
               "repeats": repeats, "timing": "interleaved rounds, wall clock, device synchronised", "rows": rows,
               "checks": checks, "triton_configs": configs,
               "target": "SogCLR/iSogCLR within 1.2x of info_nce auto at N = 4,096 and 65,536 on one H200"}
    path = write_results(args.out, f"sogclr-{tag}", payload)
    series = {}
    for method in args.methods:
        pts = [(r["N"], r["ms"]) for r in rows
               if r["method"] == method and r.get("ms") is not None and r["data"] == kinds[0]]
        if pts:
            series[method] = ([p[0] for p in pts], [p[1] for p in pts])
    if series:
        plot_series(Path(args.out) / f"sogclr-{tag}.png", series, xlabel="N (batch)", ylabel="ms per forward+backward",
                    title=f"SogCLR / iSogCLR vs InfoNCE ({device_name(device)})")
    print(f"wrote {path}")
    return 1 if checks and not all(c["pass"] for c in checks) else 0


def main(argv=None) -> int:
    from batchlab.bench._common import script_main

    return script_main("batchlab.bench.sogclr", __doc__, add_arguments, run, argv, log_level=logging.INFO)


if __name__ == "__main__":
    raise SystemExit(main())
