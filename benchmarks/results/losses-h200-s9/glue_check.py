"""Session 9, helper glue: InfoNCE at N = 65,536 (d = 512, bf16, random unit rows), info_nce(impl="auto"),
the new streaming path (``_lse.STREAM_LOSS``: positives, loss and gradient glue in ``_glue``'s kernels) against
the old one (the switch off) and the new one with dk accumulated in bf16 (``_lse.DK_IN_PLACE``), in one process:

* median of 20 forward + backward calls (CUDA events, after warm-up), per path, 3 rounds interleaved; d = 768 too;
* the profiler's kernel list (name, count, ms per step) and launches per step (kernels + memsets);
* host syncs of one call (``set_sync_debug_mode("warn")``); peak memory beyond inputs and gradients; the
  kernels of one step in launch order;
* loss / q, k, scale gradient errors against the fp32 reference (s = 1/0.07 and 0.01), and new vs old;
* torch.compile(fullgraph=True) and CUDA-graph replay of a tiny model's step on the new path (N = 4,096 forced
  onto the streaming kernels).

JSON: $OUT/glue.json. ~40 s on one H200. Env: N (default 65536); GLUE_ONLY=compile: only the last part (~10 s).
"""
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.getcwd())
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from batchlab.bench.losses import count_syncs  # noqa: E402
from batchlab.losses import info_nce  # noqa: E402
from batchlab.losses.triton import _lse  # noqa: E402
from tests.losses.gpu_large_run import leaves  # noqa: E402
from tests.losses.gpu_small_run import rel, timed  # noqa: E402

T0 = time.time()
out = Path(os.environ.get("OUT", "/tmp/glue_out"))
out.mkdir(parents=True, exist_ok=True)
N = int(os.environ.get("N", 65536))
res = {"N": N, "d": 512, "torch": torch.__version__, "time": {}, "profile": {}, "syncs": {}, "check": []}


def say(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def dump():
    (out / "glue.json").write_text(json.dumps(res, indent=1, default=str))


ONLY_COMPILE = os.environ.get("GLUE_ONLY") == "compile"
q, k, s, _ = leaves(N if not ONLY_COMPILE else 256, 512)


def step():
    return torch.autograd.grad(info_nce(q, k, s), [q, k, s])


paths = {"new": (True, False), "new_dk_bf16": (True, True), "old": (False, False)}


def use(name):
    _lse.STREAM_LOSS, _lse.DK_IN_PLACE = paths[name]


for name in ([] if ONLY_COMPILE else paths):  # warm-up / compile all
    use(name)
    for _ in range(3):
        step()
torch.cuda.synchronize()
say("warm")

for rnd in range(0 if ONLY_COMPILE else 3):
    for name in paths:
        use(name)
        ms, host = timed(step, reps=20)
        res["time"].setdefault(name, []).append({"median_ms": ms, "host_ms": host})
        say(name, f"median {ms:.3f} ms, host {host:.3f} ms")
        dump()

for name in ([] if ONLY_COMPILE else paths):
    use(name)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
             and "memcpy" not in e.name.lower()]
    res.setdefault("order", {})[name] = [x[:60] for x in names[: len(names) // 3]]  # one step, in launch order
    rows = []
    for ev in prof.key_averages():
        ct = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if ct:
            rows.append({"name": ev.key[:100], "count": ev.count / 3, "ms_per_step": ct / 3 / 1e3})
    rows.sort(key=lambda r: -r["ms_per_step"])
    res["profile"][name] = {"launches_per_step": len(names) / 3, "kernel_ms": sum(r["ms_per_step"] for r in rows),
                            "kernels": rows}
    say(name, f"launches/step {len(names) / 3:.1f}, kernel ms {res['profile'][name]['kernel_ms']:.3f}")
    for r in rows:
        say(f"   {r['ms_per_step']:8.3f} ms  x{r['count']:<5.1f} {r['name']}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    res["syncs"][name] = count_syncs([str(w.message) for w in caught])
    say(name, "syncs", res["syncs"][name])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = step()
    torch.cuda.synchronize()
    res.setdefault("peak_mib_beyond_inputs_and_grads", {})[name] = (
        torch.cuda.max_memory_allocated() - base - sum(x.numel() * x.element_size() for x in grads)) / 2**20
    del grads
    say(name, "peak MiB beyond inputs and gradients", res["peak_mib_beyond_inputs_and_grads"][name])
    dump()

# errors against the fp32 reference (one scale at a time: the reference holds several N x N fp32 tensors)
for scale in (() if ONLY_COMPILE else (1 / 0.07, 0.01)):
    ss = torch.tensor(scale, device="cuda", requires_grad=True)
    got = {}
    for name in paths:
        use(name)
        loss = info_nce(q, k, ss)
        got[name] = [loss.detach(), *torch.autograd.grad(loss, [q, k, ss])]
        del loss
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, ss)]
    loss = info_nce(*ref_in, impl="reference")
    ref = [loss.detach(), *torch.autograd.grad(loss, ref_in)]
    del loss, ref_in
    torch.cuda.empty_cache()
    row = {"scale": scale, "ref_loss": float(ref[0]), "ref_scale_grad": float(ref[3])}
    for name in paths:
        for label, a, b in zip(("loss", "dq", "dk", "ds"), got[name], ref):
            row[f"{name}_{label}_err"] = rel(a, b)
    for label, a, b in zip(("loss", "dq", "dk", "ds"), got["new"], got["old"]):
        row[f"new_vs_old_{label}"] = rel(a, b)
    for label, a, b in zip(("loss", "dq", "dk", "ds"), got["new"], got["new_dk_bf16"]):
        row[f"new_vs_dk_bf16_{label}"] = rel(a, b)
    res["check"].append(row)
    say(json.dumps(row))
    dump()
    del got, ref
    torch.cuda.empty_cache()
use("new")
del q, k
torch.cuda.empty_cache()

# d = 768: new / old, 2 rounds
q, k, s, _ = leaves(N if not ONLY_COMPILE else 256, 768)
res["time768"] = {}
for name in (() if ONLY_COMPILE else ("new", "old")):
    use(name)
    for _ in range(2):
        step()
for rnd in range(0 if ONLY_COMPILE else 2):
    for name in ("new", "old"):
        use(name)
        ms, host = timed(step, reps=20)
        res["time768"].setdefault(name, []).append({"median_ms": ms, "host_ms": host})
        say("d=768", name, f"median {ms:.3f} ms")
        dump()
use("new")
del q, k
torch.cuda.empty_cache()

# compile (fullgraph) and CUDA-graph replay of a tiny model's step on the streaming kernels
from batchlab.losses.triton import _dense  # noqa: E402
from tests.losses.gpu_check_overhead import compile_and_graph_check  # noqa: E402

_dense.DENSE_MAX_LOGITS = 0
res["compile_graph"] = []
try:
    compile_and_graph_check("info_nce", 4096, 64, 512, res["compile_graph"])
except Exception as exc:  # noqa: BLE001
    res["compile_graph"].append({"error": repr(exc)[:600]})
for row in res["compile_graph"]:
    say(json.dumps(row))
dump()
say("done")
