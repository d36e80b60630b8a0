"""Full-size GPU check of ``impl="triton"`` against the float64 reference and the tiled engine.

Run on a CUDA machine (not collected by pytest; CI has no GPU)::

    PYTHONPATH=. python3 tests/losses/gpu_check_triton.py [--out DIR]

Every case draws fresh random inputs, fills the CUDA caching allocator with NaN first
(so an output element the kernels never wrote shows up as NaN), and compares every
element of the loss (``reduction="none"`` cases), of the log-sum-exps and of every
gradient. NaN or Inf never passes. Tolerances: values 2e-4 relative + 2e-4 absolute
(fp32 sums in another order, approximate exp2); gradients, as max |error| over max
|reference| and as relative norm: 1e-4 for fp32 inputs (IEEE fp32 dots), 2e-2 for
bf16/fp16 (the logit gradient is stored in the input dtype before the two gradient
products, and the gradients are returned in it).
Exit status 1 if any case fails. The small-batch path is switched off unless
``--dense-max-logits`` says otherwise, so every case runs the streaming kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

if "--dry-run" in sys.argv:  # before the kernels are defined
    import os

    os.environ["TRITON_INTERPRET"] = "1"

from batchlab.losses import dcl, info_nce, siglip

GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


DEVICE = "cuda"
DIV = 1  # --dry-run: sizes / 32 on the CPU under TRITON_INTERPRET=1 (checks the script, not the GPU)


def sz(x):
    return max(2, x // DIV)


def poison_allocator(device):
    if DEVICE != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    block = torch.full((int(free * 0.6) // 4,), float("nan"), device=device)
    del block  # stays in the caching allocator: later empty() tensors start as NaN


def unit(shape, dtype, gen):
    return F.normalize(torch.randn(*shape, device=DEVICE, generator=gen), dim=-1).to(dtype)


def compare_tensor(name, a, b, tol, report):
    if a is None or b is None:
        ok = a is None and b is None
        report.append((name, ok, "missing" if not ok else "both none"))
        return ok
    finite = bool(torch.isfinite(a).all())
    a64, b64 = a.double(), b.double()
    err_max = float((a64 - b64).abs().max()) if a.numel() else 0.0
    ref_max = float(b64.abs().max()) if a.numel() else 0.0
    rel_norm = float((a64 - b64).norm() / b64.norm().clamp_min(1e-30)) if a.numel() else 0.0
    ok = finite and (err_max <= tol * max(ref_max, 1e-6) or err_max < 1e-7) and (rel_norm <= tol or err_max < 1e-7)
    report.append((name, ok, f"finite={finite} max_err/max_ref={err_max / max(ref_max, 1e-30):.2e} "
                              f"rel_norm={rel_norm:.2e}"))
    return ok


def run_case(label, fn, tensors, dtype, gen, report, *, has_lse=False, tiled=True):
    """fn(impl, *tensors) -> loss or (loss, lse). Compares triton with reference(fp64) and tiled."""
    poison_allocator("cuda")
    fast_in = [t.detach().to(dtype if t.dim() else torch.float32).requires_grad_() for t in tensors]
    ref_in = [t.detach().double().requires_grad_() for t in fast_in]
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fast = fn("triton", *fast_in)
    fast_loss, fast_lse = (fast if has_lse else (fast, None))
    w = torch.rand(fast_loss.shape, device=DEVICE, generator=gen, dtype=torch.float64) + 0.5
    g_fast = torch.autograd.grad((fast_loss.double() * w).sum(), fast_in, allow_unused=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    ref = fn("reference", *ref_in)
    ref_loss, ref_lse = (ref if has_lse else (ref, None))
    g_ref = torch.autograd.grad((ref_loss * w).sum(), ref_in, allow_unused=True)
    ok = True
    ok &= compare_tensor(f"{label}: loss", fast_loss.float(), ref_loss, 2e-4, report)
    if has_lse:
        ok &= compare_tensor(f"{label}: row lse", fast_lse.row, ref_lse.row, 2e-5, report)
        if ref_lse.col is not None:
            ok &= compare_tensor(f"{label}: col lse", fast_lse.col, ref_lse.col, 2e-5, report)
    for i, (a, b) in enumerate(zip(g_fast, g_ref)):
        ok &= compare_tensor(f"{label}: grad[{i}]", a, b, GRAD_TOL[dtype], report)
    if tiled:
        tiled_in = [t.detach().clone().requires_grad_() for t in fast_in]
        out = fn("tiled", *tiled_in)
        tiled_loss = out[0] if has_lse else out
        ok &= compare_tensor(f"{label}: loss vs tiled", fast_loss.float(), tiled_loss.float(), 2e-4, report)
        g_tiled = torch.autograd.grad((tiled_loss.double() * w).sum(), tiled_in, allow_unused=True)
        for i, (a, b) in enumerate(zip(g_fast, g_tiled)):
            ok &= compare_tensor(f"{label}: grad[{i}] vs tiled", a, b, 2 * GRAD_TOL[dtype], report)
    print(f"{'PASS' if ok else 'FAIL'}  {label}  (triton fwd+bwd {elapsed * 1e3:.1f} ms incl. first-call compile)",
          flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--configs", default=None, help="a sweep results JSON whose 'best' tile configs to check")
    parser.add_argument("--part", type=int, nargs=2, default=(0, 1), metavar=("I", "PARTS"),
                        help="run only cases I, I+PARTS, I+2*PARTS, ... (several processes compile in parallel)")
    parser.add_argument("--dense-max-logits", type=int, default=0,
                        help="the small-batch path's limit during the check (default 0: every case streams, "
                             "so the streaming kernels are what is checked; -1 keeps the library's limit)")
    args = parser.parse_args()
    if args.dense_max_logits >= 0:
        from batchlab.losses.triton import _dense

        _dense.DENSE_MAX_LOGITS = args.dense_max_logits
    if args.configs:
        from batchlab.bench.losses_triton import load_configs

        load_configs(args.configs)
    global DEVICE, DIV
    if args.dry_run:
        DEVICE, DIV = "cpu", 32
    gen = torch.Generator(device=DEVICE).manual_seed(args.seed)
    bf, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    report: list = []
    results = []
    s = torch.tensor(1 / 0.07)

    counter = [0]

    def case(label, fn, tensors, dtype, **kw):
        counter[0] += 1
        if (counter[0] - 1) % args.part[1] == args.part[0]:
            results.append((label, run_case(label, fn, tensors, dtype, gen, report, **kw)))

    n = sz(4096)
    q, k = unit((n, 512), bf, gen), unit((n, 512), bf, gen)
    case("info_nce sym N=4096 d=512 bf16 mean",
         lambda impl, q, k, s: info_nce(q, k, s, impl=impl, return_lse=True), [q, k, s], bf, has_lse=True)
    n = sz(8192)
    q, k = unit((n, 512), bf, gen), unit((n, 512), bf, gen)
    case("info_nce sym N=8192 d=512 bf16 none, 3 gradient panels",
         lambda impl, q, k, s: info_nce(q, k, s, impl=impl, reduction="none", return_lse=True,
                                        **({"workspace_bytes": (n // 3 + 1) * n * 2} if impl == "triton" else {})),
         [q, k, s], bf, has_lse=True)
    n, m, d = sz(3001), sz(5003), 300
    q, k = unit((n, d), fp16, gen), unit((m, d), fp16, gen)
    extra = unit((n, 4, d), fp16, gen)
    targets = torch.randint(0, m, (n,), device=DEVICE, generator=gen)
    case("info_nce one-way N=3001 M=5003 d=300 fp16 targets + 4 extra negatives, none",
         lambda impl, q, k, s, e: info_nce(q, k, s, symmetric=False, targets=targets, extra_negatives=e,
                                           reduction="none", impl=impl, return_lse=True),
         [q, k, s, extra], fp16, has_lse=True)
    n = sz(2048)
    q, k = unit((n, 256), fp32, gen), unit((n, 256), fp32, gen)
    pos = torch.eye(n, dtype=torch.bool, device=DEVICE) | (torch.rand(n, n, device=DEVICE, generator=gen) < 0.002)
    case("info_nce sym N=2048 d=256 fp32 pos_mask (several positives)",
         lambda impl, q, k, s: info_nce(q, k, s, pos_mask=pos, impl=impl), [q, k, s], fp32)
    n = sz(4096)
    q, k = unit((n, 512), bf, gen), unit((n, 512), bf, gen)
    for scale in (100.0, 0.01):
        case(f"info_nce sym N=4096 d=512 bf16 s={scale}",
             lambda impl, q, k, s: info_nce(q, k, s, impl=impl, return_lse=True), [q, k, torch.tensor(scale)], bf,
             has_lse=True)
    # a key every query points away from: its column sum underflows at s=100 -> exact second pass
    n, d = sz(2048), 64
    e1 = torch.zeros(d, device=DEVICE)
    e1[0] = 1
    q = F.normalize(e1 + 0.05 * torch.randn(n, d, device=DEVICE, generator=gen), dim=1).to(bf)
    k = F.normalize(e1 + 0.05 * torch.randn(n, d, device=DEVICE, generator=gen), dim=1)
    k[:7] = F.normalize(-e1 + 0.05 * torch.randn(7, d, device=DEVICE, generator=gen), dim=1)
    k = k.to(bf)
    case("info_nce sym s=100 with underflowing columns (exact column pass)",
         lambda impl, q, k, s: info_nce(q, k, s, impl=impl, return_lse=True), [q, k, torch.tensor(100.0)], bf,
         has_lse=True)
    case("info_nce sym s=100 with underflowing rows (exact row pass of the one-tile forward)",
         lambda impl, q, k, s: info_nce(q, k, s, impl=impl, return_lse=True), [k, q, torch.tensor(100.0)], bf,
         has_lse=True)
    n = sz(2048)
    q, k = unit((n, 768), fp32, gen), unit((n, 768), fp32, gen)
    case("info_nce sym N=2048 d=768 fp32", lambda impl, q, k, s: info_nce(q, k, s, impl=impl), [q, k, s], fp32)

    n = sz(4096)
    q, k = unit((n, 512), bf, gen), unit((n, 512), bf, gen)
    b = torch.tensor(-10.0)
    case("siglip N=4096 d=512 bf16 mean", lambda impl, q, k, s, b: siglip(q, k, s, b, impl=impl),
         [q, k, torch.tensor(10.0), b], bf)
    n, m, d = sz(3001), sz(4000), 300
    q, k = unit((n, d), fp16, gen), unit((m, d), fp16, gen)
    targets = torch.randint(0, m, (n,), device=DEVICE, generator=gen)
    case("siglip N=3001 M=4000 d=300 fp16 targets none",
         lambda impl, q, k, s, b: siglip(q, k, s, b, targets=targets, reduction="none", impl=impl),
         [q, k, torch.tensor(10.0), b], fp16)
    n = sz(2048)
    q, k = unit((n, 512), fp32, gen), unit((n, 512), fp32, gen)
    case("siglip N=2048 d=512 fp32 sum, 2 panels",
         lambda impl, q, k, s, b: siglip(q, k, s, b, reduction="sum", impl=impl,
                                         **({"workspace_bytes": (n // 2) * n * 4} if impl == "triton" else {})),
         [q, k, torch.tensor(10.0), b], fp32)

    n = sz(4096)
    q, k = unit((n, 512), bf, gen), unit((n, 512), bf, gen)
    for weighted in (False, True):
        case(f"dcl sym N=4096 d=512 bf16 weighted={weighted}",
             lambda impl, q, k, s, weighted=weighted: dcl(q, k, s, weighted=weighted, impl=impl, return_lse=True),
             [q, k, s], bf, has_lse=True)
    n, m = sz(3000), sz(5000)
    q, k = unit((n, 384), bf, gen), unit((m, 384), bf, gen)
    targets = torch.randint(0, m, (n,), device=DEVICE, generator=gen)
    case("dcl one-way N=3000 M=5000 d=384 bf16 targets none",
         lambda impl, q, k, s: dcl(q, k, s, symmetric=False, targets=targets, reduction="none", impl=impl,
                                   return_lse=True), [q, k, s], bf, has_lse=True)

    failed = [label for label, ok in results if not ok]
    for name, ok, msg in report:
        if not ok:
            print("  FAILED:", name, msg)
    print(f"{len(results) - len(failed)}/{len(results)} cases passed")
    if args.out:
        suffix = f"-part{args.part[0]}" if args.part[1] > 1 else ""
        with open(f"{args.out}/gpu_check_triton{suffix}.json", "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu dry run", "cases": results,
                       "checks": [list(r) for r in report]}, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
