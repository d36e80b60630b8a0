"""GPU check (run through `device`, not in CI): ring and all-gather over NCCL vs one process.

    python tests/gpu_check_distributed.py --world 2 --n 16384 --dim 512

Every rank computes the loss and gradients of its shard; rank 0 gathers them and
compares, element by element, with the single-process reference on the whole batch
(the convention of batchlab.losses.distributed). Exits non-zero on any mismatch or NaN.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from batchlab.losses import dcl, info_nce, siglip  # noqa: E402

IMPL = {"none": "reference"}  # the distributed runs use --impl (set in main)

CASES = {
    "info_nce": lambda q, k, s, b, dd: info_nce(q, k, s, distributed=dd, impl=IMPL[dd]),
    "dclw": lambda q, k, s, b, dd: dcl(q, k, s, weighted=True, distributed=dd, impl=IMPL[dd]),
    "siglip": lambda q, k, s, b, dd: siglip(q, k, s, b, distributed=dd, impl=IMPL[dd]),
}


def data(n, d, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    q = F.normalize(torch.randn(n, d, device=device, generator=g), dim=1).to(dtype)
    k = F.normalize(torch.randn(n, d, device=device, generator=g), dim=1).to(dtype)
    return q, k


def run_case(fn, q, k, strategy):
    q, k = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    s = torch.tensor(1 / 0.07, device=q.device, requires_grad=True)
    b = torch.tensor(-10.0, device=q.device, requires_grad=True)
    loss = fn(q, k, s, b, strategy)
    loss.backward()
    return loss.detach(), q.grad, k.grad, s.grad, b.grad


def worker(rank, world, port, args, failures):
    IMPL.update(ring=args.impl, allgather=args.impl)
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=device)
    bad = 0
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):
        q, k = data(args.n, args.dim, dtype, device)
        shard = slice(rank * args.n // world, (rank + 1) * args.n // world)
        for name, fn in CASES.items():
            ref = run_case(fn, q, k, "none") if rank == 0 else None
            for strategy in ("ring", "allgather"):
                loss, dq, dk, ds, db = run_case(fn, q[shard], k[shard], strategy)
                parts = {}
                for key, t in (("loss", loss[None]), ("s", ds[None]), ("b", db[None] if db is not None else ds[None] * 0)):
                    buf = [torch.empty_like(t) for _ in range(world)]
                    dist.all_gather(buf, t.contiguous())
                    parts[key] = torch.cat(buf).float().mean()
                for key, t in (("q", dq), ("k", dk)):
                    buf = [torch.empty_like(t) for _ in range(world)]
                    dist.all_gather(buf, t.contiguous())
                    parts[key] = torch.cat(buf).float()
                if rank == 0:
                    expected = {"loss": ref[0].float(), "q": world * ref[1].float(), "k": world * ref[2].float(),
                                "s": ref[3].float(), "b": (ref[4] if ref[4] is not None else ref[3] * 0).float()}
                    for key in expected:
                        got, want = parts[key], expected[key]
                        scale = want.abs().max().clamp_min(1e-12)
                        err = float(((got - want).abs().max()) / scale)
                        ok = bool(torch.isfinite(got).all()) and err <= tol
                        bad += not ok
                        print(f"{args.impl:9s} {str(dtype):15s} {name:8s} {strategy:9s} {key:4s} rel-max-err {err:.2e} "
                              f"{'ok' if ok else 'FAIL'}", flush=True)
    if rank == 0:
        failures.value = bad
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=torch.cuda.device_count())
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--impl", default="auto", help="single-process backend inside the strategies")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    failures = mp.get_context("spawn").Value("i", -1)
    mp.spawn(worker, args=(args.world, port, args, failures), nprocs=args.world, join=True)
    print("failures:", failures.value)
    sys.exit(1 if failures.value != 0 else 0)


if __name__ == "__main__":
    main()
