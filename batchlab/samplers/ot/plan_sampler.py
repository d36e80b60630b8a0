"""``OTPlanSampler`` with torchcfm's call shape, backed by :func:`couple`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from batchlab._checks import check_positive_int
from batchlab.errors import BatchlabInputError
from batchlab.samplers.ot.couple import METHODS, couple


class OTPlanSampler:
    """torchcfm's ``OTPlanSampler`` call shape, with batchlab's choices.

    For torchcfm's exact semantics (the same plans and numpy-seeded draws, absolute
    ``reg``, entropic ``"partial"``, uneven exact batches) use
    :class:`batchlab.compat.torchcfm.OTPlanSampler`. Differences here, all deliberate:

    * ``replace=False`` is the default and returns a *permutation*: every ``x0`` and
      every ``x1`` appears exactly once (torchcfm samples pairs from the plan with
      replacement by default, duplicating and dropping points: torchcfm#142).
      ``replace=True`` samples ``batch_size`` pairs from the plan as torchcfm does.
    * The solve runs on the tensors' device (no ``.cpu().numpy()`` of the inputs).
    * ``reg`` and ``reg_m`` are relative to the standard deviation of the cost
      matrix, so ``normalize_cost`` is accepted but not needed.
    * ``condition_weight`` (default None: labels are only carried along, as in
      torchcfm) puts the labels into the cost (C2OT) in ``sample_plan_with_labels``.

    Parameters
    ----------
    method : {"exact", "sinkhorn", "unbalanced", "partial", "bomb", "knn"}
    reg, reg_m : float
        Entropic regularisation and marginal relaxation (relative to std(C)).
    normalize_cost, num_threads, warn
        Accepted for compatibility; ``normalize_cost`` divides the cost by its max.
    condition_weight : float or "auto", optional
        C2OT weight for the labels in :meth:`sample_plan_with_labels`.
    generator : torch.Generator, optional
        Randomness of ``replace=True`` sampling (and of ``partial``/``knn``).
    **couple_kwargs
        Passed to :func:`~batchlab.samplers.couple` (``k``, ``mass``, ``cost``...).

    Examples
    --------
    >>> ot = OTPlanSampler(method="exact")
    >>> x0, x1 = torch.randn(32, 2), torch.randn(32, 2) + 4
    >>> a, b = ot.sample_plan(x0, x1)
    >>> a.shape, b.shape
    (torch.Size([32, 2]), torch.Size([32, 2]))
    """

    def __init__(
        self,
        method: str = "exact",
        reg: float = 0.05,
        reg_m: float = 1.0,
        normalize_cost: bool = False,
        num_threads: int | str = 1,
        warn: bool = True,
        *,
        condition_weight: float | str | None = None,
        generator: torch.Generator | None = None,
        **couple_kwargs: Any,
    ) -> None:
        if method not in METHODS:
            raise BatchlabInputError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.reg = reg
        self.reg_m = reg_m
        self.normalize_cost = normalize_cost
        self.num_threads = num_threads
        self.warn = warn
        self.condition_weight = condition_weight
        self.generator = generator
        self.couple_kwargs = couple_kwargs

    def _couple(self, x0, x1, *, return_plan: bool, condition=None):
        kw = dict(self.couple_kwargs)
        if self.normalize_cost and "cost" not in kw:
            def _normalized(a, b):
                c = torch.cdist(a.float(), b.float()).pow(2)
                return c / c.max().clamp_min(1e-30)

            kw["cost"] = _normalized
        if condition is not None:
            kw["condition"] = condition
            kw["condition_weight"] = self.condition_weight
        return couple(
            x0, x1, self.method, reg=self.reg, reg_m=self.reg_m, return_plan=return_plan,
            generator=self.generator, **kw,
        )

    def get_map(self, x0: torch.Tensor, x1: torch.Tensor) -> np.ndarray:
        """The transport plan (n, m) as a numpy array (torchcfm returns numpy too)."""
        return self._couple(x0, x1, return_plan=True).detach().cpu().numpy()

    def sample_map(self, pi, batch_size: int, replace: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``batch_size`` (i, j) index pairs from the plan ``pi`` (n, m).

        Only pairs the plan gives mass to are drawn; ``replace=False`` draws distinct pairs,
        so it needs at least ``batch_size`` of them (as numpy's ``choice``, which torchcfm uses).
        """
        plan = torch.as_tensor(pi, dtype=torch.float64)
        if plan.dim() != 2:
            raise BatchlabInputError(f"pi must be a transport plan of shape (n, m), got shape {tuple(plan.shape)}")
        batch_size = check_positive_int("batch_size", batch_size)
        p = plan.reshape(-1)
        if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or float(p.sum()) <= 0:
            raise BatchlabInputError(
                "the plan must hold finite, non-negative masses with a positive total to sample from"
            )
        support = int((p > 0).sum())
        if not replace and batch_size > support:
            # torch.multinomial would go on to draw pairs of zero mass
            raise BatchlabInputError(
                f"replace=False draws {batch_size} distinct pairs but the plan gives mass to only {support}; "
                f"use batch_size <= {support} or replace=True"
            )
        idx = torch.multinomial(p / p.sum(), batch_size, replacement=replace, generator=self.generator)
        m = plan.shape[1]
        return (idx // m).numpy(), (idx % m).numpy()

    def _pairs(self, x0, x1, replace: bool, condition=None):
        if replace:
            plan = self._couple(x0, x1, return_plan=True, condition=condition)
            i, j = self.sample_map(plan.detach().cpu(), x0.shape[0], replace=True)
            dev = x0.device
            return torch.as_tensor(i, device=dev), torch.as_tensor(j, device=dev)
        perm = self._couple(x0, x1, return_plan=False, condition=condition)
        return torch.arange(x0.shape[0], device=perm.device), perm

    def sample_plan(self, x0: torch.Tensor, x1: torch.Tensor, replace: bool = False):
        """``(x0[i], x1[j])`` paired; with ``replace=False`` ``i`` is the identity and ``j`` a permutation."""
        i, j = self._pairs(x0, x1, replace)
        return x0[i], x1[j]

    def sample_plan_with_labels(self, x0, x1, y0=None, y1=None, replace: bool = False):
        """``(x0[i], x1[j], y0[i], y1[j])``; a missing label tensor stays None.

        With ``condition_weight`` set and both labels given, the labels enter the cost.
        """
        for name, y, x in (("y0", y0, x0), ("y1", y1, x1)):
            if y is not None and (getattr(y, "ndim", 1) == 0 or len(y) != len(x)):
                raise BatchlabInputError(
                    f"{name} must hold one label per row of {'x0' if name == 'y0' else 'x1'} ({len(x)} rows), "
                    f"got {'a scalar' if getattr(y, 'ndim', 1) == 0 else len(y)}; pass the labels of the same batch"
                )
        cond = None
        if self.condition_weight is not None and y0 is not None and y1 is not None:
            cond = (torch.as_tensor(y0), torch.as_tensor(y1))
        i, j = self._pairs(x0, x1, replace, condition=cond)
        return (
            x0[i],
            x1[j],
            y0[i.to(y0.device)] if y0 is not None else None,
            y1[j.to(y1.device)] if y1 is not None else None,
        )

    def sample_trajectory(self, X: torch.Tensor) -> np.ndarray:
        """Chain the plans between consecutive time points of ``X`` (batch, times, dim).

        Returns an array (batch, times, dim) of trajectories, like torchcfm's.
        """
        times = X.shape[1]
        idx = [np.arange(X.shape[0])]
        for t in range(times - 1):
            perm = self._couple(X[:, t], X[:, t + 1], return_plan=False).cpu().numpy()
            idx.append(perm[idx[-1]])
        return np.stack([X[idx[t], t].detach().cpu().numpy() for t in range(times)], axis=1)
