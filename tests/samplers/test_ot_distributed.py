"""couple_global with 2 gloo processes on the CPU: the global batch is solved once."""

import pytest
import torch

from batchlab.samplers import couple, couple_global
from tests.gloo import run_on_ranks

pytestmark = pytest.mark.distributed

N_LOCAL, D = 40, 3


def _inputs():
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(2 * N_LOCAL, D, generator=g)
    x1 = torch.randn(2 * N_LOCAL, D, generator=g) + 2.0
    y0 = torch.arange(2 * N_LOCAL) % 4
    y1 = (torch.arange(2 * N_LOCAL) + 1) % 4
    return x0, x1, y0, y1


def _couple_on_rank(rank, world):
    x0, x1, y0, y1 = _inputs()
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    res = {}
    for solve_on in ("rank0", "all"):
        out = couple_global(x0[sl], x1[sl], "exact", solve_on=solve_on)
        res[solve_on] = (out.x0, out.x1, out.partner, out.perm)
    cond = couple_global(x0[sl], x1[sl], condition=(y0[sl], y1[sl]), condition_weight=1e3)
    res["cond"] = (cond.partner, cond.c1)
    return res


def test_two_ranks_share_one_global_coupling():
    got = run_on_ranks(_couple_on_rank)
    x0, x1, y0, y1 = _inputs()
    ref = couple(x0, x1, "exact")
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
