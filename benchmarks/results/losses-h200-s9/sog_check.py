"""Session 9, helper "sog": float64 checks of the new SogCLR / iSogCLR defaults on the GPU (<= 90 s).

The defaults (TILE forward from 8,192^2 logits, 3 stages, FASTLOG=1, MASK_ALL=0; backward G0=1) are
forced down to small N (TILE threshold 1, TMA on) so that the float64 reference stays cheap; then one
module step each at N = 8,192 (bf16) with the thresholds as shipped. Writes $OUT/sog_check.json; exit 1 if a
check fails.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from batchlab.losses import ISogCLRLoss, SogCLRLoss, sogclr  # noqa: E402
from batchlab.losses.triton import _sogclr  # noqa: E402

T0 = time.time()
OUT = os.environ.get("OUT", ".")
SMOKE = os.environ.get("SOG_SMOKE") == "1"  # CPU, Triton's interpreter, tiny sizes: the plumbing only
dev = torch.device("cpu" if SMOKE else "cuda")
SMALL, LARGE = (40, 72) if SMOKE else (1500, 8192)
rows = []


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)
    with open(os.path.join(OUT, "sog_check.json"), "w") as fh:  # after every row: a timeout keeps what ran
        json.dump({"rows": rows, "configs": _sogclr.CONFIGS, "seconds": time.time() - T0}, fh, indent=1)


def err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin):
        return float("inf")
    return float((a[fin] - b[fin]).abs().max() / b[fin].abs().max().clamp_min(1e-300)) if fin.any() else 0.0


def functional(n, d, dtype, tau_kind):
    gen = torch.Generator().manual_seed(n + d)
    q64, k64 = (F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1) for _ in range(2))
    q64, k64 = q64.to(dtype).double(), k64.to(dtype).double()  # the reference sees the rounded inputs
    log_u = torch.randn(2, n, generator=gen, dtype=torch.float64) + 3.0
    log_u[:, ::7] = float("-inf")
    if tau_kind.endswith("per-example"):
        lo, span = (0.005, 0.005) if tau_kind.startswith("small") else (0.02, 0.05)
        tau = lo + span * torch.rand(2, n, generator=gen, dtype=torch.float64)
        tau_min = lo
    else:
        tau = tau_min = float(tau_kind)
    outs = []
    for impl, dt, dv in (("reference", torch.float64, dev), ("triton", dtype, dev)):
        q, k = (x.to(dv, dt).requires_grad_(True) for x in (q64, k64))
        t = tau.to(dv, torch.float64 if impl == "reference" else torch.float32).requires_grad_(True) \
            if isinstance(tau, torch.Tensor) else tau
        out = sogclr(q, k, log_u=log_u.to(dv, torch.float64 if impl == "reference" else torch.float32), tau=t,
                     rho=1.0, mode="symmetric", impl=impl, check_inputs=False)
        wrt = [q, k] + ([t] if isinstance(t, torch.Tensor) else [])
        outs.append([out.loss.detach(), out.log_u, out.tau_grad, *torch.autograd.grad(out.loss, wrt)])
    names = ["loss", "log_u", "tau_grad", "dq", "dk", "dtau"]
    scale = max(1.0, 0.05 / tau_min)
    tol = {"float32": (1e-5 * scale, 1e-5 * scale), "bfloat16": (1e-3, 2e-2)}[str(dtype).split(".")[-1]]
    row = {"check": "functional", "n": n, "d": d, "dtype": str(dtype), "tau": tau_kind}
    for nm, a, b in zip(names, outs[1], outs[0]):
        row[nm] = err(a, b)
    row["pass"] = all(row[nm] <= (tol[1] if nm in ("dq", "dk") else tol[0]) for nm in names if nm in row)
    return row


def module(cls, n, d, dtype, steps=2):
    fused = cls(n, impl="triton", check_inputs=False).to(dev)
    ref = cls(n, impl="reference", check_inputs=False).double().to(dev)
    gen = torch.Generator().manual_seed(n)
    worst = {}
    for _ in range(steps):
        ids = torch.randperm(n, generator=gen).to(dev)
        q, k = (F.normalize(torch.randn(n, d, generator=gen), dim=1).to(dtype).to(dev) for _ in range(2))
        got, want = [], []
        for fn, out, dt in ((fused, got, dtype), (ref, want, torch.float64)):
            qq, kk = q.to(dt).requires_grad_(True), k.to(dt).requires_grad_(True)
            loss = fn(qq, kk, ids)
            out += [loss.detach(), *torch.autograd.grad(loss, [qq, kk])]
        for nm, a, b in zip(["loss", "dq", "dk"], got, want):
            worst[nm] = max(worst.get(nm, 0.0), err(a, b))
    for nm, buf in ref.state_dict().items():
        worst[nm] = err(fused.state_dict()[nm], buf)
    bf16 = dtype == torch.bfloat16
    scale = 0.05 / fused.tau_min if cls is ISogCLRLoss else 1.0  # the temperature step carries 1 / tau
    ok = all(v <= ((2e-2 if bf16 else 1e-5) if nm in ("dq", "dk") else (1e-3 if bf16 else 1e-5 * max(1.0, scale)))
             for nm, v in worst.items())
    return {"check": "module", "loss_fn": cls.__name__, "n": n, "d": d, "dtype": str(dtype), **worst, "pass": ok}


# the new defaults forced down to small N (TILE from 1 logit, TMA on)
saved = (_sogclr.CONFIGS["fwd"]["TILE"], _sogclr.CONFIGS["fwd_one"]["TILE"], _sogclr.TMA_MIN_LOGITS)
_sogclr.CONFIGS["fwd"]["TILE"] = _sogclr.CONFIGS["fwd_one"]["TILE"] = 1
_sogclr.TMA_MIN_LOGITS = 0
# bf16 (and TF32) take the TILE forward; strict fp32 keeps the looped kernels on the GPU (its one-tile
# build spills), so the fp32 checks cover the backward's G0 and the looped forward there
plan = [
    lambda: functional(SMALL, 128, torch.bfloat16, "per-example"),
    lambda: functional(SMALL, 128, torch.bfloat16, "small per-example"),
    lambda: functional(SMALL, 128, torch.bfloat16, "0.005"),
    lambda: functional(SMALL, 128, torch.bfloat16, "0.01"),
    lambda: module(SogCLRLoss, SMALL, 512, torch.bfloat16),
    lambda: module(ISogCLRLoss, SMALL, 512, torch.bfloat16),
    lambda: functional(SMALL, 128, torch.float32, "small per-example"),
    lambda: module(ISogCLRLoss, SMALL, 128, torch.float32),
]
for fn in plan:
    if time.time() - T0 > 60:
        log("budget: skipping the rest of the forced checks")
        break
    try:
        row = fn()
    except Exception as exc:  # noqa: BLE001
        row = {"error": repr(exc)[:300], "pass": False}
    rows.append(row)
    log(row)
# the untimed FASTLOG=2 (rcp.approx instead of div.full), for a later flip: two checks, budget allowing
if time.time() - T0 < 55:
    _sogclr.CONFIGS["tile"]["FASTLOG"] = 2
    for fn in (lambda: functional(SMALL, 128, torch.bfloat16, "small per-example"),
               lambda: module(ISogCLRLoss, SMALL, 512, torch.bfloat16)):
        try:
            row = {**fn(), "FASTLOG": 2}
        except Exception as exc:  # noqa: BLE001
            row = {"error": repr(exc)[:300], "FASTLOG": 2, "pass": False}
        rows.append(row)
        log(row)
    _sogclr.CONFIGS["tile"]["FASTLOG"] = 1
# as shipped: N = 8,192 (= the TILE and TMA thresholds), one module step each
_sogclr.CONFIGS["fwd"]["TILE"], _sogclr.CONFIGS["fwd_one"]["TILE"], _sogclr.TMA_MIN_LOGITS = saved
for cls in (SogCLRLoss, ISogCLRLoss):
    if time.time() - T0 > 80:
        log("budget: skipping", cls.__name__, "at 8,192")
        continue
    try:
        row = module(cls, LARGE, 256, torch.bfloat16, steps=1)
    except Exception as exc:  # noqa: BLE001
        row = {"error": repr(exc)[:300], "pass": False}
    rows.append(row)
    log(row)
with open(os.path.join(OUT, "sog_check.json"), "w") as fh:
    json.dump({"rows": rows, "configs": _sogclr.CONFIGS, "seconds": time.time() - T0}, fh, indent=1)
failed = [r for r in rows if not r.get("pass")]
log(f"{len(rows) - len(failed)} of {len(rows)} passed")
sys.exit(1 if failed else 0)
