"""Offline: compile siglip launches for sm_90 with Triton 3.6; print regs/spills; optionally dump asm."""
import os, sys, json, re
sys.path.insert(0, os.getcwd())
import torch, triton
from batchlab.bench.losses_triton import capture_launches, _aot_rows, _grid_inputs, _grid_fn, _v
from batchlab.losses.triton import _launch
import batchlab.bench.losses_triton as lt
_launch.SHAPE_KEYS = tuple(_launch.SHAPE_KEYS) + ("maxnreg",)
_launch.KERNEL_OPTIONS["siglip"] = tuple(_launch.KERNEL_OPTIONS["siglip"]) + ("TPP", "FLAT")

cfgs = json.loads(sys.argv[1]) if len(sys.argv) > 1 else [_v(0, BM=64, BN=128, num_warps=4, num_stages=4)]
dump = os.environ.get("DUMP")
orig = triton.compile
def comp(*a, **k):
    c = orig(*a, **k)
    if dump:
        name = a[0].fn.__name__ if hasattr(a[0], "fn") else "k"
        for key in ("ttgir", "ptx", "llir"):
            open(f"{dump}_{name}.{key}", "w").write(c.asm[key])
        import subprocess, tempfile
        from pathlib import Path
        tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
            fh.write(c.asm["cubin"]); fh.flush()
            sass = subprocess.run([str(tools / "cuobjdump"), "--dump-sass", fh.name], capture_output=True, text=True).stdout
        open(f"{dump}_{name}.sass", "w").write(sass)
    return c
triton.compile = comp
N = int(os.environ.get("NN", 1024))
for cfg in cfgs:
    with capture_launches(_launch.CONFIGS) as cap:
        _launch.CONFIGS["siglip"] = dict(cfg)
        q, k, s, b = _grid_inputs(N, 512, torch.bfloat16, "cpu")
        _grid_fn("siglip", q, k, s, b)()
    for kw, row in _aot_rows(cap, keep=lambda n: "siglip" in n):
        print(json.dumps(cfg), {x: row.get(x) for x in ("kernel_fn", "regs", "spill_ops", "shared_kib", "ctas_per_sm", "HGMMA", "status")}, flush=True)
