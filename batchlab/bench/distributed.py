"""``batchlab bench distributed``: distributed losses over 1..W GPUs (or CPU processes).

For each world size and global batch N, every rank holds N/W pairs and runs one
forward+backward of the symmetric InfoNCE loss with each strategy:

* ``ring`` and ``allgather`` (batchlab), and
* ``open_clip`` (anchor): open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``,
  the configuration its maintainers recommend for scale, measured in the same run.

Reported per row: median time per step, peak memory per rank above the inputs,
throughput relative to one GPU at the same global N, and for the ring the fraction of
communication hidden behind compute::

    hidden = 1 - (t_ring - t_compute_only) / t_comm_only

where ``t_compute_only`` runs the same ring with an exchange that moves nothing and
``t_comm_only`` runs the exchanges alone.

Example::

    batchlab bench distributed --device cuda --worlds 1 2 --sizes 65536 262144 1048576
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time

import torch

from batchlab.bench._common import format_table, plot_series, write_results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cuda (NCCL, one GPU per rank) or cpu (gloo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="global batch sizes N")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--strategies", nargs="+", default=["ring", "allgather", "open_clip"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hidden", action="store_true", help="skip the compute-only / comm-only runs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open_clip_loss(q, k, scale):
    from open_clip.loss import ClipLoss

    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(q, k, scale)


def _step(strategy, q, k, scale):
    from batchlab.losses import info_nce

    if strategy == "open_clip":
        loss = _open_clip_loss(q, k, scale)
    else:
        loss = info_nce(q, k, scale, distributed=strategy)
    loss.backward()
    return loss


def _time(fn, device, repeats):
    fn()  # warm-up (kernels, NCCL communicators)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def _comm_only(q, k, device, repeats):
    """The ring's exchanges alone, in the order the ring makes them (forward, then backward)."""
    from batchlab.losses.distributed import strategies as bd

    sizes = bd.gather_sizes(q.shape[0], device)
    ring = bd._Ring(None, sizes)
    lse = torch.zeros(q.shape[0], device=device)
    dk = torch.zeros(k.shape, device=device)  # the key-gradient accumulator travels in fp32

    def run():
        for keys, acc in (([k], lse), ([k, lse, lse], dk)):  # forward; backward
            for step in range(ring.world):
                if step < ring.world - 1:
                    req, _ = ring.start(keys, ring.source_of(step + 1))
                    ring.wait(req)
                req, _ = ring.start([acc], ring.source_of(step + 1))
                ring.wait(req)

    return _time(run, device, repeats)


def _worker(rank, world, port, args, result_file):
    import torch.distributed as dist

    from batchlab.losses.distributed import strategies as bd

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    use_cuda = args.device == "cuda"
    if use_cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, **({"device_id": device} if use_cuda else {}))
    dtype = getattr(torch, args.dtype)
    rows = []
    for n_global in args.sizes:
        n_local = n_global // world
        g = torch.Generator(device=device).manual_seed(args.seed + rank)
        q = torch.nn.functional.normalize(torch.randn(n_local, args.dim, device=device, generator=g), dim=1)
        k = torch.nn.functional.normalize(torch.randn(n_local, args.dim, device=device, generator=g), dim=1)
        q = q.to(dtype).requires_grad_(True)
        k = k.to(dtype).requires_grad_(True)
        scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
        for strategy in args.strategies:
            row = {"world": world, "N": n_global, "strategy": strategy}
            try:
                if use_cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device) if use_cuda else 0
                row["ms"] = 1e3 * _time(lambda: _step(strategy, q, k, scale), device, args.repeats)
                if use_cuda:
                    row["peak_GiB"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
                if strategy == "ring" and world > 1 and not args.no_hidden:
                    bd.RING_EXCHANGE = bd._ComputeOnlyRing
                    try:
                        compute = _time(lambda: _step(strategy, q, k, scale), device, args.repeats)
                    finally:
                        bd.RING_EXCHANGE = bd._Ring
                    comm = _comm_only(q.detach(), k.detach(), device, args.repeats)
                    exposed = max(0.0, row["ms"] / 1e3 - compute)
                    row["compute_ms"], row["comm_ms"] = 1e3 * compute, 1e3 * comm
                    row["hidden"] = max(0.0, 1 - exposed / comm) if comm > 0 else 1.0
            except (torch.OutOfMemoryError, RuntimeError, ImportError) as exc:
                if use_cuda:
                    torch.cuda.empty_cache()
                row["error"] = type(exc).__name__ + (": out of memory" if "memory" in str(exc) else f": {exc}"[:120])
            q.grad = k.grad = scale.grad = None
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def run(args) -> int:
    import torch.multiprocessing as mp

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but no GPU is visible")
        return 2
    available = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count() or 1
    rows = []
    for world in args.worlds:
        if world > available:
            print(f"skipping world={world}: only {available} device(s)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            result_file = os.path.join(tmp, "rows.json")
            mp.spawn(_worker, args=(world, _free_port(), args, result_file), nprocs=world, join=True)
            with open(result_file) as f:
                rows += json.load(f)
    single = {(r["N"], r["strategy"]): r.get("ms") for r in rows if r["world"] == 1}
    anchor = {(r["world"], r["N"]): r.get("ms") for r in rows if r["strategy"] == "open_clip"}
    for r in rows:
        one = single.get((r["N"], r["strategy"]))
        if r.get("ms") and one:
            r["speedup_vs_1"] = one / r["ms"]
        oc = anchor.get((r["world"], r["N"]))
        if r.get("ms") and oc and r["strategy"] != "open_clip":
            r["x_faster_than_open_clip"] = oc / r["ms"]
    columns = ["world", "N", "strategy", "ms", "peak_GiB", "speedup_vs_1", "x_faster_than_open_clip",
               "compute_ms", "comm_ms", "hidden", "error"]
    print(format_table(rows, columns))
    from batchlab.bench._common import device_name

    tag = "cpu" if args.device == "cpu" else torch.cuda.get_device_name(0).replace(" ", "-")
    path = write_results(args.out, f"distributed-{tag}", {
        "command": "batchlab bench distributed " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("func", "no_hidden", "bench")),
        "device": device_name(args.device if args.device == "cpu" else "cuda:0"),
        "dim": args.dim, "dtype": args.dtype, "rows": rows,
    })
    series = {}
    for r in rows:
        if r.get("ms"):
            series.setdefault(f"{r['strategy']} W={r['world']}", ([], []))
            series[f"{r['strategy']} W={r['world']}"][0].append(r["N"])
            series[f"{r['strategy']} W={r['world']}"][1].append(r["ms"])
    if series:
        plot_series(path.with_suffix(".png"), series, xlabel="global batch N", ylabel="ms per step (fwd+bwd)",
                    title=f"distributed symmetric InfoNCE, d={args.dim}, {args.dtype}")
    print(f"results: {path}")
    return 0


def main(argv=None) -> int:
    from batchlab.bench._common import script_main

    return script_main("batchlab.bench.distributed", __doc__, add_arguments, run,
                       argv)


if __name__ == "__main__":
    raise SystemExit(main())
