"""Compile batchlab's CuTe epilogue GEMMs for sm_90a on a machine without a GPU (QUACK_ARCH=90 CUTE_DSL_ARCH=sm_90a),
and print each kernel's registers and stack from the cubin in quack's cache (an offline check before a GPU run)."""
import os, site, sys, time, glob, subprocess
site.addsitedir(os.environ.get("CUTE_SITE", ".cache/cute311"))
sys.path.insert(0, os.getcwd())
os.environ.setdefault("QUACK_ARCH", "90"); os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
import torch
import quack.gemm_runtime.host as _host
from quack.cache.async_compile import _install_gpu_blind_device_attrs, _pin_dsl_arch
from cutlass import Float32
_host.get_max_active_clusters = lambda cluster_size, *a, **kw: 132 // cluster_size
_pin_dsl_arch(os.environ["CUTE_DSL_ARCH"]); _install_gpu_blind_device_attrs()
from batchlab.losses.cute import _epilogues, _streaming
ptr = ("pointer", Float32)
n, m, d = 1000, 1016, 512
q = torch.zeros(n, d, dtype=torch.bfloat16); k = torch.zeros(m, d, dtype=torch.bfloat16)
vr, vc = torch.zeros(1, n), torch.zeros(1, m)
for name, cfg in _streaming.CONFIGS.items():
    t = time.time()
    if name == "sums":
        rp = torch.zeros(n, -(-m // cfg["tile_N"])); cp = torch.zeros(-(-n // cfg["tile_M"]), m)
        _epilogues.shifted_sums[True].gemm(q, k, None, epi_args=dict(scale=1.0, ref2=1.0, rsum=rp, csum=cp), _launch=False,
                                     epi_key_overrides={"scale": ptr, "ref2": ptr}, **cfg)
    else:
        out = torch.zeros(n, m, dtype=torch.bfloat16); ds = torch.zeros(n, -(-m // cfg["tile_N"]))
        for mod, extra in ((_epilogues.logit_grad, {}), (_epilogues.logit_grad_ds[True], {"ds": ds}), (_epilogues.logit_grad_ds[False], {"ds": ds})):
            mod.gemm(q, k, out, epi_args=dict(scale=1.0, lse_r=vr, g_r=vr, lse_c=vc, g_c=vc, ginv=1.0, **extra),
                     _launch=False, epi_key_overrides={"scale": ptr, "ginv": ptr}, **cfg)
    print(name, cfg, f"{time.time() - t:.1f} s", flush=True)
cu = glob.glob(".cache/t36/triton/backends/nvidia/bin/cuobjdump")[0]
for f in sorted(glob.glob(os.path.join(os.environ.get("QUACK_CACHE_DIR", f"/tmp/{os.environ.get('USER', 'root')}/quack_cache"), "*", "*.o")), key=os.path.getmtime)[-3:]:
    data = open(f, "rb").read(); i = data.find(b"\x7fELF", 1)
    open("/tmp/_emb.cubin", "wb").write(data[i:])
    usage = subprocess.run([cu, "--dump-resource-usage", "/tmp/_emb.cubin"], capture_output=True, text=True).stdout
    for line in usage.splitlines():
        if "Function" in line: print(line.split("GemmMod_")[-1][:60])
        if "REG" in line: print("   ", line.strip()[:60])
os.remove("/tmp/_emb.cubin")
