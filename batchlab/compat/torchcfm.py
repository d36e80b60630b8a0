"""torchcfm's ``OTPlanSampler``, exactly, with batchlab's exact OT solver.

Change ``from torchcfm.optimal_transport import OTPlanSampler`` to
``from batchlab.compat.torchcfm import OTPlanSampler``: same constructor, methods,
return types (numpy plans and index arrays) and randomness (numpy's global RNG), so a
seeded torchcfm run draws the same pairs. Checked against torchcfm 1.0.7 with POT 0.9.7
(tests/compat/test_torchcfm.py runs torchcfm itself, including its Schrödinger-bridge
matcher with this class substituted).

How each ``method`` is solved (cost: squared Euclidean distances, ``torch.cdist ** 2``
of the flattened batches, divided by its maximum if ``normalize_cost``):

* ``"exact"``: batchlab's exact assignment (:func:`batchlab.samplers.ot.exact_assignment`,
  scipy's LAPJV or the certified sparse solver), on the tensors' device. For equal
  batch sizes the optimal plan with uniform marginals is a permutation with mass 1/n per
  pair; for uneven batches (n, m) it is solved as an assignment between L = lcm(n, m)
  copies (each x0 repeated L/n times, each x1 L/m times), whose optimum is the optimal
  transport plan (the transport polytope's vertices are integral in units of 1/L). When
  L exceeds :data:`MAX_REPLICATED` that problem is too large and POT's ``ot.emd`` solves it.
  When a batch repeats a point, several plans are optimal and POT's ``ot.emd`` solves it
  too, so that its tie-break (torchcfm's plan) is kept. Other exact ties (distinct points
  with equal total costs, e.g. on an integer grid) can still give another optimal plan
  than POT's, and so other draws.
* ``"sinkhorn"``, ``"unbalanced"``, ``"partial"``: POT itself (``ot.sinkhorn``,
  ``ot.unbalanced.sinkhorn_knopp_unbalanced``, ``ot.partial.entropic_partial_wasserstein``),
  the calls torchcfm makes: its plans are those solvers' iterates (1000 iterations,
  stopping at 1e-9), not converged entropic plans, and ``reg`` is absolute. batchlab's
  own log-domain solvers converge to a different (better) plan, so using them would
  change a torchcfm run. POT must be installed (``pip install pot``; torchcfm needs it too).

batchlab's own :class:`batchlab.samplers.OTPlanSampler` chooses differently, on purpose:
``sample_plan`` returns a permutation (every point once) unless ``replace=True``,
``reg``/``reg_m`` are relative to std(C), ``"partial"`` is exact m-POT with mass 0.9,
uneven batches pair one to one only with the entropic methods, and it draws with a
torch generator.
"""

from __future__ import annotations

import math
import warnings
from typing import Union

import numpy as np
import torch

from batchlab.errors import BatchlabInputError
from batchlab.samplers.ot import exact_assignment

METHODS = ("exact", "sinkhorn", "unbalanced", "partial")

#: Uneven exact plans are solved as an L x L assignment up to this L = lcm(n, m) (an
#: 8 MB float64 cost matrix at 1024); above, POT's network simplex (``ot.emd``).
MAX_REPLICATED = 1024


def _pot():
    try:
        import ot
    except ImportError as exc:  # pragma: no cover - POT is a test dependency
        raise BatchlabInputError(
            "torchcfm's entropic OT methods are POT's solvers: pip install pot (torchcfm itself needs it)"
        ) from exc
    return ot


def has_repeated_points(C: torch.Tensor) -> bool:
    """Whether two rows or two columns of ``C`` are equal (a point repeated in a batch).

    Then several plans are optimal (the repeated points can trade partners) and which one a
    solver returns is its own tie-break: torchcfm's is POT's network simplex.
    """
    for M in (C, C.T):
        # equal rows give equal weighted sums: sort n sums first, whole rows only if two sums tie
        sums = M @ torch.linspace(1.0, 2.0, M.shape[1], dtype=M.dtype, device=M.device)
        if torch.unique(sums).numel() < M.shape[0] and torch.unique(M, dim=0).shape[0] < M.shape[0]:
            return True
    return False


def exact_plan(C: torch.Tensor) -> np.ndarray:
    """The optimal transport plan (n, m) with uniform marginals for costs ``C`` (float64)."""
    n, m = C.shape
    a = np.ones(n) / n  # POT's unif: the very values torchcfm's plans carry
    if has_repeated_points(C):
        try:
            import ot
        except ImportError:  # no torchcfm without POT: any optimal plan will do
            pass
        else:
            return ot.emd(a, np.ones(m) / m, C.cpu().numpy())
    if n == m:
        perm, _ = exact_assignment(C)
        plan = np.zeros((n, m))
        plan[np.arange(n), perm.cpu().numpy()] = a
        return plan
    big = n * m // math.gcd(n, m)
    if big > MAX_REPLICATED:
        ot = _pot()
        return ot.emd(a, np.ones(m) / m, C.cpu().numpy())
    rows, cols = big // n, big // m
    replicated = C.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)
    perm, _ = exact_assignment(replicated)
    counts = np.zeros((n, m))
    np.add.at(counts, (np.arange(big) // rows, perm.cpu().numpy() // cols), 1.0)
    return counts / big


class OTPlanSampler:
    """torchcfm's OT plan sampler (see the module docstring for the solvers).

    Parameters
    ----------
    method : {"exact", "sinkhorn", "unbalanced", "partial"}
        Required, as in torchcfm.
    reg : float
        Entropic regularisation of the Sinkhorn-based methods, absolute (torchcfm's).
    reg_m : float
        Marginal relaxation of ``"unbalanced"``.
    normalize_cost : bool
        Divide the cost matrix by its maximum.
    num_threads : int or "max"
        Accepted (torchcfm passes it to ``ot.emd``; batchlab's exact solver is one thread).
    warn : bool
        Warn when the plan is numerically zero and a uniform plan is used instead.

    Examples
    --------
    >>> np.random.seed(0)
    >>> ot_sampler = OTPlanSampler(method="exact")
    >>> x0, x1 = torch.randn(16, 2), torch.randn(16, 2) + 3
    >>> a, b = ot_sampler.sample_plan(x0, x1)   # pairs drawn from the plan, with replacement
    >>> a.shape
    torch.Size([16, 2])
    """

    def __init__(
        self,
        method: str,
        reg: float = 0.05,
        reg_m: float = 1.0,
        normalize_cost: bool = False,
        num_threads: Union[int, str] = 1,
        warn: bool = True,
    ) -> None:
        if method not in METHODS:
            raise BatchlabInputError(f"Unknown method: {method!r}; torchcfm's methods are {METHODS}")
        self.method = method
        self.reg = reg
        self.reg_m = reg_m
        self.normalize_cost = normalize_cost
        self.num_threads = num_threads
        self.warn = warn

    def _solve(self, M: torch.Tensor) -> np.ndarray:
        n, m = M.shape
        if self.method == "exact":
            return exact_plan(M.to(torch.float64))
        ot = _pot()
        a, b, cost = ot.unif(n), ot.unif(m), M.cpu().numpy()
        if self.method == "sinkhorn":
            return ot.sinkhorn(a, b, cost, reg=self.reg)
        if self.method == "unbalanced":
            return ot.unbalanced.sinkhorn_knopp_unbalanced(a, b, cost, reg=self.reg, reg_m=self.reg_m)
        return ot.partial.entropic_partial_wasserstein(a, b, cost, reg=self.reg)

    def get_map(self, x0: torch.Tensor, x1: torch.Tensor) -> np.ndarray:
        """The OT plan (n, m) between two batches (bs, *dim), as a float64 numpy array."""
        if x0.dim() > 2:
            x0 = x0.reshape(x0.shape[0], -1)
        if x1.dim() > 2:
            x1 = x1.reshape(x1.shape[0], -1)
        M = torch.cdist(x0, x1) ** 2
        if self.normalize_cost:
            M = M / M.max()  # should not be normalized when using minibatches
        p = self._solve(M.detach())
        if not np.all(np.isfinite(p)):
            warnings.warn(f"the OT plan is not finite (cost mean {float(M.mean()):.4g}, max {float(M.max()):.4g}); "
                          "torchcfm returns it as it is (a larger reg, or normalize_cost=True, avoids this)",
                          RuntimeWarning, stacklevel=2)
        if np.abs(p.sum()) < 1e-8:
            if self.warn:
                warnings.warn("Numerical errors in OT plan, reverting to uniform plan.")
            p = np.ones_like(p) / p.size
        return p

    def sample_map(self, pi: np.ndarray, batch_size: int, replace=True):
        """Draw ``batch_size`` index pairs ``(i, j) ~ pi`` with numpy's global RNG."""
        p = pi.flatten()
        p = p / p.sum()
        choices = np.random.choice(pi.shape[0] * pi.shape[1], p=p, size=batch_size, replace=replace)
        return np.divmod(choices, pi.shape[1])

    def sample_plan(self, x0: torch.Tensor, x1: torch.Tensor, replace=True):
        """``(x0[i], x1[j])`` for ``x0.shape[0]`` pairs drawn from the plan."""
        pi = self.get_map(x0, x1)
        i, j = self.sample_map(pi, x0.shape[0], replace=replace)
        return x0[i], x1[j]

    def sample_plan_with_labels(self, x0, x1, y0=None, y1=None, replace=True):
        """As :meth:`sample_plan`, carrying the labels along (a missing one stays None)."""
        pi = self.get_map(x0, x1)
        i, j = self.sample_map(pi, x0.shape[0], replace=replace)
        return (
            x0[i],
            x1[j],
            y0[i] if y0 is not None else None,
            y1[j] if y1 is not None else None,
        )

    def sample_trajectory(self, X: torch.Tensor) -> np.ndarray:
        """Trajectories (bs, times, *dim) through the plans between consecutive times of ``X``."""
        times = X.shape[1]
        pis = [self.get_map(X[:, t], X[:, t + 1]) for t in range(times - 1)]
        indices = [np.arange(X.shape[0])]
        for pi in pis:
            indices.append(np.array([np.random.choice(pi.shape[1], p=pi[i] / pi[i].sum()) for i in indices[-1]]))
        return np.stack([X[:, t][indices[t]] for t in range(times)], axis=1)
