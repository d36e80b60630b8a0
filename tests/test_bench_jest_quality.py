"""The JEST quality experiment's pieces: round sampler (uniform batches), metric, data split."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from batchlab.bench.jest_quality import RoundSampler, _split, _steps_to, _summary


@pytest.mark.parametrize("n,batch,steps", [(10, 4, 5), (100, 32, 3), (12, 6, 7)])
def test_round_sampler_uniform_batches_without_repeats(n, batch, steps):
    s = RoundSampler(n, batch, steps, seed=3)
    batches = list(s)
    assert len(s) == len(batches) == steps
    assert all(len(b) == batch and len(set(b)) == batch for b in batches)
    assert all(0 <= i < n for b in batches for i in b)
    # one pass uses every example at most once
    per_pass = n // batch
    first = [i for b in batches[:per_pass] for i in b]
    assert len(first) == len(set(first))


def test_round_sampler_is_seeded_per_epoch():
    a, b = RoundSampler(50, 8, 6, seed=1), RoundSampler(50, 8, 6, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(RoundSampler(50, 8, 6, seed=2)) != list(b)
    with pytest.raises(ValueError):
        RoundSampler(5, 8, 2)


def test_metric_first_step_reaching_target():
    steps = [10, 20, 30, 40]
    assert _steps_to(steps, [0.1, 0.2, 0.3, 0.25], 0.2) == 20
    assert _steps_to(steps, [0.1, 0.2, 0.3, 0.25], 0.31) is None
    done = _summary([0.5, 0.7])
    assert done["reached"] == "2/2" and done["mean"] == pytest.approx(0.6) and done["min"] == 0.5
    partial = _summary([0.5, None])
    assert partial["reached"] == "1/2" and "mean" not in partial


def test_split_holds_out_whole_modules():
    train = SimpleNamespace(queries=[f"q{i}" for i in range(20)], documents=[f"d{i}" for i in range(20)],
                            modules=[f"m{i % 5}" for i in range(20)])
    pool, ref = _split(train, 0.4, seed=0)
    assert len(pool) + len(ref) == 20 and len(ref) == 8
    mod = {f"q{i}": train.modules[i] for i in range(20)}
    assert not {mod[q] for q, _ in pool} & {mod[q] for q, _ in ref}
