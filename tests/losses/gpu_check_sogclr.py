"""GPU check and benchmark of SogCLR / iSogCLR ``impl="triton"`` in one process (not collected by pytest).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 tests/losses/gpu_check_sogclr.py --out DIR

1. a short sweep of the forward and backward tile shapes at N = 65,536 (bf16, d = 512), whose
   best shapes the rest of the run uses (written to DIR/sweep.json);
2. ``batchlab bench sogclr --device cuda --check`` in this process: the float64-reference check of
   every mode, dtype and extreme temperature (tiled and Triton), then SogCLR / iSogCLR Triton
   against InfoNCE (auto) at N = 4,096 and 65,536 (median of 20);
3. extra checks: Triton against tiled at N = 16,384 (several backward panels), the chunked column
   partials against one chunk, and one module step under ``set_sync_debug_mode("error")``.

Exit status 1 if a check fails. ``--dry-run``: tiny sizes on the CPU in Triton's interpreter.
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

FWD = [dict(BM=128, BN=128, BD=64, num_warps=8, num_stages=3), dict(BM=128, BN=128, BD=64, num_warps=4, num_stages=3),
       dict(BM=128, BN=64, BD=64, num_warps=4, num_stages=3)]
BWD = [dict(BM=128, BN=128, BD=64, num_warps=8, num_stages=3), dict(BM=128, BN=128, BD=64, num_warps=4, num_stages=3)]


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
    from batchlab.losses import sogclr
    from batchlab.losses.triton import _sogclr

    gen = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(n, dim, generator=gen), dim=1).to(device, torch.bfloat16).requires_grad_(True)
            for _ in range(2))
    tau = (0.01 + 0.04 * torch.rand(2, n, generator=gen)).to(device)
    log_u = torch.zeros(2, n, device=device)

    def fwd():
        with torch.no_grad():
            sogclr(q, k, log_u=log_u, tau=tau, impl="triton")

    def step():
        torch.autograd.grad(sogclr(q, k, log_u=log_u, tau=tau, impl="triton").loss, [q, k])

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

    pick("fwd", FWD, fwd, "forward")
    pick("bwd", BWD, step, "forward+backward")
    result = {"n": n, "dim": dim, "rows": rows, "chosen": _sogclr.CONFIGS}
    with open(os.path.join(out, "sweep.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print("chosen configs:", _sogclr.CONFIGS, flush=True)


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def extra_checks(device, big, dim):
    from batchlab.losses import ISogCLRLoss, sogclr
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
    # 3. one module step (iSogCLR, state update) without a host sync
    loss_fn = ISogCLRLoss(2 * n, tau=0.02, tau_min=0.005, tau_max=0.05, rho=1.0).to(device)
    ids = torch.randperm(2 * n, device=device)[:n]
    qq, kk = q[:n].detach().requires_grad_(True), k[:n].detach().requires_grad_(True)
    torch.autograd.grad(loss_fn(qq, kk, ids), [qq, kk])  # warm-up (first-use probes may sync)
    ok = True
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.autograd.grad(loss_fn(qq, kk, ids), [qq, kk])
        except RuntimeError as exc:
            ok = False
            print("sync:", exc)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # the fused state update equals the PyTorch one
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
    results.append({"check": "module step: no host sync; fused update vs tiled", "sync_free": ok,
                    "state_max_rel_diff": state_err, "pass": ok and state_err < 1e-4})
    for r in results:
        print(("PASS " if r["pass"] else "FAIL ") + json.dumps(r), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results/gpu-check-sogclr")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    t0 = time.time()
    status = 0
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
    if not dry:
        argv.insert(0, "--check")
    try:
        status |= bench.main(argv)
    except Exception:
        traceback.print_exc()
        status = 1
    print(f"[{time.time() - t0:.0f} s] bench done", flush=True)
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
