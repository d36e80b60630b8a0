"""The small-batch Triton path (``_dense``) in Triton's CPU interpreter, against float64.

Tolerances as in test_triton.py: values 1e-5 relative (fp32 sums of exact products);
gradients 1e-4 (fp32) and 1.5e-2 (bf16: the logit gradient is stored in bf16).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from batchlab.losses import info_nce, siglip  # noqa: E402
from batchlab.losses.triton import _dense  # noqa: E402
from tests.losses.test_triton import compare, unit  # noqa: E402


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(params=["one-kernel", "tiled", "tiled-dot"])
def clip_forward(request, monkeypatch):
    """The CLIP forwards: one kernel sweeping rows and columns, and per-tile partials + merge (the
    tiles read from the fp32 product, or computed by the tile kernel itself: ``DOT``)."""
    monkeypatch.setattr(_dense, "TILED_STATS_MIN_LOGITS", 2**62 if request.param == "one-kernel" else 0)
    monkeypatch.setattr(_dense, "TILE_DOT", request.param == "tiled-dot")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric,reduction,targets", [
    (True, "mean", False), (True, "none", True), (False, "sum", True), (False, "mean", False),
])
def test_clip_small_batch_matches_float64(dtype, symmetric, reduction, targets, gen, clip_forward):
    n, m, d = 37, (37 if symmetric else 45), 20
    q, k = unit(n, d, gen, torch.float32), unit(m, d, gen, torch.float32)
    # targets: a permutation with a repeated key (several positives in one column), one-way only
    t = torch.randperm(n, generator=gen) if targets else None
    if targets and not symmetric:
        t[:3] = t[3]
    assert _dense.dense_ok(q.to(dtype), k.to(dtype))
    compare(lambda impl, q, k, s: info_nce(q, k, s, impl=impl, symmetric=symmetric, targets=t,
                                           reduction=reduction), [q, k, torch.tensor(12.0)], dtype, gen,
            reduction=reduction)


@pytest.mark.parametrize("n,scale", [(1, 14.3), (33, 0.01), (33, 100.0)])
def test_clip_small_batch_edges(n, scale, gen, clip_forward):
    """N=1 (loss identically 0) and extreme temperatures, with the returned LSE's gradient."""
    q, k = unit(n, 16, gen, torch.float32), unit(n, 16, gen, torch.float32)

    def fn(impl, q, k, s):
        loss, lse = info_nce(q, k, s, impl=impl, return_lse=True)
        return loss + 0.1 * lse.row.mean() + 0.1 * lse.col.mean()

    compare(fn, [q, k, torch.tensor(scale)], torch.float32, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_siglip_small_batch_matches_float64(dtype, reduction, gen):
    n, d = 29, 24
    q, k = unit(n, d, gen, torch.float32), unit(n + 5, d, gen, torch.float32)
    t = torch.randperm(n + 5, generator=gen)[:n]
    compare(lambda impl, q, k, s, b: siglip(q, k, s, b, impl=impl, targets=t, reduction=reduction),
            [q, k, torch.tensor(10.0), torch.tensor(-10.0)], dtype, gen, reduction=reduction)


@pytest.mark.parametrize("use", ["loss", "lse", "both"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_eager_function_matches_custom_op(use, reduction, monkeypatch, gen, clip_forward):
    """Eager calls take the autograd function, torch.compile the custom op: same values and gradients,
    also when only the loss (the LSE gradient is skipped in-kernel) or only the LSE is differentiated."""
    q0, k0 = unit(21, 12, gen, torch.float32), unit(21, 12, gen, torch.float32)
    t = torch.randperm(21, generator=gen)
    results = []
    for eager in (True, False):
        monkeypatch.setattr(_dense, "EAGER_FUNCTION", eager)
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        s = torch.tensor(9.0, requires_grad=True)
        loss, lse = info_nce(q, k, s, targets=t, reduction=reduction, return_lse=True, impl="triton")
        out = {"loss": loss.sum(), "lse": lse.row.sum() + lse.col.sum(), "both": loss.sum() + lse.row.mean()}[use]
        results.append([out.detach(), *torch.autograd.grad(out, [q, k, s])])
        sig = siglip(q, k, s, torch.tensor(-3.0), targets=t, impl="triton")
        results[-1] += [sig.detach(), *torch.autograd.grad(sig, [q, k, s])]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", ["info_nce", "siglip"])
def test_totals_added_in_kernel_survive_repeated_backward(family, gen, clip_forward):
    """The gradient kernels add up the scale (and bias) gradients themselves on a counter the forward
    set to zero; the last program sets it back, so a second backward (retain_graph) gives the same."""
    q = unit(37, 16, gen, torch.float32).requires_grad_()
    k = unit(37, 16, gen, torch.float32).requires_grad_()
    s, b = torch.tensor(11.0, requires_grad=True), torch.tensor(-4.0, requires_grad=True)
    leaves = [q, k, s] + ([b] if family == "siglip" else [])
    loss = info_nce(q, k, s, impl="triton") if family == "info_nce" else siglip(q, k, s, b, impl="triton")
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    assert all(float(g.abs().sum()) > 0 for g in first[2:])  # the totals were written
    for a, c in zip(first, second):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


class _FakeCompiled:
    def __init__(self, calls):
        self.calls, self.function, self.packed_metadata = calls, "fn", "meta"

    def run(self, *args):
        self.calls.append(("direct", args))

    def launch_metadata(self, grid, stream, *args):
        return "launch-meta"


class _FakeJit:
    """Stands in for a @triton.jit kernel: (x_ptr, n, c, BLOCK: constexpr, FLAG: constexpr = 7)."""

    arg_names = ["x_ptr", "n", "c", "BLOCK", "FLAG"]

    def __init__(self):
        import inspect

        self.params = [type("P", (), {"default": d})() for d in [inspect.Parameter.empty] * 4 + [7]]
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return _FakeCompiled(self.calls)

        return launch


def test_direct_launch_reuses_the_compiled_kernel_per_specialisation(monkeypatch):
    monkeypatch.setattr(_dense, "_INTERPRET", False)
    monkeypatch.setattr(_dense, "_current_stream", lambda: 1234)
    monkeypatch.setattr(_dense, "DIRECT_LAUNCH", True)
    fake = _FakeJit()
    kernel = _dense._Kernel(fake)
    x = torch.zeros(8)
    consts = dict(BLOCK=16, num_warps=4)
    kernel((3,), (x, 10, 0.5), consts)  # first use: Triton's own launch, which compiles
    kernel((5, 2), (x, 10, 0.25), consts)  # same specialisation (floats are not specialised): direct
    kernel((3,), (x, 11, 0.5), consts)  # another integer: Triton again (it may specialise on it)
    kernel((3,), (x[1:], 10, 0.5), consts)  # a misaligned pointer: Triton again
    kernel((3,), (x, 10, 0.5), dict(BLOCK=32, num_warps=4))  # another constexpr: Triton again
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["jit", "direct", "jit", "jit", "jit"]
    _, args = fake.calls[1]
    hooks = args[6:9]
    assert args[:6] == (5, 2, 1, 1234, "fn", "meta")
    assert args[9:] == (x, 10, 0.25, 16, 7)  # runtime args, then the constexprs (FLAG's default)
    assert hooks[0] is None or hooks[0] == "launch-meta"
    monkeypatch.setattr(_dense, "DIRECT_LAUNCH", False)
    kernel((3,), (x, 10, 0.5), consts)
    assert fake.calls[-1][0] == "jit"


class _FakeLauncher:
    """Triton 3.6's CudaLauncher as far as the raw launch reads it: scratch sizes and the C launch function."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self, calls):
        self.calls = calls

    def launch(self, *args):
        self.calls.append(("raw", args))

    def __call__(self, *args):
        self.calls.append(("direct", args))


def test_raw_launch_passes_what_the_launcher_would(monkeypatch):
    """Without scratch memory the C launch function is called with the arguments ``CudaLauncher``
    would give it (grid, stream, function, cooperative, pdl, no scratch, metadata, hooks, args)."""
    monkeypatch.setattr(_dense, "_INTERPRET", False)
    monkeypatch.setattr(_dense, "_current_stream", lambda: 99)
    monkeypatch.setattr(_dense, "DIRECT_LAUNCH", True)
    fake = _FakeJit()
    compiled = _FakeCompiled(fake.calls)
    compiled.run = _FakeLauncher(fake.calls)
    kernel = _dense._Kernel(fake)
    monkeypatch.setattr(_FakeJit, "__getitem__", lambda self, grid: lambda *a, **kw: compiled)
    x = torch.zeros(8)
    consts = dict(BLOCK=16)
    kernel((3,), (x, 10, 0.5), consts)  # compiles (Triton's launch: nothing recorded by the fake)
    kernel((4, 2), (x, 10, 0.5), consts)
    kind, args = fake.calls[-1]
    assert kind == "raw"
    assert args[:9] == (4, 2, 1, 99, "fn", False, True, None, None)
    assert args[9] == "meta" and args[-5:] == (x, 10, 0.5, 16, 7)
    compiled.run.global_scratch_size = 128  # needs scratch: the launcher's own call allocates it
    kernel.compiled.clear()
    kernel((3,), (x, 10, 0.5), consts)
    kernel((3,), (x, 10, 0.5), consts)
    assert fake.calls[-1][0] == "direct"
    monkeypatch.setattr(_dense, "RAW_LAUNCH", False)
    kernel.compiled.clear()
    compiled.run.global_scratch_size = 0
    kernel((3,), (x, 10, 0.5), consts)
    kernel((3,), (x, 10, 0.5), consts)
    assert fake.calls[-1][0] == "direct"


def test_backward_config_is_cached_until_the_sweep_replaces_it(monkeypatch):
    from batchlab.losses.triton import _launch

    monkeypatch.setattr(_dense, "_INTERPRET", False)
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(_dense, "_FLAGS", {})
    q = torch.empty(4, 256, dtype=torch.bfloat16)
    first = _dense._grad_flags_cached(q)
    assert _dense._grad_flags_cached(q) is first  # no recomputation per call
    monkeypatch.setitem(_launch.CONFIGS, "bwd", dict(_launch.CONFIGS["bwd"], BM=64))  # what the sweep does
    assert _dense._grad_flags_cached(q)["BM"] == 64


def test_direct_launch_keys_tensor_descriptors_by_dtype_and_block(monkeypatch):
    """The direct launcher compiles again for a tensor descriptor of another dtype or block shape (Triton
    specialises on both); keyed by the descriptor's class alone, a bf16 kernel would run on fp16 data."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from batchlab.losses.triton import _dense

    monkeypatch.setattr(_dense, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(_dense, "_INTERPRET", False)
    monkeypatch.setattr(_dense, "RAW_LAUNCH", False)

    class Compiled:  # what fn[grid](...) returns on a GPU: cached, then launched directly
        packed_metadata = None

    class FakeJit:
        arg_names, params = ["desc", "n"], []
        compiles: list = []

        def __getitem__(self, grid):
            return lambda *args, **consts: self.compiles.append(args[0].base.dtype) or Compiled()

    kernel = _dense._Kernel(FakeJit())

    def desc(dtype, block=(16, 16)):
        return TensorDescriptor.from_tensor(torch.zeros(32, 32, dtype=dtype), list(block))

    kernel((1,), (desc(torch.bfloat16), 4), {"BM": 16})
    kernel((1,), (desc(torch.float16), 4), {"BM": 16})  # another dtype: compiled, not the bf16 kernel
    kernel((1,), (desc(torch.float16, (32, 16)), 4), {"BM": 16})  # another block shape: compiled
    assert FakeJit.compiles == [torch.bfloat16, torch.float16, torch.float16]
    assert _dense._arg_key(desc(torch.bfloat16)) != _dense._arg_key(desc(torch.float16))


@pytest.mark.parametrize("text", ["128,128,64,4", "128,128,x,4,3", "128,128,64,0,3"])
def test_tile_dot_config_switch_names_a_bad_value(text):
    """A malformed ``BATCHLAB_DENSE_TILE_DOT_CONFIG`` is refused with what it takes (not a bare int() error)."""
    from batchlab.losses.triton import _dense

    assert _dense._tile_dot_config("128,128,64,4,3") == (128, 128, 64, 4, 3)
    with pytest.raises(ValueError, match="five positive integers"):
        _dense._tile_dot_config(text)
