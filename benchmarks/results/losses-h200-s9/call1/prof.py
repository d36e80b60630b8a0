"""Session 9 call 1: where the time goes at N = 65,536 (d = 512, bf16, random unit rows): per-kernel CUDA time of one
forward + backward of info_nce / siglip (impl auto) and SogCLRLoss / ISogCLRLoss (torch.profiler, 3 calls), and the
SigLIP pass alone for a few launch configs (triton do_bench, median)."""
import json, os, sys, time
from pathlib import Path
import torch
sys.path.insert(0, os.getcwd())
from torch.profiler import profile, ProfilerActivity
from batchlab.bench.sogclr import _step
from batchlab.bench.losses_triton import _grid_inputs, _grid_fn, _bench_ms, _v
from batchlab.losses.triton import _launch
from tests.losses.gpu_large_run import leaves, loss_of
out = Path(os.environ["OUT"]); out.mkdir(parents=True, exist_ok=True)
N = int(os.environ.get("N", 65536))
res = {}
q, k, s, b = leaves(N, 512)
steps = {"info_nce": lambda: torch.autograd.grad(loss_of("info_nce", q, k, s, b), [q, k, s]),
         "siglip": lambda: torch.autograd.grad(loss_of("siglip", q, k, s, b), [q, k, s, b]),
         "sogclr": _step("sogclr triton", N, q, k), "isogclr": _step("isogclr triton", N, q, k)}
for name, fn in steps.items():
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 3 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        ct = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if ct:
            rows.append({"name": ev.key[:90], "count": ev.count // 3, "ms_per_step": ct / 3 / 1e3})
    rows.sort(key=lambda r: -r["ms_per_step"])
    res[name] = {"wall_ms": wall, "kernels": rows[:25], "kernel_ms": sum(r["ms_per_step"] for r in rows)}
    print(name, f"wall {wall:.2f} ms, kernels {res[name]['kernel_ms']:.2f} ms", flush=True)
    for r in rows[:12]:
        print(f"   {r['ms_per_step']:8.3f} ms  x{r['count']:<4d} {r['name']}", flush=True)
(out / "prof65k.json").write_text(json.dumps(res, indent=1))
del steps, q, k; torch.cuda.empty_cache()
# SigLIP pass (kernel + 2 products per panel) under launch configs; first = default
sig = [dict(_launch.CONFIGS["siglip"]), _v(0, BM=128, BN=128, num_warps=8, num_stages=3),
       _v(1, BM=128, BN=128, num_warps=8, num_stages=3), _v(1, BM=128, BN=128, num_warps=8, num_stages=2),
       _v(0, BM=64, BN=128, num_warps=4, num_stages=3), _v(0, BM=64, BN=256, num_warps=8, num_stages=3)]
extra = json.loads(os.environ.get("SIG_VARIANTS", "[]"))
saved = dict(_launch.CONFIGS["siglip"])
qq, kk, ss, bb = _grid_inputs(N, 512, torch.bfloat16, "cuda")
vrows = []
for cfg in sig + extra:
    _launch.CONFIGS["siglip"] = dict(cfg)
    try:
        ms = _bench_ms(_grid_fn("siglip", qq, kk, ss, bb)); st = "ok"
    except Exception as exc:
        ms, st = None, f"{type(exc).__name__}: {str(exc)[:200]}"
    vrows.append({"cfg": cfg, "ms": ms, "status": st}); print("siglip pass", cfg, ms, st, flush=True)
_launch.CONFIGS["siglip"] = saved
(out / "siglip_variants.json").write_text(json.dumps(vrows, indent=1))
