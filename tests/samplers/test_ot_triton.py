"""The fused Triton Sinkhorn half-step against the PyTorch one (CPU: Triton's interpreter).

Tolerance: both accumulate in float32 but in a different order (online base-2
log-sum-exp per row against max / exp / sum), so potentials agree to a few float32
ulps of their magnitude; 1e-5 relative to the cost spread after a few iterations.
The same check at full size runs on a GPU through ``tests/gpu_check_ot.py``.
"""

from __future__ import annotations

import pytest
import torch

from batchlab.errors import BatchlabInputError
from batchlab.samplers.ot import solvers

triton = pytest.importorskip("triton")
from batchlab.losses.triton import triton_available  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available("cpu"), reason="needs TRITON_INTERPRET=1 (set by conftest)")


def _both(C, eps, **kw):
    a = solvers.sinkhorn_potentials(C, eps, backend="torch", **kw)
    b = solvers.sinkhorn_potentials(C, eps, backend="triton", **kw)
    return a, b


# sizes that are not multiples of the interpreter's 4 x 8 tiles; one row; one column;
# split column shares (13 x 21) and one share per row block written directly (10 x 1, 6 x 8)
@pytest.mark.parametrize("n,m", [(13, 21), (1, 9), (10, 1), (6, 8)])
@pytest.mark.parametrize("reg_m", [None, 0.5])
def test_fused_half_steps_match_torch(n, m, reg_m):
    g = torch.Generator().manual_seed(n * 100 + m)
    C = torch.rand(n, m, generator=g) * 5.0
    eps = 0.05 * solvers.cost_scale(C)
    (f0, g0, it0, _), (f1, g1, it1, _) = _both(C, eps, max_iter=4, tol=0.0, reg_m=None if reg_m is None else reg_m)
    assert it0 == it1 == 4
    spread = float(C.max() - C.min()) + 1e-12
    torch.testing.assert_close(f1, f0, rtol=0, atol=1e-5 * spread)
    torch.testing.assert_close(g1, g0, rtol=0, atol=1e-5 * spread)


@pytest.mark.parametrize("rel_eps", [1e-4, 10.0])
def test_extreme_eps_stays_finite_and_matches(rel_eps):
    # eps 1e-4 of the spread: exponents of -1e4 underflow to 0 except at the row maximum
    g = torch.Generator().manual_seed(7)
    C = torch.randn(9, 11, generator=g) ** 2
    eps = rel_eps * solvers.cost_scale(C)
    (f0, g0, _, _), (f1, g1, _, _) = _both(C, eps, max_iter=3, tol=0.0)
    assert torch.isfinite(f1).all() and torch.isfinite(g1).all()
    scale = float(C.abs().max()) + eps
    torch.testing.assert_close(f1, f0, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(g1, g0, rtol=0, atol=1e-5 * scale)


def test_marginals_are_met_after_convergence():
    g = torch.Generator().manual_seed(3)
    C = torch.rand(12, 12, generator=g)
    f, gg, eps = solvers.annealed_potentials(C, 0.2, tol=1e-5, max_iter=200, backend="triton")
    P = solvers.plan_from_potentials(C, f, gg, eps)
    torch.testing.assert_close(P.sum(1), torch.full((12,), 1 / 12), rtol=1e-3, atol=0)
    torch.testing.assert_close(P.sum(0), torch.full((12,), 1 / 12), rtol=1e-3, atol=0)


def test_backend_errors_are_clear():
    C = torch.rand(4, 4, dtype=torch.float64)
    with pytest.raises(BatchlabInputError, match="float32 cost matrix"):
        solvers.sinkhorn_potentials(C, 0.1, backend="triton")
    with pytest.raises(BatchlabInputError, match="backend must be one of"):
        solvers.sinkhorn_potentials(C.float(), 0.1, backend="cuda")


def test_auto_stays_on_torch_on_the_cpu():
    # the interpreter is for tests only: "auto" must not pick it
    assert solvers._resolve_backend(torch.rand(3, 3), "auto") == "scaling"
    assert solvers._resolve_backend(torch.rand(3, 3), "triton") == "triton"
