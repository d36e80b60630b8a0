"""GPU check of the fused Sinkhorn half-step at full size (run on a CUDA machine, not in CI).

For n in {4,096, 16,384} and d = 3,072 (the benchmark's data), compares the Triton and
PyTorch potentials after the same iterations (every element, NaN never passes), checks
the converged plan's marginals, and times one half-step of each.

    python tests/gpu_check_ot.py --sizes 4096,16384
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from batchlab.bench.ot import _data
from batchlab.samplers.ot.costs import pairwise_cost
from batchlab.samplers.ot.solvers import annealed_potentials, cost_scale, plan_from_potentials, sinkhorn_potentials


def _ms(fn, repeats=20):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="4096,16384")
    p.add_argument("--dim", type=int, default=3072)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    ok = True
    report = []
    for n in [int(s) for s in args.sizes.split(",")]:
        x0, x1 = _data(n, args.dim, 0, torch.device("cuda"))
        C = pairwise_cost(x0, x1)
        spread = float(C.max() - C.min())
        C64 = C.double()
        for rel in (0.05, 0.005):
            # both float32 paths against float64: the fused kernel may not be less accurate
            eps = rel * cost_scale(C)
            f64, g64, _, _ = sinkhorn_potentials(C64, eps, max_iter=20, tol=0.0, backend="torch")
            f0, g0, _, _ = sinkhorn_potentials(C, eps, max_iter=20, tol=0.0, backend="torch")
            f1, g1, _, _ = sinkhorn_potentials(C, eps, max_iter=20, tol=0.0, backend="triton")
            finite = bool(torch.isfinite(f1).all() and torch.isfinite(g1).all())

            def err(f, g):
                return max(float((f.double() - f64).abs().max()), float((g.double() - g64).abs().max())) / spread

            e_torch, e_fused = err(f0, g0), err(f1, g1)
            good = finite and e_fused <= 2 * e_torch + 1e-6
            ok &= good
            report.append({"n": n, "rel_eps": rel, "fused_err_over_spread": e_fused,
                           "torch_fp32_err_over_spread": e_torch, "finite": finite, "ok": good})
            print(report[-1], flush=True)

        def marginal_err(backend):
            f, g, eps = annealed_potentials(C, 0.05, backend=backend)
            P = plan_from_potentials(C, f, g, eps)
            return max(float((P.sum(1) * n - 1).abs().max()), float((P.sum(0) * n - 1).abs().max()))

        marg, marg_torch = marginal_err("triton"), marginal_err("torch")
        good = marg <= 1.5 * marg_torch + 1e-3
        ok &= good
        from batchlab.samplers.ot._sinkhorn_triton import SoftminUpdate
        from batchlab.samplers.ot.solvers import _softmin

        step = SoftminUpdate(C)
        base = torch.zeros(n, device="cuda")
        buf = torch.empty_like(C)
        t_fused = _ms(lambda: step(g, eps, base, 1.0))
        t_torch = _ms(lambda: _softmin(C, g, eps, 1, buf))
        gb = C.numel() * 4 / 1e9
        report.append({"n": n, "plan_marginal_rel_err": marg, "torch_plan_marginal_rel_err": marg_torch, "ok": good, "half_step_ms_triton": t_fused,
                       "half_step_ms_torch": t_torch, "triton_GBps": gb / (t_fused / 1e3)})
        print(report[-1], flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "rows": report, "ok": ok}, fh, indent=1)
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
