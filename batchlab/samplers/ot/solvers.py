"""OT solvers on a cost matrix: exact assignment, log-domain Sinkhorn (balanced,
unbalanced, partial), roundings of a plan to a permutation, BoMb-OT and KNN pairing.

Each solver takes an ``(n, m)`` cost matrix ``C`` (lower is better) on any device
and returns either potentials / a plan on that device, or a permutation ``perm``
(LongTensor ``(n,)``) with ``x0[i]`` paired to ``x1[perm[i]]``.

The fast exact path (:func:`sparse_assignment`) is the one idea worth knowing:
a few Sinkhorn iterations give dual prices ``g_j`` that correct for "hub" columns
that many rows like; the ``k`` best columns of every row and the ``k`` best rows
of every column under the reduced cost ``C_ij - f_i - g_j`` almost always contain
the optimal assignment, so scipy's sparse LAPJV solves an ``n x ~2k`` problem in
milliseconds instead of the dense ``n x n`` one in seconds. The result is then
*certified*: shortest paths on the residual graph give LP duals ``(u, v)`` of the
sparse optimum, and one dense pass checks ``C_ij - u_i - v_j >= 0`` everywhere;
violating edges are added and the problem is solved again until none is left,
so the answer is the exact optimum of the dense problem (up to float32 rounding
of ``C``).
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch

from batchlab.errors import BatchlabInputError

log = logging.getLogger(__name__)

# exp(x) below about -87 is a float32 denormal; denormals make CPU exp/sum up to 10x
# slower and carry no weight next to the row maximum (exp(0) = 1), so clamp first.
_EXP_FLOOR = -80.0


class _Clock:
    """Wall-clock seconds per phase (device synchronised), summed over repeats."""

    def __init__(self, device: torch.device) -> None:
        import time

        self._time = time.perf_counter
        self._cuda = torch.device(device).type == "cuda"
        self.laps: dict[str, float] = {}
        self._t = self._now()

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return self._time()

    def lap(self, name: str) -> None:
        t = self._now()
        self.laps[name] = self.laps.get(name, 0.0) + t - self._t
        self._t = t


def cost_scale(C: torch.Tensor) -> float:
    """The spread of the costs (their standard deviation; 1.0 if all costs are equal).

    Sinkhorn's epsilon is ``reg * cost_scale(C)``, so ``reg`` means the same thing
    for 2-D toy data and for 3072-dimensional images.
    """
    if C.numel() < 2:
        return 1.0
    s = float(C.float().std())
    return s if s > 0 and math.isfinite(s) else 1.0


def _softmin(C: torch.Tensor, pot: torch.Tensor, eps: float, dim: int, buf: torch.Tensor) -> torch.Tensor:
    """``-eps * log sum_k exp((pot_k - C_ik) / eps)`` along ``dim`` (1: over columns, 0: over rows).

    Written with one reusable buffer and in-place ops: on the CPU this is about 2x
    faster than ``torch.logsumexp`` on a fresh ``(pot - C) / eps`` tensor.
    """
    if dim == 1:
        torch.sub(pot[None, :], C, out=buf)
    else:
        torch.sub(pot[:, None], C, out=buf)
    buf.mul_(1.0 / eps)
    m = buf.amax(dim, keepdim=True)
    buf.sub_(m)
    if buf.device.type == "cpu":
        buf.clamp_min_(_EXP_FLOOR)
    buf.exp_()
    return -eps * (buf.sum(dim).log() + m.squeeze(dim))


def sinkhorn_potentials(
    C: torch.Tensor,
    eps: float,
    *,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    reg_m: float | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
    f: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Log-domain Sinkhorn: dual potentials ``(f, g)`` of entropic OT at ``eps``.

    The plan is ``P_ij = exp((f_i + g_j - C_ij) / eps)`` (:func:`plan_from_potentials`).

    Parameters
    ----------
    C : Tensor (n, m)
        Cost matrix, float32 or float64.
    eps : float
        Absolute entropic regularisation (same units as ``C``).
    a, b : Tensor (n,), (m,), optional
        Marginals (default uniform ``1/n``, ``1/m``).
    reg_m : float, optional
        If given, unbalanced OT with KL marginal penalty ``reg_m`` (absolute units):
        each update is damped by ``tau = reg_m / (reg_m + eps)``.
    max_iter, tol : int, float
        Stop when the L1 error of the row marginals falls below ``tol`` (read for
        free from the change of ``f``: the plan with the old ``f`` has row sums
        ``a_i exp((f_i - f_new_i) / eps)``).
    f, g : Tensor, optional
        Warm start (for epsilon scaling).
    backend : {"auto", "torch", "triton", "scaling"}
        ``"torch"``: log-domain half-steps on PyTorch ops. ``"triton"``: one fused
        kernel per half-step (one read of ``C``; float32 ``C`` on a CUDA GPU, or the
        CPU under ``TRITON_INTERPRET=1`` for tests). ``"scaling"`` (CPU): the same
        iterates by stabilised matrix scaling, one BLAS mat-vec per half-step
        (:mod:`batchlab.samplers.ot._scaling`). ``"auto"``: Triton for float32 ``C`` on
        CUDA when Triton imports, scaling on the CPU, else PyTorch.

    Returns
    -------
    f (n,), g (m,), iterations run, final marginal error.
    """
    n, m = C.shape
    wd = C.dtype
    log_a = (a.to(wd).log() if a is not None else torch.full((n,), -math.log(n), dtype=wd, device=C.device))
    log_b = (b.to(wd).log() if b is not None else torch.full((m,), -math.log(m), dtype=wd, device=C.device))
    f = torch.zeros(n, dtype=wd, device=C.device) if f is None else f.to(wd)
    g = torch.zeros(m, dtype=wd, device=C.device) if g is None else g.to(wd)
    tau = 1.0 if reg_m is None else reg_m / (reg_m + eps)
    # reference measure a (x) b: f = eps log a + tau * softmin (tau = 1: balanced)
    base_f, base_g = eps * log_a, eps * log_b
    kind = _resolve_backend(C, backend)
    if kind == "triton":
        from batchlab.samplers.ot._sinkhorn_triton import SoftminUpdate

        rows_step, cols_step = SoftminUpdate(C), SoftminUpdate(C.t().contiguous())

        def update_f(g):
            return rows_step(g, eps, base_f, tau)

        def update_g(f):
            return cols_step(f, eps, base_g, tau)
    else:
        buf = torch.empty_like(C)

        def log_softmin(pot, dim):
            return _softmin(C, pot, eps, dim, buf)

        if kind == "scaling":
            from batchlab.samplers.ot._scaling import ScalingSteps

            steps = ScalingSteps(C, eps, tau, base_f, base_g, f, g, log_softmin)
            update_f, update_g = steps.update_f, steps.update_g
        else:

            def update_f(g):
                return base_f + tau * log_softmin(g, 1)

            def update_g(f):
                return base_g + tau * log_softmin(f, 0)
    a_marg = log_a.exp()
    # The error is read every _CHECK_EVERY iterations (one host sync each); on CUDA with the
    # fused kernels, those blocks of iterations replay as one CUDA graph once compiled.
    graphed = None
    use_graphs = (USE_CUDA_GRAPHS and kind == "triton" and C.device.type == "cuda" and max_iter >= 3 * _CHECK_EVERY
                  and C.numel() <= _GRAPH_MAX_ENTRIES)
    err = float("inf")
    it = 0
    while it < max_iter:
        if use_graphs and it >= _CHECK_EVERY and it % _CHECK_EVERY == 0 and it + _CHECK_EVERY <= max_iter:
            if graphed is None:
                from batchlab.samplers.ot._sinkhorn_triton import GraphedIterations

                graphed = GraphedIterations(update_f, update_g, f, g, a_marg, eps, _CHECK_EVERY)
            f, g, err_t = graphed(f, g)
            it += _CHECK_EVERY
            err = float(err_t)
        else:
            it += 1
            f_new = update_f(g)
            if it > 1 and (it % _CHECK_EVERY == 0 or it == max_iter):
                err = float((a_marg * ((f - f_new) / eps).exp().sub(1).abs()).sum())
            f = f_new
            g = update_g(f)
        if err < tol:
            break
    if graphed is not None:  # the graph's outputs are overwritten by its next replay
        f, g = f.clone(), g.clone()
    if not (torch.isfinite(f).all() and torch.isfinite(g).all()):
        raise BatchlabInputError(
            f"Sinkhorn diverged at eps={eps:.3g} (non-finite potentials); raise reg or check the costs"
        )
    return f, g, it, err


SINKHORN_BACKENDS = ("auto", "torch", "triton", "scaling")
#: Iterations between two reads of the marginal error.
_CHECK_EVERY = 5
#: Replay blocks of fused iterations as CUDA graphs (set False to compare with eager launches).
#: Measured on one H100 (tests/gpu_check_ot.py): 100 iterations at n = 4,096 take 9.0 ms
#: with graphs and 10.3 ms without; at n = 16,384 a half-step is HBM-bound (0.37 ms either
#: way) and graphs gained nothing (86.8 vs 80.0 ms), hence the size limit.
USE_CUDA_GRAPHS = True
_GRAPH_MAX_ENTRIES = 8192 * 8192


def _resolve_backend(C: torch.Tensor, backend: str) -> str:
    """The half-step ``backend`` runs on for this ``C``: "triton", "scaling" or "torch"."""
    if backend not in SINKHORN_BACKENDS:
        raise BatchlabInputError(f"backend must be one of {SINKHORN_BACKENDS}, got {backend!r}")
    cpu = C.device.type == "cpu"
    if backend == "scaling" and not cpu:
        raise BatchlabInputError(f"backend='scaling' runs on the CPU; C is on {C.device} (use 'auto')")
    if backend in ("triton", "auto") and not (backend == "auto" and cpu):
        try:
            from batchlab.losses.triton import triton_available
        except ImportError:
            triton_available = None
        usable = triton_available is not None and triton_available(C.device) and C.dtype == torch.float32
        if usable:
            return "triton"
        if backend == "triton":
            raise BatchlabInputError(
                "backend='triton' needs Triton and a float32 cost matrix on a CUDA GPU (or the CPU under "
                f"TRITON_INTERPRET=1); got {C.dtype} on {C.device}"
            )
    if backend == "auto":  # the interpreter is for tests only: never picked by "auto" on the CPU
        return "scaling" if cpu else "torch"
    return backend


def plan_from_potentials(C: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """``P_ij = exp((f_i + g_j - C_ij) / eps)``, shape (n, m)."""
    return ((f[:, None] + g[None, :] - C) / eps).exp_()


def annealed_potentials(
    C: torch.Tensor, reg: float, *, start: float = 1.0, factor: float = 0.5, iters_per_step: int = 5,
    max_iter: int = 1000, tol: float = 1e-4, reg_m: float | None = None,
    a: torch.Tensor | None = None, b: torch.Tensor | None = None, scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Sinkhorn with epsilon scaling: eps goes from ``start`` to ``reg`` (both relative
    to ``scale``, default :func:`cost_scale`), ``iters_per_step`` iterations per step,
    then iterates at ``reg`` until ``tol``. Returns ``(f, g, eps)`` with ``eps`` absolute.
    ``backend`` as in :func:`sinkhorn_potentials`."""
    scale = cost_scale(C) if scale is None else scale
    f = g = None
    rel = max(start, reg)
    kw = {"reg_m": reg_m, "a": a, "b": b, "backend": backend}
    while rel > reg * (1 + 1e-9):
        f, g, _, _ = sinkhorn_potentials(C, rel * scale, max_iter=iters_per_step, tol=0.0, f=f, g=g, **kw)
        rel = max(reg, rel * factor)
    eps = reg * scale
    f, g, it, err = sinkhorn_potentials(C, eps, max_iter=max_iter, tol=tol, f=f, g=g, **kw)
    if err > tol and reg_m is None:
        log.info("Sinkhorn stopped after %d iterations with marginal error %.2e > tol %.1e", it, err, tol)
    return f, g, eps


def entropic_partial_plan(
    C: torch.Tensor, mass: float, reg: float, *, max_iter: int = 1000, tol: float = 1e-4
) -> torch.Tensor:
    """Entropic partial OT (what torchcfm's "partial" computes with POT): a plan of total
    mass ``mass`` with row sums <= 1/n and column sums <= 1/m.

    Solved as balanced Sinkhorn on ``C`` extended by one dummy row and column (cost 0
    to every real point, forbidden between themselves) that each hold ``1 - mass``:
    the mass a real point sends to the dummy is the mass it does not transport.
    Returns the real block (n, m).
    """
    n, m = C.shape
    scale = cost_scale(C)
    big = float(C.max()) + 1e3 * scale  # exp(-big / eps) = 0: dummy-dummy never used
    aug = C.new_zeros(n + 1, m + 1)
    aug[:n, :m] = C
    aug[n, m] = big
    rest = max(1.0 - mass, 1e-12)  # mass = 1: the dummies carry (almost) nothing
    a = torch.cat([C.new_full((n,), 1.0 / n), C.new_full((1,), rest)])
    b = torch.cat([C.new_full((m,), 1.0 / m), C.new_full((1,), rest)])
    f, g, eps = annealed_potentials(aug, reg, max_iter=max_iter, tol=tol, a=a, b=b, scale=scale)
    return plan_from_potentials(aug, f, g, eps)[:n, :m]


# ----------------------------------------------------------------------------------------------
# permutations


def lsa_dense(C: torch.Tensor) -> torch.Tensor:
    """Exact assignment with scipy's ``linear_sum_assignment`` (dense LAPJV, on the CPU).

    Returns ``perm`` (n,) on ``C``'s device. ``C`` must be square.
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(C.detach().to("cpu", torch.float64).numpy())
    perm = torch.empty(C.shape[0], dtype=torch.long)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm.to(C.device)


def _candidates(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges (rows, cols) of the union of every row's and every column's ``k`` best
    entries of ``score`` plus the identity (so a perfect matching always exists)."""
    n = score.shape[0]
    k = min(k, n)
    dev = score.device
    ar = torch.arange(n, device=dev)
    best_cols = torch.topk(score, k, dim=1, largest=False).indices  # (n, k)
    best_rows = torch.topk(score, k, dim=0, largest=False).indices  # (k, n)
    rows = torch.cat([ar.repeat_interleave(k), best_rows.T.reshape(-1), ar])
    cols = torch.cat([best_cols.reshape(-1), ar.repeat_interleave(k), ar])
    key = torch.unique(rows * n + cols)
    return key // n, key % n


def _residual_duals(
    n: int, rows: torch.Tensor, cols: torch.Tensor, w: torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """LP duals ``(u, v)`` of an optimal perfect matching ``perm`` on the sparse edges.

    Bellman-Ford from a virtual source on the residual graph (row -> col along
    unmatched edges with ``w``, col -> row along matched ones with ``-w``), vectorised
    over edges. Then ``w_ij - u_i - v_j >= 0`` on every edge and ``= 0`` on matched ones.
    """
    matched = perm[rows] == cols
    w_match = torch.zeros(n, dtype=w.dtype, device=w.device)
    w_match[rows[matched]] = w[matched]
    rr, cc, ww = rows[~matched], cols[~matched], w[~matched]
    d_row = torch.zeros(n, dtype=w.dtype, device=w.device)
    d_col = torch.zeros(n, dtype=w.dtype, device=w.device)
    tiny = 1e-12 * float(w.abs().max()) if w.numel() else 0.0
    for _ in range(2 * n + 2):
        new_col = d_col.scatter_reduce(0, cc, d_row[rr] + ww, reduce="amin", include_self=True)
        new_row = torch.minimum(d_row, new_col[perm] - w_match)
        change = max(float((d_col - new_col).max()), float((d_row - new_row).max()))
        d_col, d_row = new_col, new_row
        if change <= tiny:
            break
    u = w_match - d_col[perm]  # = -(d_col[perm] - w_match), the row potential made tight on matches
    return u, d_col


def _residual_duals_numpy(
    n: int, rows: np.ndarray, cols: np.ndarray, w: np.ndarray, perm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_residual_duals` in numpy for the CPU: the loop is ~100 sweeps of small
    ops, which multi-threaded torch runs 25-50x slower when another process holds a
    core (measured: 0.1 s with 1 torch thread, 2.4-5.2 s with 2, n=4096)."""
    matched = perm[rows] == cols
    w_match = np.zeros(n)
    w_match[rows[matched]] = w[matched]
    rr, cc, ww = rows[~matched], cols[~matched], w[~matched]
    order = np.argsort(cc, kind="stable")
    rr, cc, ww = rr[order], cc[order], ww[order]
    d_row = np.zeros(n)
    d_col = np.zeros(n)
    if cc.size == 0:
        return w_match - d_col[perm], d_col
    starts = np.flatnonzero(np.r_[True, cc[1:] != cc[:-1]])
    seg_cols = cc[starts]
    tiny = 1e-12 * float(np.abs(w).max())
    for _ in range(2 * n + 2):
        seg_min = np.minimum.reduceat(d_row[rr] + ww, starts)
        new_col = d_col.copy()
        new_col[seg_cols] = np.minimum(d_col[seg_cols], seg_min)
        new_row = np.minimum(d_row, new_col[perm] - w_match)
        change = max(float((d_col - new_col).max()), float((d_row - new_row).max()))
        d_col, d_row = new_col, new_row
        if change <= tiny:
            break
    return w_match - d_col[perm], d_col


def sparse_assignment(
    C: torch.Tensor,
    score: torch.Tensor | None = None,
    *,
    k: int = 16,
    verify: bool = True,
    max_rounds: int = 6,
    use_score: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Assignment restricted to candidate edges, solved by scipy's sparse LAPJV.

    Parameters
    ----------
    C : Tensor (n, n)
        Cost matrix (any device); candidate edges are costed from it.
    score : Tensor (n, n), optional
        What ranks the candidates (default ``C``); pass the reduced cost
        ``C - f[:, None] - g[None, :]`` from Sinkhorn potentials, or ``-log P``.
    k : int
        Candidates per row and per column.
    verify : bool
        Certify the result against the dense ``C`` (see the module docstring) and
        add violating edges until the answer is the dense optimum.
    max_rounds : int
        Most solve/verify rounds; a warning is raised if the last one still violates.
    use_score : bool
        Solve and certify on ``score`` instead of ``C``: right (and faster) when
        ``score`` is ``C`` minus row and column potentials, wrong otherwise.

    Returns
    -------
    perm (n,) LongTensor on ``C``'s device, and an info dict
    (``edges``, ``rounds``, ``certified``, ``violations``).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n = C.shape[0]
    score = C if score is None else score
    clock = _Clock(C.device)
    rows, cols = _candidates(score, k)
    rows, cols = rows.cpu(), cols.cpu()
    # Solve and certify on the score when it is a reduced cost (C - f - g): every
    # permutation's total differs from C's by the same constant sum(f) + sum(g), so the
    # optimum is the same, and LAPJV starts far closer to it (reduced costs near 0).
    W = score if use_score else C
    Cf = W.float() if W.dtype != torch.float64 else W
    # scipy treats explicit zeros as missing edges: the weights are shifted to [spread, 2 spread]
    # (every perfect matching uses n edges, so a constant shift keeps the argmin). A shift of the
    # costs' own size, not a fixed 1.0, which in float64 rounded away costs far below 1 (data
    # at scale 1e-8: sub-optimal; at 1e-4: never certified)
    lo, hi = torch.aminmax(Cf)
    base, top = (float(t) for t in torch.stack([lo, hi]).tolist())
    shift = top - base if top > base else 1.0
    info = {"edges": 0, "rounds": 0, "certified": False, "violations": 0}
    clock.lap("candidates")
    perm = None
    for rnd in range(1, max_rounds + 1):
        w = W[rows.to(C.device), cols.to(C.device)].to("cpu", torch.float64) - base + shift
        mat = csr_matrix((w.numpy(), (rows.numpy(), cols.numpy())), shape=(n, n))
        _, col_ind = min_weight_full_bipartite_matching(mat)
        perm = torch.from_numpy(np.asarray(col_ind)).long()
        info.update(edges=int(rows.numel()), rounds=rnd)
        clock.lap("sparse_lsa")
        if not verify:
            break
        # duals on C's device: on a GPU the ~100 vectorised Bellman-Ford sweeps cost
        # a few ms at n=16k, on the CPU about as much as the sparse solve
        dev = C.device
        if dev.type == "cpu":
            u, v = (torch.from_numpy(t) for t in _residual_duals_numpy(
                n, rows.numpy(), cols.numpy(), w.numpy(), perm.numpy()))
        else:
            u, v = _residual_duals(n, rows.to(dev), cols.to(dev), w.to(dev), perm.to(dev))
        clock.lap("duals")
        # Dense check in C's precision: reduced cost R = (W - base + shift) - u - v.
        u_d = (u + base - shift).to(Cf.dtype)
        v_d = v.to(Cf.dtype)
        R = (Cf - u_d[:, None]).sub_(v_d[None, :])  # one n x n temporary, not two
        mag = max(float(Cf.abs().max()), float(u_d.abs().max()) + float(v_d.abs().max()), 1e-30)
        tol = 16 * torch.finfo(Cf.dtype).eps * mag
        bad_rows = (R.amin(1) < -tol).nonzero().squeeze(1)
        info["violations"] = int(bad_rows.numel())
        clock.lap("dense_check")
        if bad_rows.numel() == 0:
            info["certified"] = True
            break
        # add the most violated entries of every violating row and column, then solve again
        kk = min(k, n)
        add_c = torch.topk(R[bad_rows], kk, dim=1, largest=False).indices
        new_r = bad_rows.repeat_interleave(kk)
        new_c = add_c.reshape(-1)
        bad_cols = (R.amin(0) < -tol).nonzero().squeeze(1)
        add_r = torch.topk(R[:, bad_cols], kk, dim=0, largest=False).indices
        new_r = torch.cat([new_r, add_r.T.reshape(-1)])
        new_c = torch.cat([new_c, bad_cols.repeat_interleave(kk)])
        key = torch.unique(torch.cat([rows * n + cols, (new_r * n + new_c).cpu()]))
        rows, cols = key // n, key % n
        del R
        clock.lap("add_edges")
    info["seconds"] = clock.laps
    if verify and not info["certified"]:
        warnings.warn(
            f"sparse_assignment: {info['violations']} rows still violate optimality after "
            f"{max_rounds} rounds; the permutation may be slightly sub-optimal (raise k)",
            RuntimeWarning,
            stacklevel=2,
        )
    return perm.to(C.device), info


def exact_assignment(
    C: torch.Tensor,
    *,
    solver: str = "auto",
    k: int = 16,
    reg: float = 0.05,
    price_iters: int = 10,
    verify: bool = True,
    scipy_max_n: int = 256,
) -> tuple[torch.Tensor, dict]:
    """The optimal permutation for a square cost matrix ``C`` (n, n) on any device.

    ``solver="scipy"``: dense LAPJV on the CPU. ``"sparse"``: ``price_iters`` Sinkhorn
    iterations at ``eps = reg * std(C)`` price the costs, then :func:`sparse_assignment`
    on the reduced costs with the optimality certificate. ``"auto"``: scipy up to
    ``scipy_max_n``, sparse above. Returns ``(perm, info)``.

    >>> C = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> exact_assignment(C)[0].tolist()
    [1, 0]
    """
    n = C.shape[0]
    use = solver if solver != "auto" else ("scipy" if n <= scipy_max_n else "sparse")
    info: dict = {"solver": use}
    if use == "scipy":
        return lsa_dense(C), info
    # Prices, not a converged plan: a few iterations at a moderate eps already undo
    # the "hub" columns; exactness comes from the certified sparse solve.
    # (backend "auto": the fused kernel on CUDA, mat-vec scaling on the CPU)
    f, g, it, _ = sinkhorn_potentials(C, reg * cost_scale(C), max_iter=price_iters, tol=1e-2)
    score = (C - f[:, None]).sub_(g[None, :])
    perm, sinfo = sparse_assignment(C, score, k=k, verify=verify, use_score=True)
    info.update(sinfo, price_iterations=it)
    return perm, info


def greedy_assignment(score: torch.Tensor) -> torch.Tensor:
    """Greedy rounding: every free row proposes its best free column, each column keeps
    its best proposer, repeat. ``score`` (n, n), lower is better. Returns ``perm`` (n,)."""
    n = score.shape[0]
    dev = score.device
    perm = torch.full((n,), -1, dtype=torch.long, device=dev)
    free_r = torch.arange(n, device=dev)
    free_c = torch.arange(n, device=dev)
    while free_r.numel():
        sub = score[free_r][:, free_c]
        j = sub.argmin(1)
        val = sub.gather(1, j[:, None]).squeeze(1)
        best = torch.full((free_c.numel(),), float("inf"), dtype=val.dtype, device=dev)
        best = best.scatter_reduce(0, j, val, reduce="amin")
        win = (val <= best[j]).nonzero().squeeze(1)
        # ties: one winner per column (the first row)
        uniq, first = np.unique(j[win].cpu().numpy(), return_index=True)
        win = win[torch.from_numpy(first).to(dev)]
        perm[free_r[win]] = free_c[j[win]]
        keep_r = torch.ones(free_r.numel(), dtype=torch.bool, device=dev)
        keep_r[win] = False
        keep_c = torch.ones(free_c.numel(), dtype=torch.bool, device=dev)
        keep_c[j[win]] = False
        free_r, free_c = free_r[keep_r], free_c[keep_c]
    return perm


def partial_assignment(
    C: torch.Tensor, mass: float, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """m-POT with a permutation: pair ``s = round(mass * n)`` rows with ``s`` columns at
    the least total cost (exact, an augmented dense assignment on the CPU), then pair
    the ``n - s`` untransported rows with the untransported columns at random.

    Returns ``perm`` (n,) and ``transported`` (n,) bool (True for the optimal pairs).
    """
    n = C.shape[0]
    s = int(round(mass * n))
    s = min(max(s, 0), n)
    r = n - s
    dev = C.device
    if r == 0:
        return lsa_dense(C), torch.ones(n, dtype=torch.bool, device=dev)
    Cc = C.detach().to("cpu", torch.float64)
    big = float(Cc.abs().max()) * 4 * (n + 1) + 1.0
    # rows: n real + r dummy; cols: n real + r dummy. A real row matched to a dummy
    # column (cost 0) is not transported; dummy rows absorb r real columns; dummy-dummy
    # is forbidden, so exactly s real-real pairs remain.
    aug = torch.zeros(n + r, n + r, dtype=torch.float64)
    aug[:n, :n] = Cc
    aug[n:, n:] = big
    p = lsa_dense(aug)
    perm = torch.full((n,), -1, dtype=torch.long)
    real = p[:n] < n
    perm[real] = p[:n][real]
    used = torch.zeros(n, dtype=torch.bool)
    used[perm[real]] = True
    left_rows = (~real).nonzero().squeeze(1)
    left_cols = (~used).nonzero().squeeze(1)
    shuffle = torch.randperm(left_cols.numel(), generator=generator)
    perm[left_rows] = left_cols[shuffle]
    return perm.to(dev), real.to(dev)


def bomb_assignment(C: torch.Tensor, block: int) -> torch.Tensor:
    """BoMb-OT (Nguyen et al., 2022): cut both batches into consecutive mini-batches of
    ``block``, solve OT between every pair of mini-batches, pair the mini-batches by OT
    on those costs, and keep the inner assignments of the chosen pairs."""
    from scipy.optimize import linear_sum_assignment

    n = C.shape[0]
    if n % block:
        raise BatchlabInputError(
            f"bomb needs the batch size ({n}) to be a multiple of block ({block}); pick block dividing n"
        )
    nb = n // block
    Cb = C.detach().to("cpu", torch.float64).reshape(nb, block, nb, block).permute(0, 2, 1, 3).numpy()
    outer = np.empty((nb, nb))
    inner = {}
    for p in range(nb):
        for q in range(nb):
            r, c = linear_sum_assignment(Cb[p, q])
            outer[p, q] = Cb[p, q][r, c].sum()
            inner[p, q] = c
    _, q_of_p = linear_sum_assignment(outer)
    perm = np.empty(n, dtype=np.int64)
    for p, q in enumerate(q_of_p):
        perm[p * block:(p + 1) * block] = q * block + inner[p, q]
    return torch.from_numpy(perm).to(C.device)


def knn_assignment(pair_cost, n: int, k: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Immiscible Diffusion's k-nearest noise selection, kept a permutation.

    Every row draws ``k`` random columns and ``pair_cost(rows, cols)`` (two (n, k)
    LongTensors -> (n, k) costs) prices them; pairs are then taken cheapest first when
    both ends are still free, and rows left without a free candidate get the remaining
    columns at random. O(n k d) work: no n x n matrix.
    """
    # k random partners per row (a repeat within a row is harmless: it is the same pair)
    cand = torch.randint(0, n, (n, k), generator=generator)
    rows = torch.arange(n)[:, None].expand_as(cand)
    costs = pair_cost(rows.to(device), cand.to(device)).detach().to("cpu", torch.float64)
    order = torch.argsort(costs.reshape(-1), stable=True).numpy()
    r_flat, c_flat = rows.reshape(-1).numpy(), cand.reshape(-1).numpy()
    perm = np.full(n, -1, dtype=np.int64)
    used = np.zeros(n, dtype=bool)
    for e in order:
        i, j = r_flat[e], c_flat[e]
        if perm[i] < 0 and not used[j]:
            perm[i] = j
            used[j] = True
    left_rows = np.nonzero(perm < 0)[0]
    left_cols = np.nonzero(~used)[0]
    shuffle = torch.randperm(left_cols.size, generator=generator).numpy()
    perm[left_rows] = left_cols[shuffle]
    return torch.from_numpy(perm).to(device)
