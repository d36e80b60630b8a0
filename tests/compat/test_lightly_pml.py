"""batchlab.compat.lightly and .pytorch_metric_learning against lightly 1.6.0 and
pytorch-metric-learning 2.9.0 themselves: values and every gradient (fp32, 1e-5
relative to the largest entry; see tests/compat/helpers.py)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from batchlab.compat import lightly as compat
from batchlab.compat import pytorch_metric_learning as compat_pml
from batchlab.errors import BatchlabInputError
from tests.compat.helpers import assert_same_run, run
from tests.compat.peers import LIGHTLY as PEERS


def _views(gen, n, d=6):
    return [torch.randn(n, d, generator=gen) * 3, torch.randn(n, d, generator=gen)]


def test_constructors_are_lightlys_and_pmls():
    for name, peer in PEERS.items():
        ours, theirs = inspect.signature(getattr(compat, name)), inspect.signature(peer)
        assert list(ours.parameters) == list(theirs.parameters), name
        assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()]
        assert list(inspect.signature(getattr(compat, name).forward).parameters) == ["self", "out0", "out1"]
    assert list(inspect.signature(compat_pml.NTXentLoss).parameters) == ["temperature", "kwargs"]
    assert inspect.signature(compat_pml.NTXentLoss).parameters["temperature"].default == 0.07
    ours = inspect.signature(compat_pml.NTXentLoss.forward).parameters
    assert list(ours) == list(inspect.signature(pml_losses.NTXentLoss.forward).parameters)


@pytest.mark.parametrize("name,kwargs", [
    ("NTXentLoss", {}), ("NTXentLoss", {"temperature": 0.1}), ("NTXentLoss", {"temperature": -0.3}),
    ("DCLLoss", {}), ("DCLLoss", {"temperature": 0.5}),
    ("DCLLoss", {"weight_fn": lambda a, b: ((a - b) ** 2).sum(1)}),  # a weight with a gradient
    ("DCLWLoss", {}), ("DCLWLoss", {"temperature": 0.2, "sigma": 0.3}),
])
@pytest.mark.parametrize("n", [1, 2, 9])
def test_lightly_losses(gen, name, kwargs, n):
    inputs = _views(gen, n)
    if n == 1 and name != "NTXentLoss":
        # lightly's DCL has no negative at N = 1 and returns -inf; batchlab says so instead
        with pytest.raises(BatchlabInputError, match="negative"):
            getattr(compat, name)(**kwargs)(*inputs)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lightly's DCLW weights warn about torch.tensor(tensor)
        want = run(PEERS[name](**kwargs), inputs)
    got = run(getattr(compat, name)(**kwargs), inputs)
    assert_same_run(got, want, what=f"{name} {kwargs} n={n}")


def test_lightly_memory_bank_over_steps(gen):
    """MoCo-style: K banked negatives, drawn at construction and refreshed by each step."""
    steps = [_views(gen, 4) for _ in range(4)]  # 16 rows through a bank of 10: the queue wraps
    torch.manual_seed(5)
    peer = PEERS["NTXentLoss"](temperature=0.2, memory_bank_size=(10, 6))
    torch.manual_seed(5)
    ours = compat.NTXentLoss(temperature=0.2, memory_bank_size=(10, 6))
    torch.testing.assert_close(ours.memory_bank.bank, peer.memory_bank.bank, rtol=0, atol=0)
    for i, inputs in enumerate(steps):
        assert_same_run(run(ours, inputs), run(peer, inputs), what=f"bank step {i}")
    with torch.no_grad():  # out0 without gradient: the bank is read, not updated
        a, b = steps[0]
        assert_same_run((ours(a, b), []), (peer(a, b), []), what="no-grad step")
    torch.testing.assert_close(ours.memory_bank.bank, peer.memory_bank.bank, rtol=0, atol=0)


def test_lightly_bad_arguments():
    with pytest.raises(ValueError, match="Illegal temperature"):
        compat.NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="feature dimension"):
        compat.NTXentLoss(memory_bank_size=128)
    with pytest.raises(TypeError):
        compat.DCLLoss(sigma=0.5)


def _pml_cases(gen):
    v, n, d = 3, 5, 6
    e = torch.randn(v * n, d, generator=gen)
    views = torch.arange(n).repeat(v)
    yield "3 views", (e,), dict(labels=views)
    yield "2 views", (e[: 2 * n],), dict(labels=views[: 2 * n])
    yield "classes", (e,), dict(labels=torch.randint(0, 3, (v * n,), generator=gen))
    ref = torch.randn(7, d, generator=gen)
    yield "ref_emb", (e, torch.randint(0, 3, (v * n,), generator=gen)), dict(
        ref_emb=ref, ref_labels=torch.randint(0, 3, (7,), generator=gen))
    a = torch.tensor([0, 1, 2, 2])
    yield "triplets", (e,), dict(indices_tuple=(a, torch.tensor([5, 6, 7, 12]), torch.tensor([3, 4, 3, 9])))
    yield "pairs", (e,), dict(indices_tuple=(a, torch.tensor([5, 6, 7, 12]), torch.tensor([0, 0, 1, 2, 2]),
                                             torch.tensor([3, 8, 9, 1, 11])))
    yield "one label", (e,), dict(labels=torch.zeros(v * n, dtype=torch.long))  # no negative: zero loss


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_pml_ntxent(gen, temperature):
    for what, inputs, kwargs in _pml_cases(gen):
        float_inputs = [x for x in inputs if x.is_floating_point()]
        labels = [x for x in inputs if not x.is_floating_point()]
        extra = {**kwargs, **({"labels": labels[0]} if labels else {})}
        ref = extra.pop("ref_emb", None)
        leaves = float_inputs + ([ref] if ref is not None else [])

        def call(module):
            def f(*xs):
                return module(xs[0], ref_emb=xs[1] if ref is not None else None, **extra)
            return run(f, leaves)

        want = call(pml_losses.NTXentLoss(temperature=temperature))
        got = call(compat_pml.NTXentLoss(temperature=temperature))
        assert_same_run(got, want, what=f"PML {what}")


def test_pml_options():
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.reducers import MeanReducer, SumReducer

    compat_pml.NTXentLoss(0.1, distance=CosineSimilarity(), reducer=MeanReducer(), collect_stats=True)
    for bad in (dict(distance=LpDistance()), dict(reducer=SumReducer()), dict(margin=0.1)):
        with pytest.raises(BatchlabInputError):
            compat_pml.NTXentLoss(**bad)
    with pytest.raises(BatchlabInputError, match="labels or indices_tuple"):
        compat_pml.NTXentLoss()(torch.randn(4, 3))


@pytest.mark.parametrize("name", ["NTXentLoss", "DCLLoss", "DCLWLoss", "pml"])
def test_bf16_like_the_peers(gen, name):
    """bf16 in, bf16 loss out (the peers compute in bf16; batchlab accumulates in fp32, so
    the two agree to bf16's precision), gradients in bf16."""
    inputs = [x.bfloat16() for x in _views(gen, 6)]
    if name == "pml":
        inputs = [torch.cat(inputs)]
        peer, ours, extra = pml_losses.NTXentLoss(0.2), compat_pml.NTXentLoss(0.2), (torch.arange(6).repeat(2),)
    else:
        peer, ours, extra = PEERS[name](), getattr(compat, name)(), ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = run(peer, inputs, *extra)
    got = run(ours, inputs, *extra)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert [g.dtype for g in got[1]] == [g.dtype for g in want[1]]
    assert_same_run(got, want, rtol=3e-2, what=f"{name} bf16")
