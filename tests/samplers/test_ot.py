"""couple(): exactness against scipy, Sinkhorn convergence, permutations, conditions, errors."""

import itertools
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from batchlab.errors import BatchlabInputError
from batchlab.samplers import couple
from batchlab.samplers.ot import costs, solvers


def scipy_cost(C: torch.Tensor) -> float:
    r, c = linear_sum_assignment(C.double().numpy())
    return float(C.double().numpy()[r, c].sum())


def total(C: torch.Tensor, perm: torch.Tensor) -> float:
    return float(C.double()[torch.arange(C.shape[0]), perm].sum())


def is_perm(p: torch.Tensor, n: int) -> bool:
    return p.dtype == torch.long and p.shape == (n,) and sorted(p.tolist()) == list(range(n))


def problem(gen, n, d, shift=1.0):
    x0 = torch.randn(n, d, generator=gen)
    x1 = torch.randn(n, d, generator=gen) * 0.7 + shift * torch.randn(1, d, generator=gen)
    return x0, x1


@pytest.mark.parametrize("solver", ["scipy", "sparse"])
@pytest.mark.parametrize("n,d", [(40, 2), (300, 2), (300, 64), (400, 512)])
def test_exact_cost_equals_scipy(gen, solver, n, d):
    x0, x1 = problem(gen, n, d)
    perm, info = couple(x0, x1, "exact", solver=solver, return_info=True)
    assert is_perm(perm, n)
    C = costs.pairwise_cost(x0, x1)
    # C is float32; scipy sums its float64 copy; the sparse path certifies on C minus
    # float32 potentials, so ties may break differently: compare totals, rel 1e-6.
    assert total(C, perm) == pytest.approx(scipy_cost(C), rel=1e-6)
    if solver == "sparse":
        assert info["certified"]


def test_sparse_certificate_repairs_a_poor_candidate_set(gen):
    # k=1 on unpriced costs misses most optimal edges; the dual check must add them.
    x0, x1 = problem(gen, 200, 8)
    C = costs.pairwise_cost(x0, x1)
    perm, info = solvers.sparse_assignment(C, k=1, max_rounds=20)
    assert info["rounds"] > 1 and info["certified"]
    assert total(C, perm) == pytest.approx(scipy_cost(C), rel=1e-6)


def test_sparse_without_verify_can_miss_and_says_so(gen):
    x0, x1 = problem(gen, 200, 8)
    C = costs.pairwise_cost(x0, x1)
    perm, info = solvers.sparse_assignment(C, k=1, verify=False)
    assert is_perm(perm, 200) and not info["certified"]
    assert total(C, perm) >= scipy_cost(C) * (1 - 1e-6)


def test_sinkhorn_approaches_exact_as_eps_shrinks(gen):
    x0, x1 = problem(gen, 128, 4)
    C = costs.pairwise_cost(x0, x1)
    exact = scipy_cost(C) / 128  # the plan has total mass 1
    gaps = []
    for reg in (1.0, 0.1, 0.01):
        P = couple(x0, x1, "sinkhorn", reg=reg, return_plan=True, tol=1e-6, max_iter=5000)
        assert torch.allclose(P.sum(1), torch.full((128,), 1 / 128), atol=1e-5 / 128 * 128)
        assert torch.allclose(P.sum(0), torch.full((128,), 1 / 128), atol=1e-6)
        gaps.append(float((P.double() * C.double()).sum()) - exact)
    assert gaps[0] > gaps[1] > gaps[2] >= -1e-4 * exact
    assert gaps[2] < 0.02 * exact  # eps = 1% of the cost spread: within 2% of the optimum


def test_sinkhorn_permutation_is_near_exact(gen):
    x0, x1 = problem(gen, 256, 16)
    C = costs.pairwise_cost(x0, x1)
    for rounding in ("lsa", "greedy"):
        perm = couple(x0, x1, "sinkhorn", rounding=rounding)
        assert is_perm(perm, 256)
        ident = total(C, torch.arange(256))
        opt = scipy_cost(C)
        # the rounded plan keeps at least 90% of the improvement over the identity pairing
        assert ident - total(C, perm) >= 0.9 * (ident - opt)


@pytest.mark.parametrize("method", ["exact", "sinkhorn", "unbalanced", "partial", "bomb", "knn"])
@pytest.mark.parametrize("n", [1, 2, 17, 64])
def test_every_method_returns_a_permutation_on_the_device(gen, method, n):
    x0, x1 = problem(gen, n, 3)
    kw = {"block": 1} if method == "bomb" and n in (1, 2, 17) else {}
    perm = couple(x0, x1, method, generator=torch.Generator().manual_seed(0), **kw)
    assert is_perm(perm, n) and perm.device == x0.device


def test_images_are_flattened_and_costs_match_cdist(gen):
    x0 = torch.randn(20, 3, 4, 4, generator=gen)
    x1 = torch.randn(20, 3, 4, 4, generator=gen)
    C = costs.pairwise_cost(x0, x1)
    ref = torch.cdist(x0.reshape(20, -1).double(), x1.reshape(20, -1).double()) ** 2
    assert torch.allclose(C.double(), ref, rtol=1e-5, atol=1e-4)
    assert is_perm(couple(x0, x1), 20)


def test_callable_cost_is_used(gen):
    x0, x1 = problem(gen, 30, 2)
    l1 = lambda a, b: torch.cdist(a, b, p=1)  # noqa: E731
    perm = couple(x0, x1, cost=l1)
    C = torch.cdist(x0, x1, p=1)
    assert total(C, perm) == pytest.approx(scipy_cost(C), rel=1e-6)


def test_return_plan_masses(gen):
    x0, x1 = problem(gen, 32, 2)
    P = couple(x0, x1, "exact", return_plan=True)
    assert P.shape == (32, 32) and float(P.sum()) == pytest.approx(1.0)
    assert ((P > 0).sum(1) == 1).all()
    Pp = couple(x0, x1, "partial", mass=0.75, return_plan=True)
    assert float(Pp.sum()) == pytest.approx(0.75)
    Pu = couple(x0, x1[:20], "sinkhorn", return_plan=True)  # rectangular plans are fine
    assert Pu.shape == (32, 20) and float(Pu.sum()) == pytest.approx(1.0, rel=1e-4)


def test_unbalanced_plan_sheds_mass_on_outliers(gen):
    x0, x1 = problem(gen, 64, 2, shift=0.0)
    x1 = x1.clone()
    x1[0] = 50.0  # an outlier target
    P = couple(x0, x1, "unbalanced", reg=0.05, reg_m=0.05, return_plan=True)
    assert float(P[:, 0].sum()) < 0.5 / 64  # far less than its balanced share 1/64
    assert float(P.sum()) < 1.0


def test_partial_transports_the_cheapest_pairs_exactly():
    gen = torch.Generator().manual_seed(3)
    n, s = 6, 4
    x0, x1 = torch.randn(n, 2, generator=gen), torch.randn(n, 2, generator=gen)
    x1[5] += 30  # an outlier the partial plan should leave out
    C = costs.pairwise_cost(x0, x1).double()
    perm, info = couple(x0, x1, "partial", mass=s / n, return_info=True, generator=gen)
    tr = info["transported"]
    assert is_perm(perm, n) and int(tr.sum()) == s and int(perm[tr].eq(5).sum()) == 0
    best = min(
        sum(float(C[r, c]) for r, c in zip(rows, cols))
        for rows in itertools.combinations(range(n), s)
        for cols in itertools.permutations(range(n), s)
    )
    assert float(C[tr.nonzero().squeeze(1), perm[tr]].sum()) == pytest.approx(best, rel=1e-9)


def test_bomb_with_one_block_is_exact_and_checks_block(gen):
    x0, x1 = problem(gen, 48, 3)
    C = costs.pairwise_cost(x0, x1)
    assert total(C, couple(x0, x1, "bomb", block=48)) == pytest.approx(scipy_cost(C), rel=1e-6)
    p = couple(x0, x1, "bomb", block=12)
    assert is_perm(p, 48) and total(C, p) >= scipy_cost(C) * (1 - 1e-9)
    with pytest.raises(BatchlabInputError, match="multiple of block"):
        couple(x0, x1, "bomb", block=10)


def test_knn_is_seeded_and_lowers_the_cost(gen):
    x0, x1 = problem(gen, 512, 8, shift=0.0)
    C = costs.pairwise_cost(x0, x1)
    p1 = couple(x0, x1, "knn", knn_k=8, generator=torch.Generator().manual_seed(1))
    p2 = couple(x0, x1, "knn", knn_k=8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(p1, p2) and is_perm(p1, 512)
    assert total(C, p1) < total(C, torch.arange(512)) * 0.97


def test_label_conditions_are_respected(gen):
    n = 120
    x0, x1 = problem(gen, n, 2)
    y0 = torch.arange(n) % 4
    y1 = y0[torch.randperm(n, generator=gen)]
    free = couple(x0, x1)
    assert float((y0 == y1[free]).float().mean()) < 0.6  # geometry alone ignores labels
    for method in ("exact", "sinkhorn", "bomb"):
        kw = {"block": n} if method == "bomb" else {}
        perm = couple(x0, x1, method, condition=(y0, y1), condition_weight=1e3, **kw)
        assert torch.equal(y0, y1[perm]), method
    auto = couple(x0, x1, condition=(y0, y1))  # "auto" weight: 3 cost std per mismatch
    assert float((y0 == y1[auto]).float().mean()) > 0.9


def test_continuous_conditions_pull_pairs_together(gen):
    n = 100
    x0, x1 = problem(gen, n, 2)
    c0, c1 = torch.randn(n, 5, generator=gen), torch.randn(n, 5, generator=gen)
    D = costs.condition_cost(c0, c1)
    base = couple(x0, x1)
    cond = couple(x0, x1, condition=(c0, c1), condition_ratio=3.0)
    ar = torch.arange(n)
    assert float(D[ar, cond].mean()) < 0.5 * float(D[ar, base].mean())


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.randn(5, 2), torch.randn(6, 2)), {}, "same batch size"),
        ((torch.randn(5, 2), torch.randn(6, 2)), {"method": "sinkhorn"}, "same batch size"),
        ((torch.full((4, 2), float("nan")), torch.randn(4, 2)), {}, "non-finite"),
        ((torch.randn(4, 2), torch.tensor([[1.0, float("inf")]] * 4)), {}, "non-finite"),
        ((torch.randn(0, 2), torch.randn(0, 2)), {}, "empty"),
        ((torch.randn(4, 0), torch.randn(4, 0)), {}, "empty"),
        ((torch.ones(4, 2, dtype=torch.long), torch.randn(4, 2)), {}, "floating"),
        (([[0.0, 1.0]], torch.randn(1, 2)), {}, "torch.Tensor"),
        ((torch.randn(4, 2), torch.randn(4, 3)), {}, "same size"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"method": "hungarian"}, "method"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"cost": "l1"}, "cost"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"reg": 0.0, "method": "sinkhorn"}, "reg"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"mass": 1.5, "method": "partial"}, "mass"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"solver": "lapjv"}, "solver"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"k": 0}, "k"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"condition": (torch.arange(3), torch.arange(4))}, "rows"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"condition": torch.arange(4)}, "pair"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"condition": (torch.arange(4), torch.arange(4)), "condition_weight": -1.0}, "condition_weight"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"cost": lambda a, b: a @ b.T[:, :2]}, "cost callable"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"cost": lambda a, b: torch.full((4, 4), float("nan"))}, "NaN"),
    ],
)
def test_bad_input_raises_batchlab_error(args, kwargs, match):
    with pytest.raises(BatchlabInputError, match=match):
        couple(*args, **kwargs)


def test_sinkhorn_eps_follows_the_cost_spread(gen):
    x0, x1 = problem(gen, 64, 2)
    _, info_small = couple(x0, x1, "sinkhorn", reg=0.1, return_info=True, return_plan=True)
    _, info_big = couple(100 * x0, 100 * x1, "sinkhorn", reg=0.1, return_info=True, return_plan=True)
    assert info_big["eps"] == pytest.approx(1e4 * info_small["eps"], rel=1e-3)
    assert math.isfinite(info_big["eps"])


def test_exact_assignment_on_a_given_cost_matrix(gen):
    from batchlab.samplers.ot import exact_assignment

    C = torch.rand(300, 300, generator=gen)
    for solver in ("scipy", "sparse"):
        perm, info = exact_assignment(C, solver=solver)
        assert is_perm(perm, 300) and info["solver"] == solver
        assert total(C, perm) == pytest.approx(scipy_cost(C), rel=1e-6)


def test_auto_solver_depends_on_size_and_geometry(gen):
    _, low = couple(*problem(gen, 600, 2), return_info=True)
    _, high = couple(*problem(gen, 600, 64), return_info=True)
    assert low["solver"] == "scipy" and high["solver"] == "sparse"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_input_dtypes(gen, dtype):
    x0, x1 = problem(gen, 300, 40)
    perm = couple(x0.to(dtype), x1.to(dtype))
    C = costs.pairwise_cost(x0.to(dtype).float(), x1.to(dtype).float())
    assert is_perm(perm, 300)
    assert total(C, perm) == pytest.approx(scipy_cost(C), rel=1e-5)


def test_greedy_rounding_of_a_permutation_score_recovers_it(gen):
    n = 64
    target = torch.randperm(n, generator=gen)
    score = torch.rand(n, n, generator=gen)
    score[torch.arange(n), target] = -1.0  # each row has one clearly best, distinct column
    assert torch.equal(solvers.greedy_assignment(score), target)


def test_dual_certificate_numpy_and_torch_paths_agree(gen):
    # the CPU uses the numpy loop, CUDA the torch one: same duals on the same matching
    x0, x1 = problem(gen, 150, 8)
    C = costs.pairwise_cost(x0, x1).double()
    rows, cols = solvers._candidates(C, 6)
    perm = torch.from_numpy(linear_sum_assignment(C.numpy())[1])
    keep = torch.cat([rows * 150 + cols, torch.arange(150) * 150 + perm]).unique()
    rows, cols = keep // 150, keep % 150
    w = C[rows, cols] - C.min() + 1
    u_t, v_t = solvers._residual_duals(150, rows, cols, w, perm)
    u_n, v_n = solvers._residual_duals_numpy(150, rows.numpy(), cols.numpy(), w.numpy(), perm.numpy())
    assert torch.allclose(u_t, torch.from_numpy(u_n)) and torch.allclose(v_t, torch.from_numpy(v_n))
    red = w - u_t[rows] - v_t[cols]
    assert float(red.min()) > -1e-9  # dual feasible on every edge
    on_match = perm[rows] == cols
    assert float(red[on_match].abs().max()) < 1e-9  # tight on the matching


def test_entropic_partial_plan_moves_mass_and_skips_outliers(gen):
    x0, x1 = problem(gen, 64, 2, shift=0.0)
    x1 = x1.clone()
    x1[:4] += 40.0  # four far targets
    P = couple(x0, x1, "partial", mass=0.875, solver="sinkhorn", reg=0.02, return_plan=True, tol=1e-6, max_iter=5000)
    assert P.shape == (64, 64)
    assert float(P.sum()) == pytest.approx(0.875, rel=1e-3)
    assert float(P.sum(1).max()) <= 1 / 64 * (1 + 1e-3) and float(P.sum(0).max()) <= 1 / 64 * (1 + 1e-3)
    assert float(P[:, :4].sum()) < 0.01 * float(P.sum())  # the outliers are left out
    Pe = couple(x0, x1, "partial", mass=0.875, return_plan=True)  # exact partial plan, 56 of 64 pairs
    assert float((Pe * costs.pairwise_cost(x0, x1)).sum()) <= float((P * costs.pairwise_cost(x0, x1)).sum()) * 1.0001


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rel_eps", [1e-3, 0.05, 10.0])
@pytest.mark.parametrize("reg_m", [None, 0.3])
def test_scaling_backend_follows_the_log_domain_iterates(gen, dtype, rel_eps, reg_m):
    # same updates, so the same potentials after every iteration, up to rounding; at
    # rel_eps 1e-3 most exponents underflow and the half-steps fall back and re-absorb
    C = (torch.randn(37, 29, generator=gen, dtype=torch.float64) ** 2 * 50).to(dtype)
    eps = rel_eps * solvers.cost_scale(C)
    rm = None if reg_m is None else reg_m * solvers.cost_scale(C)
    f0, g0, it0, e0 = solvers.sinkhorn_potentials(C, eps, max_iter=12, tol=0.0, reg_m=rm, backend="torch")
    f1, g1, it1, e1 = solvers.sinkhorn_potentials(C, eps, max_iter=12, tol=0.0, reg_m=rm, backend="scaling")
    assert it0 == it1 == 12
    # float32: a few ulps of the larger of the cost spread and the potentials (at a large
    # eps the potentials are ~eps log n, and rounding is relative to them)
    scale = float(C.max() - C.min()) + float(f0.abs().max()) + float(g0.abs().max())
    atol = scale * (2e-6 if dtype == torch.float32 else 1e-11)
    torch.testing.assert_close(f1, f0, rtol=0, atol=atol)
    torch.testing.assert_close(g1, g0, rtol=0, atol=atol)


def test_scaling_backend_absorbs_and_falls_back_at_tiny_eps(gen):
    from batchlab.samplers.ot._scaling import ScalingSteps

    C = torch.rand(20, 20, generator=gen) * 100
    eps = 1e-3
    n = 20
    base = torch.full((n,), eps * -math.log(n))
    buf = torch.empty_like(C)
    steps = ScalingSteps(C, eps, 1.0, base, base, torch.zeros(n), torch.zeros(n),
                         lambda pot, dim: solvers._softmin(C, pot, eps, dim, buf))
    f = steps.update_f(torch.zeros(n))
    steps.update_g(f)
    assert steps.rebuilds > 1  # exp(-C / eps) is all floor: the first steps ran in the log domain
    f_ref = base + solvers._softmin(C, torch.zeros(n), eps, 1, buf)
    torch.testing.assert_close(f, f_ref)


def test_scaling_backend_needs_the_cpu():
    with pytest.raises(BatchlabInputError, match="runs on the CPU"):
        solvers.sinkhorn_potentials(torch.rand(3, 3, device="meta"), 0.1, backend="scaling")


def test_exact_pricing_leaves_a_float64_cost_matrix_untouched(gen):
    # regression: the CPU pricing once shifted a float64 C in place (C.to(float64) is C)
    C = torch.rand(300, 300, generator=gen, dtype=torch.float64)
    before = C.clone()
    perm, info = solvers.exact_assignment(C, solver="sparse")
    assert torch.equal(C, before) and info["certified"]
    assert total(C, perm) == pytest.approx(scipy_cost(C), rel=1e-9)
