"""Host time per call of the small-batch Triton path on the CPU, kernels mocked (session 6, issue 21).

Each compiled-kernel entry of ``_dense._Kernel`` is primed with a fake whose launch does nothing, so
what is timed is batchlab's Python and torch's CPU ops around the launches (not the CUDA costs of
the GPU machine). Run with Triton 3.6's Python package first on the path to time its host code:

    PYTHONPATH=<triton-3.6.0 unpacked> python benchmarks/results/losses-h200-s6/host_harness.py siglip [--prof]

Min over 40 batches of 200 calls (N = 64, d = 32, fp32): before the session-6 changes SigLIP
87 us, InfoNCE 97 us; after 73 and 85 us (2 shared CPU cores, so only the minima are comparable).
"""
import cProfile, pstats, sys, time, os
import torch, torch.nn.functional as F
torch.set_num_threads(1)
from batchlab.losses import info_nce, siglip, _dispatch
from batchlab.losses.triton import _dense, _impl
import triton

class FakeCompiled:
    packed_metadata = ()
    function = 0
    def run(self, *a): pass
    def launch_metadata(self, *a): return None

# every _Kernel: pretend compiled already
orig_call = _dense._Kernel.__call__
def prime(self, grid, args, consts):
    key = (tuple(consts.items()), tuple(map(_dense._arg_key, args)))
    if key not in self.compiled:
        names = self.fn.arg_names[len(args):]
        params = self.fn.params[len(args):]
        tail = tuple(consts[n] if n in consts else p.default for n, p in zip(names, params))
        self.compiled[key] = (FakeCompiled(), tail) if not hasattr(_dense, 'RAW_LAUNCH') else (FakeCompiled(), tail, None)
    return orig_call(self, grid, args, consts)
_dense._Kernel.__call__ = prime
_dense._current_stream = lambda: 0
_dense.DIRECT_LAUNCH = True
_dense._INTERPRET = False
_dispatch._TRITON_USABLE[torch.device("cpu")] = True
orig_usable = _dispatch._triton_usable
_dispatch._triton_usable = lambda d: True
from batchlab.losses.triton import _launch
_launch.interpreting = lambda: False
_dense.config = lambda kernel, dtype: {k: v for k, v in _launch.CONFIGS[kernel].items() if k in ("BM","BN","BD","num_warps","num_stages")}

fam = sys.argv[1] if len(sys.argv) > 1 else "siglip"
n, d = 64, 32
q = F.normalize(torch.randn(n, d), dim=1).requires_grad_()
k = F.normalize(torch.randn(n, d), dim=1).requires_grad_()
s = torch.tensor(14.0, requires_grad=True); b = torch.tensor(-10.0, requires_grad=True)
os.environ["BATCHLAB_CHECK_INPUTS"] = "0"
if fam == "siglip":
    step = lambda: torch.autograd.grad(siglip(q, k, s, b), [q, k, s, b])
elif fam == "info_nce":
    step = lambda: torch.autograd.grad(info_nce(q, k, s), [q, k, s])
else:
    from open_clip.loss import ClipLoss, SigLipLoss
    L = SigLipLoss() if fam == "oc_siglip" else ClipLoss()
    step = (lambda: torch.autograd.grad(L(q, k, s, b), [q, k, s, b])) if fam == "oc_siglip" else (lambda: torch.autograd.grad(L(q, k, s), [q, k, s]))
for _ in range(50): step()
_dense._Kernel.__call__ = orig_call  # every specialisation is primed: measure the real launch path
reps = 200
best = []
for _ in range(40):
    t = time.perf_counter()
    for _ in range(reps): step()
    best.append((time.perf_counter() - t) / reps * 1e6)
best.sort()
print(f"{fam}: host us/call min {best[0]:.1f} p10 {best[4]:.1f} median {best[20]:.1f}")
if "--prof" in sys.argv:
    pr = cProfile.Profile(); pr.enable()
    for _ in range(500): step()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(35)
