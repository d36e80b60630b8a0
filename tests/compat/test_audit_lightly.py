"""Audit of batchlab.compat.lightly: call variants tests/compat/test_lightly_pml.py leaves out,
each against lightly 1.6.0's own loss files (values and every gradient, the helpers' 1e-5
relative), or the precise error batchlab raises where it refuses.
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch

from batchlab.compat import lightly as compat
from batchlab.errors import BatchlabInputError
from tests.compat.helpers import assert_same_run, run
from tests.compat.peers import LIGHTLY as PEERS
from tests.compat.peers import lightly_dcl

NAMES = list(PEERS)


def _compare(peer, ours, inputs, what):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lightly's DCLW weights warn about torch.tensor(tensor)
        want, got = run(peer, inputs), run(ours, inputs)
    assert_same_run(got, want, what=what)


def _views(gen, n=5, d=4, dtype=torch.float32):
    return [torch.randn(n, d, generator=gen, dtype=dtype) * 2, torch.randn(n, d, generator=gen, dtype=dtype)]


@pytest.mark.parametrize("name", NAMES)
def test_dtypes_temperatures_and_layouts(gen, name):
    peer, ours = PEERS[name], getattr(compat, name)
    _compare(peer(), ours(), _views(gen, dtype=torch.float64), f"{name} fp64")
    for t in (0.01, 5.0):
        _compare(peer(temperature=t), ours(temperature=t), _views(gen), f"{name} T={t}")
    a, b = _views(gen, n=4, d=5)
    _compare(peer(), ours(), [a.T, b.T], f"{name} transposed")  # (5, 4) non-contiguous views


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("which", [0, 1])
def test_zero_projection_rows_are_refused(gen, name, which):
    """lightly keeps a zero row at zero after normalising; batchlab's losses (unit rows) used to
    reject it as 'not L2-normalised', which named neither the input nor the cause."""
    views = _views(gen)
    views[which][2] = 0
    with pytest.raises(BatchlabInputError, match=f"out{which} has 1 all-zero row.*row 2"):
        getattr(compat, name)()(*views)


@pytest.mark.parametrize("size,n", [((3, 4), 5), ((5, 4), 5), ([7, 4], 3)])
def test_memory_bank_smaller_equal_larger_than_the_batch(gen, size, n):
    """The FIFO queue when a batch overflows it, fills it exactly, or wraps after steps."""
    banks = []
    for cls in (PEERS["NTXentLoss"], compat.NTXentLoss):
        torch.manual_seed(1)  # the bank is drawn at construction
        banks.append(cls(temperature=0.3, memory_bank_size=size))
    peer, ours = banks
    for step in range(3):
        _compare(peer, ours, _views(gen, n=n), f"bank {size} n={n} step {step}")
        assert torch.equal(ours.memory_bank.bank, peer.memory_bank.bank)
        assert int(ours.memory_bank.bank_ptr) == int(peer.memory_bank.bank_ptr)
    assert [k for k, _ in ours.named_buffers()] == [k for k, _ in peer.named_buffers()]


@pytest.mark.parametrize("weight_fn", [
    partial(lightly_dcl.negative_mises_fisher_weights, sigma=0.3),  # lightly's own weights
    partial(compat.negative_mises_fisher_weights),  # batchlab's, default sigma
    lambda a, b: torch.tensor(2.0),  # one weight for every example: lightly broadcasts it
], ids=["lightly-vmf", "batchlab-vmf", "scalar"])
def test_dcl_weight_functions(gen, weight_fn):
    peer_fn = partial(lightly_dcl.negative_mises_fisher_weights, *weight_fn.args, **weight_fn.keywords) \
        if isinstance(weight_fn, partial) else weight_fn
    _compare(PEERS["DCLLoss"](weight_fn=peer_fn), compat.DCLLoss(weight_fn=weight_fn), _views(gen, n=6),
             "DCL weight_fn")


def test_dcl_weight_of_the_wrong_shape_is_refused(gen):
    with pytest.raises(BatchlabInputError, match=r"weight_fn must return one weight per example, shape \(5,\)"):
        compat.DCLLoss(weight_fn=lambda a, b: torch.ones(3))(*_views(gen))


@pytest.mark.parametrize("name", NAMES)
def test_gather_distributed_without_a_process_group(gen, name):
    """gather_distributed=True in one process (no group initialised): lightly's single-process loss."""
    peer, ours = PEERS[name], getattr(compat, name)
    _compare(peer(gather_distributed=True), ours(gather_distributed=True), _views(gen), f"{name} gather, 1 process")
