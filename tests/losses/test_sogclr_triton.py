"""SogCLR / iSogCLR ``impl="triton"`` in Triton's CPU interpreter, against the float64 reference.

The interpreter runs the GPU kernels' code with small blocks (16 x 32: every size here is
ragged, several row blocks and column tiles); bf16 dot operands are upcast there, and bf16
products are exact in fp32 either way.

Tolerances (normwise: max |error| / max |reference|, against the float64 reference on the same
rounded inputs):

* fp32 inputs: 1e-5 on values, new ``log u``, temperature gradients and embedding gradients
  (fp32 statistics and products; the temperature gradient ``log u + rho - s mean(h / tau)`` is
  a difference of terms as large as ``log u``, which sets the bound). At tau = 0.005 an fp32
  error of 1e-7 in a similarity becomes 2e-5 in ``h / tau``: the bound scales with 0.05 / tau.
* bf16 inputs: 1e-5 on the statistics (exact products, fp32 sums) and 2e-2 on the embedding
  gradients: the backward stores ``dLoss/dS`` in bf16 (2**-9 per entry) before the two
  gradient products, and returns the gradients in bf16.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from batchlab.errors import BatchlabInputError  # noqa: E402
from batchlab.losses import ISogCLRLoss, SogCLRLoss, sogclr  # noqa: E402
from batchlab.losses.sogclr import MODES, SogCLRResult  # noqa: E402
from batchlab.losses.triton import _sogclr  # noqa: E402
from tests.gloo import run_on_ranks  # noqa: E402

GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# the interpreter warns about exp2 overflowing in lanes that the kernels mask out (never stored or summed)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")


def _inputs(mode, n, d, dtype, seed, tau=None, extra=3):
    gen = torch.Generator().manual_seed(seed)
    m = n + extra if mode == "one_way" else n
    q, k = (F.normalize(torch.randn(r, d, generator=gen, dtype=torch.float64), dim=1).to(dtype) for r in (n, m))
    rows = 1 if mode == "one_way" else 2
    log_u = torch.randn(rows, n, generator=gen, dtype=torch.float64) + 1.0
    log_u[:, ::3] = float("-inf")  # first visits
    if tau is None:
        tau = 0.05 + 0.2 * torch.rand(rows, n, generator=gen, dtype=torch.float64)
    else:
        tau = torch.full((rows, n), float(tau), dtype=torch.float64)
    return q, k, log_u, tau


def _run(q, k, log_u, tau, impl, **kw):
    """(loss, log u, tau_grad, dq, dk, dtau) of one call; float64 runs on copies."""
    dt = torch.float64 if impl == "reference" else torch.float32
    q, k = (x.detach().to(torch.float64 if impl == "reference" else x.dtype).requires_grad_(True) for x in (q, k))
    tau = tau.to(dt).requires_grad_(True)
    out = sogclr(q, k, log_u=log_u.to(dt), tau=tau, impl=impl, check_inputs=False, **kw)
    total = out.loss.sum()
    return [out.loss.detach(), out.log_u, out.tau_grad, *torch.autograd.grad(total, [q, k, tau])]


def _err(a, b):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite)
    return float((a[finite] - b[finite]).abs().max() / b[finite].abs().max().clamp_min(1e-300))


def _compare(got, want, dtype, scale=1.0):
    names = ["loss", "log_u", "tau_grad", "dq", "dk", "dtau"]
    for name, a, b in zip(names, got, want):
        tol = (GRAD_TOL[dtype] if name in ("dq", "dk") else 1e-5) * scale
        err = _err(a, b)
        assert err <= tol, f"{name}: {err:.2e} > {tol:.1e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,n", [("symmetric", 37), ("one_way", 21), ("two_view", 19)])
def test_matches_float64_reference(mode, n, dtype):
    q, k, log_u, tau = _inputs(mode, n, 20, dtype, seed=n, extra=24)
    kw = dict(mode=mode, gamma=0.8, rho=0.3)
    _compare(_run(q, k, log_u, tau, "triton", **kw), _run(q, k, log_u, tau, "reference", **kw), dtype)


@pytest.mark.parametrize("tau", [0.005, 1.0])
@pytest.mark.parametrize("mode", ["symmetric", "one_way"])
def test_extreme_temperatures(mode, tau):
    q, k, log_u, taus = _inputs(mode, 23, 16, torch.float32, seed=7, tau=tau)
    kw = dict(mode=mode, gamma=0.9, rho=1.0)
    _compare(_run(q, k, log_u, taus, "triton", **kw), _run(q, k, log_u, taus, "reference", **kw), torch.float32,
             scale=max(1.0, 0.05 / tau))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_no_memory(reduction):
    """The symmetric kernels reduce the loss themselves: sum and none, and gamma = 1 (no moving average)."""
    q, k, log_u, tau = _inputs("symmetric", 18, 12, torch.float32, seed=3)
    kw = dict(mode="symmetric", gamma=1.0, rho=0.0, reduction=reduction)
    _compare(_run(q, k, log_u, tau, "triton", **kw), _run(q, k, log_u, tau, "reference", **kw), torch.float32)


def test_one_query_with_extra_keys():
    q, k, log_u, tau = _inputs("one_way", 1, 8, torch.float32, seed=4, extra=2)
    kw = dict(mode="one_way")
    _compare(_run(q, k, log_u, tau, "triton", **kw), _run(q, k, log_u, tau, "reference", **kw), torch.float32)


@pytest.mark.parametrize("mode", ["symmetric", "two_view"])
def test_chunks_and_panels(mode, monkeypatch):
    """Column partials folded chunk by chunk, and the backward in several row panels (fp32 accumulation)."""
    q, k, log_u, tau = _inputs(mode, 50, 12, torch.bfloat16, seed=5)
    want = _run(q, k, log_u, tau, "triton", mode=mode)
    monkeypatch.setattr(_sogclr, "CHUNK_BYTES", 8 * 50 * 2)  # two row blocks per chunk
    monkeypatch.setattr(_sogclr, "panel_rows", lambda n, m, elem, block, ws: 16)
    monkeypatch.setattr(_sogclr, "_PLANS", {})  # the plans hold the panels (not keyed by panel_rows)
    got = _run(q, k, log_u, tau, "triton", mode=mode)
    for name, a, b in zip(["loss", "log_u", "tau_grad", "dq", "dk", "dtau"], got, want):
        assert _err(a, b) <= (1e-2 if name in ("dq", "dk") else 1e-6), name
    _compare(got, _run(q, k, log_u, tau, "reference", mode=mode), torch.bfloat16)


def test_tile_forward_falls_back_above_chunk_bytes(monkeypatch):
    """TILE=1 whose per-tile partials would exceed CHUNK_BYTES: the looped kernels run (in chunks)."""
    q, k, log_u, tau = _inputs("symmetric", 50, 12, torch.float32, seed=21)
    monkeypatch.setattr(_sogclr, "_INTERPRET", {**_sogclr._INTERPRET, "TILE": 1})
    tiled = _run(q, k, log_u, tau, "triton", mode="symmetric")
    monkeypatch.setattr(_sogclr, "CHUNK_BYTES", 8 * 50 * 2)
    launched = []
    real = _sogclr._launch
    monkeypatch.setattr(_sogclr, "_launch", lambda fn, *a: launched.append(fn.fn.__name__) or real(fn, *a))
    got = _run(q, k, log_u, tau, "triton", mode="symmetric")
    assert "sog_fwd_tile_kernel" not in launched and "sog_combine_kernel" in launched
    for a, b in zip(got, tiled):
        assert _err(a, b) <= 1e-5
    _compare(got, _run(q, k, log_u, tau, "reference", mode="symmetric"), torch.float32)


def test_fallbacks_and_strict_keywords():
    """What the kernels do not cover runs tiled (same numbers); options no kernel takes are refused."""
    q, k, log_u, tau = _inputs("symmetric", 9, 8, torch.float64, seed=6)
    got = _run(q, k, log_u, tau, "triton")  # float64: the tiled engine
    want = _run(q, k, log_u, tau, "tiled")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    mask = torch.zeros(9, 9, dtype=torch.bool)
    mask[0, 3] = True
    got = _run(q.float(), k.float(), log_u, tau, "triton", neg_mask=mask)
    want = _run(q.float(), k.float(), log_u, tau, "tiled", neg_mask=mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(BatchlabInputError, match="does not take"):
        sogclr(q.float(), k.float(), log_u=log_u.float(), tau=0.1, impl="triton", tile_size=4)
    # auto never picks the interpreter on the CPU
    assert sogclr.__module__ and _sogclr.supported(q.float()) and not _sogclr.supported(q.half())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("isogclr", [False, True])
def test_fused_state_update_equals_the_module_step(mode, isogclr):
    gen = torch.Generator().manual_seed(8)
    cls = ISogCLRLoss if isogclr else SogCLRLoss
    a, b = cls(50, mode=mode), cls(50, mode=mode)
    for buf in a.buffers():
        buf.copy_(0.01 + 0.05 * torch.rand(buf.shape, generator=gen))
    b.load_state_dict(a.state_dict())
    rows = 1 if mode == "one_way" else 2
    ids = torch.randperm(50, generator=gen)[:13]
    out = SogCLRResult(torch.zeros(()), torch.randn(rows, 13, generator=gen), torch.randn(rows, 13, generator=gen))
    a._update(ids, out)  # the PyTorch step (CPU tensors)
    assert _sogclr.update_ok(b.log_u)
    _sogclr.sogclr_update(ids, out.log_u, out.tau_grad, b.log_u, b.tau if isogclr else None,
                          b.tau_momentum if isogclr else None, mode == "two_view", b.beta, b.eta, b.tau_min, b.tau_max)
    for name, buf in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], buf, rtol=1e-6, atol=1e-7, msg=name)


def test_fake_implementations_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, tau, log_u = torch.empty(6, 4), torch.empty(6, 4), torch.empty(2, 6), torch.empty(2, 6)
        ops = torch.ops.batchlab
        loss, stats = ops.sogclr_forward(q, k, k, tau, 0.0, log_u, [0], [6], [0], True, 1.0, 0.9, 0.0, 0.1, True)
        assert loss.shape == () and stats.shape == (4, 2, 6)
        values, _ = ops.sogclr_forward(q, k, k, None, 0.1, log_u, [0], [6], [0], True, 1.0, 0.9, 0.0, 0.1, False)
        assert values.shape == (2, 6)
        dq, dk = ops.sogclr_backward(q, k, tau, 0.0, stats, loss, [0], [6], [0], True, 0.1, True, False)
        assert dq.shape == q.shape and dk.shape == (0,)


def test_compiled_step_without_graph_breaks_matches_eager():
    """The kernels sit in custom ops: torch.compile(fullgraph=True) traces forward and backward."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 8)
    x, y = torch.randn(16, 12), torch.randn(16, 12)
    tau = torch.full((2, 16), 0.1, requires_grad=True)
    log_u = torch.zeros(2, 16)

    def step(x, y, log_u, tau):
        q, k = F.normalize(lin(x), dim=-1), F.normalize(lin(y), dim=-1)
        out = sogclr(q, k, log_u=log_u, tau=tau, impl="triton", check_inputs=False)
        return out.loss, out.log_u

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        loss, new_log_u = fn(x, y, log_u, tau)
        results.append([loss.detach(), new_log_u, *torch.autograd.grad(loss, [lin.weight, tau])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _ranks(rank: int, world: int):
    """Two steps of iSogCLR (Triton) per mode on this rank's shard of 7 pairs (4 + 3)."""
    results = {}
    for mode in MODES:
        gen = torch.Generator().manual_seed(11)
        q, k = (F.normalize(torch.randn(7, 8, generator=gen), dim=1) for _ in range(2))
        ids = torch.randperm(20, generator=gen)[:7]
        loss_fn = ISogCLRLoss(20, mode=mode, tau=0.1, tau_min=0.05, tau_max=0.7, impl="triton",
                              distributed="allgather" if world > 1 else "none")
        rows = slice(0, 7) if world == 1 else [slice(0, 4), slice(4, 7)][rank]
        out = []
        for _ in range(2):
            q_r, k_r = q[rows].clone().requires_grad_(True), k[rows].clone().requires_grad_(True)
            loss = loss_fn(q_r, k_r, ids[rows])
            out.append((loss.detach(), *torch.autograd.grad(loss, [q_r, k_r])))
        results[mode] = (out, {name: buf.clone() for name, buf in loss_fn.state_dict().items()})
    return results


def test_two_ranks_equal_one_process():
    """distributed='allgather' runs the per-direction kernels on local rows against gathered candidates."""
    single = _ranks(0, 1)
    spawned = run_on_ranks(_ranks, world=2)
    for mode in MODES:
        (want, want_state), per_rank = single[mode], [spawned[0][mode], spawned[1][mode]]
        for step, w in enumerate(want):
            torch.testing.assert_close(sum(r[0][step][0] for r in per_rank) / 2, w[0], rtol=1e-5, atol=1e-6)
            for part in (1, 2):
                got = torch.cat([r[0][step][part] for r in per_rank]) / 2
                torch.testing.assert_close(got, w[part], rtol=1e-5, atol=1e-6)
        for _, state in per_rank:
            for name, buf in want_state.items():
                torch.testing.assert_close(state[name], buf, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- one temperature (ONE_TAU)


def _floats(mode, n, d, dtype, seed, extra=5):
    q, k, log_u, _ = _inputs(mode, n, d, dtype, seed, extra=extra)
    return q, k, log_u


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,n", [("symmetric", 37), ("one_way", 21), ("two_view", 19)])
def test_one_temperature_matches_float64_reference(mode, n, dtype, monkeypatch):
    """A float tau: one exponential per logit at each tile's maximum (the kernels' ONE_TAU + FAST path)."""
    monkeypatch.setattr(_sogclr, "_INTERPRET", {**_sogclr._INTERPRET, "FAST": 1})
    q, k, log_u = _floats(mode, n, 20, dtype, seed=n + 1)
    kw = dict(mode=mode, gamma=0.8, rho=0.3)
    _compare(_run_float(q, k, log_u, 0.07, "triton", **kw), _run_float(q, k, log_u, 0.07, "reference", **kw), dtype)


def _run_float(q, k, log_u, tau, impl, **kw):
    """(loss, log u, tau_grad, dq, dk) of one call with a float temperature."""
    dt = torch.float64 if impl == "reference" else torch.float32
    q, k = (x.detach().to(torch.float64 if impl == "reference" else x.dtype).requires_grad_(True) for x in (q, k))
    out = sogclr(q, k, log_u=log_u.to(dt), tau=tau, impl=impl, check_inputs=False, **kw)
    return [out.loss.detach(), out.log_u, out.tau_grad, *torch.autograd.grad(out.loss.sum(), [q, k])]


@pytest.mark.parametrize("risk", ["never", "always"])
@pytest.mark.parametrize("tau", [0.005, 1.0])
@pytest.mark.parametrize("tile", [0, 1])
def test_one_temperature_both_loops(tau, risk, tile, monkeypatch):
    """The one-exponential loop alone (no redo) and the per-row/per-column loop alone (redo always)
    each match the reference at moderate spreads; at tau = 0.005 the default bound decides per program
    (TILE=1: per tile)."""
    import triton.language as tl

    from batchlab.losses.triton import _sogclr_kernels as ks

    monkeypatch.setattr(_sogclr, "_INTERPRET", {**_sogclr._INTERPRET, "FAST": 1, "TILE": tile})
    q, k, log_u = _floats("symmetric", 40, 16, torch.float32, seed=12)
    if tau == 1.0:
        monkeypatch.setattr(ks, "RISK", tl.constexpr(-1.0 if risk == "never" else 1e30))
    kw = dict(mode="symmetric", gamma=0.9, rho=1.0)
    _compare(_run_float(q, k, log_u, tau, "triton", **kw), _run_float(q, k, log_u, tau, "reference", **kw),
             torch.float32, scale=max(1.0, 0.05 / tau))


@pytest.mark.parametrize("tile", [0, 1])
def test_one_temperature_redoes_a_program_whose_rows_underflow(tile, monkeypatch):
    """Rows whose every logit lies ~576 (base 2) below the tile's best (cos -1 against cos 1 at tau =
    0.005): their sums at the tile's maximum underflow to 0, and the program redoes its tiles with
    per-row shifts. Without the redo (bound forced off) those rows come out wrong: the test can fail.
    TILE=1: the one-tile kernel redoes its tile."""
    import triton.language as tl

    from batchlab.losses.triton import _sogclr_kernels as ks

    monkeypatch.setattr(_sogclr, "_INTERPRET", {**_sogclr._INTERPRET, "FAST": 1, "TILE": tile})
    gen = torch.Generator().manual_seed(13)
    e1 = torch.zeros(6, 4)
    e1[:, 0] = 1.0
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, -1.0])[:, None]
    q = F.normalize(sign * e1 + 0.01 * torch.randn(6, 4, generator=gen), dim=1)
    k = F.normalize(e1 + 0.01 * torch.randn(6, 4, generator=gen), dim=1)
    log_u = torch.zeros(2, 6)
    want = sogclr(q.double(), k.double(), log_u=log_u.double(), tau=0.005, impl="reference", check_inputs=False)
    got = sogclr(q, k, log_u=log_u, tau=0.005, impl="triton", check_inputs=False)
    assert _err(got.log_u, want.log_u) <= 1e-5
    monkeypatch.setattr(ks, "RISK", tl.constexpr(-1.0))
    broken = sogclr(q, k, log_u=log_u, tau=0.005, impl="triton", check_inputs=False)
    assert float((broken.log_u[0, 2:].double() - want.log_u[0, 2:]).abs().min()) > 1.0  # images 2-5 lost


# ----------------------------------------------------------------------------- the modules' fused step


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("mode", ["symmetric", "one_way", "two_view"])
@pytest.mark.parametrize("isogclr", [False, True])
def test_fused_module_step_matches_reference_module(isogclr, mode, reduction, monkeypatch):
    """Two steps of the module: sogclr_step (tables read and written by the kernels; two views: the
    unfused path) against the float64 reference module: loss, gradients and the whole state."""
    calls = []
    real_step = _sogclr.sogclr_step
    monkeypatch.setattr(_sogclr, "sogclr_step", lambda *a, **kw: calls.append(1) or real_step(*a, **kw))
    cls = ISogCLRLoss if isogclr else SogCLRLoss
    opts = dict(mode=mode, reduction=reduction, check_inputs=False)
    fused, ref = cls(30, impl="triton", **opts), cls(30, impl="reference", **opts).double()
    gen = torch.Generator().manual_seed(14)
    for _ in range(2):
        ids = torch.randperm(30, generator=gen)[:11]
        q = F.normalize(torch.randn(11, 16, generator=gen, dtype=torch.float64), dim=1)
        k = F.normalize(torch.randn(11 + (4 if mode == "one_way" else 0), 16, generator=gen, dtype=torch.float64),
                        dim=1)
        got, want = [], []
        for fn, out, dt in ((fused, got, torch.float32), (ref, want, torch.float64)):
            qq, kk = q.to(dt).requires_grad_(True), k.to(dt).requires_grad_(True)
            loss = fn(qq, kk, ids)
            out += [loss.detach(), *torch.autograd.grad(loss.sum(), [qq, kk])]
        for name, a, b in zip(["loss", "dq", "dk"], got, want):
            assert _err(a, b) <= 1e-5, name
    assert len(calls) == (0 if mode == "two_view" else 2)
    # symmetric iSogCLR: temperatures down to tau_min = 0.005, where the temperature step carries
    # fp32's similarity error times 1 / tau (the 0.05 / tau scaling of test_extreme_temperatures)
    scale = 0.05 / fused.tau_min if isogclr else 1.0
    for name, buf in ref.state_dict().items():
        a, b = fused.state_dict()[name].double(), buf
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        assert _err(a, b) <= 1e-5 * max(1.0, scale), name


def test_fused_module_step_bf16():
    """bf16 embeddings take the fused step too (statistics exact, gradients through a bf16 dLoss/dS)."""
    gen = torch.Generator().manual_seed(15)
    q, k = (F.normalize(torch.randn(9, 8, generator=gen), dim=1).bfloat16() for _ in range(2))
    ids = torch.tensor([4, 0, 8, 2, 6, 1, 3, 7, 5])
    fused = ISogCLRLoss(9, impl="triton", check_inputs=False, tau=0.05, tau_min=0.01, tau_max=0.1)
    ref = ISogCLRLoss(9, impl="reference", check_inputs=False, tau=0.05, tau_min=0.01, tau_max=0.1).double()
    results = []
    for fn, dt in ((fused, torch.bfloat16), (ref, torch.float64)):
        qq, kk = q.to(dt).requires_grad_(True), k.to(dt).requires_grad_(True)
        loss = fn(qq, kk, ids)
        results.append([loss.detach(), *torch.autograd.grad(loss, [qq, kk])])
    (loss, dq, dk), (want_loss, want_dq, want_dk) = results
    assert _err(loss, want_loss) <= 1e-5
    assert _err(dq, want_dq) <= 2e-2 and _err(dk, want_dk) <= 2e-2
    for name, buf in ref.state_dict().items():
        assert _err(fused.state_dict()[name], buf) <= 1e-5, name


@pytest.mark.parametrize("isogclr", [False, True])
def test_compiled_module_steps_match_eager_fused_steps(isogclr):
    """Under torch.compile(fullgraph=True) the module takes the custom ops (gather, forward, update);
    eagerly it takes the fused step: same losses, gradients and state over two steps."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 8)
    x, y, ids = torch.randn(16, 12), torch.randn(16, 12), torch.randperm(20)[:16]
    results = []
    for compiled in (False, True):
        loss_fn = (ISogCLRLoss if isogclr else SogCLRLoss)(20, impl="triton", check_inputs=False)

        def step(x, y, ids):
            return loss_fn(F.normalize(lin(x), dim=-1), F.normalize(lin(y), dim=-1), ids)

        fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
        out = []
        for _ in range(2):
            loss = fn(x, y, ids)
            out += [loss.detach(), *torch.autograd.grad(loss, [lin.weight])]
        results.append(out + [buf.clone() for buf in loss_fn.buffers()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_module_step_one_query_with_extra_keys():
    """N = 1 (one_way, two extra keys) through the fused step: loss, gradients and state."""
    gen = torch.Generator().manual_seed(16)
    q = F.normalize(torch.randn(1, 8, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(3, 8, generator=gen, dtype=torch.float64), dim=1)
    ids = torch.tensor([3])
    fused = ISogCLRLoss(5, mode="one_way", impl="triton", check_inputs=False)
    ref = ISogCLRLoss(5, mode="one_way", impl="reference", check_inputs=False).double()
    results = []
    for fn, dt in ((fused, torch.float32), (ref, torch.float64)):
        qq, kk = q.to(dt).requires_grad_(True), k.to(dt).requires_grad_(True)
        loss = fn(qq, kk, ids)
        results.append([loss.detach(), *torch.autograd.grad(loss, [qq, kk])])
    for a, b in zip(*results):
        assert _err(a, b) <= 1e-5
    for name, buf in ref.state_dict().items():
        assert _err(fused.state_dict()[name], buf) <= 1e-5, name


@pytest.mark.parametrize("option", [{}, {"PAIR": 1}, {"SPLIT": 1}, {"SPLIT": 1, "FAST": 1}, {"LEAN": 1}, {"G0": 1},
                                    {"TILE": 1}, {"TILE": 1, "FAST": 1}, {"TILE": 1, "PAIR": 1}, {"TILE": 1, "PB": 2},
                                    {"TILE": 1, "MASK_ALL": 1}, {"G0": 0}])
def test_kernel_options_match_float64_reference(option, monkeypatch):
    """The sweep's forward options: the defaults (FAST=0: the one-temperature kernel's per-row and
    per-column loop; PAIR=0: weighted sums in reductions of their own), PAIR=1 (one reduction
    for each sum and its weighted sum) and SPLIT=1 (the symmetric loss as two row-only passes, FAST
    ignored); FAST=1 alone has the one_temperature tests above."""
    monkeypatch.setattr(_sogclr, "_INTERPRET", {**_sogclr._INTERPRET, **option})
    q, k, log_u, tau = _inputs("symmetric", 37, 20, torch.float32, seed=17)
    kw = dict(mode="symmetric", gamma=0.8, rho=0.3)
    _compare(_run(q, k, log_u, tau, "triton", **kw), _run(q, k, log_u, tau, "reference", **kw), torch.float32)
    _compare(_run_float(q, k, log_u, 0.02, "triton", **kw), _run_float(q, k, log_u, 0.02, "reference", **kw),
             torch.float32, scale=2.5)


@pytest.mark.parametrize("fast", [0, 1])
def test_tile_forward_skips_masks_only_where_nothing_is_masked(fast, monkeypatch):
    """TILE=1 with MASK_ALL=0: tiles without an excluded entry or out-of-range rows and columns take
    the product as it is (N = 80: such tiles exist at the interpreter's 16 x 32 tiles), the others mask."""
    monkeypatch.setattr(_sogclr, "_INTERPRET", {**_sogclr._INTERPRET, "TILE": 1, "MASK_ALL": 0, "FAST": fast})
    q, k, log_u, tau = _inputs("symmetric", 80, 16, torch.float32, seed=20)
    kw = dict(mode="symmetric", gamma=0.8, rho=0.3)
    _compare(_run(q, k, log_u, tau, "triton", **kw), _run(q, k, log_u, tau, "reference", **kw), torch.float32)
    _compare(_run_float(q, k, log_u, 0.02, "triton", **kw), _run_float(q, k, log_u, 0.02, "reference", **kw),
             torch.float32, scale=2.5)


@pytest.mark.parametrize("mode", ["symmetric", "one_way"])
def test_lean_backward_with_per_anchor_upstream_gradients(mode, monkeypatch):
    """LEAN=1 (the backward's positive entry from per-row values) with an upstream gradient per
    anchor (reduction "none": no G0) against the float64 reference; the scalar one (G0) is above."""
    monkeypatch.setattr(_sogclr, "_INTERPRET", {**_sogclr._INTERPRET, "LEAN": 1})
    q, k, log_u, tau = _inputs(mode, 21, 16, torch.float32, seed=19)
    kw = dict(mode=mode, gamma=0.8, rho=0.3, reduction="none")
    _compare(_run(q, k, log_u, tau, "triton", **kw), _run(q, k, log_u, tau, "reference", **kw), torch.float32)


@pytest.mark.parametrize("option", ["SPLIT", "TILE"])
@pytest.mark.parametrize("isogclr", [False, True])
def test_split_module_step_matches_reference_module(isogclr, option, monkeypatch):
    """SPLIT=1 (the symmetric forward as two row-only passes) and TILE=1 (one tile per program) through
    the modules' fused step: two steps against the float64 reference module (loss, gradients, state)."""
    monkeypatch.setattr(_sogclr, "_INTERPRET", {**_sogclr._INTERPRET, option: 1})
    cls = ISogCLRLoss if isogclr else SogCLRLoss
    fused = cls(40, impl="triton", check_inputs=False)
    ref = cls(40, impl="reference", check_inputs=False).double()
    gen = torch.Generator().manual_seed(18)
    for _ in range(2):
        ids = torch.randperm(40, generator=gen)[:35]
        q, k = (F.normalize(torch.randn(35, 16, generator=gen, dtype=torch.float64), dim=1) for _ in range(2))
        got, want = [], []
        for fn, out, dt in ((fused, got, torch.float32), (ref, want, torch.float64)):
            qq, kk = q.to(dt).requires_grad_(True), k.to(dt).requires_grad_(True)
            loss = fn(qq, kk, ids)
            out += [loss.detach(), *torch.autograd.grad(loss, [qq, kk])]
        for name, a, b in zip(["loss", "dq", "dk"], got, want):
            assert _err(a, b) <= 1e-5, name
    scale = 0.05 / fused.tau_min if isogclr else 1.0
    for name, buf in ref.state_dict().items():
        assert _err(fused.state_dict()[name].double(), buf) <= 1e-5 * max(1.0, scale), name


def test_tma_threshold_turns_descriptors_off_below_it(monkeypatch):
    """TMA_MIN_LOGITS: below it every kernel's config loads through pointers (no host descriptors);
    the launch plans are keyed by it (a changed threshold never reuses a stale plan)."""
    monkeypatch.setattr(_sogclr, "_INTERPRETING", False)
    monkeypatch.setattr(_sogclr, "TMA_MIN_LOGITS", 100)
    for kernel in ("fwd", "fwd_one", "split", "bwd", "tile"):
        assert _sogclr._config(kernel, torch.bfloat16, 99)["TMA"] == 0
        assert _sogclr._config(kernel, torch.bfloat16, 100)["TMA"] == _sogclr.CONFIGS[kernel]["TMA"]
    a = torch.zeros(4, 8)
    first = _sogclr._plan("bwd", a, lambda: {"built": 1})
    monkeypatch.setattr(_sogclr, "TMA_MIN_LOGITS", 0)
    assert _sogclr._plan("bwd", a, lambda: {"built": 2}) is not first


def test_fused_module_step_gathering_temperatures_first(monkeypatch):
    """Above GATHER_TAU_MAX_LOGITS (and without two passes) iSogCLR's step gathers the batch's
    temperatures before the kernels (index_select) instead of reading them at the ids in-kernel."""
    monkeypatch.setattr(_sogclr, "GATHER_TAU_MAX_LOGITS", 0)
    calls = []
    real = _sogclr._forward
    monkeypatch.setattr(_sogclr, "_forward", lambda *a, **kw: calls.append(kw.get("gather_tau")) or real(*a, **kw))
    test_fused_module_step_matches_reference_module(True, "symmetric", "mean", monkeypatch)
    assert calls and not any(calls)


@pytest.mark.parametrize("gather", [0, 1])
def test_tile_module_step_gathers_temperatures_as_asked(gather, monkeypatch):
    """TILE=1 above GATHER_TAU_MAX_LOGITS: the "tile" config's GATHER decides whether iSogCLR's step
    reads the temperatures at the ids in-kernel (1) or gathers them first (0); both match float64."""
    monkeypatch.setattr(_sogclr, "GATHER_TAU_MAX_LOGITS", 0)
    monkeypatch.setattr(_sogclr, "_INTERPRET", {**_sogclr._INTERPRET, "TILE": 1, "GATHER": gather})
    calls = []
    real = _sogclr._forward
    monkeypatch.setattr(_sogclr, "_forward", lambda *a, **kw: calls.append(kw.get("gather_tau")) or real(*a, **kw))
    test_fused_module_step_matches_reference_module(True, "symmetric", "mean", monkeypatch)
    assert calls and all(c == bool(gather) for c in calls)


def test_tile_forward_plan_skips_strict_fp32_on_the_gpu(monkeypatch):
    """On the GPU the TILE forward takes bf16 and TF32 products; strict fp32 keeps the looped kernels
    (the one-tile kernel's fp32 product without tensor cores spills)."""
    monkeypatch.setattr(_sogclr, "_INTERPRETING", False)
    monkeypatch.setitem(_sogclr.CONFIGS, "fwd", {**_sogclr.CONFIGS["fwd"], "TILE": 1})
    plans, saved = {}, torch.backends.cuda.matmul.allow_tf32
    try:
        for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.zeros(256, 64, dtype=dtype)
            plans[(dtype, tf32)] = _sogclr._forward_plan(a, [256], True, False, True, True, 0.9, True)["tile"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert plans == {(torch.bfloat16, False): True, (torch.float32, False): False, (torch.float32, True): True}
