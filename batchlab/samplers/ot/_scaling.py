"""Sinkhorn half-steps by stabilised matrix scaling: the CPU's fast path.

A log-domain half-step ``f_i = base_i + tau * softmin_i(C, g)`` makes eight passes over
the (n, m) matrix on the CPU (subtract, scale, max, subtract, clamp, exp, sum, log);
the same update written with a Gibbs kernel is one BLAS matrix-vector product:
with potentials ``(fa, ga)`` absorbed into ``K_ij = exp((fa_i + ga_j - C_ij) / eps)``,

    softmin_i(C, g) = fa_i - eps * log sum_j K_ij exp((g_j - ga_j) / eps).

The kernel is rebuilt around the current potentials ("absorption", Schmitzer 2019)
whenever ``|g - ga| / eps`` would make the exponentials overflow, and a half-step is
redone in the log domain (then absorbed) when a row's sum is so small that the
kernel's clamped entries could dominate it, so the iterates stay those of the
log-domain solver up to rounding. Measured on the 2-core CPU at n = 4,096:
see ``docs/ot.md``.
"""

from __future__ import annotations

import torch

# exp() arguments are clamped here before the kernel is built: no denormals (slow on
# CPUs); entries that small never matter next to a trusted sum (see _TRUST).
_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
# |(g - ga) / eps| above this triggers absorption: exp() stays far from overflow.
_ABSORB = {torch.float32: 30.0, torch.float64: 200.0}
# A sum below this may be made of clamped entries: redo the half-step in the log domain.
# (clamped entries add at most m * exp(floor): < 1e-11 of a trusted float32 sum at m = 1e5)
_TRUST = {torch.float32: 1e-20, torch.float64: 1e-250}


class ScalingSteps:
    """Row and column Sinkhorn half-steps on ``C`` (n, m) at a fixed ``eps``, by scaling.

    ``update_f(g)`` returns ``base_f + tau * softmin(C, g)`` (n,) and ``update_g(f)``
    returns ``base_g + tau * softmin(C.T, f)`` (m,), the updates of
    :func:`batchlab.samplers.ot.solvers.sinkhorn_potentials`. ``log_softmin(pot, dim)``
    is the exact log-domain softmin used as the fallback.
    """

    def __init__(self, C: torch.Tensor, eps: float, tau: float, base_f: torch.Tensor, base_g: torch.Tensor,
                 f: torch.Tensor, g: torch.Tensor, log_softmin) -> None:
        self.C, self.eps, self.tau = C, eps, tau
        self.base_f, self.base_g = base_f, base_g
        self.log_softmin = log_softmin
        self.floor, self.absorb, self.trust = _FLOOR[C.dtype], _ABSORB[C.dtype], _TRUST[C.dtype]
        self.K = torch.empty_like(C)
        self.rebuilds = 0
        self._build(f, g)

    def _build(self, f: torch.Tensor, g: torch.Tensor) -> None:
        """Absorb ``(f, g)``: ``K = exp(max((f_i + g_j - C_ij) / eps, floor))``, in place."""
        self.fa, self.ga = f.clone(), g.clone()
        torch.sub(f[:, None], self.C, out=self.K)
        self.K.add_(g[None, :]).mul_(1.0 / self.eps).clamp_min_(self.floor).exp_()
        self.rebuilds += 1

    def _half_step(self, pot, pot_a, own_a, base, kernel):
        """``base + tau * softmin`` by one mat-vec with ``kernel`` (K or K.T), or None if not trusted."""
        x = (pot - pot_a) / self.eps
        if float(x.abs().max()) > self.absorb:
            return None
        sums = torch.mv(kernel, x.exp_())
        if float(sums.min()) < self.trust:
            return None
        return base + self.tau * (own_a - self.eps * sums.log_())

    def update_f(self, g: torch.Tensor) -> torch.Tensor:
        out = self._half_step(g, self.ga, self.fa, self.base_f, self.K)
        if out is None:  # exact step in the log domain, then absorb around it
            out = self.base_f + self.tau * self.log_softmin(g, 1)
            self._build(out, g)
        return out

    def update_g(self, f: torch.Tensor) -> torch.Tensor:
        out = self._half_step(f, self.fa, self.ga, self.base_g, self.K.t())
        if out is None:
            out = self.base_g + self.tau * self.log_softmin(f, 0)
            self._build(f, out)
        return out
