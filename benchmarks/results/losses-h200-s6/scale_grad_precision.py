"""Relative error of the scale gradient of the symmetric InfoNCE loss (bf16 inputs) against float64,
per path, in Triton's CPU interpreter (the kernels' arithmetic, fp32 dots; the logit gradient stored
in bf16 as on the GPU). N = 256, d = 64, seeds 0-5, s in {0.01, 1, 14.3}.

    TRITON_INTERPRET=1 python benchmarks/results/losses-h200-s6/scale_grad_precision.py > scale_grad_precision.json

Paths: ``dense`` (the small-batch path: the scale gradient summed in fp32 inside clip_grad_kernel),
``streaming`` (default configs: the scale gradient from the bf16 logit gradient's product) and
``streaming-tile`` (one-tile forward + TWO_EXP backward: call 1's candidate configs).
"""
import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from batchlab.losses import info_nce  # noqa: E402
from batchlab.losses.triton import _dense, _launch  # noqa: E402

BASE = dict(_launch.INTERPRET_CONFIG)
LIMIT = _dense.DENSE_MAX_LOGITS
rows = []
for path in ("dense", "streaming", "streaming-tile"):
    _dense.DENSE_MAX_LOGITS = LIMIT if path == "dense" else 0
    _launch.INTERPRET_CONFIG = dict(BASE, TILE=1, TWO_EXP=1) if path == "streaming-tile" else dict(BASE)
    for scale in (0.01, 1.0, 14.3):
        errs = []
        for seed in range(6):
            g = torch.Generator().manual_seed(seed)
            q = F.normalize(torch.randn(256, 64, generator=g), dim=1).bfloat16()
            k = F.normalize(torch.randn(256, 64, generator=g), dim=1).bfloat16()
            grads = []
            for impl, dtype in (("triton", torch.float32), ("reference", torch.float64)):
                qq = q.to(dtype if impl == "reference" else q.dtype).requires_grad_()
                kk = k.to(dtype if impl == "reference" else k.dtype).requires_grad_()
                s = torch.tensor(scale, dtype=dtype, requires_grad=True)
                grads.append(torch.autograd.grad(info_nce(qq, kk, s, impl=impl), [s])[0].double())
            errs.append(float((grads[0] - grads[1]).abs() / grads[1].abs()))
        rows.append({"path": path, "scale": scale, "rel_err": [float(f"{e:.2e}") for e in errs]})
print(json.dumps({"N": 256, "d": 64, "dtype": "bfloat16", "rows": rows}, indent=1))
