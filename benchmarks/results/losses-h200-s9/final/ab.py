"""Session 9 call 7: (1) ISogCLRLoss fp32 module check (N = 1,500, d = 128, 2 steps vs float64 reference) with the
shipped backward (G0=1) and with G0=0, MASK_ALL=1 (the session-8 options); (2) InfoNCE at 1,048,576 x 512:
streaming glue on (default) vs off (session 8 path) vs DK_IN_PLACE, interleaved, 2 timed calls each."""
import json, os, sys, time
from pathlib import Path
import torch, torch.nn.functional as F
sys.path.insert(0, os.getcwd())
from batchlab.losses import ISogCLRLoss, info_nce
from batchlab.losses.triton import _sogclr, _lse
from tests.losses.gpu_large_run import leaves
out = Path(os.environ["OUT"]); out.mkdir(parents=True, exist_ok=True); res = {"iso": [], "n1m": []}
def err(a, b):
    a, b = a.double(), b.double(); return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
def module(n, d):
    fused = ISogCLRLoss(n, impl="triton", check_inputs=False).cuda(); ref = ISogCLRLoss(n, impl="reference", check_inputs=False).double().cuda()
    gen = torch.Generator().manual_seed(n); worst = {}
    for _ in range(2):
        ids = torch.randperm(n, generator=gen).cuda()
        q, k = (F.normalize(torch.randn(n, d, generator=gen), dim=1).cuda() for _ in range(2))
        got, want = [], []
        for fn, o, dt in ((fused, got, torch.float32), (ref, want, torch.float64)):
            qq, kk = q.to(dt).requires_grad_(), k.to(dt).requires_grad_()
            loss = fn(qq, kk, ids); o += [loss.detach(), *torch.autograd.grad(loss, [qq, kk])]
        for nm, a, b in zip(["loss", "dq", "dk"], got, want):
            worst[nm] = max(worst.get(nm, 0.0), err(a, b))
    for nm, buf in ref.state_dict().items():
        worst[nm] = err(fused.state_dict()[nm], buf)
    return worst
base = dict(_sogclr.CONFIGS["bwd"]); basef = dict(_sogclr.CONFIGS["fwd"])
for label, bwd in (("shipped", {}), ("G0=0", {"G0": 0})):
    _sogclr.CONFIGS["bwd"] = dict(base, **bwd)
    for n in (1500, 300):
        r = {"variant": label, "n": n, **module(n, 128)}; res["iso"].append(r); print(json.dumps(r), flush=True)
    _sogclr.CONFIGS["bwd"] = dict(base); _sogclr.CONFIGS["fwd"] = dict(basef)
(out / "ab.json").write_text(json.dumps(res, indent=1))
q, k, s, _ = leaves(1 << 20, 512)
paths = {"default": (True, False), "stream_off": (False, False), "dk_in_place": (True, True)}
def step(): torch.autograd.grad(info_nce(q, k, s), [q, k, s])
for name, (on, dk) in paths.items():
    _lse.STREAM_LOSS, _lse.DK_IN_PLACE = on, dk; step(); torch.cuda.synchronize()
for rnd in range(2):
    for name, (on, dk) in paths.items():
        _lse.STREAM_LOSS, _lse.DK_IN_PLACE = on, dk
        torch.cuda.synchronize(); t = time.perf_counter(); step(); torch.cuda.synchronize()
        r = {"path": name, "round": rnd, "s": time.perf_counter() - t}; res["n1m"].append(r); print(json.dumps(r), flush=True)
        (out / "ab.json").write_text(json.dumps(res, indent=1))
