"""batchlab.compat.torchcfm.OTPlanSampler against torchcfm 1.0.7 itself.

Checks written for this class (torchcfm's test files are not vendored): the same
plans, the same numpy-seeded draws, and torchcfm's OT flow matchers (exact OT-CFM and
the Schrödinger bridge, plain and label-guided) giving the very same samples when
their ``ot_sampler`` is replaced by the compat class.

Tolerance: the exact plans are built from the same float32 costs by another exact
solver, so entries agree to float64 rounding (1e-15); the entropic methods call the same
POT solver on the same costs and agree bitwise; seeded draws agree exactly.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from torchcfm import conditional_flow_matching as cfm
from torchcfm.optimal_transport import OTPlanSampler as PeerSampler

from batchlab.compat import torchcfm as compat
from batchlab.compat.torchcfm import OTPlanSampler


def _batches(n, m, dim=3, seed=0, shift=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randn(m, dim, generator=g) + shift


def test_signature_is_torchcfms():
    for name in ("__init__", "get_map", "sample_map", "sample_plan", "sample_plan_with_labels", "sample_trajectory"):
        ours, theirs = inspect.signature(getattr(OTPlanSampler, name)), inspect.signature(getattr(PeerSampler, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()], name


@pytest.mark.parametrize("n,m", [(1, 1), (8, 8), (6, 9), (48, 64), (9, 4)])
@pytest.mark.parametrize("method,kw", [
    ("exact", {}), ("exact", {"normalize_cost": True}),
    ("sinkhorn", {"reg": 0.5}), ("sinkhorn", {"reg": 0.05, "normalize_cost": True}),
    ("unbalanced", {"reg": 0.5, "reg_m": 2.0}), ("partial", {"reg": 0.5}),
])
def test_same_plan(n, m, method, kw):
    x0, x1 = _batches(n, m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = PeerSampler(method, **kw).get_map(x0, x1)
        got = OTPlanSampler(method, **kw).get_map(x0, x1)
    assert got.dtype == want.dtype and got.shape == want.shape == (n, m)
    if method == "exact" and n != m:  # a different exact solver: the same vertex up to rounding
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    else:
        np.testing.assert_array_equal(got, want)


def test_exact_uneven_above_replication_limit_uses_emd():
    n, m = 31, 37  # lcm 1147 > MAX_REPLICATED
    assert n * m > compat.MAX_REPLICATED
    x0, x1 = _batches(n, m, dim=2)
    np.testing.assert_allclose(OTPlanSampler("exact").get_map(x0, x1), PeerSampler("exact").get_map(x0, x1),
                               atol=1e-15)


def test_images_are_flattened():
    x0, x1 = torch.randn(6, 2, 3, 3), torch.randn(6, 2, 3, 3)
    np.testing.assert_allclose(OTPlanSampler("exact").get_map(x0, x1), PeerSampler("exact").get_map(x0, x1),
                               atol=1e-15)


@pytest.mark.parametrize("method", ["exact", "sinkhorn"])
@pytest.mark.parametrize("replace", [True, False])
def test_same_draws_for_the_same_numpy_seed(method, replace):
    x0, x1 = _batches(16, 16)
    y0, y1 = torch.arange(16), torch.arange(16) + 100
    outs = []
    for cls in (PeerSampler, OTPlanSampler):
        np.random.seed(3)
        sampler = cls(method, reg=0.5)
        outs.append((sampler.sample_plan(x0, x1, replace=replace),
                     sampler.sample_plan_with_labels(x0, x1, y0, y1, replace=replace),
                     sampler.sample_plan_with_labels(x0, x1, None, y1, replace=replace)))
    (a0, a1), la, na = outs[0]
    (b0, b1), lb, nb = outs[1]
    torch.testing.assert_close(b0, a0, rtol=0, atol=0)
    torch.testing.assert_close(b1, a1, rtol=0, atol=0)
    for u, v in zip(la, lb):
        torch.testing.assert_close(v, u, rtol=0, atol=0)
    assert na[2] is None and nb[2] is None
    torch.testing.assert_close(nb[3], na[3], rtol=0, atol=0)


def test_exact_plan_is_pots_emd_bitwise():
    """As torchcfm's own check: the plan equals ``ot.emd`` on the flattened squared distances."""
    import ot

    x0, x1 = torch.randn(128, 2, 2, 2), torch.randn(128, 2, 2, 2)
    M = torch.cdist(x0.reshape(128, -1), x1.reshape(128, -1)) ** 2
    assert np.array_equal(OTPlanSampler("exact").get_map(x0, x1), ot.emd(ot.unif(128), ot.unif(128), M.numpy()))


def test_sample_map_without_replacement_keeps_a_permutation():
    permuted = np.random.default_rng(1).permutation(np.eye(64), axis=1)
    i, j = OTPlanSampler("exact").sample_map(permuted, batch_size=64, replace=False)
    rebuilt = np.zeros((64, 64))
    rebuilt[i, j] = 1
    assert np.array_equal(rebuilt, permuted)


def test_sample_plan_is_get_map_then_sample_map():
    x0, x1 = torch.randn(32, 2, 2), torch.randn(32, 2, 2)
    sampler = OTPlanSampler("exact")
    np.random.seed(1980)
    i, j = sampler.sample_map(sampler.get_map(x0, x1), batch_size=32, replace=True)
    np.random.seed(1980)
    a, b = sampler.sample_plan(x0, x1, replace=True)
    assert torch.equal(a, x0[i]) and torch.equal(b, x1[j])


def test_sample_map_is_torchcfms():
    pi = np.random.default_rng(0).random((5, 7))
    pairs = []
    for cls in (PeerSampler, OTPlanSampler):
        np.random.seed(11)
        pairs.append(cls("exact").sample_map(pi, 30))
    np.testing.assert_array_equal(pairs[0], pairs[1])


def test_same_trajectories():
    X = torch.randn(10, 4, 2, generator=torch.Generator().manual_seed(5))
    X[:, 1:] += 1
    trajectories = []
    for cls in (PeerSampler, OTPlanSampler):
        np.random.seed(2)
        trajectories.append(cls("exact").sample_trajectory(X))
    assert isinstance(trajectories[1], np.ndarray) and trajectories[1].shape == (10, 4, 2)
    np.testing.assert_array_equal(trajectories[0], trajectories[1])


def test_unknown_method_and_zero_plan():
    with pytest.raises(ValueError, match="Unknown method"):
        OTPlanSampler("emd")
    with pytest.raises(TypeError):
        OTPlanSampler()  # method is required, as in torchcfm
    sampler = OTPlanSampler("exact")
    sampler._solve = lambda M: np.zeros(tuple(M.shape))  # a plan that vanished numerically
    with pytest.warns(UserWarning, match="reverting to uniform plan"):
        plan = sampler.get_map(*_batches(3, 4))
    np.testing.assert_array_equal(plan, np.full((3, 4), 1 / 12))


def _matcher_outputs(fm, x0, x1, y0, y1):
    torch.manual_seed(0)
    np.random.seed(0)
    plain = fm.sample_location_and_conditional_flow(x0, x1, return_noise=True)
    guided = fm.guided_sample_location_and_conditional_flow(x0, x1, y0, y1, return_noise=True)
    return plain, guided


@pytest.mark.parametrize("make", [
    lambda: cfm.ExactOptimalTransportConditionalFlowMatcher(sigma=0.1),
    lambda: cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=0.5, ot_method="sinkhorn"),
    lambda: cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=1.0, ot_method="sinkhorn"),
    lambda: cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=1.0, ot_method="exact"),
], ids=["ot-cfm", "sb-0.5", "sb-1.0", "sb-exact"])
def test_flow_matchers_with_the_compat_sampler_are_torchcfms(make):
    """torchcfm's matchers build their own sampler; substituting ours changes nothing."""
    x0, x1 = _batches(24, 24, dim=2, shift=2.0)
    y0, y1 = torch.arange(24) % 3, torch.arange(24) % 4
    peer = make()
    ours = make()
    ours.ot_sampler = OTPlanSampler(_method(peer), reg=peer.ot_sampler.reg, reg_m=peer.ot_sampler.reg_m)
    want, got = _matcher_outputs(peer, x0, x1, y0, y1), _matcher_outputs(ours, x0, x1, y0, y1)
    for w_out, g_out in zip(want, got):
        assert len(w_out) == len(g_out)
        for w, g in zip(w_out, g_out):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def _method(peer) -> str:
    name = peer.ot_sampler.ot_fn.func.__name__
    return {"emd": "exact", "sinkhorn": "sinkhorn", "sinkhorn_knopp_unbalanced": "unbalanced",
            "entropic_partial_wasserstein": "partial"}[name]


def test_schrodinger_bridge_coupling_grows_with_sigma_as_torchcfms():
    """The issue's symptom: with the compat sampler the SB coupling's cost follows sigma."""
    x0, x1 = _batches(64, 64, dim=2, shift=2.0)
    costs = []
    for sigma in (0.5, 1.0, 2.0):
        np.random.seed(0)
        a, b = OTPlanSampler("sinkhorn", reg=2 * sigma ** 2).sample_plan(x0, x1)
        costs.append(float(((a - b) ** 2).sum(1).mean()))
    assert costs[0] < costs[1] < costs[2]
