"""Session 10 (issue 21): batchlab's CuTe streaming kernels (quack epilogue GEMMs) on the H200.

Each step runs even if one before failed; results in $OUT/cute_check.json.
1. check: InfoNCE (bf16, d=512) at N = 20,000 and 65,536, s = 0.01, 14.3, 100, CuTe on (MODE "1") and off ("0"),
   against the fp32 reference (gpu_large_run._s7_case: loss, grads, scale grad, DS on and off); fp16 at 20,000
   (d = 768); M = 20,004 (M % 8 != 0: must fall back). Each row says how many CuTe calls it made.
2. syncs and launches of one forward + backward at 65,536 with CuTe on.
3. time at 65,536 (d = 512, 768), CuTe on/off interleaved, median of 10 each, peak memory beyond inputs + grads.
4. 1,048,576 x 512: on/off, two calls each.
5. torch.compile(fullgraph=True) and CUDA-graph replay of a training step at N = 20,000 with CuTe on.
"""
import json
import os
import site
import sys
import time
import traceback

site.addsitedir(os.environ.get("CUTE_SITE", "/tmp/site"))
sys.path.insert(0, os.getcwd())
import torch  # noqa: E402

import batchlab.losses.cute as cute  # noqa: E402
from batchlab.losses.cute import _streaming  # noqa: E402
from tests.losses import gpu_large_run as L  # noqa: E402
from tests.losses.gpu_check_overhead import compile_and_graph_check  # noqa: E402
from batchlab.bench.losses import count_syncs  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/cute_check")
os.makedirs(OUT, exist_ok=True)
STEPS = os.environ.get("CUTE_STEPS", "check,configs,sync,time,n1m,graph").split(",")
res = {"check": [], "sync": [], "time": [], "n1m": [], "graph": [], "errors": []}
calls = {"sums": 0, "grad": 0}
_orig = {"sums": _streaming.shifted_sums, "grad": _streaming.logit_grad_panel}


def _counting(name):
    def wrapper(*a, **kw):
        calls[name] += 1
        return _orig[name](*a, **kw)
    return wrapper


_streaming.shifted_sums, _streaming.logit_grad_panel = _counting("sums"), _counting("grad")


def dump():
    with open(os.path.join(OUT, "cute_check.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)


def case(q, k, b, scale, mode, **tags):
    cute.MODE = mode
    before = dict(calls)
    out = {"check": []}
    ok = L._s7_case(out, q, k, b, "info_nce", scale)
    row = dict(out["check"][-1], mode=mode, cute_calls={n: calls[n] - before[n] for n in calls}, **tags)
    res["check"].append(row)
    dump()
    return ok


def step_check():
    for n in (20000, 65536):
        q, k, _, b = L.leaves(n, 512, seed=n)
        for scale in (0.01, 14.3, 100.0):
            for mode in ("1", "0"):
                case(q, k, b, scale, mode)
                L._free()
        del q, k
    q, k, _, b = L.leaves(20000, 768, seed=1)
    q, k = (x.detach().half().requires_grad_() for x in (q, k))
    for mode in ("1", "0"):
        case(q, k, b, 14.3, mode, dtype="fp16")
    q, k, _, b = L.leaves(20004, 512, seed=2)
    case(q, k, b, 14.3, "1", note="M % 8 != 0: Triton")


def step_sync():
    cute.MODE = "1"
    q, k, s, _ = L.leaves(65536, 512)

    def call():
        return torch.autograd.grad(L.loss_of("info_nce", q, k, s, None), [q, k, s])

    names = L.kernels_of(call)
    caught = L._sync_warnings(call)
    res["sync"].append({"N": 65536, "launches": len(names), "syncs": count_syncs(caught),
                        "by_kernel": {name[:80]: names.count(name) for name in set(names)}})
    L.say(json.dumps(res["sync"][-1]))


def step_time():
    for d in (512, 768):
        q, k, s, _ = L.leaves(65536, d)

        def call():
            return torch.autograd.grad(L.loss_of("info_nce", q, k, s, None), [q, k, s])

        for rnd in range(2):
            for mode in ("1", "0"):
                cute.MODE = mode
                peak, _ = L._peak_mib(call)
                ms = L._median_ms(call, 10)
                res["time"].append({"N": 65536, "d": d, "mode": mode, "round": rnd, "ms": ms,
                                    "beyond_grads_mib": peak - 2 * 65536 * d * 2 / 2**20})
                L.say(json.dumps(res["time"][-1]))
                dump()
        del q, k
        L._free()


def step_n1m():
    q, k, s, _ = L.leaves(1 << 20, 512)
    for mode in ("1", "0", "1", "0"):
        cute.MODE = mode
        rows = []
        L._time_info_nce(q, k, s, rows)
        res["n1m"].append(dict(rows[-1], mode=mode))
        dump()


def step_configs():
    """Kernel time of the two CuTe passes at 65,536 x 512 by tile config (do_bench medians; grad: 8 panels)."""
    import triton.testing
    from batchlab.losses.triton import _lse

    q, k, s, _ = L.leaves(65536, 512)
    q, k, s = q.detach(), k.detach(), s.detach()
    s32 = s.float().reshape(1)
    ctl = _lse.control(q, k, s)
    f32 = dict(device="cuda", dtype=torch.float32)
    rs, cs, dsr = torch.empty(65536, **f32), torch.empty(65536, **f32), torch.empty(8192, **f32)
    cute.MODE = "0"
    row2, col2 = _lse.lse_forward(q, k, s, None, cols=True, exclude=False)
    g = torch.full((65536,), 1 / 131072, **f32)
    out = torch.empty(8192, 65536, device="cuda", dtype=torch.bfloat16)
    base = {key: dict(v) for key, v in _streaming.CONFIGS.items()}
    calls_of = {"sums": lambda: _orig["sums"](q, k, s32, ctl, rs, cs),
                "grad": lambda: _orig["grad"](q[:8192], k, s32, s32, row2[:8192], g[:8192], col2, g, out, dsr)}
    for which in ("sums", "grad"):
        for tm, tn, cm, pp in ((128, 192, 2, True), (128, 128, 2, True), (128, 256, 2, False), (128, 256, 1, False),
                               (128, 192, 1, True), (256, 128, 1, False), (128, 128, 1, True)):
            _streaming.CONFIGS[which] = dict(tile_M=tm, tile_N=tn, cluster_M=cm, cluster_N=1, pingpong=pp)
            row = {"pass": which, **_streaming.CONFIGS[which]}
            try:
                row["ms"] = triton.testing.do_bench(calls_of[which], warmup=5, rep=60, return_mode="median") * (
                    8 if which == "grad" else 1)
            except Exception as exc:  # noqa: BLE001 - a config that fails is a result
                row["error"] = repr(exc)[:300]
            finally:
                _streaming.CONFIGS[which] = dict(base[which])
            res.setdefault("configs", []).append(row)
            L.say(json.dumps(row))
            dump()


def step_graph():
    cute.MODE = "1"
    before = dict(calls)
    compile_and_graph_check("info_nce", 20000, 64, 512, res["graph"])
    res["graph"].append({"cute_calls": {n: calls[n] - before[n] for n in calls}})
    for row in res["graph"]:
        L.say(json.dumps(row)[:400])


for name in STEPS:
    t = time.time()
    try:
        globals()[f"step_{name}"]()
    except Exception as exc:  # noqa: BLE001 - the next step still runs
        res["errors"].append(f"{name}: {exc!r}"[:800])
        traceback.print_exc()
        L._free()
    L.say(f"step {name}: {time.time() - t:.1f} s")
    dump()
bad = [r for r in res["check"] if not r.get("ok")]
print("checks:", len(res["check"]), "failed:", len(bad), "errors:", len(res["errors"]), flush=True)
for r in res["check"]:
    print({key: r.get(key) for key in ("N", "scale", "mode", "dtype", "loss_err", "grad_err", "scale_grad_err",
                                       "scale_grad_err_ds_off", "ok", "cute_calls")}, flush=True)
