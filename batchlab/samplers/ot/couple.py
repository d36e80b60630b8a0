"""``couple``: pair two batches (noise and data, two domains) by mini-batch optimal transport."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from batchlab._checks import check_choice, check_finite, check_positive_int, check_real
from batchlab.errors import BatchlabInputError
from batchlab.samplers.ot import costs as _costs
from batchlab.samplers.ot import solvers as _solvers

METHODS = ("exact", "sinkhorn", "unbalanced", "partial", "bomb", "knn")
EXACT_SOLVERS = ("auto", "scipy", "sparse")
ROUNDINGS = ("lsa", "greedy")

# Tuning of the certified sparse solver, by cost geometry ("high-dim": built-in cost on
# examples of >= 32 values; "low-dim": 2-D toy data, or any callable cost), measured on
# the 2-core CPU (bench/ot.py and the notes in the final report of issue 9):
# * below SCIPY_MAX_N scipy's dense LAPJV is faster (low-dim costs make LAPJV's sparse
#   variant need 3-4 certificate rounds, so scipy wins up to ~700 there; in high
#   dimensions, with the CPU's mat-vec pricing, the sparse solver already wins at
#   n=512: 15 ms vs scipy's 20 ms on the same C, and ties at 256);
# * PRICE_ITERS Sinkhorn iterations price the costs: in high dimensions 3-5 put the
#   optimum among the candidates on the CPU, where each iteration is a dense pass as
#   dear as the solve; on a GPU iterations are ~100x cheaper and better prices keep
#   the CPU-side sparse solve to one round (n=16384: 15 iterations -> 1 round and a 9x
#   faster LAPJV than 5 iterations -> 2 rounds);
# * K candidates per row/column: low-dim costs need more (k=32 saves a round at 1-2k).
_SCIPY_MAX_N = {"high": 256, "low": 768}
_PRICE_ITERS = {("high", "cpu"): 5, ("high", "cuda"): 30, ("low", "cpu"): 30, ("low", "cuda"): 30}
_K = {"high": 16, "low": 32}


def _check_batch(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise BatchlabInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise BatchlabInputError(f"{name} must have shape (n, ...), got a scalar")
    if not torch.is_floating_point(x):
        raise BatchlabInputError(f"{name} must be a floating tensor, got {x.dtype}; cast with .float()")
    if x.shape[0] == 0 or x.numel() == 0:
        raise BatchlabInputError(f"{name} is empty (shape {tuple(x.shape)}); couple needs at least one example")
    check_finite(name, x)
    return x.detach()


def _check_condition(condition: Any, n0: int, n1: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(condition, (tuple, list)) and len(condition) == 2):
        raise BatchlabInputError(
            "condition must be a pair (c0, c1): the conditions (labels (n,) or features (n, k)) of x0 and x1"
        )
    c0, c1 = condition
    for name, c, n in (("condition[0]", c0, n0), ("condition[1]", c1, n1)):
        if not isinstance(c, torch.Tensor):
            raise BatchlabInputError(f"{name} must be a torch.Tensor, got {type(c).__name__}")
        if c.shape[0] != n:
            raise BatchlabInputError(f"{name} has {c.shape[0]} rows but its batch has {n}; give one condition per example")
        if torch.is_floating_point(c):
            check_finite(name, c)
    return c0.detach().to(device), c1.detach().to(device)


def _perm_plan(perm: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    n = perm.shape[0]
    plan = torch.zeros(n, m, dtype=dtype, device=perm.device)
    plan[torch.arange(n, device=perm.device), perm] = 1.0 / n
    return plan


def _default_block(n: int) -> int:
    """The divisor of ``n`` closest to sqrt(n): as many mini-batches as their size."""
    best = 1
    for d in range(1, int(math.isqrt(n)) + 1):
        if n % d == 0:
            best = d
    return n // best if abs(n // best - math.sqrt(n)) < abs(best - math.sqrt(n)) else best


def couple(
    x0: torch.Tensor,
    x1: torch.Tensor,
    method: str = "exact",
    *,
    cost: _costs.CostSpec = "sqeuclidean",
    condition: Sequence[torch.Tensor] | None = None,
    condition_weight: float | str = "auto",
    condition_cost: str = "auto",
    condition_ratio: float = 1.0,
    reg: float = 0.05,
    reg_m: float = 1.0,
    mass: float = 0.9,
    solver: str = "auto",
    rounding: str = "lsa",
    k: int | None = None,
    verify: bool = True,
    block: int | None = None,
    knn_k: int = 4,
    max_iter: int = 1000,
    tol: float = 1e-4,
    precision: str = "float32",
    generator: torch.Generator | None = None,
    return_plan: bool = False,
    return_info: bool = False,
):
    """Pair ``x0[i]`` with ``x1[perm[i]]`` by mini-batch optimal transport.

    Parameters
    ----------
    x0, x1 : Tensor (n, ...)
        The two batches (e.g. noise and data) on one device; trailing dimensions are
        flattened. Gradients are not tracked through the coupling.
    method : {"exact", "sinkhorn", "unbalanced", "partial", "bomb", "knn"}
        * ``exact``: the optimal permutation (linear assignment). ``solver="scipy"``
          is scipy's dense LAPJV on the CPU; ``"sparse"`` prices the costs with a
          few Sinkhorn iterations on the tensors' device, solves on ``k`` candidates
          per row and column with scipy's sparse LAPJV, and certifies optimality
          against the dense costs with LP duals (adding edges until it holds);
          ``"auto"`` uses scipy for ``n <= 256`` (``n <= 768`` for low-dimensional
          data or a callable cost) and ``sparse`` above.
        * ``sinkhorn``: log-domain entropic OT with ``eps = reg * std(C)``
          (epsilon scaling from ``eps = std(C)`` down to it); the permutation is the
          plan rounded by ``rounding``: ``"lsa"`` (best permutation among the plan's
          ``k`` largest entries per row and column, uncertified) or ``"greedy"``.
        * ``unbalanced``: entropic OT with KL-relaxed marginals (``reg_m``, relative
          to ``std(C)`` like ``reg``); rounded as for ``sinkhorn``.
        * ``partial`` (m-POT): only ``mass`` of the mass is transported: the best
          ``round(mass * n)`` pairs are optimal, the rest are paired at random.
          ``return_plan=True, solver="sinkhorn"`` gives the entropic partial plan
          (torchcfm's "partial") instead of the exact one.
        * ``bomb`` (BoMb-OT): OT between mini-batches of ``block`` examples, then
          within the paired mini-batches.
        * ``knn`` (Immiscible Diffusion): each row looks at ``knn_k`` random
          partners and keeps the nearest still free; O(n knn_k d), no n x n matrix.
    cost : {"sqeuclidean", "euclidean", "cosine"} or callable
        ``cost(x0_flat (n, D), x1_flat (m, D)) -> (n, m)``.
    condition : (c0, c1), optional
        C2OT conditions: labels ``(n,)`` (integer) or features ``(n, k)`` (float).
        ``condition_weight * condition_cost(c0, c1)`` is added to the cost.
    condition_weight : float or "auto"
        ``"auto"``: ``condition_ratio * std(C) / std(condition cost)``.
    condition_cost : {"auto", "label", "cosine", "l2"}
    reg, reg_m, mass, k, verify, block, knn_k, max_iter, tol
        Method parameters (see above); ``reg`` and ``reg_m`` are relative to the
        standard deviation of the cost matrix; ``k`` (candidates per row and column
        of the sparse solver and the ``"lsa"`` rounding) defaults to 16, or 32 for
        low-dimensional data; ``tol`` is the L1 error of the plan's marginals.
    precision : {"float32", "bfloat16"}
        Precision of the ``x0 @ x1.T`` product inside the built-in costs.
    generator : torch.Generator, optional
        Randomness of ``partial`` (the untransported pairs) and ``knn``.
    return_plan : bool
        Return the ``(n, m)`` transport plan (total mass 1, or ``mass`` for
        ``partial``) instead of a permutation. Only the entropic methods return a
        dense, non-permutation plan.
    return_info : bool
        Also return a dict of solver facts (iterations, candidate edges, certified).

    Returns
    -------
    perm : LongTensor (n,) on the inputs' device (a permutation of ``range(n)``), or
    the plan (n, m) if ``return_plan``; ``(result, info)`` if ``return_info``.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> noise, data = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) + 3
    >>> perm = couple(noise, data)
    >>> sorted(perm.tolist()) == list(range(64))
    True
    >>> pairs = (noise, data[perm])  # train on these
    """
    check_choice("method", method, METHODS)
    a = _check_batch("x0", x0)
    b = _check_batch("x1", x1)
    if a.device != b.device:
        raise BatchlabInputError(f"x1 is on {b.device} but x0 is on {a.device}; move both to one device")
    n, m = a.shape[0], b.shape[0]
    if not callable(cost):
        check_choice("cost", cost, _costs.COSTS)
        if a[0].numel() != b[0].numel():
            raise BatchlabInputError(
                f"x0 examples have {a[0].numel()} values but x1 examples have {b[0].numel()}; "
                "built-in costs compare examples of the same size (pass a callable cost otherwise)"
            )
    plan_ok = method in ("sinkhorn", "unbalanced") and return_plan
    if n != m and not plan_ok:
        raise BatchlabInputError(
            f"method={method!r} pairs the batches one to one, so x0 and x1 need the same batch size, "
            f"got {n} and {m}; trim or resample one batch (or use method='sinkhorn' with return_plan=True)"
        )
    # numbers, not strings or bools; finite (reg=inf made Sinkhorn "diverge" and advise raising reg)
    if not (0 < check_real("reg", reg) < math.inf):
        raise BatchlabInputError(f"reg must be a finite number > 0 (relative to the cost spread), got {reg!r}")
    if not (0 < check_real("reg_m", reg_m) < math.inf):
        raise BatchlabInputError(f"reg_m must be a finite number > 0, got {reg_m!r}")
    if not (0.0 <= check_real("mass", mass) <= 1.0):
        raise BatchlabInputError(f"mass must be in [0, 1], got {mass!r}")
    if not (0.0 <= check_real("tol", tol) < math.inf):
        raise BatchlabInputError(f"tol must be a finite number >= 0 (the plan's marginal L1 error), got {tol!r}")
    geometry = "high" if (not callable(cost) and a[0].numel() >= 32) else "low"
    k = _K[geometry] if k is None else check_positive_int("k", k)
    check_positive_int("knn_k", knn_k)
    check_positive_int("max_iter", max_iter)
    check_choice("rounding", rounding, ROUNDINGS)
    if method == "exact":
        check_choice("solver", solver, EXACT_SOLVERS)
    elif method == "partial":
        check_choice("solver", solver, ("auto", "exact", "sinkhorn"))
    cond = _check_condition(condition, n, m, a.device) if condition is not None else None
    info: dict[str, Any] = {"method": method}

    def full_cost() -> torch.Tensor:
        C = _costs.pairwise_cost(a, b, cost, precision=precision)
        if cond is not None:
            D = _costs.condition_cost(cond[0], cond[1], condition_cost)
            C = _costs.add_condition(C, D, condition_weight, ratio=condition_ratio)
        return C

    def done(perm_or_plan):
        return (perm_or_plan, info) if return_info else perm_or_plan

    if method == "knn":
        if cond is None and not callable(cost):
            fa = _costs.flatten("x0", a).float()
            fb = _costs.flatten("x1", b).float()

            def pair_cost(r, c):
                return _costs.pairwise_rowwise(fa, fb, r, c, cost)
        else:
            C = full_cost()

            def pair_cost(r, c):
                return C[r, c]

        perm = _solvers.knn_assignment(pair_cost, n, knn_k, generator=generator, device=a.device)
        return done(_perm_plan(perm, m, torch.float32) if return_plan else perm)

    C = full_cost()
    if method == "exact":
        dev = "cuda" if C.device.type == "cuda" else "cpu"
        perm, einfo = _solvers.exact_assignment(
            C, solver=solver, k=k, reg=reg, verify=verify, scipy_max_n=_SCIPY_MAX_N[geometry],
            price_iters=_PRICE_ITERS[(geometry, dev)],
        )
        info.update(einfo)
        return done(_perm_plan(perm, m, C.dtype) if return_plan else perm)

    if method in ("sinkhorn", "unbalanced"):
        rm = reg_m * _solvers.cost_scale(C) if method == "unbalanced" else None
        f, g, eps = _solvers.annealed_potentials(C, reg, max_iter=max_iter, tol=tol, reg_m=rm)
        info["eps"] = eps
        if return_plan:
            return done(_solvers.plan_from_potentials(C, f, g, eps))
        score = C - f[:, None] - g[None, :]  # -eps * log P, up to a constant
        if rounding == "greedy":
            perm = _solvers.greedy_assignment(score)
        else:
            perm, sinfo = _solvers.sparse_assignment(C, score, k=k, verify=False, use_score=True)
            info.update(sinfo)
        return done(perm)

    if method == "partial":
        if return_plan and solver == "sinkhorn":
            return done(_solvers.entropic_partial_plan(C, mass, reg, max_iter=max_iter, tol=tol))
        perm, transported = _solvers.partial_assignment(C, mass, generator=generator)
        info["transported"] = transported
        if return_plan:
            plan = _perm_plan(perm, m, C.dtype)
            plan[~transported] = 0
            return done(plan)
        return done(perm)

    # bomb
    blk = block if block is not None else _default_block(n)
    check_positive_int("block", blk)
    info["block"] = blk
    perm = _solvers.bomb_assignment(C, blk)
    return done(_perm_plan(perm, m, C.dtype) if return_plan else perm)
