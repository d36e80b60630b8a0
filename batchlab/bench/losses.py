"""Benchmark: time and peak memory of the losses vs N -- reference, tiled, open_clip (and Triton).

Forward + backward (``torch.autograd.grad`` over q, k, scale[, bias]) of the symmetric
CLIP loss (``info_nce``) and of SigLIP, on fresh random unit-norm inputs:

* ``batchlab reference`` -- the exact loss that materialises the N x N logits;
* ``batchlab tiled`` -- the tiled engine (``impl="tiled"``);
* ``batchlab triton`` -- the Triton kernels, on CUDA when they are installed;
* anchors measured in the same run: open_clip ``ClipLoss`` / ``SigLipLoss`` (imported
  lazily; rows say "not installed" where open_clip is missing).

Peak memory ("extra"): on CUDA, ``torch.cuda.max_memory_allocated`` above what was
allocated before the call (the inputs), and "beyond grads" = that minus the bytes of
the q and k gradients. On the CPU, the peak resident set size of the process during
the call (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, after
``malloc_trim``) above the resident size before it: every page the call touched,
including the allocator's slack, so small values (< a few MiB) are noise.

Above ``--single-run-above`` each method runs once (that run gives both time and
memory); below, one run for memory (which doubles as warm-up) then ``--repeats`` timed
runs (median).

    python -m batchlab.bench.losses                       # CPU, N up to 16,384, d=256 (~2 min)
    python -m batchlab.bench.losses --reference-max-n 16384 --anchor-max-n 16384  # the committed CPU file
    python -m batchlab.bench.losses --device cuda --check # GPU, N up to 1,048,576, d=512, bf16
    # (the committed H100 file: this command with open_clip installed from carried wheels, 128 s)
    # the per-call overhead sweep (benchmarks/results/losses-h200-overhead/README.md has the exact command):
    batchlab bench losses --device cuda --sizes 256,1024,4096,8192,16384,32768,65536,262144,1048576 \
        --methods "batchlab auto" "batchlab reference" open_clip --repeats 30
    # small and middle N at both widths (benchmarks/results/losses-h200-small/README.md):
    batchlab bench losses --device cuda --sizes 256,1024,4096,8192,16384 --dim 512 768 \
        --methods "batchlab auto" open_clip --repeats 30
    batchlab bench losses --replot results/bench/losses-h200.json   # redraw the log-log plots

On CUDA each row also reports ``launches`` (kernel and memset events per call, from
torch.profiler), ``syncs`` (host-device synchronisations per call, counted with
``torch.cuda.set_sync_debug_mode("warn")``) and ``host_ms`` (host time per call with ten calls
queued back to back: the per-call host work where it, not the GPU, is the limit), up to
``--count-max-n``. Plots: time and peak memory vs N, log-log, one line per implementation,
one pair per ``--dim``.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from batchlab._argtypes import device as device_arg
from batchlab._argtypes import positive_int, positive_int_list
from batchlab.bench._common import device_name, format_table, peak_and_time, plot_series, synchronize, write_results

log = logging.getLogger(__name__)

NAME = "losses"
CPU_SIZES = [1024, 4096, 8192, 16384]
CUDA_SIZES = [8192, 32768, 65536, 131072, 262144, 1048576]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench", help="results directory")
    parser.add_argument("--sizes", type=positive_int_list, nargs="+", default=None,
                        help=f"batch sizes N (= M), space- or comma-separated (--sizes 256,1024,4096); "
                             f"default {CPU_SIZES} on cpu, {CUDA_SIZES} on cuda")
    parser.add_argument("--dim", type=positive_int, nargs="+", default=None,
                        help="embedding dimension(s), e.g. --dim 512 768 (default 256 cpu, 512 cuda)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="input dtype (default float32 cpu, bfloat16 cuda)")
    parser.add_argument("--families", nargs="+", default=["info_nce", "siglip"], choices=["info_nce", "siglip"])
    parser.add_argument("--tile-size", type=int, nargs="+", default=None, help="tiled engine tile (rows [cols])")
    parser.add_argument("--reference-max-n", type=int, default=None,
                        help="largest N for the reference (default 8192 cpu, 32768 cuda: its fp32 N x N "
                             "logits take 8 GiB of a shared machine's memory at 16,384)")
    parser.add_argument("--anchor-max-n", type=int, default=None,
                        help="largest N for open_clip (default 8192 cpu, 65536 cuda: 32 GiB there)")
    parser.add_argument("--siglip-max-n", type=int, default=None,
                        help="largest N for the SigLIP rows (default 4096 cpu, 262144 cuda)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--single-run-above", type=int, default=None,
                        help="above this N run each method once (default 4096 cpu, 131072 cuda)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1: the CPU is shared)")
    parser.add_argument("--check", action="store_true",
                        help="first compare tiled against the reference (values and gradients) on this device")
    parser.add_argument("--tag", default="", help="suffix for the results file names")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        help="what to measure (default: all that run on the device)")
    parser.add_argument("--replot", default=None, metavar="JSON",
                        help="only redraw the plots of a results file written by this benchmark (next to it)")
    parser.add_argument("--count-max-n", type=positive_int, default=65536,
                        help="largest N at which kernel launches and host syncs per call are counted "
                             "(two extra profiled calls each)")


# ----------------------------------------------------------------------------- memory


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _cpu_peak_call(fn) -> tuple[float, int | None]:
    """(seconds, peak extra bytes) of ``fn()``: VmHWM after a reset, above VmRSS before."""
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) of this process
        before = _status_kib("VmRSS")
    except OSError:
        before = None
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    if before is None:
        return seconds, None
    return seconds, (_status_kib("VmHWM") - before) * 1024


def _timed(fn, device) -> float:
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- methods


def _batchlab_step(family: str, impl: str, tile):
    from batchlab.losses import info_nce, siglip

    options = {"tile_size": tile} if impl == "tiled" and tile else {}

    def step(q, k, scale, bias):
        if family == "info_nce":
            return torch.autograd.grad(info_nce(q, k, scale, impl=impl, **options), [q, k, scale])
        return torch.autograd.grad(siglip(q, k, scale, bias, impl=impl, **options), [q, k, scale, bias])

    return step


def _open_clip_step(family: str):
    """open_clip's loss as a step, or None when open_clip is not installed (the GPU image)."""
    try:
        from open_clip.loss import ClipLoss, SigLipLoss
    except ImportError:
        return None
    if family == "info_nce":
        loss_fn = ClipLoss()
        return lambda q, k, scale, bias: torch.autograd.grad(loss_fn(q, k, scale), [q, k, scale])
    loss_fn = SigLipLoss()
    return lambda q, k, scale, bias: torch.autograd.grad(loss_fn(q, k, scale, bias), [q, k, scale, bias])


#: Every method the benchmark knows, by label: (impl or "open_clip", runs on the CPU).
METHODS = {
    "batchlab auto": ("auto", True),
    "batchlab reference": ("reference", True),
    "batchlab tiled": ("tiled", True),
    "batchlab triton": ("triton", False),
    "open_clip": ("open_clip", True),
}


def _methods(family: str, device: torch.device, tile, chosen=None) -> dict:
    from batchlab.losses import available_impls

    methods = {}
    for label, (impl, on_cpu) in METHODS.items():
        if chosen is not None and label not in chosen:
            continue
        if chosen is None and label == "batchlab auto" and device.type != "cuda":
            continue  # on the CPU auto is the reference or the tiled engine, both measured
        if impl == "open_clip":
            methods[label] = _open_clip_step(family)
        elif impl == "triton":
            if device.type == "cuda" and "triton" in available_impls(family):
                methods[label] = _batchlab_step(family, impl, tile)
        elif on_cpu or device.type == "cuda":
            methods[label] = _batchlab_step(family, impl, tile)
    return methods


#: What ``torch.cuda.set_sync_debug_mode("warn")`` says for each synchronising operation (c10/cuda).
SYNC_WARNING = "called a synchronizing CUDA operation"


def count_syncs(messages) -> int:
    """Host syncs among warning messages: torch's message for a synchronising call only, not the
    one-time "Synchronization debug mode is a prototype feature" notice that the first
    ``set_sync_debug_mode`` of a process prints (counted before: the first row measured in every
    process showed 0.5 syncs per call)."""
    return sum(SYNC_WARNING in message for message in messages)


def _launches_and_syncs(call, device: torch.device, calls: int = 2) -> tuple[float | None, float | None]:
    """Kernel launches (torch.profiler's CUDA kernel and memset events) and host syncs
    (``torch.cuda.set_sync_debug_mode("warn")`` warnings) per call, on CUDA; (None, None) elsewhere."""
    if device.type != "cuda":
        return None, None
    import warnings

    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                call()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = count_syncs(str(w.message) for w in caught)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        synchronize(device)
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and "memcpy" not in e.name.lower())
    return kernels / calls, syncs / calls


# ----------------------------------------------------------------------------- measuring


def _unit(n, d, dtype, device, gen):
    return F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1).to(dtype)


def _host_ms(call, device, calls: int = 10) -> float:
    """Host time per call with ``calls`` calls queued back to back (no synchronisation between them):
    the per-call host work when it, not the GPU, is the limit (small N); the GPU time otherwise."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    seconds = (time.perf_counter() - start) / calls
    synchronize(device)
    return seconds * 1e3


def _measure(family, label, step, n, args, gen, dim=None) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    dim = dim or args.dim[0]
    row = {"family": family, "method": label, "N": n, "d": dim, "dtype": args.dtype}
    if step is None:
        return {**row, "status": "not installed"}
    q = _unit(n, dim, dtype, device, gen).requires_grad_()
    k = _unit(n, dim, dtype, device, gen).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    call = lambda: step(q, k, scale, bias)  # noqa: E731
    try:
        if device.type == "cuda":
            first, peak, _ = peak_and_time(call, device)
        else:
            first, peak = _cpu_peak_call(call)
        times = [first]
        if n <= args.single_run_above:
            times = [_timed(call, device) for _ in range(args.repeats)]
        launches, syncs = _launches_and_syncs(call, device) if n <= args.count_max_n else (None, None)
        host = _host_ms(call, device) if device.type == "cuda" and n <= args.count_max_n else None
    except torch.cuda.OutOfMemoryError:
        return {**row, "status": "out of memory"}
    finally:
        if device.type == "cuda":
            q = k = None
            torch.cuda.empty_cache()
    grads = 2 * n * dim * torch.empty(0, dtype=dtype).element_size()
    median = statistics.median(times)
    return {
        **row,
        "ms": median * 1e3,
        "host_ms": host,
        "runs": len(times),
        "launches": launches,
        "syncs": syncs,
        "peak_extra_mib": None if peak is None else peak / 2**20,
        "beyond_grads_mib": None if peak is None else (peak - grads) / 2**20,
        "status": "ok",
    }


def _check(args) -> list[dict]:
    """Relative error ||tiled - reference|| / ||reference|| of the loss and every gradient."""
    from batchlab.losses import dcl, info_nce, nt_xent, siglip

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    n, d = 4096 if device.type == "cuda" else 512, args.dim[0]
    tile = {"tile_size": args.tile}
    perm = torch.randperm(n, device=device, generator=gen)
    extra = F.normalize(torch.randn(n, 4, d, device=device, generator=gen), dim=-1).to(dtype)
    pairs = torch.randint(0, n, (4 * n, 2), device=device, generator=gen)
    pairs = pairs[pairs[:, 1] != perm[pairs[:, 0]]]
    cases = {
        "info_nce targets+extra+neg_mask": lambda q, k, s, b, e, **o: info_nce(
            q, k, s, targets=perm, extra_negatives=e, neg_mask=pairs, **o),
        "siglip": lambda q, k, s, b, e, **o: siglip(q, k, s, b, **o),
        "dclw": lambda q, k, s, b, e, **o: dcl(q, k, s, weighted=True, **o),
        "nt_xent 3 views": lambda q, k, s, b, e, **o: nt_xent(torch.stack([q, k, e[:, 0]]), s, **o),
    }
    rows = []
    for name, fn in cases.items():
        inputs = [_unit(n, d, dtype, device, gen), _unit(n, d, dtype, device, gen),
                  torch.tensor(1 / 0.07, device=device), torch.tensor(-10.0, device=device), extra]
        results = {}
        for impl in ("reference", "tiled"):
            leaves = [x.detach().clone().requires_grad_() for x in inputs]
            loss = fn(*leaves, impl=impl, **(tile if impl == "tiled" else {}))
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            results[impl] = [loss] + [g for g in grads if g is not None]
        err = max(float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))
                  for a, b in zip(results["tiled"], results["reference"]))
        rows.append({"check": name, "N": n, "d": d, "dtype": args.dtype, "max_rel_err": err})
        print(format_table([rows[-1]]), flush=True)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    by_key = {(r["family"], r["N"], r.get("d"), r["method"]): r.get("ms") for r in rows}
    for r in rows:
        if not r.get("ms"):
            continue
        for anchor, col in (("batchlab reference", "x_reference"), ("open_clip", "x_open_clip")):
            base = by_key.get((r["family"], r["N"], r.get("d"), anchor))
            r[col] = r["ms"] / base if base else None


def plot_results(rows: list[dict], out: str | Path, name: str, dtype: str, gpu: str) -> list[Path]:
    """Log-log plots of time and peak memory vs N, one line per (family, method), one pair per d."""
    paths = []
    for dim in sorted({r.get("d") for r in rows if r.get("d")}):
        for metric, ylabel in (("ms", "forward + backward (ms)"), ("peak_extra_mib", "peak extra memory (MiB)")):
            series: dict = {}
            for r in rows:
                if r.get("d") == dim and r.get(metric):
                    xs, ys = series.setdefault(f"{r['family']}: {r['method']}", ([], []))
                    xs.append(r["N"])
                    ys.append(r[metric])
            if series:
                path = Path(out) / f"{name}-d{dim}-{'time' if metric == 'ms' else 'memory'}.png"
                plot_series(path, series, xlabel="N (= M)", ylabel=ylabel,
                            title=f"losses, d={dim} {dtype}, {gpu}")
                paths.append(path)
    return paths


def replot(path: str | Path) -> int:
    """Redraw the plots of a results file (``--replot``), next to it."""
    import json

    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # missing, unreadable, not JSON
        print(f"batchlab bench losses --replot: cannot read {path} ({type(error).__name__}: {error})", file=sys.stderr)
        return 2
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        print(f"batchlab bench losses --replot: {path} is not a results file of this benchmark (no rows)",
              file=sys.stderr)
        return 2
    args = payload.get("args", {})
    for plot in plot_results(payload["rows"], path.parent, path.stem, args.get("dtype", ""), payload.get("device", "")):
        print(f"wrote {plot}")
    return 0


def run(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    if args.replot:
        return replot(args.replot)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.sizes = sorted({n for group in args.sizes for n in group}) if args.sizes else (
        CUDA_SIZES if cuda else CPU_SIZES)
    args.dim = args.dim or [512 if cuda else 256]
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.reference_max_n = args.reference_max_n or (32768 if cuda else 8192)
    args.anchor_max_n = args.anchor_max_n or (65536 if cuda else 8192)
    args.siglip_max_n = args.siglip_max_n or (262144 if cuda else 4096)
    args.single_run_above = args.single_run_above or (131072 if cuda else 4096)
    torch.set_num_threads(args.threads)
    tile = args.tile = tuple(args.tile_size) if args.tile_size and len(args.tile_size) == 2 else (
        args.tile_size[0] if args.tile_size else None)
    checks = _check(args) if args.check else []
    gen = torch.Generator(device=device).manual_seed(args.seed)
    gpu = device_name(device)
    slug = gpu.replace("NVIDIA ", "").replace(" ", "-").lower() if cuda else "cpu"
    name = f"{NAME}-{slug}{args.tag}"
    payload = {"device": gpu, "args": vars(args), "checks": checks,
               "memory_method": "cuda: max_memory_allocated above the start" if cuda else
               "cpu: VmHWM (reset via /proc/self/clear_refs) above VmRSS before the call"}
    rows: list[dict] = []
    failed: set[tuple[str, str, int]] = set()
    methods = {family: _methods(family, device, tile, args.methods) for family in args.families}
    # dimension by dimension, size by size (largest last), so an interrupted run still leaves every smaller size
    for dim in args.dim:
        for n in sorted(args.sizes):
            for family in args.families:
                if family == "siglip" and n > args.siglip_max_n:
                    continue
                for label, step in methods[family].items():
                    limit = {"batchlab reference": args.reference_max_n, "open_clip": args.anchor_max_n}.get(label, n)
                    if n > limit or (family, label, dim) in failed:
                        continue
                    try:
                        row = _measure(family, label, step, n, args, gen, dim)
                    except Exception as exc:  # noqa: BLE001 - a failing method is a result; keep measuring the rest
                        row = {"family": family, "method": label, "N": n, "d": dim, "status": f"error: {exc!r}"[:200]}
                    rows.append(row)
                    print(format_table([row]), flush=True)
                    if row["status"] != "ok":  # a larger N will not fit (or install) either
                        failed.add((family, label, dim))
                    _add_ratios(rows)
                    write_results(args.out, name, {**payload, "rows": rows})
    columns = ["family", "method", "N", "d", "dtype", "ms", "host_ms", "runs", "launches", "syncs", "peak_extra_mib",
               "beyond_grads_mib", "x_reference", "x_open_clip", "status"]
    print(f"\n{gpu}; torch {torch.__version__}; forward+backward; tile {tile or 'default'}")
    print(format_table(rows, columns))
    path = write_results(args.out, name, {**payload, "rows": rows})
    plot_results(rows, args.out, name, args.dtype, gpu)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    from batchlab.bench._common import script_main

    return script_main("batchlab.bench.losses", __doc__, add_arguments, run,
                       argv)


if __name__ == "__main__":
    raise SystemExit(main())
