"""Triton loss kernels against open_clip and Inf-CL, forward + backward, one GPU.

Rows: batchlab's Triton symmetric InfoNCE (CLIP), SigLIP and DCL, and the anchors
measured in the same run on the same GPU: open_clip ``ClipLoss`` and ``SigLipLoss``
(bf16 inputs, as in AMP training) and Inf-CL's ``cal_inf_loss`` both ways (it upcasts
to fp32 and runs TF32; its single-GPU path needs a process group, so a one-process
group is started). Anchors that are not installed, or run out of memory, are
reported as such. Every row is timed on fresh random unit-norm inputs, ``d`` wide,
with ``torch.autograd.grad`` over (q, k, scale[, bias]) so nothing accumulates.

TFLOP/s is reported against the floor of an exact O(N)-memory symmetric loss,
``8 N^2 d`` (one forward GEMM for both statistics, one recompute plus two gradient
GEMMs in the backward).

    python -m batchlab.bench.losses_triton --device cuda --sizes 8192 65536
    python -m batchlab.bench.losses_triton --device cuda --sweep   # tile configs
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from batchlab.bench._common import device_name, format_table, plot_series, write_results

log = logging.getLogger(__name__)

DEFAULT_SIZES = [8192, 32768, 65536, 131072, 262144, 524288, 1048576]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cuda (the kernels need a GPU; cpu only runs the interpreter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="batch sizes N (= M)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--losses", nargs="+", default=["info_nce", "siglip", "dcl"],
                        help="batchlab losses to time (impl='triton')")
    parser.add_argument("--anchors", nargs="*", default=["open_clip_clip", "open_clip_siglip", "inf_cl"])
    parser.add_argument("--anchor-max-n", type=int, default=131072,
                        help="largest N for the anchors (open_clip runs out of memory above 65,536; "
                             "Inf-CL takes 16 s at 262,144)")
    parser.add_argument("--sweep", action="store_true", help="time tile configs of each kernel instead")
    parser.add_argument("--tune", action="store_true",
                        help="sweep first, then benchmark with the fastest config of each kernel")
    parser.add_argument("--sweep-n", type=int, default=32768)
    parser.add_argument("--sweep-kernels", nargs="+", default=["fwd", "bwd_kernel_only", "siglip"],
                        help="which kernels the sweep times (default: all three)")
    parser.add_argument("--tag", default="", help="suffix for the results file name")
    parser.add_argument("--configs", default=None,
                        help="a sweep results JSON whose 'best' tile configs to use")
    parser.add_argument("--grid", action="store_true",
                        help="time GRID_VARIANTS of each kernel at --grid-sizes (kernels compiled in parallel "
                             "first), then fwd+bwd of the losses with the default and the fastest variants")
    parser.add_argument("--grid-sizes", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--grid-losses-sizes", type=int, nargs="*", default=[16384, 32768, 65536])
    parser.add_argument("--grid-jobs", type=int, default=12, help="processes compiling the variants")
    parser.add_argument("--grid-compile-only", action="store_true",
                        help="only compile the grid's variants into Triton's cache (to overlap with other work)")
    parser.add_argument("--aot", action="store_true",
                        help="no GPU needed: compile every grid variant's kernels for sm_90 with the installed "
                             "Triton and report registers, spills, shared memory, wgmma count, warp specialisation")
    parser.add_argument("--aot-ws", action="store_true", help="--aot: add the warp-specialised variants (WS=1)")


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
def _time_cuda(fn, *, budget_s: float = 2.0, max_repeats: int = 20) -> tuple[float, list[float], int]:
    """Median seconds of ``fn()`` with CUDA events after one warm-up; also the peak bytes above the start."""
    if not torch.cuda.is_available():  # dry run of the script under TRITON_INTERPRET=1
        from batchlab.bench._common import time_call

        return time_call(fn, repeats=1), [0.0], 0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()  # warm-up (compilation, autotuning, allocator)
    torch.cuda.synchronize()
    times = []
    repeats = max_repeats
    for i in range(max_repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        if i == 0:
            repeats = int(min(max_repeats, max(2, math.ceil(budget_s / max(times[0], 1e-6)))))
        if len(times) >= repeats:
            break
    peak = torch.cuda.max_memory_allocated() - before
    return statistics.median(times), times, peak


def _unit(n, d, dtype, device, gen):
    return F.normalize(torch.randn(n, d, device=device, generator=gen, dtype=torch.float32), dim=1).to(dtype)


def _batchlab_step(name, q, k, scale, bias):
    from batchlab.losses import dcl, info_nce, siglip

    if name == "info_nce":
        loss = info_nce(q, k, scale, impl="triton")
        return torch.autograd.grad(loss, [q, k, scale])
    if name == "siglip":
        loss = siglip(q, k, scale, bias, impl="triton")
        return torch.autograd.grad(loss, [q, k, scale, bias])
    if name == "dcl":
        loss = dcl(q, k, scale, impl="triton")
        return torch.autograd.grad(loss, [q, k, scale])
    raise ValueError(name)


def _anchor_step(name):
    """A closure factory for an anchor, or None when the anchor is not installed."""
    if name.startswith("open_clip"):
        try:
            from open_clip.loss import ClipLoss, SigLipLoss
        except ImportError:
            return None
        if name == "open_clip_clip":
            loss_fn = ClipLoss()

            def step(q, k, scale, bias):
                return torch.autograd.grad(loss_fn(q, k, scale), [q, k, scale])
        else:
            loss_fn = SigLipLoss()

            def step(q, k, scale, bias):
                return torch.autograd.grad(loss_fn(q, k, scale, bias), [q, k, scale, bias])

        return step
    if name == "inf_cl":
        try:
            from inf_cl import cal_inf_loss
        except ImportError:
            return None
        import torch.distributed as dist

        if not torch.cuda.is_available():
            return None
        if not dist.is_initialized():  # Inf-CL all-reduces the scale gradient even on one GPU
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29531")
            dist.init_process_group("nccl", rank=0, world_size=1)

        def step(q, k, scale, bias):
            loss = (cal_inf_loss(q, k, scale=scale) + cal_inf_loss(k, q, scale=scale)) / 2
            return torch.autograd.grad(loss, [q, k, scale])

        return step
    raise ValueError(name)


def _measure(label, step, n, args, gen):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    row = {"method": label, "N": n, "d": args.dim}
    try:
        q = _unit(n, args.dim, dtype, device, gen).requires_grad_()
        k = _unit(n, args.dim, dtype, device, gen).requires_grad_()
        scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        median, times, peak = _time_cuda(lambda: step(q, k, scale, bias))
    except torch.cuda.OutOfMemoryError:
        row.update(ms=None, status="out of memory")
        return row
    finally:
        q = k = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    grads = 2 * n * args.dim * torch.empty(0, dtype=dtype).element_size()
    row.update(
        ms=median * 1e3,
        runs=len(times),
        spread_pct=100 * (max(times) - min(times)) / median if len(times) > 1 else 0.0,
        peak_gib=peak / 2**30,
        beyond_grads_gib=(peak - grads) / 2**30,
        tflops_vs_floor=8 * n * n * args.dim / median / 1e12,
        status="ok",
    )
    return row


def run_benchmark(args, checkpoint=None) -> list[dict]:
    """All rows; ``checkpoint(rows)`` is called after each one (partial results survive a time limit)."""
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    rows = []
    anchors = {name: _anchor_step(name) for name in args.anchors}
    failed: set[str] = set()
    for n in args.sizes:
        for name in args.losses:
            row = _measure(f"batchlab triton {name}", lambda q, k, s, b, name=name: _batchlab_step(name, q, k, s, b),
                           n, args, gen)
            rows.append(row)
            log.info("%s", row)
            print(format_table([row]), flush=True)
            if checkpoint:
                checkpoint(rows)
        for name, step in anchors.items():
            if step is None:
                rows.append({"method": name, "N": n, "d": args.dim, "ms": None, "status": "not installed"})
                continue
            if n > args.anchor_max_n or name in failed:
                continue
            row = _measure(name, step, n, args, gen)
            rows.append(row)
            print(format_table([row]), flush=True)
            if checkpoint:
                checkpoint(rows)
            if row["status"] != "ok":  # larger N will not fit either
                failed.add(name)
    base = {(r["N"]): r["ms"] for r in rows if r["method"] == "batchlab triton info_nce" and r.get("ms")}
    for r in rows:
        if r.get("ms") and r["N"] in base:
            r["ratio_to_triton_info_nce"] = r["ms"] / base[r["N"]]
    return rows


# ---------------------------------------------------------------------------
# tile-config sweep of each kernel alone
# ---------------------------------------------------------------------------
def _cfgs(*shapes):
    """(BM, BN, warps, stages) shapes with BD=64, each with pointer loads and with TMA descriptors."""
    return [dict(BM=bm, BN=bn, BD=64, num_warps=w, num_stages=st, TMA=tma)
            for tma in (0, 1) for bm, bn, w, st in shapes]  # pointer loads first: a TMA fault cannot hide them


#: Candidates per kernel, around the winners of the first H100 sweep (benchmarks/results/).
SWEEP_CONFIGS = {
    "fwd": _cfgs((128, 128, 4, 3), (128, 128, 4, 4), (256, 128, 8, 3), (128, 256, 8, 3)),
    "bwd_kernel_only": _cfgs((128, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3)),
    "siglip": _cfgs((64, 128, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3)),
}
# the panel-writing kernels again with their tiles stored through the copy engine (TMA loads too)
for _kernel in ("bwd_kernel_only", "siglip"):
    SWEEP_CONFIGS[_kernel] += [dict(c, TMA_OUT=1) for c in SWEEP_CONFIGS[_kernel] if c["TMA"]]
# loop flattening (FLAT: the next tile's loads overlap this tile's epilogue) and, in the
# backward, several column tiles per program (TPP) so that there is a loop to flatten
_TMA = dict(BD=64, TMA=1)
SWEEP_CONFIGS["fwd"] += [dict(_TMA, BM=bm, BN=bn, num_warps=w, num_stages=st, FLAT=1)
                         for bm, bn, w, st in ((128, 128, 4, 2), (128, 128, 4, 3), (128, 128, 4, 4),
                                               (256, 128, 8, 3), (128, 256, 8, 3), (128, 128, 8, 3))]
SWEEP_CONFIGS["bwd_kernel_only"] += [dict(_TMA, BM=bm, BN=bn, num_warps=w, num_stages=st, TPP=tpp, FLAT=flat)
                                     for bm, bn, w, st in ((128, 128, 4, 3), (128, 256, 8, 3), (128, 128, 4, 4))
                                     for tpp, flat in ((4, 0), (4, 1), (16, 1))]


def best_configs(sweep_rows: list[dict]) -> dict[str, dict[str, int]]:
    """The fastest config of each kernel in a sweep (the backward judged by its Triton kernel alone)."""
    from batchlab.losses.triton import _launch

    judge = {"fwd": "fwd", "bwd_kernel_only": "bwd", "siglip": "siglip"}
    best: dict[str, tuple[float, dict]] = {}
    for r in sweep_rows:
        target = judge.get(r["kernel"])
        if target and r.get("ms") and (target not in best or r["ms"] < best[target][0]):
            keys = (*_launch.SHAPE_KEYS, *_launch.KERNEL_OPTIONS[target])
            best[target] = (r["ms"], {key: r[key] for key in keys if key in r})
    return {key: cfg for key, (_, cfg) in best.items()}


def load_configs(path: str) -> dict:
    """Use the 'best' tile configs of a sweep results file (returns them)."""
    import json

    from batchlab.losses.triton import _launch

    best = json.loads(Path(path).read_text())["best"]
    for key, cfg in best.items():
        _launch.CONFIGS[key] = dict(cfg)
    print("tile configs from", path, ":", best, flush=True)
    return best


def run_sweep(args) -> list[dict]:
    import triton.testing

    from batchlab.losses.triton import _launch, _lse, _siglip

    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    n, d = args.sweep_n, args.dim
    q = _unit(n, d, dtype, args.device, gen)
    k = _unit(n, d, dtype, args.device, gen)
    scale = torch.tensor(1 / 0.07, device=args.device)
    bias = torch.tensor(-10.0, device=args.device)
    g = torch.full((n,), 1.0 / (2 * n), device=args.device)
    row2, col2 = _lse.lse_forward(q, k, scale, None, cols=True, exclude=False)
    rows = []
    p = min(8192, n)
    a = torch.randn(p, n, device=args.device, dtype=dtype)
    for label, fn in {f"cuBLAS G@k ({p} x N) @ (N x d)": lambda: torch.mm(a, k),
                      f"cuBLAS G.T@q (N x {p}) @ ({p} x d)": lambda: torch.mm(a.t(), q[:p]),
                      "fp32-out G@k": lambda: _launch.mm_f32(a, k),
                      "fp32-out G.T@q": lambda: _launch.mm_f32(a.t(), q[:p])}.items():
        ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        rows.append({"kernel": label, "N": n, "d": d, "ms": ms, "tflops": 2 * p * n * d / (ms / 1e3) / 1e12,
                     "status": f"mm.dtype available: {_launch._MM_F32}"})
        print(format_table([rows[-1]]), flush=True)
    del a
    saved = dict(_launch.CONFIGS)
    kernels = {
        "fwd": lambda: _lse.lse_forward(q, k, scale, None, cols=True, exclude=False),
        "bwd_kernel_only": lambda: _lse.lse_backward(q, k, scale, None, row2, col2, g, g, exclude=False,
                                                     need_q=False, need_k=False),
        "siglip": lambda: _siglip.siglip_pass(q, k, scale, bias, None, loss=True, g_row=g * 2),
    }
    # the backward "kernel only" run still does one (G @ k) product per panel for the scale gradient
    flops = {"fwd": 2 * n * n * d, "bwd_kernel_only": 4 * n * n * d, "siglip": 6 * n * n * d}
    config_of = {"fwd": "fwd", "bwd_kernel_only": "bwd", "siglip": "siglip"}
    for kernel, fn in kernels.items():
        if kernel not in args.sweep_kernels:
            continue
        for cfg in SWEEP_CONFIGS[kernel]:
            _launch.CONFIGS[config_of[kernel]] = dict(cfg)
            try:
                ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
                status = "ok"
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
                ms, status = None, f"{type(exc).__name__}: {str(exc)[:80]}"
            row = {"kernel": kernel, "N": n, "d": d, **cfg, "ms": ms,
                   "tflops": flops[kernel] / (ms / 1e3) / 1e12 if ms else None, "status": status}
            rows.append(row)
            print(format_table([row]), flush=True)
        _launch.CONFIGS[config_of[kernel]] = saved[config_of[kernel]]
    return rows


# ---------------------------------------------------------------------------
# variant grid: one-tile kernels, warp specialisation, tile shapes (issue 21's large-N targets)
# ---------------------------------------------------------------------------
def _v(tile=0, **kw):
    cfg = dict(BD=64, TMA=1, **kw)
    if tile:
        cfg["TILE"] = 1
    return cfg


#: Kernel variants of the grid, per ``_launch.CONFIGS`` key; the first of each is the default
#: before this grid. Each was compiled offline for sm_90 with Triton 3.6 (no spills, shared
#: memory within 227 KB). The warp-specialised (WS=1) variants are not in the grid: on the
#: H200 (Triton 3.6) the first run that used them never finished (150 s, no output).
GRID_VARIANTS = {
    "fwd": [
        _v(0, BM=128, BN=128, num_warps=4, num_stages=3),
        _v(1, BM=128, BN=128, num_warps=4, num_stages=3),
        _v(1, BM=128, BN=128, num_warps=4, num_stages=2),
        _v(1, BM=128, BN=128, num_warps=8, num_stages=3),
        _v(1, BM=256, BN=128, num_warps=8, num_stages=2),
        _v(1, BM=128, BN=256, num_warps=8, num_stages=2),
    ],
    "bwd": [
        _v(0, BM=128, BN=128, num_warps=4, num_stages=3),
        _v(1, BM=128, BN=128, num_warps=4, num_stages=3),
        _v(1, BM=128, BN=128, num_warps=4, num_stages=3, TWO_EXP=1),
        _v(1, BM=128, BN=128, num_warps=8, num_stages=3, TWO_EXP=1),
    ],
    "siglip": [
        _v(0, BM=64, BN=128, num_warps=4, num_stages=4),
        _v(1, BM=64, BN=128, num_warps=4, num_stages=4),
        _v(1, BM=128, BN=128, num_warps=8, num_stages=3),
    ],
}


def _grid_inputs(n, d, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k = _unit(n, d, dtype, device, gen), _unit(n, d, dtype, device, gen)
    return q, k, torch.tensor(1 / 0.07, device=device), torch.tensor(-10.0, device=device)


def _grid_fn(kernel, q, k, scale, bias):
    """The call that times one kernel family: forward statistics, backward (kernel + 2 products), SigLIP pass."""
    from batchlab.losses.triton import _lse, _siglip

    n = q.shape[0]
    if kernel == "fwd":
        return lambda: _lse.lse_forward(q, k, scale, None, cols=True, exclude=False)
    if kernel == "bwd":
        row2, col2 = _lse.lse_forward(q, k, scale, None, cols=True, exclude=False)
        g = torch.full((n,), 1.0 / (2 * n), device=q.device)
        ctl = _lse.control(q, k, scale)
        return lambda: _lse.lse_backward(q, k, scale, None, row2, col2, g, g, exclude=False, ctl=ctl)
    g = torch.full((n,), 1.0 / n, device=q.device)
    return lambda: _siglip.siglip_pass(q, k, scale, bias, None, loss=True, g_row=g)


def _compile_variant(job):
    """Worker: run one variant once at a small size so that the kernels land in Triton's disk cache."""
    kernel, cfg, n, d, dtype = job
    from batchlab.losses.triton import _launch

    _launch.CONFIGS[kernel] = dict(cfg)
    try:
        q, k, scale, bias = _grid_inputs(n, d, getattr(torch, dtype), "cuda")
        if kernel == "bwd":  # the forward it needs is compiled by the fwd jobs (default config)
            _launch.CONFIGS["fwd"] = dict(GRID_VARIANTS["fwd"][0])
        _grid_fn(kernel, q, k, scale, bias)()
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported, and the timing run reports it again
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def _precompile(jobs, workers):
    import concurrent.futures as cf
    import multiprocessing as mp

    if workers <= 1 or not torch.cuda.is_available():  # the timing run compiles on its first calls
        return []
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_compile_variant, jobs))


def _bench_ms(fn):
    if not torch.cuda.is_available():
        from batchlab.bench._common import time_call

        return time_call(fn, repeats=1) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=20, rep=120, return_mode="median")


def run_grid(args) -> list[dict]:
    """Every GRID_VARIANTS entry timed alone at each --grid-sizes N; then the losses end to end."""
    from batchlab.losses.triton import _launch

    dtype = getattr(torch, args.dtype)
    d = args.dim
    saved = {key: dict(val) for key, val in _launch.CONFIGS.items()}
    rows: list[dict] = []
    t0 = time.perf_counter()
    jobs = [(kernel, cfg, 2048, d, args.dtype) for kernel, cfgs in GRID_VARIANTS.items() for cfg in cfgs]
    status = _precompile(jobs, args.grid_jobs)
    print(f"precompiled {len(jobs)} variants in {time.perf_counter() - t0:.1f} s:",
          [s for s in status if s != "ok"] or "all ok", flush=True)
    if args.grid_compile_only:
        return rows
    if torch.cuda.is_available():  # the dense-rate anchor of the floor
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        ms = _bench_ms(lambda: a @ a)
        rows.append({"kernel": "torch.mm 8192^3", "ms": ms, "tflops": 2 * 8192**3 / ms / 1e9, "status": "ok"})
        del a
    for n in args.grid_sizes:
        q, k, scale, bias = _grid_inputs(n, d, dtype, args.device)
        p = min(8192, n)
        g = torch.randn(p, n, device=args.device, dtype=dtype)
        for label, fn in {"fp32-out G@k": lambda: _launch.mm_f32(g, k),
                          "fp32-out G.T@q": lambda: _launch.mm_f32(g.t(), q[:p])}.items():
            ms = _bench_ms(fn) * (n / p)  # all panels
            rows.append({"kernel": label, "N": n, "d": d, "ms": ms, "tflops": 2 * n * n * d / ms / 1e9, "status": "ok"})
            print(format_table([rows[-1]]), flush=True)
        del g
        flops = {"fwd": 2, "bwd": 6, "siglip": 6}
        for kernel, cfgs in GRID_VARIANTS.items():
            for i, cfg in enumerate(cfgs):
                _launch.CONFIGS[kernel] = dict(cfg)
                try:
                    ms, status = _bench_ms(_grid_fn(kernel, q, k, scale, bias)), "ok"
                except Exception as exc:  # noqa: BLE001 - a variant that fails is a result
                    ms, status = None, f"{type(exc).__name__}: {str(exc)[:100]}"
                _launch.CONFIGS[kernel] = dict(saved[kernel])
                row = {"kernel": kernel, "variant": i, "N": n, "d": d, **cfg, "ms": ms,
                       "tflops": flops[kernel] * n * n * d / ms / 1e9 if ms else None, "status": status}
                rows.append(row)
                print(format_table([row]), flush=True)
        q = k = None
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


#: Warp-specialised variants, compiled by --aot --aot-ws only (they hung on the GPU: see GRID_VARIANTS).
WS_VARIANTS = {
    "bwd": [_v(1, BM=bm, BN=bn, num_warps=4, num_stages=st, TWO_EXP=1, WS=1)
            for bm, bn, st in ((128, 128, 2), (128, 128, 3), (256, 128, 2), (128, 256, 2))],
    "siglip": [_v(1, BM=128, BN=128, num_warps=4, num_stages=st, WS=1) for st in (2, 3)],
}
#: Hopper limits used by --aot's occupancy estimate (per SM).
_SM_REGS, _SM_SHARED = 65536, 233472


def _aot_compile(fn, args, kwargs):
    """Compile one captured launch for sm_90 as the JIT would specialise it; resource usage from cuobjdump."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    option_keys = ("num_warps", "num_stages", "num_ctas", "maxnreg")
    options = {key: kwargs[key] for key in option_keys if key in kwargs}
    values = dict(zip(fn.arg_names, args), **{key: v for key, v in kwargs.items() if key not in option_keys})
    signature, constants, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = values.get(name, param.default)
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", value
            continue
        signature[name] = mangle_type(value)
        aligned = (isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0) or (
            isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0)
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(compiled.asm["cubin"])
        fh.flush()
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", fh.name], capture_output=True,
                               text=True).stdout
        sass = subprocess.run([str(tools / "cuobjdump"), "--dump-sass", fh.name], capture_output=True, text=True).stdout
    regs, stack = (int(x) for x in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    ttgir = compiled.asm["ttgir"]
    warps = int(re.search(r'"ttg.num-warps" = (\d+)', ttgir).group(1))
    ws = "ttg.warp_specialize" in ttgir
    if ws:  # the partitions' warps come on top of the default group's
        warps += sum(int(x) for x in re.findall(r"num_warps\((\d+)\)", ttgir))
    shared = compiled.metadata.shared
    return {"kernel_fn": fn.__name__, "regs": regs, "stack_bytes": stack, "shared_kib": round(shared / 1024, 1),
            "warps": warps, "ctas_per_sm": min(_SM_REGS // max(1, regs * 32 * warps), _SM_SHARED // max(1, shared)),
            "HGMMA": len(re.findall(r"HGMMA", sass)), "spill_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
            "warp_specialised": ws}


@contextlib.contextmanager
def capture_launches(configs: dict):
    """Triton launches recorded instead of run; ``configs`` (a kernel-config table) restored on exit.

    Inside the block every ``JITFunction.run`` appends ``(jit, args, kwargs)`` to the yielded list
    and launches nothing, so that :func:`_aot_compile` can compile the kernels for sm_90 on a
    machine without a GPU. The table may be changed freely inside; each key gets a copy of its
    entry back on exit::

        with capture_launches(_launch.CONFIGS) as captured:
            _launch.CONFIGS["fwd"] = {...}
            loss_call()
        rows = [_aot_compile(jit, a, kw) for jit, a, kw in captured]
    """
    from triton.runtime.jit import JITFunction

    captured: list = []
    saved = {key: dict(val) for key, val in configs.items()}
    original = JITFunction.run
    JITFunction.run = lambda self, *a, grid, warmup, **kw: captured.append((self, a, kw))
    try:
        yield captured
    finally:
        JITFunction.run = original
        configs.update({key: dict(val) for key, val in saved.items()})


def _aot_rows(captured, keep=lambda name: True) -> list[tuple[dict, dict]]:
    """(launch keywords, :func:`_aot_compile` row) for the first launch of each kernel of ``captured``
    whose name passes ``keep``; a kernel that does not compile gets a row with its ``status``."""
    rows, seen = [], set()
    for jit, a, kw in captured:
        name = jit.fn.__name__
        if name in seen or not keep(name):
            continue
        seen.add(name)
        try:
            row = _aot_compile(jit, a, kw)
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result
            row = {"kernel_fn": name, "status": f"{type(exc).__name__}: {str(exc)[-80:]}"}
        rows.append((kw, row))
    return rows


def run_aot(args) -> list[dict]:
    """--aot: every grid variant's kernels compiled for sm_90 from launches captured on the CPU (none run)."""
    from batchlab.losses.triton import _launch

    dtype = getattr(torch, args.dtype)
    variants = {key: list(val) + (WS_VARIANTS.get(key, []) if args.aot_ws else []) for key, val in GRID_VARIANTS.items()}
    rows = []
    try:
        for kernel, cfgs in variants.items():
            for cfg in cfgs:
                with capture_launches(_launch.CONFIGS) as captured:
                    _launch.CONFIGS[kernel] = dict(cfg, **({"WS": 1} if cfg.get("WS") else {}))
                    os.environ["BATCHLAB_TRITON_WS"] = "1" if cfg.get("WS") else "0"
                    q, k, scale, bias = _grid_inputs(1024, args.dim, dtype, "cpu")
                    _grid_fn(kernel, q, k, scale, bias)()
                for _, row in _aot_rows(captured):
                    rows.append({"kernel": kernel, **cfg, **row})
                    print(format_table([rows[-1]]), flush=True)
    finally:
        os.environ.pop("BATCHLAB_TRITON_WS", None)
    return rows


def grid_best(rows: list[dict], n: int) -> dict[str, dict]:
    """The fastest variant of each kernel at size ``n`` (its config, as GRID_VARIANTS has it)."""
    best: dict[str, tuple[float, dict]] = {}
    for r in rows:
        if r.get("N") == n and r.get("variant") is not None and r.get("ms"):
            if r["kernel"] not in best or r["ms"] < best[r["kernel"]][0]:
                best[r["kernel"]] = (r["ms"], GRID_VARIANTS[r["kernel"]][r["variant"]])
    return {key: dict(cfg) for key, (_, cfg) in best.items()}


def run(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    if args.aot:
        import triton

        rows = run_aot(args)
        write_results(args.out, f"losses-triton-aot-sm90-triton{triton.__version__}{args.tag}",
                      {"triton": triton.__version__, "target": "cuda:90", "dim": args.dim, "dtype": args.dtype,
                       "rows": rows})
        return 0
    if torch.device(args.device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        print("losses_triton: the Triton kernels are benchmarked on a CUDA GPU; pass --device cuda "
              "(or set TRITON_INTERPRET=1 for a slow dry run of this script on the CPU)")
        return 2
    gpu = device_name(args.device) if torch.device(args.device).type == "cuda" else "cpu-interpreter"
    slug = gpu.replace("NVIDIA ", "").replace(" ", "-").lower()
    configs = None
    if args.grid:
        return _run_grid_and_losses(args, gpu, slug)
    if args.sweep or args.tune:
        rows = run_sweep(args)
        print(format_table(rows))
        configs = best_configs(rows)
        write_results(args.out, f"losses-triton-sweep-{slug}{args.tag}", {"gpu": gpu, "rows": rows, "best": configs})
        if not args.tune:
            return 0
        from batchlab.losses.triton import _launch

        _launch.CONFIGS.update(configs)
        print("tuned configs:", configs, flush=True)
    from batchlab.losses.triton import _launch

    if args.configs:
        load_configs(args.configs)
    configs = {key: dict(val) for key, val in _launch.CONFIGS.items()}
    name = f"losses-triton-{slug}{args.tag}"

    def checkpoint(rows):
        write_results(args.out, name, {"gpu": gpu, "dim": args.dim, "dtype": args.dtype, "rows": rows,
                                       "partial": True, "triton_configs": configs})

    rows = run_benchmark(args, checkpoint)
    columns = ["method", "N", "ms", "peak_gib", "beyond_grads_gib", "tflops_vs_floor", "ratio_to_triton_info_nce",
               "status"]
    print(format_table(rows, columns))
    write_results(args.out, name, {"gpu": gpu, "dim": args.dim, "dtype": args.dtype, "rows": rows,
                                   "floor_flops": "8 N^2 d", "triton_configs": configs,
                                   "logit_scale": 1 / 0.07})
    series_t, series_m = {}, {}
    for r in rows:
        if r.get("ms"):
            series_t.setdefault(r["method"], ([], []))
            series_t[r["method"]][0].append(r["N"])
            series_t[r["method"]][1].append(r["ms"])
            series_m.setdefault(r["method"], ([], []))
            series_m[r["method"]][0].append(r["N"])
            series_m[r["method"]][1].append(r["peak_gib"])
    plot_series(Path(args.out) / f"{name}-time.png", series_t, xlabel="N (= M)", ylabel="ms, forward + backward",
                title=f"Contrastive losses, d={args.dim}, {args.dtype}, {gpu}")
    plot_series(Path(args.out) / f"{name}-memory.png", series_m, xlabel="N (= M)", ylabel="peak GiB above inputs",
                title=f"Loss memory, d={args.dim}, {args.dtype}, {gpu}")
    return 0


def _run_grid_and_losses(args, gpu, slug) -> int:
    """--grid: the variant grid, then fwd+bwd of info_nce and siglip with the default and the best variants."""
    from batchlab.losses.triton import _launch

    name = f"losses-triton-grid-{slug}{args.tag}"
    default = {key: dict(val) for key, val in _launch.CONFIGS.items()}
    rows = run_grid(args)
    if args.grid_compile_only:
        return 0
    best = grid_best(rows, max(args.grid_sizes))
    print("best at N =", max(args.grid_sizes), ":", best, flush=True)
    payload = {"gpu": gpu, "dim": args.dim, "dtype": args.dtype, "grid": rows, "best": best, "default": default,
               "floor_flops": "8 N^2 d"}
    write_results(args.out, name, payload)
    loss_rows = []
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    for label, cfgs in (("default", default), ("best", {**default, **best})):
        _launch.CONFIGS.update({key: dict(val) for key, val in cfgs.items()})
        for n in args.grid_losses_sizes:
            for loss in args.losses:
                row = _measure(f"batchlab triton {loss} ({label})",
                               lambda q, k, s, b, loss=loss: _batchlab_step(loss, q, k, s, b), n, args, gen)
                loss_rows.append(row)
                print(format_table([row]), flush=True)
        payload["losses"] = loss_rows
        write_results(args.out, name, payload)
    _launch.CONFIGS.update(default)
    return 0


def main(argv=None) -> int:
    from batchlab.bench._common import script_main

    return script_main("batchlab.bench.losses_triton", __doc__, add_arguments, run,
                       argv)


if __name__ == "__main__":
    raise SystemExit(main())
