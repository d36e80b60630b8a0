"""SogCLR / iSogCLR: the reference against a loop-by-loop oracle of the papers' rules, the
tiled path against the reference (values, state, temperature gradients, embedding
gradients), the stateful module, and 2 gloo ranks against one process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from batchlab.errors import BatchlabInputError
from batchlab.losses import ISogCLRLoss, SogCLRLoss, dcl, sogclr
from tests.gloo import run_on_ranks
from tests.losses.helpers import unit

MODES = ("symmetric", "one_way", "two_view")


def _state(mode, n, gen, dtype=torch.float64):
    """Random log u rows (one example never seen) and per-example temperatures."""
    rows = 1 if mode == "one_way" else 2
    log_u = torch.randn(rows, n, generator=gen, dtype=torch.float64).to(dtype)
    log_u[0, 0] = float("-inf")
    tau = (0.05 + 0.2 * torch.rand(rows, n, generator=gen, dtype=torch.float64)).to(dtype)
    return log_u, tau.requires_grad_(True)


def _oracle(q, k, log_u, tau, gamma, rho, mode, neg_mask=None):
    """The update rules written out anchor by anchor (float64): value, new log u, tau gradient,
    and a surrogate whose gradient is the papers' estimator sum_j P_ij dh_ij. ``neg_mask[i, j]``:
    key j is not a negative of query i (nor query i of key j)."""
    q, k = q.double(), k.double()
    n = q.shape[0]
    if mode == "one_way":
        dirs = [(q, [k], k)]
    elif mode == "symmetric":
        dirs = [(q, [k], k), (k, [q], q)]
    else:
        dirs = [(q, [k, q], k), (k, [q, k], q)]
    values, new_u, tau_grads, surrogate = [], [], [], 0.0
    def kept(d, i, j):
        return neg_mask is None or not bool(neg_mask[i, j] if d == 0 else neg_mask[j, i])

    for d, (a, blocks, p) in enumerate(dirs):
        for i in range(n):
            t = float(tau[d, i])
            hs = [a[i] @ c[j] - a[i] @ p[i] for c in blocks for j in range(c.shape[0]) if j != i and kept(d, i, j)]
            g = sum(math.exp(h.item() / t) for h in hs) / len(hs)
            old = float(log_u[d, i])
            u = g if old == float("-inf") else (1 - gamma) * math.exp(old) + gamma * g
            weights = [math.exp(h.item() / t) / (len(hs) * u) for h in hs]
            values.append(t * (math.log(u) + rho))
            new_u.append(math.log(u))
            tau_grads.append(math.log(u) + rho - sum(w * h.item() / t for w, h in zip(weights, hs)))
            surrogate = surrogate + sum(w * h for w, h in zip(weights, hs)) / (n * len(dirs))
    shape = (len(dirs), n)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.float64).view(shape)  # noqa: E731
    return as_t(values).mean(0).mean(), as_t(new_u), as_t(tau_grads), surrogate


@pytest.mark.parametrize("mode", MODES)
def test_reference_follows_the_update_rules(mode):
    gen = torch.Generator().manual_seed(1)
    n, m = 5, (7 if mode == "one_way" else 5)
    q, k = unit(n, 6, gen, torch.float64), unit(m, 6, gen, torch.float64)
    log_u, tau = _state(mode, n, gen)
    out = sogclr(q, k, log_u=log_u, tau=tau, gamma=0.7, rho=0.4, mode=mode, impl="reference")
    value, new_u, tau_grad, surrogate = _oracle(q, k, log_u, tau.detach(), 0.7, 0.4, mode)
    torch.testing.assert_close(out.loss.detach(), value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.log_u, new_u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tau_grad, tau_grad, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(out.loss, [q, k, tau])
    want = torch.autograd.grad(surrogate, [q, k])
    for a, b in zip(got[:2], want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the temperature receives the DRO gradient, divided by the mean over rows and directions
    torch.testing.assert_close(got[2], tau_grad / tau.numel(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["symmetric", "one_way"])
def test_negative_mask_leaves_pairs_out(mode):
    gen = torch.Generator().manual_seed(8)
    n, m = 6, (8 if mode == "one_way" else 6)
    q, k = unit(n, 5, gen, torch.float64), unit(m, 5, gen, torch.float64)
    log_u, tau = _state(mode, n, gen)
    mask = torch.rand(n, m, generator=gen) < 0.3
    out = sogclr(q, k, log_u=log_u, tau=tau, gamma=0.6, rho=0.2, mode=mode, impl="reference", neg_mask=mask)
    value, new_u, tau_grad, surrogate = _oracle(q, k, log_u, tau.detach(), 0.6, 0.2, mode, neg_mask=mask)
    torch.testing.assert_close(out.loss.detach(), value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tau_grad, tau_grad, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.loss, [q, k]), torch.autograd.grad(surrogate, [q, k])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    tiled = sogclr(q, k, log_u=log_u, tau=tau, gamma=0.6, rho=0.2, mode=mode, impl="tiled", tile_size=(4, 3),
                   neg_mask=lambda r, c: mask[r][:, c])
    torch.testing.assert_close(tiled.loss, out.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tiled.log_u, out.log_u, rtol=1e-12, atol=1e-12)
    # a query whose every negative is masked carries no signal: value 0, no gradient, u kept
    emptied = mask.clone()
    emptied[:2] = True
    runs = []
    for impl in ("reference", "tiled"):
        out = sogclr(q, k, log_u=log_u, tau=tau, gamma=0.6, rho=0.2, mode=mode, impl=impl, neg_mask=emptied,
                     reduction="none")
        assert torch.equal(out.log_u[0, :2], log_u[0, :2]) and torch.all(out.tau_grad[0, :2] == 0)
        if mode == "one_way":
            assert torch.all(out.loss[:2] == 0)
            assert torch.all(torch.autograd.grad(out.loss[:2].sum(), q, retain_graph=True)[0] == 0)
        runs.append((out, torch.autograd.grad(out.loss.sum(), [q, k, tau])))
    for a, b in zip([runs[0][0].loss, *runs[0][1]], [runs[1][0].loss, *runs[1][1]]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_no_memory_is_tau_times_dcl():
    """gamma = 1, one temperature: SogCLR's gradient is tau times DCL's at scale 1/tau."""
    gen = torch.Generator().manual_seed(2)
    q, k = unit(6, 4, gen, torch.float64), unit(6, 4, gen, torch.float64)
    out = sogclr(q, k, log_u=torch.full((2, 6), float("-inf"), dtype=torch.float64), tau=0.2, gamma=1.0)
    ref = dcl(q, k, 5.0)
    torch.testing.assert_close(out.loss, 0.2 * (ref - math.log(5)), rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.loss, [q, k]), torch.autograd.grad(0.2 * ref, [q, k])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _both(q, k, log_u, tau, mode, **kw):
    res = {}
    for impl, opts in (("reference", {}), ("tiled", {"tile_size": (4, 3)})):
        out = sogclr(q, k, log_u=log_u, tau=tau, gamma=0.8, rho=0.3, mode=mode, impl=impl, **opts, **kw)
        res[impl] = (out, torch.autograd.grad(out.loss, [q, k, tau]))
    return res["reference"], res["tiled"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [2, 7, 13])
def test_tiled_matches_reference_fp32(mode, n):
    """fp32 within 1e-5 relative (both accumulate in fp32; tiles of 4 x 3 make every size ragged)."""
    gen = torch.Generator().manual_seed(n)
    m = n + 3 if mode == "one_way" else n
    q, k = unit(n, 8, gen), unit(m, 8, gen)
    log_u, tau = _state(mode, n, gen, torch.float32)
    (ref, ref_g), (til, til_g) = _both(q, k, log_u, tau, mode)
    torch.testing.assert_close(til.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(til.log_u, ref.log_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(til.tau_grad, ref.tau_grad, rtol=1e-5, atol=1e-5)
    for a, b in zip(til_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tiled_bf16_against_float64_reference():
    """bf16 inputs: statistics in fp32 (1e-4 relative), gradients rounded to bf16 (2**-8 relative)."""
    gen = torch.Generator().manual_seed(3)
    q, k = unit(11, 16, gen, torch.bfloat16), unit(11, 16, gen, torch.bfloat16)
    log_u, tau = _state("symmetric", 11, gen, torch.float32)
    til = sogclr(q, k, log_u=log_u, tau=tau, mode="symmetric", impl="tiled", tile_size=4)
    til_g = torch.autograd.grad(til.loss, [q, k, tau])
    q64, k64 = (x.detach().double().requires_grad_(True) for x in (q, k))
    tau64 = tau.detach().double().requires_grad_(True)
    ref = sogclr(q64, k64, log_u=log_u.double(), tau=tau64, mode="symmetric", impl="reference", check_inputs=False)
    ref_g = torch.autograd.grad(ref.loss, [q64, k64, tau64])
    torch.testing.assert_close(til.loss.double(), ref.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(til.tau_grad.double(), ref.tau_grad, rtol=1e-4, atol=1e-4)
    for a, b in zip(til_g, ref_g):
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-3)


def test_one_query_with_extra_keys_and_refusals():
    gen = torch.Generator().manual_seed(4)
    q, k = unit(1, 5, gen), unit(3, 5, gen)
    log_u, tau = _state("one_way", 1, gen, torch.float32)
    (ref, ref_g), (til, til_g) = _both(q, k, log_u, tau, "one_way")
    torch.testing.assert_close(til.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(til_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    one = unit(1, 5, gen)
    with pytest.raises(BatchlabInputError, match="no negative"):
        sogclr(one, one, log_u=torch.zeros(2, 1), tau=0.1)
    with pytest.raises(BatchlabInputError, match="unknown keyword"):
        sogclr(q, k[:1], log_u=torch.zeros(2, 1), tau=0.1, temperature=0.1)
    with pytest.raises(BatchlabInputError, match="shape"):
        sogclr(q, k[:1], log_u=torch.zeros(1, 1), tau=0.1)
    with pytest.raises(BatchlabInputError, match="> 0"):
        sogclr(q, k, log_u=torch.zeros(1, 1), tau=torch.zeros(1, 1), mode="one_way")


def test_module_steps_temperatures_and_resumes():
    """iSogCLR's momentum step, the first-visit rule, and a state_dict round trip mid-run."""
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randperm(12, generator=gen)[:4], unit(4, 6, gen).detach(), unit(4, 6, gen).detach())
               for _ in range(4)]
    loss_fn = ISogCLRLoss(12, tau=0.1, tau_min=0.05, tau_max=0.7, rho=0.3, eta=0.05, beta=0.8)
    ids, q, k = batches[0]
    loss_fn(q, k, ids)
    out = sogclr(q, k, log_u=torch.full((2, 4), float("-inf")), tau=0.1, gamma=0.9, rho=0.3)
    torch.testing.assert_close(loss_fn.log_u[:, ids], out.log_u)
    torch.testing.assert_close(loss_fn.tau_momentum[:, ids], 0.8 * out.tau_grad)
    torch.testing.assert_close(loss_fn.tau[:, ids], (0.1 - 0.05 * 0.8 * out.tau_grad).clamp(0.05, 0.7))
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[ids] = False
    assert torch.isneginf(loss_fn.log_u[:, untouched]).all()

    resumed = ISogCLRLoss(12, tau=0.1, tau_min=0.05, tau_max=0.7, rho=0.3, eta=0.05, beta=0.8)
    resumed.load_state_dict(loss_fn.state_dict())
    for ids, q, k in batches[1:]:
        torch.testing.assert_close(resumed(q, k, ids), loss_fn(q, k, ids), rtol=0, atol=0)
    for name, buf in loss_fn.state_dict().items():
        assert torch.equal(buf, resumed.state_dict()[name]), name
    with pytest.raises(BatchlabInputError, match="saved for another"):
        SogCLRLoss(13).load_state_dict(SogCLRLoss(12).state_dict())


def test_module_refuses_bad_ids_and_keywords():
    gen = torch.Generator().manual_seed(6)
    q, k = unit(3, 4, gen), unit(3, 4, gen)
    loss_fn = SogCLRLoss(5, mode="two_view")
    with pytest.raises(BatchlabInputError, match="repeat"):
        loss_fn(q, k, torch.tensor([1, 1, 2]))
    with pytest.raises(BatchlabInputError, match=r"\[0, 5\)"):
        loss_fn(q, k, torch.tensor([1, 2, 5]))
    with pytest.raises(BatchlabInputError, match="unknown keyword"):
        SogCLRLoss(5, temperature=0.1)
    with pytest.raises(BatchlabInputError, match="isogclr=True"):
        SogCLRLoss(5, rho=0.3)
    assert "tau" not in SogCLRLoss(5).state_dict()  # SogCLR: one fixed temperature, no per-example state


# ----------------------------------------------------------------------------- two gloo ranks


def _batches():
    """Two steps' (ids, queries, positive keys, two extra keys); 7 pairs split 4 + 3 over two ranks."""
    gen = torch.Generator().manual_seed(7)
    return [(torch.randperm(20, generator=gen)[:n], unit(n, 8, gen).detach(), unit(n, 8, gen).detach(),
             unit(2, 8, gen).detach()) for n in (7, 6)]


def _run(rank: int, world: int, mode: str):
    """Two steps of iSogCLR on this rank's shard (world 1: the whole batch).

    one_way: each rank holds its queries' positive keys followed by one extra key; one
    process holds all positives followed by both extra keys (the same candidate set).
    """
    loss_fn = ISogCLRLoss(20, mode=mode, tau=0.1, tau_min=0.05, tau_max=0.7, impl="tiled", tile_size=3,
                          distributed="allgather" if world > 1 else "none")
    results = []
    for ids, q, k, extra in _batches():
        half = (q.shape[0] + 1) // 2
        rows = slice(0, q.shape[0]) if world == 1 else [slice(0, half), slice(half, None)][rank]
        extra = extra if world == 1 else extra[rank : rank + 1]
        keys = torch.cat([k[rows], extra]) if mode == "one_way" else k[rows]
        q_r, k_r = q[rows].clone().requires_grad_(True), keys.clone().requires_grad_(True)
        loss = loss_fn(q_r, k_r, ids[rows])
        loss.backward()
        n_r = q_r.shape[0]
        results.append((loss.detach(), q_r.grad, k_r.grad[:n_r], k_r.grad[n_r:]))
    return results, {name: buf.clone() for name, buf in loss_fn.state_dict().items()}


def _run_rank(rank, world):
    return {mode: _run(rank, world, mode) for mode in MODES}


def test_two_ranks_equal_one_process():
    spawned = run_on_ranks(_run_rank, world=2)  # one spawn for every mode: process start-up dominates
    for mode in MODES:
        _compare_ranks(_run(0, 1, mode), [spawned[0][mode], spawned[1][mode]])


def _compare_ranks(single_run, per_rank):
    single, single_state = single_run
    for step, want in enumerate(single):
        # the distributed convention: mean over ranks of the loss; each rank's gradient is W x its share
        torch.testing.assert_close(sum(r[0][step][0] for r in per_rank) / 2, want[0], rtol=1e-5, atol=1e-6)
        for part in (1, 2, 3):  # query, positive-key and extra-key gradients
            got = torch.cat([r[0][step][part] for r in per_rank]) / 2
            torch.testing.assert_close(got, want[part], rtol=1e-5, atol=1e-6)
    for rank_state in (per_rank[0][1], per_rank[1][1]):  # every rank holds the whole, same state
        for name, buf in single_state.items():
            torch.testing.assert_close(rank_state[name], buf, rtol=1e-5, atol=1e-6, msg=name)


def test_recipe_heads():
    from batchlab.recipes.global_loss import GlobalContrastiveHead, global_contrastive_head

    assert global_contrastive_head("info_nce", 10) is None
    sog, isog = global_contrastive_head("sogclr", 10), global_contrastive_head("isogclr", 10)
    assert isinstance(sog, GlobalContrastiveHead) and not sog.loss_fn.isogclr and isog.loss_fn.isogclr
    with pytest.raises(BatchlabInputError, match="holds state for 12"):
        global_contrastive_head(SogCLRLoss(12), 10)
    gen = torch.Generator().manual_seed(9)
    q, k = unit(3, 4, gen), unit(3, 4, gen)
    with pytest.raises(BatchlabInputError, match="track"):
        sog(q, k)
    encode = sog.track(lambda ids: (q, k))
    torch.testing.assert_close(sog(*encode(torch.tensor([1, 4, 7]))),
                               SogCLRLoss(10, tau=0.07)(q, k, torch.tensor([1, 4, 7])))


def test_temperature_gradient_is_rho_minus_kl_on_first_visit():
    """With u = g (an unseen example), d loss_i / d tau_i = rho - KL(softmax over negatives || uniform):
    iSogCLR lowers tau_i until its negatives' weighting is rho nats from uniform."""
    gen = torch.Generator().manual_seed(10)
    q, k = unit(9, 6, gen, torch.float64), unit(9, 6, gen, torch.float64)
    tau = 0.05 + 0.1 * torch.rand(2, 9, generator=gen, dtype=torch.float64)
    out = sogclr(q, k, log_u=torch.full((2, 9), float("-inf"), dtype=torch.float64), tau=tau, rho=0.7)
    for d, (a, c) in enumerate(((q, k), (k, q))):
        h = (a @ c.T - (a * c).sum(1, keepdim=True)) / tau[d][:, None]
        h = h.masked_fill(torch.eye(9, dtype=torch.bool), float("-inf"))
        p = torch.softmax(h, 1)
        kl = (p * (p.clamp_min(1e-300).log() + math.log(8))).sum(1)
        torch.testing.assert_close(out.tau_grad[d], 0.7 - kl, rtol=1e-10, atol=1e-12)


def test_tiles_without_exclusions_are_found_on_the_host():
    """The tiled path skips the mask of tiles with no excluded entry; the host rule must agree with the mask."""
    from batchlab.losses.sogclr import Direction, excluded, touches_exclusions

    x = torch.zeros(1, 1)
    for starts, sizes, offsets in [((0,), (9,), (0,)), ((0,), (9,), (4,)), ((0, 9), (9, 7), (2, 5)), ((0,), (12,), (7,))]:
        d = Direction(x, x, x, starts, sizes, offsets)
        k = sum(sizes)
        for r0 in range(0, 6, 2):
            for c0 in range(0, k, 3):
                rows, cols = torch.arange(r0, r0 + 2), torch.arange(c0, min(c0 + 3, k))
                assert touches_exclusions(d, r0, r0 + 2, c0, min(c0 + 3, k)) == bool(excluded(d, rows, cols).any())


def test_auto_never_picks_the_interpreter_and_triton_needs_cuda(monkeypatch):
    """On the CPU ``auto`` is the reference (tiled when large), whatever TRITON_INTERPRET says;
    ``impl="triton"`` on CPU tensors is refused outside Triton's interpreter."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(12)
    q, k = unit(6, 4, gen), unit(6, 4, gen)
    log_u = torch.zeros(2, 6)
    auto = sogclr(q, k, log_u=log_u, tau=0.1)
    ref = sogclr(q, k, log_u=log_u, tau=0.1, impl="reference")
    torch.testing.assert_close(auto.loss, ref.loss, rtol=0, atol=0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BatchlabInputError, match="CUDA"):
        sogclr(q, k, log_u=log_u, tau=0.1, impl="triton")


@pytest.mark.parametrize("check_inputs", [None, True, False])
def test_module_validates_its_inputs_once_where_no_kernel_runs(check_inputs, monkeypatch):
    """On the CPU (no fused step): one validation per call, the value checks included, not one in the
    fused step's probe and another in sogclr()."""
    import importlib

    module = importlib.import_module("batchlab.losses.sogclr")  # (batchlab.losses.sogclr is also the function)

    calls = []
    real = module._validate
    monkeypatch.setattr(module, "_validate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    loss = SogCLRLoss(8, check_inputs=check_inputs)
    q, k = F.normalize(torch.randn(4, 6), dim=1), F.normalize(torch.randn(4, 6), dim=1)
    loss(q, k, torch.arange(4))
    assert len(calls) == 1


def test_bench_interleaves_methods_and_reports_paired_ratios(tmp_path):
    """``batchlab bench sogclr`` on the CPU at a tiny size: every method timed once per round, rows per
    data kind with quartiles, the per-round ratio to info_nce auto (1 for the anchor itself)."""
    import json

    from batchlab.bench import sogclr as bench

    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")}
    times = bench.interleaved(steps, "cpu", repeats=3, warmup=1)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(v) == 3 for v in times.values())
    status = bench.main(["--sizes", "12", "--dim", "8", "--repeats", "3", "--data", "random,clustered",
                         "--methods", "info_nce auto", "sogclr tiled", "--out", str(tmp_path)])
    assert status == 0
    rows = json.loads((tmp_path / "sogclr-cpu.json").read_text())["rows"]
    assert [(r["data"], r["method"]) for r in rows] == [("random", "info_nce auto"), ("random", "sogclr tiled"),
                                                        ("clustered", "info_nce auto"), ("clustered", "sogclr tiled")]
    for r in rows:
        assert r["ms_p25"] <= r["ms"] <= r["ms_p75"]
        assert r["x_info_nce_auto"] > 0
    assert rows[0]["x_info_nce_auto"] == 1.0


def test_bench_refuses_bad_data_before_check(monkeypatch, tmp_path, capsys):
    """A bad ``--data`` or ``--sizes`` is refused (exit 2, the value named) before ``--check`` spends any time."""
    from batchlab.bench import sogclr as bench

    monkeypatch.setattr(bench, "check", lambda *a, **kw: pytest.fail("--check ran before --data was validated"))
    for bad in (["--data", "random,nope"], ["--sizes", "12,x"]):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--sizes", "12", "--dim", "8", *bad, "--check", "--out", str(tmp_path)])
        assert stop.value.code == 2  # the CLI's bad-input exit
    assert "random and/or clustered, got 'random,nope'" in capsys.readouterr().err
