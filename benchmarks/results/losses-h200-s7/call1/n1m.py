"""Session 7, call 1: 1M end to end (InfoNCE one-tile vs looped forward, DS_SUM on/off; SigLIP) and 65,536 DS variants."""
import json, os, sys, time
from pathlib import Path
import torch
sys.path.insert(0, os.getcwd())
from tests.losses.gpu_large_run import leaves, loss_of, _median_ms
from batchlab.losses.triton import _lse, _launch, _dense
OUT = Path(os.environ["OUT"]) / "n1m"; OUT.mkdir(parents=True, exist_ok=True)
rows = []
T0 = time.time()
def rec(**r):
    r["t"] = round(time.time() - T0, 1); rows.append(r); print(json.dumps(r), flush=True)
    (OUT / "n1m.json").write_text(json.dumps(rows, indent=1))
base = dict(_launch.CONFIGS["bwd"])
# 65,536 first (fast): default vs DS loop vs DS one-tile two-exp, both families where applicable
for fam in ("info_nce", "siglip"):
    q, k, s, b = leaves(65536, 512)
    inputs = [q, k, s] + ([b] if fam == "siglip" else [])
    for name, ds, extra in (("default", False, {}), ("DS tile two-exp", True, dict(TILE=1, TWO_EXP=1)), ("tile two-exp", False, dict(TILE=1, TWO_EXP=1))):
        if fam == "siglip" and name != "default":
            continue
        _lse.DS_SUM = ds; _launch.CONFIGS["bwd"] = dict(base, **extra)
        ms = _median_ms(lambda: torch.autograd.grad(loss_of(fam, q, k, s, b), inputs), 10)
        rec(family=fam, N=65536, variant=name, ms=ms)
    _lse.DS_SUM = False; _launch.CONFIGS["bwd"] = base
del q, k
q, k, s, b = leaves(1 << 20, 512)
def once(fam):
    inputs = [q, k, s] + ([b] if fam == "siglip" else [])
    torch.cuda.synchronize(); t = time.perf_counter()
    torch.autograd.grad(loss_of(fam, q, k, s, b), inputs); torch.cuda.synchronize()
    return time.perf_counter() - t
for name, limit, ds, extra in (("one-tile fwd", 2**62, False, {}), ("looped fwd", 0, False, {}),
                               ("one-tile fwd + DS tile two-exp", 2**62, True, dict(TILE=1, TWO_EXP=1))):
    _lse.TILE_FWD_MAX_KEY_BYTES = limit; _lse.DS_SUM = ds; _launch.CONFIGS["bwd"] = dict(base, **extra)
    ts = [once("info_nce") for _ in range(3)]
    rec(family="info_nce", N=1 << 20, variant=name, s=ts)
_lse.TILE_FWD_MAX_KEY_BYTES = 2**62; _lse.DS_SUM = False; _launch.CONFIGS["bwd"] = base
ts = [once("siglip") for _ in range(2)]
rec(family="siglip", N=1 << 20, variant="default", s=ts)
