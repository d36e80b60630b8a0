"""GPU check of the low-overhead loss paths (run on a CUDA machine; not collected by pytest).

    python tests/losses/gpu_check_overhead.py [--out DIR] [--quick]

For InfoNCE/CLIP, SigLIP and DCL (bf16, d=512) at small-batch and streaming sizes (DCL always
streams; ``--quick``: N <= 16,384 for InfoNCE/SigLIP, 2 and 1,024 for DCL):

1. **no host sync**: forward + backward under ``torch.cuda.set_sync_debug_mode("error")``
   (any synchronising call raises), compared with the fp32 reference (values and gradients);
2. **torch.compile(fullgraph=True)** of a training step (a tiny two-tower model + the loss,
   ``backward`` through AOTAutograd): no graph break, same loss and gradients as eager;
3. **CUDA graph**: the eager step captured once and replayed on new inputs copied into the
   static buffers: same loss and gradients as eager on those inputs.

Tolerances: bf16 inputs; the fast paths round the logit gradient to bf16 (2^-9 relative) before
the two gradient products, so gradients agree to ~1e-2 relative; values to 1e-4.
Prints one line per check and exits non-zero if any fails; ``--out`` writes a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from batchlab.losses import dcl, info_nce, siglip

VALUE_TOL, GRAD_TOL = 1e-4, 2e-2


def rel(a, b) -> float:
    """Relative error; the floor 1e-3 covers gradients that vanish exactly (N=1: the loss is constant)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-3))


def call(family, q, k, s, b, impl="auto"):
    if family == "info_nce":
        return info_nce(q, k, s, impl=impl)
    if family == "siglip":
        return siglip(q, k, s, b, impl=impl)
    return dcl(q, k, s, impl=impl)


def no_sync_check(family, n, d, results):
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = F.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=1).bfloat16().requires_grad_()
    k = F.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=1).bfloat16().requires_grad_()
    s = torch.tensor(1 / 0.07, device="cuda", requires_grad=True)
    b = torch.tensor(-10.0, device="cuda", requires_grad=True)
    leaves = [q, k, s] + ([b] if family == "siglip" else [])
    call(family, q, k, s, b)  # compile the kernels first (autotuning may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = call(family, q, k, s, b)
        grads = torch.autograd.grad(loss, leaves)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    row = {"check": "no sync", "family": family, "N": n, "ok": True}
    if n <= 16384:  # the fp32 reference holds N x N logits
        ref_in = [x.detach().float().requires_grad_() for x in leaves]
        ref = call(family, ref_in[0], ref_in[1], ref_in[2], ref_in[3] if family == "siglip" else b, "reference")
        ref_g = torch.autograd.grad(ref, ref_in)
        row["loss_err"] = rel(loss, ref)
        row["grad_err"] = max(rel(g, r) for g, r in zip(grads, ref_g))
        row["ok"] = row["loss_err"] < VALUE_TOL and row["grad_err"] < GRAD_TOL
    results.append(row)


class Towers(torch.nn.Module):
    def __init__(self, d_in, d):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(d_in, d), torch.nn.Linear(d_in, d)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.659))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))

    def forward(self, x, y, family):
        q = F.normalize(self.img(x), dim=-1).bfloat16()
        k = F.normalize(self.txt(y), dim=-1).bfloat16()
        return call(family, q, k, self.logit_scale.exp(), self.logit_bias)


def grads_of(model):
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def compile_and_graph_check(family, n, d_in, d, results, only_compile=False):
    torch.manual_seed(0)
    model = Towers(d_in, d).cuda()
    x, y = torch.randn(n, d_in, device="cuda"), torch.randn(n, d_in, device="cuda")

    def eager_step(x, y):
        model.zero_grad(set_to_none=True)
        loss = model(x, y, family)
        loss.backward()
        return loss.detach(), grads_of(model)

    loss_e, grads_e = eager_step(x, y)
    # 2. torch.compile(fullgraph=True): a graph break raises
    compiled = torch.compile(lambda x, y: model(x, y, family), fullgraph=True)
    row = {"check": "compile fullgraph", "family": family, "N": n}
    try:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss_c = compiled(x, y)
        loss_c.backward()
        row.update(seconds=time.perf_counter() - start, loss_err=rel(loss_c, loss_e),
                   grad_err=max(rel(a, b) for a, b in zip(grads_of(model), grads_e)))
        row["ok"] = row["loss_err"] < VALUE_TOL and row["grad_err"] < GRAD_TOL
        del loss_c  # its autograd graph would keep AccumulateGrad nodes alive (breaks capture below)
    except Exception as exc:  # noqa: BLE001 - report and continue with the other checks
        row.update(ok=False, error=repr(exc)[:600])
    results.append(row)
    if only_compile:
        return
    # 3. CUDA graph: capture the eager step (forward + backward) and replay it on new inputs
    row = {"check": "cuda graph replay", "family": family, "N": n}
    try:
        sx, sy = x.clone(), y.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs requires
                model.zero_grad(set_to_none=False)
                model(sx, sy, family).backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        params = [p for p in model.parameters() if p.grad is not None]  # InfoNCE leaves the bias unused
        for p in params:
            p.grad.zero_()
        with torch.cuda.graph(graph):
            static_loss = model(sx, sy, family)
            static_loss.backward()
        x2, y2 = torch.randn_like(x), torch.randn_like(y)
        sx.copy_(x2)
        sy.copy_(y2)
        for p in params:
            p.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        replay_loss, replay_grads = static_loss.detach().clone(), grads_of(model)
        loss_2, grads_2 = eager_step(x2, y2)
        row.update(loss_err=rel(replay_loss, loss_2),
                   grad_err=max(rel(a, b) for a, b in zip(replay_grads, grads_2)))
        row["ok"] = row["loss_err"] < VALUE_TOL and row["grad_err"] < GRAD_TOL
    except Exception as exc:  # noqa: BLE001
        row.update(ok=False, error=repr(exc)[:600])
    results.append(row)


def _dump(out, results) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_check_overhead.json").write_text(json.dumps(results, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="folder for the JSON summary")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--graph-only", action="store_true", help="only the compile + CUDA-graph checks, N=1,024")
    parser.add_argument("--quick", action="store_true",
                        help="the small-batch sizes only (N <= 16,384: no streaming-kernel compiles), compile and "
                             "CUDA graph at N=1,024")
    args = parser.parse_args()
    results: list[dict] = []
    if args.graph_only:
        for family in ("info_nce", "siglip", "dcl"):
            compile_and_graph_check(family, 1024, 64, args.dim, results)
            print(json.dumps(results[-2:]), flush=True)
        return 0 if all(r["ok"] for r in results) else 1
    for family in ("info_nce", "siglip", "dcl"):
        sizes = (1, 256, 4096, 8192, 16384, 65536) if family != "dcl" else (2, 256, 8192, 65536)
        if args.quick:  # dcl always streams: one small and one middle size
            sizes = (1, 256, 8192, 16384) if family != "dcl" else (2, 1024)
        for n in sizes:
            try:
                no_sync_check(family, n, args.dim, results)
            except Exception as exc:  # noqa: BLE001
                results.append({"check": "no sync", "family": family, "N": n, "ok": False, "error": repr(exc)[:600]})
            print(json.dumps(results[-1]), flush=True)
        for n in ((1024, 16384) if family == "info_nce" and not args.quick else (1024,)):
            try:
                compile_and_graph_check(family, n, 64, args.dim, results)
            except Exception as exc:  # noqa: BLE001 - e.g. the eager step itself failed
                results.append({"check": "compile/graph setup", "family": family, "N": n, "ok": False,
                                "error": repr(exc)[:600]})
            for r in results[-2:]:
                print(json.dumps(r), flush=True)
            _dump(args.out, results)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed on {torch.cuda.get_device_name()}")
    _dump(args.out, results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
