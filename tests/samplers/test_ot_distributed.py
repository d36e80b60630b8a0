"""couple_global with 2 gloo processes on the CPU: the global batch is solved once."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from batchlab.samplers import couple, couple_global

pytestmark = pytest.mark.distributed

N_LOCAL, D = 40, 3


def _inputs():
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(2 * N_LOCAL, D, generator=g)
    x1 = torch.randn(2 * N_LOCAL, D, generator=g) + 2.0
    y0 = torch.arange(2 * N_LOCAL) % 4
    y1 = (torch.arange(2 * N_LOCAL) + 1) % 4
    return x0, x1, y0, y1


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x0, x1, y0, y1 = _inputs()
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        res = {}
        for solve_on in ("rank0", "all"):
            out = couple_global(x0[sl], x1[sl], "exact", solve_on=solve_on)
            res[solve_on] = (out.x0, out.x1, out.partner, out.perm)
        cond = couple_global(x0[sl], x1[sl], condition=(y0[sl], y1[sl]), condition_weight=1e3)
        res["cond"] = (cond.partner, cond.c1)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_share_one_global_coupling(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    x0, x1, y0, y1 = _inputs()
    ref = couple(x0, x1, "exact")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in range(2):
        sl = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
        for solve_on in ("rank0", "all"):
            gx0, gx1, partner, perm = got[r][solve_on]
            assert torch.equal(perm, ref)
            assert torch.equal(partner, ref[sl])
            assert torch.equal(gx0, x0[sl]) and torch.equal(gx1, x1[ref[sl]])
        partner, c1 = got[r]["cond"]
        assert torch.equal(c1, y0[sl])  # the label condition held across ranks
    # the union of the ranks' partners is the whole global x1, once each
    union = torch.cat([got[r]["rank0"][2] for r in range(2)])
    assert sorted(union.tolist()) == list(range(2 * N_LOCAL))


def test_without_process_group_it_is_local_couple():
    x0, x1, y0, y1 = _inputs()
    out = couple_global(x0, x1, condition=(y0, y1), condition_weight=1e3)
    assert torch.equal(out.perm, couple(x0, x1, condition=(y0, y1), condition_weight=1e3))
    assert torch.equal(out.c1, y0)
