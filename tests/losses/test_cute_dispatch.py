"""The optional CuTe kernels (``batchlab.losses.cute``) on the CPU: the switch, the reasons a call is refused, and
the host code around the kernels, with CPU stand-ins for quack's epilogue GEMMs.

The stand-ins follow quack's call contract (``mod.gemm(A, B, D, epi_args=..., tile_M=..., tile_N=...)`` with
per-CTA-tile partial sums: ``rsum``/``ds`` (rows, column tiles), ``csum`` (row tiles, M)) and compute what the
CuTe epilogues compute, in float64. With them in place the streaming InfoNCE path (the Triton interpreter for
everything else) must give the reference loss and gradients: this checks the buffers, panels, slices and the
scale-gradient partials that ``_lse`` and ``_streaming`` hand to the kernels. The kernels themselves run on an
H100/H200 only (``.gpu`` scripts of session 10: 15/15 reference checks, ``benchmarks/results/losses-h200-s10``).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from batchlab.losses import cute, info_nce  # noqa: E402
from batchlab.losses.cute import _streaming  # noqa: E402
from batchlab.losses.triton import _dense, _launch  # noqa: E402
from tests.losses.test_triton import unit  # noqa: E402

LOG2E = 1.4426950408889634


class _FakeGemm:
    """CPU stand-in for one quack epilogue GEMM of ``_epilogues`` (float64; ``calls`` counts launches)."""

    def __init__(self, kind: str, calls: list):
        self.kind, self.calls = kind, calls

    def gemm(self, A, B, D, *, epi_args, tile_M, tile_N, cluster_M, cluster_N, pingpong):
        self.calls.append(self.kind)
        acc = A.double() @ B.double().T
        l2 = acc * float(epi_args["scale"][0]) * LOG2E
        if self.kind == "sums":
            p = torch.exp2(l2 - float(epi_args["ref2"][0]))
            rsum, csum = epi_args["rsum"], epi_args["csum"]
            assert rsum.shape == (A.shape[0], -(-B.shape[0] // tile_N)), rsum.shape
            assert csum.shape == (-(-A.shape[0] // tile_M), B.shape[0]), csum.shape
            rsum.copy_(torch.stack([t.sum(1) for t in p.split(tile_N, 1)], 1))
            csum.copy_(torch.stack([t.sum(0) for t in p.split(tile_M, 0)], 0))
            return
        v = {name: epi_args[name].double() for name in ("lse_r", "g_r", "lse_c", "g_c")}
        assert all(x.dim() == 2 and x.shape[0] == 1 for x in v.values())
        g = v["g_r"][0][:, None] * torch.exp2(l2 - v["lse_r"][0][:, None]) + v["g_c"] * torch.exp2(l2 - v["lse_c"])
        assert D.shape == acc.shape and D.dtype == A.dtype
        D.copy_(g * float(epi_args["ginv"][0]))
        if self.kind == "grad_ds":
            ds = epi_args["ds"]
            assert ds.shape == (A.shape[0], -(-B.shape[0] // tile_N)), ds.shape
            ds.copy_(torch.stack([t.sum(1) for t in (g * acc).split(tile_N, 1)], 1))


@pytest.fixture
def fake_cute(monkeypatch):
    """The streaming path (small-batch limit 0) with the CuTe switch on and CPU stand-ins for the GEMMs."""
    calls: list = []
    mods = types.SimpleNamespace(
        shifted_sums={False: _FakeGemm("sums", calls), True: _FakeGemm("sums", calls)},
        logit_grad=_FakeGemm("grad", calls),
        logit_grad_ds={False: _FakeGemm("grad_ds", calls), True: _FakeGemm("grad_ds", calls)})
    monkeypatch.setattr(_dense, "DENSE_MAX_LOGITS", 0)
    monkeypatch.setitem(_launch.INTERPRET_CONFIG, "TILE", 1)  # the one-tile forward the GPU runs (where CuTe plugs in)
    monkeypatch.setattr(cute, "MODE", "auto")
    monkeypatch.setattr(cute, "unavailable", lambda device: None)
    monkeypatch.setattr(_streaming, "_mods", lambda: mods)
    return calls


@pytest.mark.parametrize("n,m,d,panel_rows,scratch", [(48, 48, 16, 48, 1 << 26), (40, 40, 24, 16, 100)])
@pytest.mark.parametrize("scale", [0.01, 14.3])
def test_streaming_infonce_through_the_cute_host_code(fake_cute, gen, n, m, d, panel_rows, scratch, scale,
                                                      monkeypatch):
    """Loss and gradients (q, k, scale) against the float64 reference with the CuTe host path in place: one or
    several gradient panels, one or several forward panels (a small scratch), ragged tiles (40 x 40 against 32 x 32
    tiles). bf16 inputs: tolerances of the bf16 logit gradient (2e-2), 1e-5 on the loss."""
    monkeypatch.setitem(_streaming.CONFIGS, "sums", dict(tile_M=32, tile_N=32, cluster_M=1, cluster_N=1,
                                                         pingpong=True))
    monkeypatch.setitem(_streaming.CONFIGS, "grad", dict(tile_M=32, tile_N=32, cluster_M=1, cluster_N=1,
                                                         pingpong=True))
    monkeypatch.setattr(_streaming, "SCRATCH_FLOATS", scratch)
    q = unit(n, d, gen, torch.bfloat16).requires_grad_()
    k = unit(m, d, gen, torch.bfloat16).requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    loss = info_nce(q, k, s, impl="triton", workspace_bytes=panel_rows * m * 2, check_inputs=False)
    grads = torch.autograd.grad(loss, [q, k, s])
    qr, kr, sr = (x.detach().double().requires_grad_() for x in (q, k, s))
    want = info_nce(qr, kr, sr, impl="reference")
    want_grads = torch.autograd.grad(want, [qr, kr, sr])
    forward_panels = -(-n // _streaming.sums_panel_rows(n, m))
    assert fake_cute.count("sums") == forward_panels == (2 if scratch < 1000 else 1)
    assert fake_cute.count("grad_ds") == -(-n // panel_rows)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    for got, ref in zip(grads[:2], want_grads[:2]):
        assert (got.double() - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert abs(grads[2].item() - want_grads[2].item()) <= 1e-5 * max(abs(want_grads[2].item()), 1e-3)


def test_off_by_default_and_auto_needs_the_device(monkeypatch, gen):
    """Default ``0``: the Triton kernels even where CuTe could run; ``auto`` on the CPU: Triton, silently."""
    monkeypatch.delenv("BATCHLAB_CUTE", raising=False)
    monkeypatch.setattr(cute, "MODE", None)
    q = unit(8, 16, gen, torch.bfloat16)
    assert cute.mode() == "0"
    monkeypatch.setattr(cute, "unavailable", lambda device: None)
    assert not cute.wanted(q, q)
    monkeypatch.setenv("BATCHLAB_CUTE", "auto")
    assert cute.wanted(q, q)
    monkeypatch.undo()
    monkeypatch.setenv("BATCHLAB_CUTE", "auto")
    assert not cute.wanted(q, q)  # CPU tensors


def test_required_but_unavailable_raises_with_the_reason(monkeypatch, gen):
    monkeypatch.setattr(cute, "MODE", "1")
    q = unit(8, 16, gen, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"BATCHLAB_CUTE=1 but the CuTe kernels cannot run: the inputs are on cpu.*"
                                           r"BATCHLAB_CUTE=0"):
        cute.wanted(q, q)
    monkeypatch.setattr(cute, "unavailable", lambda device: None)
    assert cute.wanted(q, q)
    assert not cute.wanted(q, q, exclude=True)  # a kind of call it does not take: Triton, even under "1"


def test_unknown_switch_value_is_an_error(monkeypatch):
    monkeypatch.setattr(cute, "MODE", "yes")
    with pytest.raises(ValueError, match=r"BATCHLAB_CUTE='yes': expected one of auto, 0, 1"):
        cute.mode()


@pytest.mark.parametrize("change,reason", [
    (dict(targets=torch.arange(8)), "diagonal positives"),
    (dict(exclude=True), "diagonal positives"),
    (dict(cols=False), "diagonal positives"),
    (dict(dtype=torch.float32), "bf16 or fp16"),
    (dict(d=12), "multiples of 8"),
    (dict(m=12), "multiples of 8"),
    (dict(strided=True), "contiguous"),
])
def test_the_calls_it_does_not_take(change, reason, gen):
    n, m, d = 8, change.get("m", 16), change.get("d", 16)
    q = unit(n, d, gen, change.get("dtype", torch.bfloat16))
    k = unit(m, d, gen, change.get("dtype", torch.bfloat16))
    if change.get("strided"):
        k = unit(m, 2 * d, gen, torch.bfloat16)[:, ::2]
    kw = {key: v for key, v in change.items() if key in ("targets", "exclude", "cols")}
    assert reason in cute.unsupported(q, k, **kw)
    assert cute.unsupported(unit(n, 16, gen, torch.bfloat16), unit(16, 16, gen, torch.float16)) is not None
    assert cute.unsupported(unit(n, 16, gen, torch.float16), unit(16, 16, gen, torch.float16)) is None


def test_forward_panels_bound_the_partial_sums():
    """Rows per forward panel keep ``rows x cdiv(M, tile_N) + cdiv(rows, tile_M) x M`` within the scratch."""
    cfg = dict(tile_M=128, tile_N=128)
    for n, m in ((65536, 65536), (1 << 20, 1 << 20), (300, 1000), (1, 8)):
        rows = _streaming.sums_panel_rows(n, m, cfg)
        assert 1 <= rows <= n and (rows == n or rows % 128 == 0)
        if rows > 128:
            assert rows * -(-m // 128) + -(-rows // 128) * m <= _streaming.SCRATCH_FLOATS
    assert _streaming.sums_panel_rows(65536, 65536, cfg) == 65536
    assert _streaming.sums_panel_rows(1 << 20, 1 << 20, cfg) == 4096
