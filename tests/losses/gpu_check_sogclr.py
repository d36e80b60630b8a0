"""GPU check and benchmark of SogCLR / iSogCLR ``impl="triton"`` in one process (not collected by pytest).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 tests/losses/gpu_check_sogclr.py --out DIR

1. a short sweep of the forward and backward tile shapes at N = 65,536 (bf16, d = 512) through the
   modules' steps (SogCLRLoss: the one-temperature forward "fwd_one"; ISogCLRLoss: per-row
   temperatures "fwd"; the backward "bwd"), whose best shapes the rest of the run uses (written to
   DIR/sweep.json);
2. ``batchlab bench sogclr --device cuda`` in this process: SogCLR / iSogCLR Triton against InfoNCE
   (auto) at N = 4,096 and 65,536 (median of 20), then its ``--check``: the float64-reference check of
   every mode, dtype and temperature kind (tiled and Triton; DIR/checks.json);
3. extra checks: Triton against tiled at N = 16,384 (several backward panels), the chunked column
   partials against one chunk, one SogCLR and one iSogCLR module step under
   ``set_sync_debug_mode("error")`` and the fused state update against the tiled module's, CUDA
   kernel launches per step at N = 4,096 (torch.profiler), and SogCLRLoss at N = 65,536 on clustered
   embeddings (tiles mixing cos ~0.9 pairs with rows whose best is ~0.1 at tau = 0.01: the forward's
   one-exponential loop hands programs to the per-row loop) against random ones.

Exit status 1 if a check fails. ``--dry-run``: tiny sizes on the CPU in Triton's interpreter.
``--quick`` (the second run, at most ~75 s): the forward's two options (one-temperature loop on/off on
random and clustered embeddings; paired or separate weighted-sum reductions), the benchmark (median
of 10), SogCLR / iSogCLR / InfoNCE on clustered embeddings at 65,536, and a bf16 float64 check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FWD_ONE = [dict(BM=128, BN=64, BD=64, num_warps=4, num_stages=3), dict(BM=128, BN=64, BD=64, num_warps=8, num_stages=3),
           dict(BM=128, BN=128, BD=64, num_warps=8, num_stages=3)]
FWD = [dict(BM=128, BN=64, BD=64, num_warps=4, num_stages=3), dict(BM=128, BN=64, BD=64, num_warps=8, num_stages=3)]
BWD = [dict(BM=128, BN=128, BD=64, num_warps=4, num_stages=3), dict(BM=128, BN=64, BD=64, num_warps=4, num_stages=3)]


def _ms(fn, device, repeats=5):
    fn()
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def sweep(device, n, dim, out):
    from batchlab.losses import ISogCLRLoss, SogCLRLoss
    from batchlab.losses.triton import _sogclr

    gen = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(n, dim, generator=gen), dim=1).to(device, torch.bfloat16).requires_grad_(True)
            for _ in range(2))
    ids = torch.arange(n, device=device)
    sog, isog = SogCLRLoss(n).to(device), ISogCLRLoss(n).to(device)

    def fwd(loss_fn):
        def run():
            with torch.no_grad():
                loss_fn(q, k, ids)
        return run

    def step():
        torch.autograd.grad(sog(q, k, ids), [q, k])

    rows = []

    def pick(kernel, configs, fn, label):
        """Time ``fn`` under each config of ``kernel``; keep the fastest in CONFIGS."""
        best, best_t = configs[0], float("inf")
        for cfg in configs:
            _sogclr.CONFIGS[kernel].update(cfg)
            try:
                t = _ms(fn, device)
            except Exception as exc:  # a shape that does not compile or fit is skipped
                rows.append({"kernel": kernel, **cfg, "error": repr(exc)[:300]})
                continue
            rows.append({"kernel": kernel, "timed": label, **cfg, "ms": t})
            print(f"sweep {kernel} {cfg}: {label} {t:.3f} ms", flush=True)
            if t < best_t:
                best, best_t = cfg, t
        _sogclr.CONFIGS[kernel].update(best)

    pick("fwd_one", FWD_ONE, fwd(sog), "SogCLRLoss forward")
    pick("fwd", FWD, fwd(isog), "ISogCLRLoss forward")
    pick("bwd", BWD, step, "SogCLRLoss forward+backward")
    result = {"n": n, "dim": dim, "rows": rows, "chosen": _sogclr.CONFIGS}
    with open(os.path.join(out, "sweep.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print("chosen configs:", _sogclr.CONFIGS, flush=True)


def _no_grad_call(loss_fn, q, k, ids):
    """A closure calling ``loss_fn(q, k, ids)`` without autograd (forward-only timings)."""
    def run():
        with torch.no_grad():
            loss_fn(q, k, ids)
    return run


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def first_step(device) -> int:
    """One SogCLRLoss and one ISogCLRLoss step at N = 4,096 with the kernels launched directly; if that
    raises, the rest of the run launches through Triton (``_dense.DIRECT_LAUNCH = False``) and says so."""
    from batchlab.losses import ISogCLRLoss, SogCLRLoss
    from batchlab.losses.triton import _dense

    q, k = (F.normalize(torch.randn(4096, 512, device=device), dim=1).bfloat16().requires_grad_(True)
            for _ in range(2))
    ids = torch.arange(4096, device=device)
    try:
        for cls in (SogCLRLoss, ISogCLRLoss):
            loss_fn = cls(4096).to(device)
            for _ in range(2):  # the second call takes the direct launch
                torch.autograd.grad(loss_fn(q, k, ids), [q, k])
        torch.cuda.synchronize()
        print(f"first steps: direct launch {'on' if _dense.DIRECT_LAUNCH else 'off'}, ok", flush=True)
        return 0
    except Exception:
        traceback.print_exc()
        _dense.DIRECT_LAUNCH = False
        print("first steps FAILED with the direct launch: the run continues with DIRECT_LAUNCH = False", flush=True)
        return 1


def _embeddings(n, dim, gen, clustered: bool, device):
    """Two (n, dim) bf16 unit batches that require grad (``batchlab.bench.sogclr.embeddings``)."""
    from batchlab.bench.sogclr import embeddings

    return [x.to(device, torch.bfloat16).requires_grad_(True) for x in embeddings(n, dim, gen, clustered=clustered)]


def quick(device, out, n=65536, dim=512) -> int:
    """The second GPU run: pick the forward options, time the steps, check correctness (see the docstring)."""
    from batchlab.bench import sogclr as bench
    from batchlab.losses import ISogCLRLoss, SogCLRLoss, info_nce
    from batchlab.losses.triton import _sogclr

    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    data = {"random": _embeddings(n, dim, gen, False, device), "clustered": _embeddings(n, dim, gen, True, device)}
    ids = torch.arange(n, device=device)
    rows = []

    def fwd(loss_fn, q, k):
        return _no_grad_call(loss_fn, q, k, ids)

    # 1. forward options at N = 65,536 (SogCLR: random + clustered; iSogCLR: random)
    best = {}
    for kernel, option, cls, kinds in (("fwd_one", "FAST", SogCLRLoss, ("random", "clustered")),
                                       ("fwd", "PAIR", ISogCLRLoss, ("random",))):
        times = {}
        for value in (1, 0):
            _sogclr.CONFIGS[kernel][option] = value
            loss_fn = cls(n).to(device)
            times[value] = 0.0
            for kind in kinds:
                t = _ms(fwd(loss_fn, *data[kind]), device)
                times[value] += t
                rows.append({"kernel": kernel, option: value, "data": kind, "forward_ms": t})
                print(f"sweep {kernel} {option}={value} {kind}: forward {t:.3f} ms", flush=True)
        best[kernel] = min(times, key=times.get)
        _sogclr.CONFIGS[kernel][option] = best[kernel]
    print(f"chosen configs: {_sogclr.CONFIGS} [{time.time() - t0:.0f} s]", flush=True)
    with open(os.path.join(out, "sweep.json"), "w") as fh:
        json.dump({"n": n, "dim": dim, "rows": rows, "chosen": _sogclr.CONFIGS}, fh, indent=1)
    # 2. the benchmark (what the target is about)
    small = 64 if dry_run() else 4096
    status = bench.main(["--device", str(device), "--sizes", f"{small},{n}", "--dim", str(dim), "--dtype", "bfloat16",
                         "--repeats", "10", "--out", out, "--methods", "info_nce auto", "sogclr triton",
                         "isogclr triton"])
    print(f"[{time.time() - t0:.0f} s] bench done", flush=True)
    # 3. forward + backward on clustered embeddings (data-dependent cost of the one-temperature loop)
    q, k = data["clustered"]
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    cost = {"info_nce auto": _ms(lambda: torch.autograd.grad(info_nce(q, k, scale), [q, k, scale]), device)}
    for name, cls in (("sogclr triton", SogCLRLoss), ("isogclr triton", ISogCLRLoss)):
        loss_fn = cls(n).to(device)
        cost[name] = _ms(lambda: torch.autograd.grad(loss_fn(q, k, ids), [q, k]), device)
    clustered = {m: {"ms": t, "x_info_nce": t / max(cost["info_nce auto"], 1e-9)} for m, t in cost.items()}
    print(f"clustered N={n}: " + ", ".join(f"{m} {v['ms']:.2f} ms ({v['x_info_nce']:.3f}x)"
                                            for m, v in clustered.items()), flush=True)
    del data, q, k
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # 4. correctness: bf16, every mode, per-example and float temperatures, against the float64 reference
    checks = bench.check(device, n=64 if dry_run() else 1500, dim=128, impls=["triton"], dtypes=(torch.bfloat16,),
                         tau_kinds=("per-example", "float 0.005"))
    passed = sum(c["pass"] for c in checks)
    print(f"checks: {passed} of {len(checks)} passed [{time.time() - t0:.0f} s]", flush=True)
    with open(os.path.join(out, "quick.json"), "w") as fh:
        json.dump({"clustered": clustered, "checks": checks, "sweep": rows}, fh, indent=1)
    return status | (0 if passed == len(checks) else 1)


def dry_run() -> bool:
    return "--dry-run" in sys.argv


def launch_counts(device, n, dim):
    """CUDA kernels per training step (forward + backward, one step after a warm-up), torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from batchlab.bench.sogclr import _step

    gen = torch.Generator().manual_seed(2)
    q, k = (F.normalize(torch.randn(n, dim, generator=gen), dim=1).to(device, torch.bfloat16).requires_grad_(True)
            for _ in range(2))
    counts = {}
    for method in ("info_nce auto", "sogclr triton", "isogclr triton"):
        step = _step(method, n, q, k)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
        counts[method] = {"kernels": len(kernels), "names": sorted(set(kernels))[:20]}
        print(f"launches per step at N={n}: {method}: {len(kernels)}", flush=True)
    return {"check": f"CUDA kernels per step at N={n} (informational)", "counts": counts, "pass": True}


def clustered_cost(device, n, dim, clusters=64):
    """SogCLRLoss (tau = 0.01) at N on clustered embeddings against random ones, forward + backward (median of 5)."""
    from batchlab.losses import SogCLRLoss

    from batchlab.bench.sogclr import embeddings

    gen = torch.Generator().manual_seed(3)
    data = {kind: embeddings(n, dim, gen, clustered=kind == "clustered", centres=clusters)
            for kind in ("random", "clustered")}
    row = {"check": f"SogCLRLoss at N={n}: clustered vs random embeddings (informational)", "pass": True}
    for name, (q, k) in data.items():
        q, k = (x.to(device, torch.bfloat16).requires_grad_(True) for x in (q, k))
        loss_fn = SogCLRLoss(n).to(device)
        ids = torch.arange(n, device=device)
        row[f"{name}_ms"] = _ms(lambda: torch.autograd.grad(loss_fn(q, k, ids), [q, k]), device)
        sims = (q[:256].float() @ k[:4096].float().T)
        row[f"{name}_cos_p1_p99"] = [float(sims.quantile(0.01)), float(sims.quantile(0.99))]
        print(f"SogCLRLoss N={n} {name}: {row[name + '_ms']:.2f} ms (cos 1%-99%: {row[name + '_cos_p1_p99']})",
              flush=True)
    return row


def sync_and_state(device, q, k) -> dict:
    """One SogCLR and one iSogCLR module step (fused: state read and written by the kernels) under
    ``set_sync_debug_mode("error")``, and the fused state update against the tiled module's."""
    from batchlab.losses import ISogCLRLoss, SogCLRLoss

    n = q.shape[0]
    # one module step of each loss (fused step: state read and written in the kernels) without a host sync
    ok = True
    for cls in (SogCLRLoss, ISogCLRLoss):
        opts = dict(tau=0.02, tau_min=0.005, tau_max=0.05, rho=1.0) if cls is ISogCLRLoss else dict(tau=0.02)
        loss_fn = cls(2 * n, **opts).to(device)
        ids = torch.randperm(2 * n, device=device)[:n]
        qq, kk = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
        torch.autograd.grad(loss_fn(qq, kk, ids), [qq, kk])  # warm-up (first-use probes may sync)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                torch.autograd.grad(loss_fn(qq, kk, ids), [qq, kk])
            except RuntimeError as exc:
                ok = False
                print("sync:", cls.__name__, exc)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    # the fused state update equals the tiled module's (PyTorch update)
    ref_fn = ISogCLRLoss(2 * n, tau=0.02, tau_min=0.005, tau_max=0.05, rho=1.0, impl="tiled").to(device)
    ref_fn.load_state_dict(loss_fn.state_dict())
    fused_fn = ISogCLRLoss(2 * n, tau=0.02, tau_min=0.005, tau_max=0.05, rho=1.0).to(device)
    fused_fn.load_state_dict(loss_fn.state_dict())
    ids2 = torch.randperm(2 * n, device=device)[:n]
    ref_fn(qq.detach(), kk.detach(), ids2)
    fused_fn(qq.detach(), kk.detach(), ids2)
    # relative to each buffer's largest entry; (-inf) - (-inf) (never seen, in both) is NaN: counted as equal
    state_err = max(float((fused_fn.state_dict()[name] - buf).nan_to_num(0.0).abs().max()
                          / buf.nan_to_num(0.0, neginf=0.0).abs().max().clamp_min(1e-30))
                    for name, buf in ref_fn.state_dict().items())
    return {"check": "module steps (SogCLR, iSogCLR): no host sync; fused update vs tiled", "sync_free": ok,
            "state_max_rel_diff": state_err, "pass": ok and state_err < 1e-4}


def extra_checks(device, big, dim):
    from batchlab.losses import sogclr
    from batchlab.losses.triton import _sogclr

    results = []
    gen = torch.Generator().manual_seed(1)
    # 1. several backward panels (rows_per_panel = 8,192): Triton against tiled, bf16
    q, k = (F.normalize(torch.randn(big, dim, generator=gen), dim=1).to(device, torch.bfloat16).requires_grad_(True)
            for _ in range(2))
    tau = (0.01 + 0.04 * torch.rand(2, big, generator=gen)).to(device).requires_grad_(True)
    log_u = (torch.randn(2, big, generator=gen) + 3).to(device)
    outs = {}
    for impl in ("tiled", "triton"):
        out = sogclr(q, k, log_u=log_u, tau=tau, rho=1.0, impl=impl)
        outs[impl] = [out.loss, out.log_u, out.tau_grad, *torch.autograd.grad(out.loss, [q, k, tau])]
    errs = [_rel(a, b) for a, b in zip(outs["triton"], outs["tiled"])]
    ok = all(e <= t for e, t in zip(errs, [1e-4, 1e-4, 1e-4, 2e-2, 2e-2, 1e-4]))
    results.append({"check": f"triton vs tiled, symmetric bf16 N={big} (panels)", "errors": errs, "pass": ok})
    # 2. chunked column partials (forced small) against one chunk
    n = min(big, 4096)
    qs, ks_ = q[:n].detach(), k[:n].detach()
    one = sogclr(qs, ks_, log_u=log_u[:, :n], tau=tau[:, :n].detach(), impl="triton")
    saved = _sogclr.CHUNK_BYTES
    _sogclr.CHUNK_BYTES = 8 * n * 3  # three row blocks per chunk
    try:
        chunked = sogclr(qs, ks_, log_u=log_u[:, :n], tau=tau[:, :n].detach(), impl="triton")
    finally:
        _sogclr.CHUNK_BYTES = saved
    errs = [_rel(a, b) for a, b in zip(chunked, one)]
    results.append({"check": f"chunked column partials N={n}", "errors": errs, "pass": all(e <= 1e-5 for e in errs)})
    # 3. one module step of each loss (fused step: state read and written in the kernels) without a host sync
    results.append(sync_and_state(device, q[:n], k[:n]))
    if device.type == "cuda" and not dry_run():
        results.append(launch_counts(device, 4096, dim))
        results.append(clustered_cost(device, 65536, dim))
    for r in results:
        print(("PASS " if r["pass"] else "FAIL ") + json.dumps(r), flush=True)
    return results


#: Session 7's forward variants at N = 65,536 (forward only, CUDA events): the one-pass kernel with
#: column partials (SPLIT=0) against two row-only passes (SPLIT=1) per "split" tile shape. Call 2
#: (2026-12-03): one pass 17.75 ms; two passes 30.7 (128 x 64 / 4 warps), 23.3 (8 warps), 24.1
#: (128 x 128 / 8 warps), 16.5 ms (128 x 128 / 4 warps); SogCLRLoss one pass 15.2, two passes 15.8.
S7_SPLIT = [dict(BM=128, BN=128, num_warps=4), dict(BM=256, BN=128, num_warps=8), dict(BM=128, BN=256, num_warps=8),
            dict(BM=64, BN=256, num_warps=4)]


def _set_split(threshold: int) -> None:
    from batchlab.losses.triton import _sogclr

    _sogclr.CONFIGS["fwd"]["SPLIT"] = _sogclr.CONFIGS["fwd_one"]["SPLIT"] = threshold


def s7_sweep(device, n, dim, out) -> dict:
    """Forward-only times at N of the one-pass forward and the two-pass one per S7_SPLIT shape (random
    embeddings; the chosen ones also on clustered); the fastest shape stays in CONFIGS["split"], and
    SPLIT stays on (from 8,192^2 logits) for a kernel whose two passes won."""
    from batchlab.losses import ISogCLRLoss, SogCLRLoss
    from batchlab.losses.triton import _sogclr

    gen = torch.Generator().manual_seed(0)
    data = {kind: _embeddings(n, dim, gen, kind == "clustered", device) for kind in ("random", "clustered")}
    ids = torch.arange(n, device=device)
    rows, chosen = [], {key: dict(val) for key, val in _sogclr.CONFIGS.items()}

    def timed(kernel, label, cls, kind="random"):
        try:
            t = _ms(_no_grad_call(cls(n).to(device), *data[kind], ids), device)
        except Exception as exc:  # a shape that does not compile or fit is skipped
            rows.append({"kernel": kernel, "variant": label, "error": repr(exc)[:300]})
            print(f"s7 sweep {kernel} {label}: FAILED {exc!r}"[:400], flush=True)
            return float("inf")
        rows.append({"kernel": kernel, "variant": label, "data": kind, "forward_ms": t})
        print(f"s7 sweep {kernel} {label} {kind}: forward {t:.3f} ms", flush=True)
        return t

    _set_split(0)
    one = {"fwd": timed("fwd", "one pass", ISogCLRLoss)}
    _set_split(1)
    best, best_t = None, float("inf")
    for shape in S7_SPLIT:
        _sogclr.CONFIGS["split"].update(shape)
        t = timed("fwd", f"two passes {shape}", ISogCLRLoss)
        if t < best_t:
            best, best_t = shape, t
    if best is not None:
        _sogclr.CONFIGS["split"].update(best)
        timed("fwd", f"two passes {best}", ISogCLRLoss, "clustered")
    two_one = timed("fwd_one", f"two passes {best}", SogCLRLoss)
    _set_split(0)
    one["fwd_one"] = timed("fwd_one", "one pass", SogCLRLoss)
    for kernel, two in (("fwd", best_t), ("fwd_one", two_one)):
        _sogclr.CONFIGS[kernel]["SPLIT"] = chosen[kernel]["SPLIT"] or 8192 * 8192 if two < one[kernel] else 0
    del data
    result = {"n": n, "dim": dim, "rows": rows, "chosen": {k: dict(v) for k, v in _sogclr.CONFIGS.items()}}
    with open(os.path.join(out, "sweep.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print("chosen configs:", _sogclr.CONFIGS, flush=True)
    return result


def _with_configs(step, changes: dict):
    """``step`` run with CONFIGS entries changed (``{kernel: {key: value}}``) and restored after."""
    from batchlab.losses.triton import _sogclr

    def run():
        saved = {kernel: dict(_sogclr.CONFIGS[kernel]) for kernel in changes}
        for kernel, values in changes.items():
            _sogclr.CONFIGS[kernel].update(values)
        try:
            step()
        finally:
            for kernel, values in saved.items():
                _sogclr.CONFIGS[kernel].update(values)
    return run


def step_profile(device, n, dim, repeats=20) -> dict:
    """At N: the steps' host time (the call returning, queue drained before: what bounds small N),
    wall time (synchronised; interleaved rounds), and the CUDA kernels with their device times
    (torch.profiler), for InfoNCE and the modules' steps with the defaults, with TMA off on every
    SogCLR kernel (no tensor descriptors on the host), and iSogCLR with two forward passes."""
    from torch.profiler import ProfilerActivity, profile

    from batchlab.bench.sogclr import _step, embeddings, interleaved

    gen = torch.Generator().manual_seed(2)
    q, k = (x.to(device, torch.bfloat16).requires_grad_(True) for x in embeddings(n, dim, gen))
    no_tma = {kernel: {"TMA": 0} for kernel in ("fwd", "fwd_one", "split", "bwd")}
    steps = {
        "info_nce auto": _step("info_nce auto", n, q, k),
        "sogclr triton": _step("sogclr triton", n, q, k),
        "isogclr triton": _step("isogclr triton", n, q, k),
        "sogclr triton TMA=0": _with_configs(_step("sogclr triton", n, q, k), no_tma),
        "isogclr triton TMA=0": _with_configs(_step("isogclr triton", n, q, k), no_tma),
        "isogclr triton SPLIT=1": _with_configs(_step("isogclr triton", n, q, k), {"fwd": {"SPLIT": 1}}),
    }
    wall = interleaved(steps, device, repeats, warmup=3)
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1e3  # noqa: E731
    out = {}
    for method, step in steps.items():
        host = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [(e.name, e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
                   for e in prof.events() if e.device_type.name == "CUDA"]
        stats = ""
        if method in ("info_nce auto", "sogclr triton", "isogclr triton"):  # where the host time goes
            import cProfile
            import io
            import pstats

            prof_py = cProfile.Profile()
            prof_py.enable()
            for _ in range(20):
                step()
            prof_py.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(prof_py, stream=buf).sort_stats("tottime").print_stats(18)
            stats = buf.getvalue()[-6000:]
            print(f"cProfile N={n} {method} (20 steps):\n{stats}", flush=True)
        out[method] = {"host_ms": med(host), "wall_ms": med(wall[method]), "cprofile_20_steps": stats,
                       "x_info_nce_wall": med([t / a for t, a in zip(wall[method], wall["info_nce auto"])]) / 1e3,
                       "kernels": len(kernels), "kernel_us_sum": sum(t for _, t in kernels),
                       "by_kernel_us": [(name[:60], t) for name, t in kernels]}
        print(f"profile N={n} {method}: host {out[method]['host_ms']:.3f} ms, wall {out[method]['wall_ms']:.3f} ms "
              f"({out[method]['x_info_nce_wall']:.3f}x), {len(kernels)} kernels, device "
              f"{out[method]['kernel_us_sum']:.0f} us: " + ", ".join(f"{name[:24]} {t:.0f}" for name, t in kernels),
              flush=True)
    return {"check": f"per-step host/wall/device at N={n} (informational)", "profile": out, "pass": True}


def s7_checks(device, out, budget_s: float) -> tuple[int, list]:
    """The float64-reference checks (Triton), most important first, none started after ``budget_s``:
    symmetric fp32/bf16 x (per-example, float 0.005) with one and two forward passes, bf16 with pointer
    loads (no TMA), then one_way and two_view bf16 per-example (defaults)."""
    from batchlab.bench import sogclr as bench
    from batchlab.losses.triton import _sogclr

    t0 = time.time()
    n = 64 if dry_run() else 1500
    saved = {kernel: dict(_sogclr.CONFIGS[kernel]) for kernel in ("fwd", "fwd_one")}
    saved_tma = _sogclr.TMA_MIN_LOGITS
    # (SPLIT: 1 always, 0 never, None the default; TMA loads; modes; dtype; temperatures)
    plan = [(split, True, ("symmetric",), dtype, tau) for split in (1, 0) for dtype in (torch.bfloat16, torch.float32)
            for tau in ("per-example", "float 0.005")]
    plan += [(None, False, ("symmetric",), torch.bfloat16, tau) for tau in ("per-example", "float 0.005")]
    plan += [(None, True, (mode,), torch.bfloat16, "per-example") for mode in ("one_way", "two_view")]
    checks, skipped = [], 0
    try:
        for split, tma, modes, dtype, tau in plan:
            if time.time() - t0 > budget_s:
                skipped += 1
                continue
            for kernel in ("fwd", "fwd_one"):
                _sogclr.CONFIGS[kernel].update(saved[kernel])
                if split is not None:
                    _sogclr.CONFIGS[kernel]["SPLIT"] = split
            _sogclr.TMA_MIN_LOGITS = saved_tma if tma else 1 << 62
            for row in bench.check(device, n=n, dim=128, impls=["triton"], dtypes=(dtype,), tau_kinds=(tau,),
                                   modes=modes):
                checks.append({**row, "SPLIT": split if split is not None else "default", "TMA": tma})
    finally:
        for kernel, values in saved.items():
            _sogclr.CONFIGS[kernel].update(values)
        _sogclr.TMA_MIN_LOGITS = saved_tma
    passed = sum(c["pass"] for c in checks)
    with open(os.path.join(out, "checks.json"), "w") as fh:
        json.dump({"checks": checks, "skipped_for_time": skipped}, fh, indent=1)
    print(f"checks: {passed} of {len(checks)} passed, {skipped} skipped for time [{time.time() - t0:.0f} s]",
          flush=True)
    return (0 if checks and passed == len(checks) else 1), checks


def s7_last_checks(device, out, budget_s: float = 75.0) -> int:
    """Session 7's last call: the float64-reference checks call 4 skipped for time, with the committed
    defaults (at N = 1,500: one forward pass, pointer loads), plus TMA loads forced on (one pass)."""
    from batchlab.bench import sogclr as bench
    from batchlab.losses.triton import _sogclr

    t0 = time.time()
    n = 64 if dry_run() else 1500
    saved = _sogclr.TMA_MIN_LOGITS
    plan = [(False, "symmetric", dtype, tau) for dtype in (torch.bfloat16, torch.float32)
            for tau in ("per-example", "float 0.005")]
    plan += [(False, mode, torch.bfloat16, "per-example") for mode in ("one_way", "two_view")]
    plan += [(True, "symmetric", torch.bfloat16, tau) for tau in ("per-example", "float 0.005")]
    checks, skipped = [], 0
    try:
        for tma, mode, dtype, tau in plan:
            if time.time() - t0 > budget_s:
                skipped += 1
                continue
            _sogclr.TMA_MIN_LOGITS = 0 if tma else saved
            for row in bench.check(device, n=n, dim=128, impls=["triton"], dtypes=(dtype,), tau_kinds=(tau,),
                                   modes=(mode,)):
                checks.append({**row, "SPLIT": "default", "TMA": tma})
            with open(os.path.join(out, "checks_last.json"), "w") as fh:  # after every case: a timeout keeps them
                json.dump({"checks": checks, "TMA_MIN_LOGITS": saved, "configs": _sogclr.CONFIGS}, fh, indent=1)
    finally:
        _sogclr.TMA_MIN_LOGITS = saved
    passed = sum(c["pass"] for c in checks)
    print(f"checks: {passed} of {len(checks)} passed, {skipped} skipped for time [{time.time() - t0:.0f} s]",
          flush=True)
    return 0 if checks and passed == len(checks) and not skipped else 1


def _bench_main(argv: list[str]) -> int:
    """``batchlab.bench.sogclr.main(argv)``'s exit status; 1 (traceback printed) where it raises."""
    from batchlab.bench import sogclr as bench

    try:
        return bench.main(argv)
    except Exception:
        traceback.print_exc()
        return 1


def s7(device, out) -> int:
    """Session 7's run (<= ~130 s): the float64-reference checks (first, budgeted), the forward sweep at
    65,536, the host/device profile at 4,096 (which picks TMA_MIN_LOGITS), the interleaved cost bench
    (random and clustered, 4,096 and 65,536) with those choices, the no-sync check."""
    from batchlab.bench.sogclr import embeddings
    from batchlab.losses.triton import _sogclr

    dry = dry_run()
    t0 = time.time()
    status = 0 if dry else first_step(device)
    n, small, dim = (128, 64, 32) if dry else (65536, 4096, 512)
    try:
        status |= s7_checks(device, out, budget_s=30.0)[0]
    except Exception:
        traceback.print_exc()
        status = 1
    print(f"[{time.time() - t0:.0f} s] checks done", flush=True)
    try:
        s7_sweep(device, n, dim, out)
    except Exception:
        traceback.print_exc()
        status = 1
    print(f"[{time.time() - t0:.0f} s] sweep done", flush=True)
    extra = []
    if device.type == "cuda":
        try:  # the small batch's host cost, TMA on and off: the bench then runs with the faster
            extra.append(step_profile(device, small, dim))
            wall = {m: v["wall_ms"] for m, v in extra[-1]["profile"].items()}
            off = wall["sogclr triton TMA=0"] + wall["isogclr triton TMA=0"]
            on = wall["sogclr triton"] + wall["isogclr triton"]
            _sogclr.TMA_MIN_LOGITS = 8192 * 8192 if off < on else 0
            extra[-1]["chosen_TMA_MIN_LOGITS"] = _sogclr.TMA_MIN_LOGITS
            print(f"TMA at N={small}: wall {on:.3f} ms (on) vs {off:.3f} ms (off): TMA_MIN_LOGITS = "
                  f"{_sogclr.TMA_MIN_LOGITS}", flush=True)
        except Exception:
            traceback.print_exc()
        with open(os.path.join(out, "extra_checks.json"), "w") as fh:
            json.dump(extra, fh, indent=1)
    print(f"[{time.time() - t0:.0f} s] profile done", flush=True)
    argv = ["--device", str(device), "--sizes", f"{small},{n}", "--dim", str(dim), "--dtype", "bfloat16",
            "--repeats", "4" if dry else "20", "--data", "random,clustered", "--out", out,
            "--methods", "info_nce auto", "sogclr triton", "isogclr triton"]
    status |= _bench_main(argv)
    print(f"[{time.time() - t0:.0f} s] bench done", flush=True)
    try:
        gen = torch.Generator().manual_seed(5)
        q, k = (x.to(device, torch.bfloat16) for x in embeddings(small, dim, gen))
        extra.append(sync_and_state(device, q, k))
        status |= 0 if extra[-1]["pass"] else 1
        print(("PASS " if extra[-1]["pass"] else "FAIL ") + json.dumps(extra[-1]), flush=True)
    except Exception:
        traceback.print_exc()
        status = 1
    with open(os.path.join(out, "extra_checks.json"), "w") as fh:
        json.dump(extra, fh, indent=1)
    print(f"[{time.time() - t0:.0f} s] no-sync check done; configs {_sogclr.CONFIGS}, TMA_MIN_LOGITS "
          f"{_sogclr.TMA_MIN_LOGITS}", flush=True)
    return status


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results/gpu-check-sogclr")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--s7", action="store_true", help="session 7's run (see s7())")
    parser.add_argument("--s7-checks", action="store_true", help="session 7's last call (see s7_last_checks())")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    if args.s7_checks:
        status = s7_last_checks(device, args.out)
        print(f"done, status {status}", flush=True)
        return status
    if args.s7:
        status = s7(device, args.out)
        print(f"done, status {status}", flush=True)
        return status
    if args.quick:
        status = 0 if dry else first_step(device)
        try:
            status |= quick(device, args.out, n=128 if dry else 65536, dim=32 if dry else 512)
        except Exception:
            traceback.print_exc()
            status = 1
        print(f"done, status {status}", flush=True)
        return status
    t0 = time.time()
    status = 0
    if not dry:
        status |= first_step(device)
    if not args.no_sweep:
        try:
            sweep(device, 256 if dry else 65536, 32 if dry else 512, args.out)
        except Exception:
            traceback.print_exc()
            status = 1
    print(f"[{time.time() - t0:.0f} s] sweep done", flush=True)
    from batchlab.bench import sogclr as bench

    methods = ["info_nce auto", "sogclr triton", "isogclr triton"]
    argv = ["--device", str(device), "--sizes", "64,256" if dry else "4096,65536", "--dim", "32" if dry else "512",
            "--dtype", "bfloat16", "--repeats", "3" if dry else "20", "--out", args.out, "--methods", *methods]
    status |= _bench_main(argv)  # the timings first (what the run is for), then the correctness check
    print(f"[{time.time() - t0:.0f} s] bench done", flush=True)
    try:
        checks = bench.check(device, n=64 if dry else 1500, dim=128,
                             impls=["triton"] if dry else None)
        status |= 0 if all(c["pass"] for c in checks) else 1
        with open(os.path.join(args.out, "checks.json"), "w") as fh:
            json.dump(checks, fh, indent=1)
        print(f"checks: {sum(c['pass'] for c in checks)} of {len(checks)} passed", flush=True)
    except Exception:
        traceback.print_exc()
        status = 1
    print(f"[{time.time() - t0:.0f} s] check done", flush=True)
    try:
        extra = extra_checks(device, 300 if dry else 16384, 32 if dry else 512)
        status |= 0 if all(r["pass"] for r in extra) else 1
        with open(os.path.join(args.out, "extra_checks.json"), "w") as fh:
            json.dump(extra, fh, indent=1)
    except Exception:
        traceback.print_exc()
        status = 1
    print(f"[{time.time() - t0:.0f} s] done, status {status}", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
