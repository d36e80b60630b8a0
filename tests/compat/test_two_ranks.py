"""The compat classes on two gloo ranks against their peers on the same two ranks.

One spawn runs every case (spawning costs seconds on the CI box): open_clip's ClipLoss
for each (local_loss, gather_with_grad) combination and SigLipLoss for each dist_impl,
and lightly's losses with ``gather_distributed=True``; unit and non-unit features;
values and every gradient on every rank within 1e-5 relative (tests/compat/helpers.py).
"""

from __future__ import annotations

import warnings

import torch

from tests.compat.helpers import assert_same_run, run
from tests.gloo import run_on_ranks


def _features(gen, n, unit):
    a, b = torch.randn(n, 8, generator=gen), torch.randn(n, 8, generator=gen)
    if unit:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return [a * (1 if unit else 3.0), b, torch.tensor(4.0), torch.tensor(-3.0)]


def _open_clip_cases(rank, world, gen):
    from batchlab.compat import open_clip as compat
    from tests.compat.peers import open_clip_loss

    n = 4
    for unit in (True, False):
        full = _features(gen, n * world, unit)
        local = [full[0][rank * n:(rank + 1) * n], full[1][rank * n:(rank + 1) * n], full[2], full[3]]
        for local_loss in (False, True):
            for with_grad in (False, True):
                args = (local_loss, with_grad, False, rank, world, False)
                yield (f"ClipLoss local_loss={local_loss} gather_with_grad={with_grad} unit={unit}",
                       run(compat.ClipLoss(*args), local[:3]), run(open_clip_loss.ClipLoss(*args), local[:3]))
        for impl in compat.DIST_IMPLS:
            yield (f"SigLipLoss dist_impl={impl} unit={unit}",
                   run(compat.SigLipLoss(False, rank, world, impl), local),
                   run(open_clip_loss.SigLipLoss(False, rank, world, impl), local))


def _lightly_cases(rank, world, gen):
    from batchlab.compat import lightly as compat
    from tests.compat.peers import LIGHTLY as PEERS

    n = 3
    full = [torch.randn(n * world, 5, generator=gen) * 2, torch.randn(n * world, 5, generator=gen)]
    local = [x[rank * n:(rank + 1) * n] for x in full]
    for name, kwargs in (("NTXentLoss", {}), ("DCLLoss", {}), ("DCLWLoss", {"sigma": 0.3}),
                         ("DCLLoss", {"weight_fn": lambda a, b: ((a - b) ** 2).sum(1)})):
        kwargs = {**kwargs, "gather_distributed": True}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = run(PEERS[name](**kwargs), local)
        yield f"lightly {name} {kwargs}", run(getattr(compat, name)(**kwargs), local), want
    # MoCo-style bank filled from every rank's batch: two steps, the second reads the first's
    modules = []
    for cls in (PEERS["NTXentLoss"], compat.NTXentLoss):
        torch.manual_seed(3)  # the bank is drawn at construction
        modules.append(cls(temperature=0.3, memory_bank_size=(8, 5), gather_distributed=True))
    for step in range(2):
        batch = [x.roll(step, dims=1) for x in local]
        want, got = run(modules[0], batch), run(modules[1], batch)
        yield f"lightly NTXentLoss memory bank step {step}", got, want


def _all_cases(rank, world):
    gen = torch.Generator().manual_seed(7)
    return list(_open_clip_cases(rank, world, gen)) + list(_lightly_cases(rank, world, gen))


def test_two_ranks_match_the_peers():
    per_rank = run_on_ranks(_all_cases)
    for rank, cases in enumerate(per_rank):
        assert len(cases) == 2 * (4 + 4) + 4 + 2
        for what, got, want in cases:
            assert_same_run(got, want, what=f"rank {rank} {what}")
