"""Session 7 final call: SigLIP at 1M end to end with the new defaults (3 calls; the first compiles)."""
import json, os, sys, time
from pathlib import Path
import torch
sys.path.insert(0, os.getcwd())
from tests.losses.gpu_large_run import leaves, loss_of
q, k, s, b = leaves(1 << 20, 512)
ts = []
for _ in range(3):
    torch.cuda.synchronize(); t = time.perf_counter()
    torch.autograd.grad(loss_of("siglip", q, k, s, b), [q, k, s, b]); torch.cuda.synchronize()
    ts.append(time.perf_counter() - t)
r = {"family": "siglip", "N": 1 << 20, "d": 512, "s": ts}
print(json.dumps(r))
out = Path(os.environ["OUT"]) / "bench"; out.mkdir(parents=True, exist_ok=True)
(out / "siglip-1m.json").write_text(json.dumps(r))
