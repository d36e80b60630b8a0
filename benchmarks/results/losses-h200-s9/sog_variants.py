"""Session 9, helper "sog": SogCLR / iSogCLR kernel variants against the defaults and InfoNCE on one H200.

1. float64 checks of the TILE forward (fp32, N = 1,024, d = 128, per-example temperatures and 0.005);
2. each variant's module step against the default's at N = 4,096 (bf16, two steps: loss, grads, state);
3. forward-only time (no_grad, CUDA events) per method at N = 65,536;
4. interleaved wall clock (forward + backward, module step) at N = 65,536, random and clustered.
Writes $OUT/sog_variants.json (and prints the rows). ~120 s.
"""

import contextlib
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from batchlab.bench.sogclr import _quartiles, embeddings, interleaved  # noqa: E402
from batchlab.losses import ISogCLRLoss, SogCLRLoss, info_nce, sogclr  # noqa: E402
from batchlab.losses.triton import _sogclr  # noqa: E402

T0 = time.time()
OUT = os.environ.get("OUT", ".")
SMOKE = os.environ.get("SOG_SMOKE") == "1"  # CPU, Triton's interpreter, tiny sizes: the script's plumbing only
BUDGET = float(os.environ.get("SOG_BUDGET", "1000" if os.environ.get("SOG_SMOKE") == "1" else "110"))
dev = torch.device("cpu" if SMOKE else "cuda")
N_REF, N_SAME, N = (48, 40, 64) if SMOKE else (1024, 4096, 65536)
_TILE = {"fwd": {"TILE": 1}, "fwd_one": {"TILE": 1}}
_G0 = {"bwd": {"G0": 1}}
# call 3: call 2 (tree 5c9ef65): tile_s3_fl_m0 (TILE, 3 stages, FASTLOG, MASK_ALL=0, G0) best: SogCLR 1.06x /
# 1.04x, iSogCLR 1.17x / 1.16x (random / clustered). Now: its PANEL, and for iSogCLR PAIR and GATHER=0
_BEST = {"num_stages": 3, "FASTLOG": 1, "MASK_ALL": 0}
VARIANTS = {
    "default": {},
    "best": {**_TILE, **_G0, "tile": dict(_BEST)},
    "best_pair": {**_TILE, **_G0, "tile": {**_BEST, "PAIR": 1}},  # iSogCLR only (weighted sums)
    "best_gather0": {**_TILE, **_G0, "tile": {**_BEST, "GATHER": 0}},  # iSogCLR only
    "best_p4k": {**_TILE, **_G0, "tile": {**_BEST, "PANEL": 4096}},
    "best_p16k": {**_TILE, **_G0, "tile": {**_BEST, "PANEL": 16384}},
    "best_pb32": {**_TILE, **_G0, "tile": {**_BEST, "PB": 32}},
}
SOG_SKIP = {"best_pair", "best_gather0"}
ISOG_SKIP = set()
result = {"device": "cpu" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__, "variants": VARIANTS, "checks": [],
          "same_as_default": [], "forward_ms": [], "bench": []}


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save():
    with open(os.path.join(OUT, "sog_variants.json"), "w") as f:
        json.dump(result, f, indent=1)


@contextlib.contextmanager
def variant(name):
    saved = {key: dict(val) for key, val in _sogclr.CONFIGS.items()}
    saved_interp = dict(_sogclr._INTERPRET)
    for key, upd in VARIANTS[name].items():
        _sogclr.CONFIGS[key].update(upd)
        if SMOKE:  # the interpreter's one config: the options only
            _sogclr._INTERPRET.update({k2: v for k2, v in upd.items() if k2 not in ("num_stages", "num_warps")})
    try:
        yield
    finally:
        for key, val in saved.items():
            _sogclr.CONFIGS[key] = val
        _sogclr._INTERPRET.clear()
        _sogclr._INTERPRET.update(saved_interp)


def err(a, b):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin):
        return float("inf")
    if not fin.any():
        return 0.0
    return float((a[fin] - b[fin]).abs().max() / b[fin].abs().max().clamp_min(1e-300))


# 1. float64 reference (the functional path: temperature gradients, weighted sums)
def ref_check(name, tau_kind):
    gen = torch.Generator().manual_seed(1)
    n, d = N_REF, 128
    q64, k64 = (F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1) for _ in range(2))
    log_u = torch.randn(2, n, generator=gen, dtype=torch.float64) + 3.0
    log_u[:, ::7] = float("-inf")
    if tau_kind.endswith("per-example"):
        lo, span = (0.005, 0.005) if tau_kind.startswith("small") else (0.02, 0.05)
        tau = lo + span * torch.rand(2, n, generator=gen, dtype=torch.float64)
    else:
        tau = float(tau_kind)
    outs = []
    for impl, dt, dv in (("reference", torch.float64, "cpu"), ("triton", torch.float32, dev)):
        q, k = (x.to(dv, dt).requires_grad_(True) for x in (q64, k64))
        t = tau.to(dv, dt).requires_grad_(True) if isinstance(tau, torch.Tensor) else tau
        out = sogclr(q, k, log_u=log_u.to(dv, dt), tau=t, rho=1.0, mode="symmetric", impl=impl, check_inputs=False)
        wrt = [q, k] + ([t] if isinstance(t, torch.Tensor) else [])
        outs.append([out.loss.detach(), out.log_u, out.tau_grad, *torch.autograd.grad(out.loss, wrt)])
    scale = max(1.0, 0.05 / (tau if isinstance(tau, float) else float(tau.detach().min())))
    names = ["loss", "log_u", "tau_grad", "dq", "dk", "dtau"]
    row = {"variant": name, "tau": tau_kind}
    for nm, a, b in zip(names, outs[1], outs[0]):
        row[nm] = err(a.cpu(), b)
    row["pass"] = all(v <= 1e-5 * scale for k2, v in row.items() if k2 in names)
    return row


for name in ("best", "best_pair"):
    for tau_kind in ("per-example", "small per-example", "0.005"):
        try:
            with variant(name):
                row = ref_check(name, tau_kind)
        except Exception as exc:  # noqa: BLE001
            row = {"variant": name, "tau": tau_kind, "error": repr(exc)[:300]}
        result["checks"].append(row)
        log("check", row)
save()

# 2. module steps against the default's at N = 4,096 (TMA on as at 65,536)
_sogclr.TMA_MIN_LOGITS = 0


def module_run(cls, name, q, k, steps=2):
    n = q.shape[0]
    fn = cls(n, mode="symmetric", impl="triton").to(dev)
    ids = torch.arange(n, device=dev)
    out = []
    with variant(name):
        for _ in range(steps):
            qq, kk = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
            loss = fn(qq, kk, ids)
            out += [loss.detach().float(), *torch.autograd.grad(loss, [qq, kk])]
    return out + [b.clone() for b in fn.buffers()]


gen = torch.Generator().manual_seed(2)
for kind in ("random", "clustered"):
    q, k = (x.to(dev, torch.bfloat16) for x in embeddings(N_SAME, 512, gen, clustered=kind == "clustered"))
    for cls in (SogCLRLoss, ISogCLRLoss):
        base = module_run(cls, "default", q, k)
        for name in ("best_pair", "best_gather0", "best_pb32") if cls is ISogCLRLoss else ("best", "best_pb32"):
            try:
                got = module_run(cls, name, q, k)
                errs = [err(a, b) for a, b in zip(got, base)]
                row = {"loss": cls.__name__, "variant": name, "data": kind, "worst_value_state": max(
                    e for i, e in enumerate(errs) if i % 3 == 0 or i >= 6), "worst_grad": max(
                    e for i, e in enumerate(errs[:6]) if i % 3 != 0)}
                row["pass"] = row["worst_value_state"] <= 1e-4 and row["worst_grad"] <= 3e-2
            except Exception as exc:  # noqa: BLE001
                row = {"loss": cls.__name__, "variant": name, "data": kind, "error": repr(exc)[:300]}
            result["same_as_default"].append(row)
            log("same", row)
    save()

# 3./4. N = 65,536
_sogclr.TMA_MIN_LOGITS = 8192 * 8192


def method_step(method, q, k):
    if method == "info_nce auto":
        scale = torch.tensor(1 / 0.07, device=dev, requires_grad=True)
        return lambda: torch.autograd.grad(info_nce(q, k, scale, impl="auto"), [q, k, scale]), None
    loss_name, name = method.split(":")
    cls = ISogCLRLoss if loss_name == "isog" else SogCLRLoss
    fn = cls(N, mode="symmetric", impl="triton").to(dev)
    ids = torch.arange(N, device=dev)

    def step():
        with variant(name):
            return torch.autograd.grad(fn(q, k, ids), [q, k])

    def fwd():
        with variant(name), torch.no_grad():
            return fn(q, k, ids)
    return step, fwd


methods = ["info_nce auto"] + [f"{loss}:{name}" for name in VARIANTS for loss in ("sog", "isog")
                               if not (loss == "isog" and name in ISOG_SKIP) and not (loss == "sog" and name in SOG_SKIP)]
# 2b. N = 4,096 (host-bound; TMA off below 8,192^2 logits as by default): the defaults against "best"
N_BIG, N = N, N_SAME
q4, k4 = (x.to(dev, torch.bfloat16).requires_grad_(True) for x in embeddings(N_SAME, 512, gen))
steps4 = {m: method_step(m, q4, k4)[0] for m in ("info_nce auto", "sog:default", "isog:default", "sog:best",
                                                 "isog:best")}
try:
    times = interleaved(steps4, dev, 2 if SMOKE else 25)
    for m, ts in times.items():
        ratios = [t / a for t, a in zip(ts, times["info_nce auto"])]
        row = {"method": m, "N": N_SAME, "ms": statistics.median(ts) * 1e3, "x_info_nce": statistics.median(ratios),
               "x_p25": _quartiles(ratios)[0], "x_p75": _quartiles(ratios)[2]}
        result.setdefault("bench_4096", []).append(row)
        log("bench4096", row)
except Exception as exc:  # noqa: BLE001
    log("bench4096 error", repr(exc)[:200])
N = N_BIG
del q4, k4, steps4
save()

for kind in ("random", "clustered"):
    if time.time() - T0 > BUDGET - 15:
        log("budget: skipping", kind)
        break
    q, k = (x.to(dev, torch.bfloat16).requires_grad_(True) for x in embeddings(N, 512, gen, clustered=kind == "clustered"))
    steps, fwds = {}, {}
    for m in methods:
        steps[m], fwds[m] = method_step(m, q, k)
    if kind == "random" and not SMOKE:  # peak memory above the inputs (after one warm-up call each)
        from batchlab.bench._common import peak_memory_call
        for m in ("info_nce auto", "sog:default", "isog:default", "sog:best", "isog:best"):
            try:
                steps[m]()
                result.setdefault("peak_extra_MiB", {})[m] = peak_memory_call(steps[m], dev) / 2**20
            except Exception as exc:  # noqa: BLE001
                result.setdefault("peak_extra_MiB", {})[m] = repr(exc)[:100]
        log("peak", result.get("peak_extra_MiB"))
    for m, f in fwds.items():  # forward only (also the first compile of each variant's forward)
        if f is None or time.time() - T0 > BUDGET - 25:
            continue
        try:
            f()
            ts = []
            for _ in range(0 if SMOKE else 4):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                f()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            row = {"method": m, "data": kind, "fwd_ms": statistics.median(ts) if ts else None}
        except Exception as exc:  # noqa: BLE001
            row = {"method": m, "data": kind, "error": repr(exc)[:300]}
            steps.pop(m, None)
        result["forward_ms"].append(row)
        log("fwd", row)
    save()
    left = BUDGET - (time.time() - T0)
    per_round = 0.04 * len(steps)
    repeats = max(3, min(10, int((left - 2 * per_round * 2 - 5) / per_round / 2) if kind == "random" else
                         int((left - 2 * per_round - 3) / per_round)))
    try:
        times = interleaved(steps, dev, repeats)
    except Exception as exc:  # noqa: BLE001
        result["bench"].append({"data": kind, "error": repr(exc)[:300]})
        log("bench error", exc)
        continue
    anchor = times["info_nce auto"]
    for m, ts in times.items():
        p25, med, p75 = _quartiles(ts)
        ratios = [t / a for t, a in zip(ts, anchor)]
        row = {"method": m, "data": kind, "repeats": repeats, "ms": med * 1e3, "ms_p25": p25 * 1e3,
               "ms_p75": p75 * 1e3, "x_info_nce": statistics.median(ratios),
               "x_p25": _quartiles(ratios)[0], "x_p75": _quartiles(ratios)[2]}
        result["bench"].append(row)
        log("bench", row)
    save()
    del q, k, steps, fwds
    torch.cuda.empty_cache()
# 5. kernel times (torch.profiler, 3 steps) of the best-guess variants, random data
if not SMOKE and time.time() - T0 < BUDGET + 20:
    from torch.profiler import ProfilerActivity, profile
    q, k = (x.to(dev, torch.bfloat16).requires_grad_(True) for x in embeddings(N, 512, gen))
    for m in ("sog:best", "isog:best", "info_nce auto"):
        try:
            step, _ = method_step(m, q, k)
            step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            kern = {}
            for ev in prof.key_averages():
                if ev.device_type.name == "CUDA" or getattr(ev, "device_time_total", 0):
                    t = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
                    if t:
                        kern[ev.key[:60]] = {"ms_per_step": t / 3e3, "calls_per_step": ev.count / 3}
            kern = dict(sorted(kern.items(), key=lambda kv: -kv[1]["ms_per_step"])[:12])
            result.setdefault("profile", {})[m] = kern
            log("profile", m, {k2: round(v["ms_per_step"], 3) for k2, v in kern.items()})
        except Exception as exc:  # noqa: BLE001
            log("profile error", m, repr(exc)[:200])
    save()
result["seconds"] = time.time() - T0
save()
log("done")
