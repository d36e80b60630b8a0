"""open_clip's ``use_horovod=True`` path of batchlab.compat.open_clip.ClipLoss against open_clip
3.3.0's, in one process with a stand-in ``horovod.torch`` (horovod is not installed in CI):
``hvd.allgather`` concatenates this rank's tensor with a fixed other rank's, and hands the
local slice of the gradient back. Both sides call the same stand-in, so equal values and
gradients show that batchlab gathers, slices and offsets as open_clip's Horovod branch does.
Before, batchlab asked for a torch.distributed group, which Horovod training does not create.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from batchlab.compat import open_clip as compat
from batchlab.errors import BatchlabInputError
from tests.compat.helpers import assert_same_run, run
from tests.compat.peers import open_clip_loss


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rank):
        ctx.rank, ctx.n = rank, x.shape[0]
        other = (x.detach().flip(0) * 0.5 + 0.1) if x.is_floating_point() else x.clone()
        return torch.cat([x, other] if rank == 0 else [other, x])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def _fake_horovod(rank: int):
    hvd = types.ModuleType("horovod.torch")
    hvd.size, hvd.rank = (lambda: 2), (lambda: rank)
    hvd.allgather = lambda t: _AllGather.apply(t, rank)
    return hvd


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("unit", [True, False])
def test_horovod_gathers_like_open_clip(gen, monkeypatch, rank, unit):
    hvd = _fake_horovod(rank)
    monkeypatch.setitem(sys.modules, "horovod", types.ModuleType("horovod"))
    monkeypatch.setitem(sys.modules, "horovod.torch", hvd)
    monkeypatch.setattr(open_clip_loss, "hvd", hvd)
    a, b = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    if unit:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    inputs = [a * (1 if unit else 2.0), b, torch.tensor(4.0)]
    for local_loss in (False, True):
        for with_grad in (False, True):
            args = (local_loss, with_grad, False, rank, 2, True)
            assert_same_run(run(compat.ClipLoss(*args), inputs), run(open_clip_loss.ClipLoss(*args), inputs),
                            what=f"horovod rank={rank} local_loss={local_loss} gather_with_grad={with_grad}")
    with pytest.raises(BatchlabInputError, match="Horovod's world has rank"):
        compat.ClipLoss(rank=1 - rank, world_size=2, use_horovod=True)(*inputs)


def test_horovod_missing_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod.torch", None)  # import fails
    with pytest.raises(BatchlabInputError, match="use_horovod=True needs horovod"):
        compat.ClipLoss(world_size=2, use_horovod=True)(torch.randn(2, 4), torch.randn(2, 4), torch.tensor(1.0))
