"""Audit of batchlab.compat.torchcfm.OTPlanSampler: variants tests/compat/test_torchcfm.py
leaves out, against torchcfm 1.0.7 (with POT) itself: plans bitwise, seeded draws exactly.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torchcfm.optimal_transport import OTPlanSampler as PeerSampler

from batchlab.compat.torchcfm import OTPlanSampler


def _repeated(case: str, gen: torch.Generator):
    if case == "a point repeated":
        x0 = torch.randn(3, 2, generator=gen).repeat(2, 1)
        return x0, torch.randn(6, 2, generator=gen)
    if case == "one point for all":
        return torch.zeros(4, 2), torch.randn(4, 2, generator=gen)
    if case == "binary data":
        return (torch.randint(0, 2, (8, 3), generator=gen).float(),
                torch.randint(0, 2, (8, 3), generator=gen).float())
    return (torch.randint(0, 2, (6, 3), generator=gen).float(),  # uneven, replicated assignment
            torch.randint(0, 2, (4, 3), generator=gen).float())


@pytest.mark.parametrize("case", ["a point repeated", "one point for all", "binary data", "uneven binary"])
@pytest.mark.parametrize("replace", [True, False])
def test_repeated_points_keep_torchcfms_plan_and_draws(gen, case, replace):
    """Several plans are optimal when a batch repeats a point; batchlab's assignment solver
    returned another one than torchcfm's POT (plans 0.25 apart, so other seeded pairs)."""
    x0, x1 = _repeated(case, gen)
    want = PeerSampler("exact").get_map(x0, x1)
    np.testing.assert_array_equal(OTPlanSampler("exact").get_map(x0, x1), want)
    draws = []
    for cls in (PeerSampler, OTPlanSampler):
        np.random.seed(4)
        draws.append(cls("exact").sample_plan(x0, x1, replace=replace))
    for theirs, ours in zip(*draws):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_warn_false_reverts_silently():
    """A numerically zero plan becomes uniform; warn=False says nothing, as in torchcfm."""
    sampler = OTPlanSampler("exact", warn=False)
    sampler._solve = lambda M: np.zeros(tuple(M.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = sampler.get_map(torch.randn(3, 2), torch.randn(5, 2))
    np.testing.assert_array_equal(plan, np.full((3, 5), 1 / 15))


@pytest.mark.parametrize("method,kw", [("exact", {"num_threads": "max"}), ("partial", {"reg": 0.5}),
                                       ("unbalanced", {"reg": 0.5, "reg_m": 0.5, "normalize_cost": True})])
def test_other_options_draw_alike(gen, method, kw):
    x0, x1 = torch.randn(12, 2, 2, generator=gen), torch.randn(12, 2, 2, generator=gen) + 1
    y0 = torch.arange(12)
    outs = []
    for cls in (PeerSampler, OTPlanSampler):
        np.random.seed(9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs.append(cls(method, **kw).sample_plan_with_labels(x0, x1, y0, None, replace=False))
    for theirs, ours in zip(*outs):
        if theirs is None:
            assert ours is None
        else:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
