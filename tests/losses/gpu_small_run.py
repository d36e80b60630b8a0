"""Issue 21 at small and middle N, in one GPU call (run on a CUDA machine; not collected by pytest).

    OUT=dir python tests/losses/gpu_small_run.py

In order (each part writes ``$OUT/small.json`` as it finishes, so a call cut short still returns
what ran):

1. **variants** of the small-batch path, each checked against the fp32 reference (loss and
   gradients) and timed with open_clip in the same process, N = 256, 4,096, 16,384, d = 512, bf16,
   forward + backward: ``old`` = custom ops + Triton's ``kernel[grid]`` launch (the previous
   design), ``function`` = eager autograd function + Triton's launch, ``direct`` = eager autograd
   function + compiled kernels launched directly. ``ms``: one call between CUDA events (median of
   30, as ``batchlab bench losses``); ``host_ms``: host time per call with 30 calls queued back to back.
   The fastest correct variant at N <= 4,096 becomes the setting for everything below.
1b. **forward**: the CLIP forward's two schemes over the fp32 product (one kernel sweeping rows and
   columns; per-tile partials on a 2-D grid + merge), the tiled one checked against the reference,
   both timed at N = 4,096 ... 16,384: the tiled scheme is used from the smallest N where it wins
   (by 3%) at that and every larger size.
2. ``batchlab bench losses`` at d = 512 and 768 (auto and open_clip), N = 256 ... 16,384;
3. ``tests/losses/gpu_check_overhead.py --quick`` (no host sync, torch.compile fullgraph and CUDA
   graph replay for info_nce, siglip and dcl);
4. (if time is left) **profile**: cProfile of 200 calls (N = 256, info_nce), the chosen variant and
   ``old``; host cost of single operations on this machine (an allocation, a product, a sum, a launch);
5. (if time is left) **crossover**: the small-batch (dense) path against the streaming kernels at
   N = 16,384 and 32,768.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from batchlab.losses import info_nce, siglip  # noqa: E402
from batchlab.losses.triton import _dense  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/gpu_small"))
TAG = os.environ.get("GPU_SMALL_TAG", "")
T0 = time.time()
RESULTS: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
VARIANTS = {"old": (False, False), "function": (True, False), "direct": (True, True)}


def save(key, value):
    RESULTS[key] = value
    RESULTS["elapsed_s"] = round(time.time() - T0, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"small{TAG}.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def say(*args):
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def use_variant(name):
    _dense.EAGER_FUNCTION, _dense.DIRECT_LAUNCH = VARIANTS[name]


def leaves(n, d, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).to(dtype).requires_grad_()
    s = torch.tensor(1 / 0.07, device="cuda", requires_grad=True)
    b = torch.tensor(-10.0, device="cuda", requires_grad=True)
    return q, k, s, b


def batchlab_step(family, q, k, s, b, impl="auto"):
    if family == "info_nce":
        return lambda: torch.autograd.grad(info_nce(q, k, s, impl=impl), [q, k, s])
    return lambda: torch.autograd.grad(siglip(q, k, s, b, impl=impl), [q, k, s, b])


def open_clip_step(family, q, k, s, b):
    from open_clip.loss import ClipLoss, SigLipLoss

    if family == "info_nce":
        fn = ClipLoss()
        return lambda: torch.autograd.grad(fn(q, k, s), [q, k, s])
    fn = SigLipLoss()
    return lambda: torch.autograd.grad(fn(q, k, s, b), [q, k, s, b])


def timed(call, reps=30):
    """(median ms of one call between events, host ms per call with ``reps`` calls queued):
    ``batchlab bench losses``'s measures, after one warm-up call."""
    from batchlab.bench.losses import _host_ms, _timed

    call()
    torch.cuda.synchronize()
    ms = statistics.median(_timed(call, "cuda") for _ in range(reps)) * 1e3
    return ms, _host_ms(call, "cuda", calls=reps)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-3))


def check(family, n, d=512):
    """Max relative error of the loss and the gradients against the fp32 reference; the batchlab
    forward + backward runs under ``set_sync_debug_mode("error")`` (a host sync raises)."""
    q, k, s, b = leaves(n, d, seed=n + 1)
    batchlab_step(family, q, k, s, b)()  # first use: compiles (may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = batchlab_step(family, q, k, s, b)()
        loss = info_nce(q, k, s) if family == "info_nce" else siglip(q, k, s, b)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, s, b)]
    rq, rk, rs, rb = ref_leaves
    ref = info_nce(rq, rk, rs, impl="reference") if family == "info_nce" else siglip(rq, rk, rs, rb, impl="reference")
    ref_g = torch.autograd.grad(ref, ref_leaves[: len(out)])
    return rel(loss, ref), max(rel(g, r) for g, r in zip(out, ref_g))


def part_variants(sizes):
    rows = []
    for name in VARIANTS:
        use_variant(name)
        for family in ("info_nce", "siglip"):
            for n in (256, 4096):
                loss_err, grad_err = check(family, n)
                ok = loss_err < 1e-4 and grad_err < 2e-2
                rows.append(dict(part="check", variant=name, family=family, N=n, loss_err=loss_err,
                                 grad_err=grad_err, ok=ok))
                say("check", name, family, n, f"{loss_err:.2e} {grad_err:.2e}", "ok" if ok else "FAILED")
    save("variants", rows)
    for n in sizes:
        for family in ("info_nce", "siglip"):
            q, k, s, b = leaves(n, 512)
            for name in [*VARIANTS, "open_clip"]:
                if name == "open_clip":
                    call = open_clip_step(family, q, k, s, b)
                else:
                    use_variant(name)
                    call = batchlab_step(family, q, k, s, b)
                ms, host = timed(call)
                rows.append(dict(part="time", variant=name, family=family, N=n, d=512, ms=ms, host_ms=host))
                say("time", family, n, name, f"{ms:.3f} ms (host {host:.3f})")
            save("variants", rows)
            del q, k
    return rows


def choose(rows):
    ok = {r["variant"] for r in rows if r["part"] == "check"} - {
        r["variant"] for r in rows if r["part"] == "check" and not r["ok"]}
    score = {name: sum(r["ms"] for r in rows if r["part"] == "time" and r["variant"] == name and r["N"] <= 4096)
             for name in VARIANTS if name in ok}
    best = min(score, key=score.get) if score else "old"
    say("chosen variant:", best, score)
    return best


def part_forward(sizes=(4096, 8192, 16384)):
    """The CLIP forward's two kernels schemes: checked (tiled) and timed; sets the threshold."""
    rows = []
    _dense.TILED_STATS_MIN_LOGITS = 0
    for n in (256, 4096, 16384):
        loss_err, grad_err = check("info_nce", n)
        ok = loss_err < 1e-4 and grad_err < 2e-2
        rows.append(dict(part="check", forward="tiled", N=n, loss_err=loss_err, grad_err=grad_err, ok=ok))
        say("check tiled forward", n, f"{loss_err:.2e} {grad_err:.2e}", "ok" if ok else "FAILED")
    save("forward", rows)
    # the tile kernel's shape: a few candidates at the largest size
    q, k, s, b = leaves(max(sizes), 512)
    call = batchlab_step("info_nce", q, k, s, b)
    best = None
    for blocks, warps in (((128, 128, 128, 32), 8), ((64, 128, 128, 32), 4), ((64, 256, 128, 32), 8)):
        _dense._TILED_BLOCKS, _dense._TILED_WARPS = blocks, warps
        ms, _ = timed(call, reps=10)
        rows.append(dict(part="tile shape", blocks=blocks, warps=warps, N=max(sizes), ms=ms))
        say("tile shape", blocks, warps, f"{ms:.3f} ms")
        if best is None or ms < best[0]:
            best = (ms, blocks, warps)
    _dense._TILED_BLOCKS, _dense._TILED_WARPS = best[1], best[2]
    save("tiled_shape", best)
    del q, k
    for n in sizes:
        q, k, s, b = leaves(n, 512)
        for name, limit in (("one-kernel", 2**62), ("tiled", 0), ("open_clip", None)):
            if limit is None:
                call = open_clip_step("info_nce", q, k, s, b)
            else:
                _dense.TILED_STATS_MIN_LOGITS = limit
                call = batchlab_step("info_nce", q, k, s, b)
            ms, host = timed(call)
            rows.append(dict(part="time", forward=name, N=n, d=512, ms=ms, host_ms=host))
            say("forward", n, name, f"{ms:.3f} ms (host {host:.3f})")
        save("forward", rows)
        del q, k
    times = {(r["forward"], r["N"]): r["ms"] for r in rows if r["part"] == "time"}
    threshold = 2**62
    if all(r["ok"] for r in rows if r["part"] == "check"):
        for n in sorted(sizes, reverse=True):  # the smallest N from which on tiled wins at every size
            if times[("tiled", n)] < 0.97 * times[("one-kernel", n)]:
                threshold = n * n
            else:
                break
    _dense.TILED_STATS_MIN_LOGITS = threshold
    say("tiled forward from", threshold, "logits")
    save("tiled_stats_min_logits", threshold)
    return rows


def part_crossover():
    rows = []
    default = _dense.DENSE_MAX_LOGITS
    try:
        for n in (16384, 32768):
            for family in ("info_nce", "siglip"):
                q, k, s, b = leaves(n, 512)
                for path, limit in (("dense", n * n), ("streaming", 0)):
                    _dense.DENSE_MAX_LOGITS = limit
                    call = batchlab_step(family, q, k, s, b)
                    call()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    ms, host = timed(call, reps=10)
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                    rows.append(dict(part="crossover", family=family, N=n, path=path, ms=ms, host_ms=host,
                                     peak_extra_mib=peak))
                    say("crossover", family, n, path, f"{ms:.3f} ms, peak +{peak:.0f} MiB")
                save("crossover", rows)
                del q, k
    finally:
        _dense.DENSE_MAX_LOGITS = default
    return rows


def part_profile(best):
    text = io.StringIO()
    for name in dict.fromkeys([best, "old"]):
        use_variant(name)
        q, k, s, b = leaves(256, 512)
        call = batchlab_step("info_nce", q, k, s, b)
        for _ in range(20):
            call()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            call()
        torch.cuda.synchronize()
        prof.disable()
        text.write(f"\n===== variant {name}: info_nce N=256 d=512, 200 calls =====\n")
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    use_variant(best)
    # host cost of single operations here (no profiler): us per call, 2000 calls queued
    q, k, s, _ = (x.detach() for x in leaves(256, 512))
    kt = k.t()
    x = torch.randn(1024, device="cuda")
    ops = {
        "torch.empty(1024)": lambda: torch.empty(1024, device="cuda"),
        "x.sum()": lambda: x.sum(),
        "torch.mm 256x512x256": lambda: torch.mm(q, kt),
        "aten.mm.dtype fp32 out": lambda: torch.ops.aten.mm.dtype(q, kt, torch.float32),
    }

    def clip_forward(direct):
        _dense.DIRECT_LAUNCH = direct
        return _dense._clip_forward(q, k, s, None, True, 0)

    ops["clip forward (mm + lse kernel + sum), triton launch"] = lambda: clip_forward(False)
    ops["clip forward (mm + lse kernel + sum), direct launch"] = lambda: clip_forward(True)
    costs = {}
    for name, fn in ops.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(2000):
            fn()
        costs[name] = (time.perf_counter() - t) / 2000 * 1e6
        torch.cuda.synchronize()
        say(f"host us/call {costs[name]:8.1f}  {name}")
    use_variant(best)
    (OUT / "small.log").parent.mkdir(parents=True, exist_ok=True)
    print(text.getvalue(), flush=True)
    save("host_us_per_op", costs)
    save("cprofile", text.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="256,1024,4096,8192,16384", help="benchmark sizes")
    parser.add_argument("--variant-sizes", default="256,4096,16384")
    parser.add_argument("--skip", nargs="*", default=[], choices=["variants", "forward", "crossover", "profile",
                                                                  "bench", "check"])
    parser.add_argument("--late-parts-before", type=float, default=90.0,
                        help="start the GPU checks, the profile and the crossover only before this many seconds")
    args = parser.parse_args()
    best = "direct"
    if "variants" not in args.skip:
        best = choose(part_variants([int(x) for x in args.variant_sizes.split(",")]))
    use_variant(best)
    save("chosen_variant", best)
    if "forward" not in args.skip:
        part_forward()
    if "bench" not in args.skip:
        from batchlab.bench import losses as bench

        say("bench")
        bench.main(["--device", "cuda", "--sizes", args.sizes, "--dim", "512", "768", "--methods", "batchlab auto",
                    "open_clip", "--repeats", "30", "--out", str(OUT), "--tag=-small"])
        for png in OUT.glob("*.png"):  # redrawn from the JSON (--replot): at most 8 files come back
            png.unlink()
    if "check" not in args.skip and time.time() - T0 < args.late_parts_before:
        say("gpu checks")
        sys.argv = ["gpu_check_overhead.py", "--quick", "--out", str(OUT)]
        from tests.losses import gpu_check_overhead

        save("gpu_check_rc", gpu_check_overhead.main())
    if "profile" not in args.skip and time.time() - T0 < args.late_parts_before:
        part_profile(best)
    if "crossover" not in args.skip and time.time() - T0 < args.late_parts_before:
        part_crossover()
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
