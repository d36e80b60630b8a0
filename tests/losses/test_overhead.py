"""What the low-overhead CUDA design promises, checked on the CPU.

* value checks: every row's norm (one scaled row in 1,000 is caught), zero rows under
  ``normalize=True`` are refused, ``check_inputs`` / ``BATCHLAB_CHECK_INPUTS`` switch them;
* the Triton custom ops are registered, with fake (meta) implementations that give the
  right shapes without running a kernel (FakeTensorMode);
* ``torch.compile(fullgraph=True)`` of a step calling the reference loss has no graph break
  (aot_eager backend: no C++ compiler needed; it traces forward and backward).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchlab._checks import data_checks_on
from batchlab.errors import BatchlabInputError
from batchlab.losses import info_nce, siglip


def unit(n, d, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_every_row_is_checked_not_a_sample():
    q, k = unit(1000, 16), unit(1000, 16, 1)
    q[637] *= 5  # one row in 1,000: a 64-row sample missed it
    with pytest.raises(BatchlabInputError, match="row 637"):
        info_nce(q, k, 10.0)
    q[637] /= 5
    q[5, 3] = float("nan")
    with pytest.raises(BatchlabInputError, match="non-finite"):
        siglip(q, k, 10.0, -10.0)


def test_normalize_refuses_zero_rows():
    q, k = torch.randn(8, 4), torch.randn(8, 4)
    q[2] = 0
    with pytest.raises(BatchlabInputError, match="all-zero"):
        info_nce(q, k, 10.0, normalize=True)
    # switched off, the row is normalised to zeros (torch's convention) and the loss is finite
    assert torch.isfinite(info_nce(q, k, 10.0, normalize=True, check_inputs=False))


def test_check_switches(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("BATCHLAB_CHECK_INPUTS", raising=False)
    assert data_checks_on(cpu) and not data_checks_on(cuda)
    assert data_checks_on(cuda, True) and not data_checks_on(cpu, False)
    monkeypatch.setenv("BATCHLAB_CHECK_INPUTS", "1")
    assert data_checks_on(cuda)
    monkeypatch.setenv("BATCHLAB_CHECK_INPUTS", "0")
    assert not data_checks_on(cpu)
    monkeypatch.setenv("BATCHLAB_CHECK_INPUTS", "yes")
    with pytest.raises(BatchlabInputError, match="BATCHLAB_CHECK_INPUTS"):
        data_checks_on(cpu)
    monkeypatch.delenv("BATCHLAB_CHECK_INPUTS")
    with pytest.raises(BatchlabInputError, match="check_inputs"):
        info_nce(unit(4, 8), unit(4, 8, 1), 10.0, check_inputs="yes")
    q = unit(4, 8)
    q[0] *= 3
    info_nce(q, unit(4, 8, 1), 10.0, check_inputs=False)  # no value check: no error


def test_custom_ops_have_fake_implementations():
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from batchlab.losses.triton import _dense, _lse, _siglip  # noqa: F401  (registers the ops)

    ops = torch.ops.batchlab
    with FakeTensorMode():
        q, k = torch.empty(6, 8, dtype=torch.bfloat16), torch.empty(5, 8, dtype=torch.bfloat16)
        s, b = torch.empty(()), torch.empty(())
        loss, stats, counts = ops.clip_dense(q, k, s, None, False, 0)
        assert loss.shape == () and stats.shape == (6,)
        loss, stats, counts = ops.clip_dense(q, q, s, None, True, 2)
        assert loss.shape == (6,) and stats.shape == (12,) and counts.dtype == torch.int32
        dq, dk, ds = ops.clip_dense_backward(q, q, s, None, stats, counts, torch.empty(6), stats, True, 2,
                                             True, False)
        assert dq.shape == q.shape and dk.numel() == 0 and ds.shape == ()
        assert counts.shape == (1,)  # the backward's counter only: no targets
        assert ops.clip_dense(q, q, s, torch.empty(6, dtype=torch.long), True, 0)[2].shape == (7,)
        loss, ctr = ops.siglip_dense(q, k, s, b, None, 0)
        assert loss.shape == () and ctr.shape == (1,) and ctr.dtype == torch.int32
        dq, dk, dsb = ops.siglip_dense_backward(q, k, s, b, None, ctr, torch.empty(()), 0, True, True)
        assert dq.shape == q.shape and dk.shape == k.shape and dsb.shape == (2,)
        row, col, ctl = ops.lse_forward(q, k, s, None, True, False)
        assert row.shape == (6,) and col.shape == (5,) and ctl.shape == (2,)
        dq, dk, ds = ops.lse_backward(q, k, s, None, row, col, ctl, row, col, False, None, True, True)
        assert dq.shape == q.shape and dk.shape == k.shape
        rows, dq, dk, dsb = ops.siglip_pass(q, k, s, b, None, True, torch.empty(6), None, True, True)
        assert rows.shape == (6,) and dsb.shape == (2,)


def test_compiled_step_without_graph_breaks_matches_eager():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 8)
    scale = torch.tensor(10.0, requires_grad=True)
    x, y = torch.randn(16, 12), torch.randn(16, 12)

    def step(x, y):
        q, k = F.normalize(lin(x), dim=-1), F.normalize(lin(y), dim=-1)
        return info_nce(q, k, scale, impl="reference", check_inputs=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        loss = fn(x, y)
        results.append([loss.detach(), *torch.autograd.grad(loss, [lin.weight, scale])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sync_count_ignores_the_debug_mode_notice():
    """The benchmark's sync count: torch's per-sync warning counts, the one-time notice of the first
    ``set_sync_debug_mode`` call does not (it made the first row of each run show 0.5 syncs)."""
    from batchlab.bench.losses import count_syncs

    notice = ("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
              "operations (Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp:1003.)")
    sync = "called a synchronizing CUDA operation (Triggered internally at c10/cuda/CUDAFunctions.cpp:118.)"
    assert count_syncs([notice]) == 0
    assert count_syncs([notice, sync, sync, "some other warning"]) == 2
