"""Distributed losses (gloo, 2 CPU processes) against the single-process reference.

The convention checked (batchlab.losses.distributed's docstring): the mean over ranks of the
returned loss is the global loss; each rank's embedding gradient is W times the global
loss's gradient for its shard; the mean over ranks of the scale/bias gradient equals
the single-process gradient. Shards are uneven (5 + 3) on purpose. Tolerance 1e-5
(fp64 inputs; ring sums are reordered) and 3e-2 for bf16 traffic.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from batchlab.losses import dcl, info_nce, nt_xent, siglip
from tests.gloo import run_on_ranks

pytestmark = pytest.mark.distributed

SIZES = [5, 3]  # uneven shards: the last batch of an epoch
N, D, EXTRA = sum(SIZES), 6, 2


def global_data(dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    q = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    e = F.normalize(torch.randn(N, EXTRA, D, generator=g, dtype=torch.float64), dim=-1)
    views = F.normalize(torch.randn(3, N, D, generator=g, dtype=torch.float64), dim=-1)
    targets = torch.randperm(N, generator=g)
    return q.to(dtype), k.to(dtype), e.to(dtype), views.to(dtype), targets


def _NEG_MASK(rows, cols):
    """A false-negative mask over global indices: (i, j) removed when i + j is a multiple of 3, off the diagonal."""
    removed = (rows[:, None] + cols[None, :]) % 3 == 0
    return removed & (rows[:, None] != cols[None, :])


def _tile(distributed):
    return {"tile_size": 2} if distributed == "ring" else {}


def cases():
    """(name, strategy, fn(q, k, e, views, targets, s, b, distributed) -> loss, which inputs, dtype)."""
    out = []
    for strategy in ("allgather", "ring"):
        # tile_size=2 makes the ring walk several tiles per block (and passes through allgather)
        out += [
            (f"clip-{strategy}", strategy, lambda q, k, e, v, t, s, b, dd: info_nce(q, k, s, distributed=dd, **_tile(dd)), "qks"),
            (f"clip-extra-{strategy}", strategy,
             lambda q, k, e, v, t, s, b, dd: info_nce(q, k, s, extra_negatives=e, distributed=dd, **_tile(dd)), "qkes"),
            (f"oneway-{strategy}", strategy,
             lambda q, k, e, v, t, s, b, dd: info_nce(q, k, s, symmetric=False, distributed=dd, **_tile(dd)), "qks"),
            (f"sum-{strategy}", strategy,
             lambda q, k, e, v, t, s, b, dd: info_nce(q, k, s, reduction="sum", distributed=dd, **_tile(dd)), "qks"),
            (f"dcl-{strategy}", strategy, lambda q, k, e, v, t, s, b, dd: dcl(q, k, s, distributed=dd, **_tile(dd)), "qks"),
            (f"dclw-{strategy}", strategy,
             lambda q, k, e, v, t, s, b, dd: dcl(q, k, s, weighted=True, distributed=dd, **_tile(dd)), "qks"),
            (f"siglip-{strategy}", strategy,
             lambda q, k, e, v, t, s, b, dd: siglip(q, k, s, b, extra_negatives=e, distributed=dd, **_tile(dd)), "qkesb"),
        ]
    out += [
        # positives living on the other rank: global targets (a permutation of the global batch)
        ("clip-targets-allgather", "allgather",
         lambda q, k, e, v, t, s, b, dd: info_nce(q, k, s, targets=t, distributed=dd, **_tile(dd)), "qks"),
        ("clip-targets-ring", "ring",
         lambda q, k, e, v, t, s, b, dd: info_nce(q, k, s, targets=t, distributed=dd, **_tile(dd)), "qks"),
        ("dclw-targets-ring", "ring", lambda q, k, e, v, t, s, b, dd: dcl(
            q, k, s, targets=t, weighted=True, extra_negatives=e, distributed=dd, **_tile(dd)), "qkes"),
        ("siglip-targets-ring", "ring",
         lambda q, k, e, v, t, s, b, dd: siglip(q, k, s, b, targets=t, distributed=dd, **_tile(dd)), "qksb"),
        ("clip-negmask-ring", "ring", lambda q, k, e, v, t, s, b, dd: info_nce(
            q, k, s, neg_mask=_NEG_MASK, distributed=dd, **_tile(dd)), "qks"),
        ("clip-negmask-allgather", "allgather", lambda q, k, e, v, t, s, b, dd: info_nce(
            q, k, s, neg_mask=_NEG_MASK, distributed=dd), "qks"),
        ("ntxent2-allgather", "allgather", lambda q, k, e, v, t, s, b, dd: nt_xent(v[:2], s, distributed=dd, **_tile(dd)), "vs"),
        ("ntxent3-allgather", "allgather", lambda q, k, e, v, t, s, b, dd: nt_xent(v, s, distributed=dd, **_tile(dd)), "vs"),
    ]
    return out


def _run_case(fn, inputs, q, k, e, views, targets, distributed, shard=None):
    """Loss and gradients of the named inputs; ``shard`` slices the per-example tensors."""
    sl = slice(None) if shard is None else shard
    leaves = {
        "q": q[sl].clone().requires_grad_(True),
        "k": k[sl].clone().requires_grad_(True),
        "e": e[sl].clone().requires_grad_(True),
        "v": views[:, sl].clone().requires_grad_(True),
        "s": torch.tensor(4.0, dtype=torch.float64, requires_grad=True),
        "b": torch.tensor(-2.0, dtype=torch.float64, requires_grad=True),
    }
    t = targets[sl]
    loss = fn(leaves["q"], leaves["k"], leaves["e"], leaves["v"], t, leaves["s"], leaves["b"], distributed)
    wanted = [leaves[c] for c in inputs]
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, wanted)]


def _cases_on_rank(rank, world, dtype_name):
    dtype = getattr(torch, dtype_name)
    q, k, e, views, targets = global_data(dtype)
    start = sum(SIZES[:rank])
    shard = slice(start, start + SIZES[rank])
    results = {}
    for name, strategy, fn, inputs in cases():
        if dtype != torch.float64 and strategy != "ring":
            continue
        results[name] = _run_case(fn, inputs, q, k, e, views, targets, strategy, shard)
    return results


def _spawn(dtype_name):
    return run_on_ranks(_cases_on_rank, dtype_name)


@pytest.fixture(scope="module")
def fp64_results():
    return _spawn("float64")


@pytest.mark.parametrize("name", [c[0] for c in cases()])
def test_distributed_matches_single_process(fp64_results, name):
    _, _, fn, inputs = next(c for c in cases() if c[0] == name)
    q, k, e, views, targets = global_data()
    loss, grads = _run_case(fn, inputs, q, k, e, views, targets, "none")
    world = len(SIZES)
    per_rank = [r[name] for r in fp64_results]
    tol = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.stack([lr for lr, _ in per_rank]).mean(), loss, **tol)
    for i, c in enumerate(inputs):
        if c in "sb":  # shared parameters: the mean over ranks is the single-process gradient
            torch.testing.assert_close(torch.stack([g[i] for _, g in per_rank]).mean(), grads[i], **tol)
        else:  # embeddings: each rank's shard gradient is W times the global one
            axis = 1 if c == "v" else 0
            shard_grads = torch.cat([g[i] for _, g in per_rank], dim=axis)
            torch.testing.assert_close(shard_grads, world * grads[i], **tol)


def test_ring_carries_bf16():
    per_rank = _spawn("bfloat16")
    q, k, e, views, targets = global_data(torch.bfloat16)
    for name, strategy, fn, inputs in cases():
        if strategy != "ring":
            continue
        loss, grads = _run_case(fn, inputs, q, k, e, views, targets, "none")
        mean_loss = torch.stack([r[name][0] for r in per_rank]).mean()
        torch.testing.assert_close(mean_loss.double(), loss.double(), rtol=3e-2, atol=3e-2)
        assert all(torch.isfinite(g).all() for r in per_rank for g in r[name][1])


def _bad_input_on_rank(rank, world):
    from batchlab.errors import BatchlabInputError

    q, k, *_ = global_data(torch.float32)
    q, k = q[:4], k[:4]
    messages = []
    for call in (
        lambda: info_nce(q, k, 2.0, pos_mask=torch.eye(4, dtype=torch.bool), distributed="allgather"),
        lambda: info_nce(q, k, 2.0, pos_mask=torch.eye(4, dtype=torch.bool), distributed="ring"),
        lambda: info_nce(q, k, 2.0, neg_mask=torch.zeros(4, 8, dtype=torch.bool), distributed="allgather"),
        lambda: nt_xent(torch.stack([q, k]), 2.0, distributed="ring"),
        # unknown keywords are refused before any strategy runs (the ring never reads them)
        lambda: info_nce(q, k, 2.0, distributed="ring", temperature=0.1),
        lambda: siglip(q, k, 2.0, -1.0, distributed="ring", temperature=0.1),
        lambda: dcl(q, k, 2.0, distributed="ring", temprature=0.1),
        lambda: info_nce(q, k, 2.0, distributed="allgather", local_loss=True),
    ):
        try:
            call()
            messages.append(None)
        except BatchlabInputError as exc:
            messages.append(str(exc))
    return messages


def test_distributed_bad_input_is_refused_clearly():
    messages = run_on_ranks(_bad_input_on_rank)[0]
    assert "pos_mask is not supported" in messages[0]
    assert "pos_mask is not supported" in messages[1]
    assert "callable" in messages[2]
    assert "allgather" in messages[3]
    assert "logit_scale=1/temperature" in messages[4] and "logit_scale=1/temperature" in messages[5]
    assert "temprature" in messages[6]
    assert "compat.open_clip" in messages[7]


def _ring_cases_on_rank(rank, world):
    q, k, e, views, targets = global_data()
    return {name: _run_case(fn, inputs, q, k, e, views, targets, strategy)
            for name, strategy, fn, inputs in cases() if strategy == "ring"}


def test_ring_of_one_rank_is_the_single_process_loss():
    got = run_on_ranks(_ring_cases_on_rank, world=1)[0]
    q, k, e, views, targets = global_data()
    for name, strategy, fn, inputs in cases():
        if strategy == "ring":
            loss, grads = _run_case(fn, inputs, q, k, e, views, targets, "none")
            torch.testing.assert_close(got[name][0], loss, rtol=1e-6, atol=1e-9)
            for a, b in zip(got[name][1], grads):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


TRITON_RING_CASES = {
    "clip": lambda q, k, e, s, impl: info_nce(q, k, s, distributed=impl[0], impl=impl[1]),
    "clip-extra-oneway": lambda q, k, e, s, impl: info_nce(q, k, s, extra_negatives=e, symmetric=False,
                                                           distributed=impl[0], impl=impl[1]),
    "dclw": lambda q, k, e, s, impl: dcl(q, k, s, weighted=True, extra_negatives=e, distributed=impl[0],
                                         impl=impl[1]),
}


def _grads_or_zeros(loss, leaves):
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _triton_ring_on_rank(rank, world):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported in this process
    q, k, e, _, _ = global_data(torch.float32)
    start = sum(SIZES[:rank])
    shard = slice(start, start + SIZES[rank])
    out = {}
    for name, fn in TRITON_RING_CASES.items():
        leaves = [t[shard].clone().requires_grad_(True) for t in (q, k, e)]
        s = torch.tensor(4.0, requires_grad=True)
        loss = fn(*leaves, s, ("ring", "triton"))
        out[name] = (loss.detach(), _grads_or_zeros(loss, [*leaves, s]))
    return out


def test_ring_on_triton_kernels_matches_single_process():
    """The ring's Triton block path (run in Triton's CPU interpreter), fp32, tolerance 1e-4."""
    pytest.importorskip("triton")
    per_rank = run_on_ranks(_triton_ring_on_rank)
    q, k, e, _, _ = global_data(torch.float64)
    for name, fn in TRITON_RING_CASES.items():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, e)]
        s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
        loss = fn(*leaves, s, ("none", "reference"))
        grads = _grads_or_zeros(loss, [*leaves, s])
        tol = dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.stack([r[name][0] for r in per_rank]).double().mean(), loss, **tol)
        for i in range(3):
            got = torch.cat([r[name][1][i] for r in per_rank]).double()
            torch.testing.assert_close(got, 2 * grads[i], **tol, msg=lambda m: f"{name} grad {i}: {m}")
        torch.testing.assert_close(torch.stack([r[name][1][3] for r in per_rank]).double().mean(), grads[3], **tol)


def _auto_choice_on_rank(rank, world):
    from batchlab.losses.distributed import strategies as bd

    chosen = []
    real = dict(bd._RING), dict(bd._ALLGATHER)
    for name, table in (("ring", bd._RING), ("allgather", bd._ALLGATHER)):
        for fam in list(table):
            table[fam] = (lambda f, n: lambda *a, **k: (chosen.append(n), f(*a, **k))[1])(table[fam], name)
    q, k, e, views, _ = global_data(torch.float32)
    shard = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))
    info_nce(q[shard], k[shard], 2.0, distributed="auto")            # small, CPU: all-gather
    info_nce(q[shard], k[shard], 2.0, distributed="auto", return_lse=True)  # only the all-gather returns LSEs
    nt_xent(views[:, shard], 2.0, distributed="auto")                # NT-Xent: all-gather
    bd._RING.update(real[0])
    bd._ALLGATHER.update(real[1])
    return chosen


def test_auto_strategy_choice_on_cpu():
    chosen = run_on_ranks(_auto_choice_on_rank)[0]
    assert chosen == ["allgather", "allgather", "allgather"]


def test_ring_pairs_of_the_diagonal_read_no_values(monkeypatch):
    """Diagonal positives: the ring builds its pairs from shapes alone (no bincount, no host sync)."""
    from batchlab.losses.distributed import strategies

    def refuse(*args, **kwargs):
        raise AssertionError("counted the targets of the diagonal")

    monkeypatch.setattr(torch, "bincount", refuse)
    q, k = torch.randn(3, 4), torch.randn(3, 4)
    pairs, rows, cols = strategies._ring_pairs(q, k, None, None, None, [3, 2], 1, None, True)
    assert torch.equal(pairs.targets, torch.arange(5)) and torch.equal(rows, torch.ones(3))
    assert torch.equal(cols, torch.ones(3))  # (targets are still counted and checked: the tests above)


def _dcl_keys_without_negatives_on_rank(rank, world):
    from batchlab.errors import BatchlabInputError

    q, k, e, *_ = global_data(torch.float32)
    messages = []
    for strategy in ("ring", "allgather"):
        try:  # one pair with extra negatives: the key has none (extras belong to queries)
            value = dcl(q[:1], k[:1], 2.0, extra_negatives=e[:1], distributed=strategy)
            messages.append(f"returned {float(value)}")
        except BatchlabInputError as exc:
            messages.append(str(exc))
    torch.distributed.barrier()
    return messages


def test_symmetric_dcl_refuses_a_key_without_negatives_on_every_strategy():
    # the ring checked only the queries' denominators and returned -inf for the key's loss
    for message in run_on_ranks(_dcl_keys_without_negatives_on_rank, world=1)[0]:
        assert "key" in message and "negative" in message, message
