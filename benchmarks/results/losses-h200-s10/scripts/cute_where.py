"""Session 10: where the CuTe grad pass spends its time (epilogue variants at 65,536 x 512, 8 panels of 8,192 rows),
and the SM clock / power while whole InfoNCE steps run on the Triton and on the CuTe kernels (power-bound?)."""
import json, os, site, subprocess, sys, time
site.addsitedir(os.environ.get("CUTE_SITE", "/tmp/site"))
sys.path.insert(0, os.getcwd())
import torch
import triton.testing
from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.math import pexp2
from quack.epilogue.ops import ColVecLoad, ColVecReduce, RowVecLoad, RowVecReduce
import batchlab.losses.cute as cute
from batchlab.losses.cute import _epilogues, _streaming
from batchlab.losses import info_nce
from batchlab.losses.triton import _lse
from tests.losses import gpu_large_run as L

OUT = os.environ.get("OUT", "/tmp/where"); os.makedirs(OUT, exist_ok=True)
res = {"grad": [], "sums": [], "power": []}
LOG2E = 1.4426950408889634


def vec():
    return {"lse_r": ColVecLoad("lse_r"), "g_r": ColVecLoad("g_r"), "lse_c": RowVecLoad("lse_c"), "g_c": RowVecLoad("g_c")}


@gemm_epilogue(reduces={"ds": ColVecReduce("ds", scaled=True)}, ops=vec())
def one_exp_ds(acc, scale, lse_r, g_r, lse_c, g_c, ginv):  # lse_c := b_j = g_c 2^-lse_c, g_c := a... (timing only)
    p = pexp2(acc * (scale * LOG2E) - lse_r)
    g = p * (g_r + lse_c * g_c)
    return {"D": g * ginv, "ds": (g, acc)}


@gemm_epilogue(reduces={"ds": ColVecReduce("ds", scaled=True)}, ops=vec())
def two_exp_ds_no_store(acc, scale, lse_r, g_r, lse_c, g_c, ginv):
    s2 = scale * LOG2E
    g = g_r * pexp2(acc * s2 - lse_r) + g_c * pexp2(acc * s2 - lse_c)
    return {"ds": (g, acc)}


@gemm_epilogue()
def store_only(acc, ginv):
    return {"D": acc * ginv}


@gemm_epilogue(reduces={"rsum": ColVecReduce("rsum")})
def row_sums_only(acc, scale, ref2):
    return {"rsum": pexp2(acc * (scale * LOG2E) - ref2)}


n, p = 65536, 8192
q, k, s, _ = L.leaves(n, 512)
q, k, s = q.detach(), k.detach(), s.detach()
s32 = s.float().reshape(1)
ctl = _lse.control(q, k, s)
cute.MODE = "0"
row2, col2 = _lse.lse_forward(q, k, s, None, cols=True, exclude=False)
f32 = dict(device="cuda", dtype=torch.float32)
g = torch.full((n,), 1 / (2 * n), **f32)
out = torch.empty(p, n, device="cuda", dtype=torch.bfloat16)
cfg = dict(_streaming.CONFIGS["grad"])
parts = torch.empty(p, n // cfg["tile_N"], **f32)
vecs = dict(lse_r=row2[:p][None], g_r=g[:p][None], lse_c=col2[None], g_c=g[None])
grad_variants = {
    "shipped (2 exp, ds, store)": lambda: _epilogues.logit_grad_ds[False].gemm(q[:p], k, out, epi_args=dict(scale=s32, ginv=s32, ds=parts, **vecs), **cfg),
    "no ds (2 exp, store)": lambda: _epilogues.logit_grad.gemm(q[:p], k, out, epi_args=dict(scale=s32, ginv=s32, **vecs), **cfg),
    "1 exp, ds, store": lambda: one_exp_ds.gemm(q[:p], k, out, epi_args=dict(scale=s32, ginv=s32, ds=parts, **vecs), **cfg),
    "2 exp, ds, no store": lambda: two_exp_ds_no_store.gemm(q[:p], k, None, epi_args=dict(scale=s32, ginv=s32, ds=parts, **vecs), **cfg),
    "store acc only": lambda: store_only.gemm(q[:p], k, out, epi_args=dict(ginv=s32), **cfg),
    "torch.mm (bf16 out)": lambda: torch.mm(q[:p], k.T, out=out),
}
for name, fn in grad_variants.items():
    try:
        fn(); torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * (n // p)
        res["grad"].append({"variant": name, "ms_65536": ms})
    except Exception as exc:  # noqa: BLE001
        res["grad"].append({"variant": name, "error": repr(exc)[:300]})
    print(json.dumps(res["grad"][-1]), flush=True)
scfg = dict(_streaming.CONFIGS["sums"])
rp = torch.empty(n, n // scfg["tile_N"], **f32); cp = torch.empty(n // scfg["tile_M"], n, **f32)
for name, fn in {"shipped (rows + cols)": lambda: _epilogues.shifted_sums[False].gemm(q, k, None, epi_args=dict(scale=s32, ref2=ctl[:1], rsum=rp, csum=cp), **scfg),
                 "rows only": lambda: row_sums_only.gemm(q, k, None, epi_args=dict(scale=s32, ref2=ctl[:1], rsum=rp), **scfg),
                 "triton lse_forward (all of it)": lambda: _lse.lse_forward(q, k, s, None, cols=True, exclude=False)}.items():
    try:
        fn(); torch.cuda.synchronize()
        res["sums"].append({"variant": name, "ms": triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")})
    except Exception as exc:  # noqa: BLE001
        res["sums"].append({"variant": name, "error": repr(exc)[:300]})
    print(json.dumps(res["sums"][-1]), flush=True)
del out, rp, cp, parts
torch.cuda.empty_cache()
# whole steps under nvidia-smi sampling
qq, kk, ss, _ = L.leaves(n, 512)
log = open(os.path.join(OUT, "smi.csv"), "w")
smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader,nounits", "-lms", "100"], stdout=log)
time.sleep(1)
for rnd in range(2):
    for mode in ("0", "1"):
        cute.MODE = mode
        step = lambda: torch.autograd.grad(info_nce(qq, kk, ss), [qq, kk, ss])
        step(); torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(40):
            step()
        torch.cuda.synchronize()
        res["power"].append({"mode": mode, "round": rnd, "start": t0, "end": time.time(), "ms_per_step": (time.time() - t0) / 40 * 1e3})
        print(json.dumps(res["power"][-1]), flush=True)
time.sleep(0.5); smi.terminate(); log.close()
import datetime
rows = []
for line in open(os.path.join(OUT, "smi.csv")):
    parts_ = [x.strip() for x in line.split(",")]
    try:
        ts = datetime.datetime.strptime(parts_[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        rows.append((ts, float(parts_[1]), float(parts_[2]), float(parts_[3])))
    except Exception:  # noqa: BLE001
        pass
for ph in res["power"]:
    sel = [r for r in rows if ph["start"] <= r[0] <= ph["end"]]
    if sel:
        ph.update(samples=len(sel), sm_mhz=sum(r[1] for r in sel) / len(sel), watts=sum(r[2] for r in sel) / len(sel),
                  max_watts=max(r[2] for r in sel), temp=max(r[3] for r in sel))
    print(json.dumps(ph), flush=True)
json.dump(res, open(os.path.join(OUT, "where.json"), "w"), indent=1)
