"""Runs that save, load and resume: the record holds every value used, an interrupted run resumes to
the same result as an uninterrupted one, load_run gives the model back, and the schedule's length is
the real number of steps."""

from __future__ import annotations

import math

import pytest
import torch

from batchlab.errors import BatchlabInputError
from batchlab.recipes import load_run, train_dual_encoder
from batchlab.recipes._loop import warmup_cosine


def _pairs(n, offset=0):
    words = ["parse", "draw", "close", "open", "read", "write", "sort", "merge"]
    return [(f"{words[i % 8]} the {words[(i // 8) % 8]} item number {i}", f"def {words[i % 8]}_{i}(x):\n    return x")
            for i in range(offset, offset + n)]


KW = dict(sampler="community", batch_size=16, epochs=2, progress=False,
          sampler_options={"group_size": 4, "rank_window": (1, 9)})


class _Stop(Exception):
    pass


def _stop_at_epoch(n):
    def progress(event):
        if event.get("event") == "epoch" and event["epoch"] == n:
            raise _Stop

    return progress


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    train, test = _pairs(64), _pairs(24, offset=64)
    whole = train_dual_encoder(train, test, out=tmp_path / "a", name="run", **KW)
    with pytest.raises(_Stop):  # killed when epoch 2 starts: the checkpoint of epoch 1 is on disk
        train_dual_encoder(train, test, out=tmp_path / "b", name="run", **{**KW, "progress": _stop_at_epoch(2)})
    resumed = train_dual_encoder(train, test, out=tmp_path / "b", name="run", resume=tmp_path / "b" / "run.pt", **KW)
    assert resumed.losses == whole.losses  # epoch 2 rebuilt its batches from the restored model: same steps
    assert resumed.metrics == whole.metrics and [h["epoch"] for h in resumed.history] == [1, 2]
    # another setting, or a finished run, is refused with a reason
    with pytest.raises(BatchlabInputError, match="lr"):
        train_dual_encoder(train, test, resume=tmp_path / "a" / "run.pt", **{**KW, "lr": 1e-3, "epochs": 3})
    with pytest.raises(BatchlabInputError, match="finished"):
        train_dual_encoder(train, test, resume=tmp_path / "a" / "run.pt", **KW)
    with pytest.raises(BatchlabInputError, match="no checkpoint"):
        train_dual_encoder(train, test, resume=tmp_path / "nothing.pt", **KW)


def test_load_run_gives_the_trained_model_and_its_record(tmp_path):
    train, test = _pairs(48), _pairs(16, offset=48)
    result = train_dual_encoder(train, test, sampler="random", batch_size=16, epochs=1, progress=False, seed=3,
                                data_seed=5, out=tmp_path, name="r")
    run = load_run(tmp_path / "r.pt")
    assert run.record == result.record and run.epoch == 1 and run.metrics == result.metrics
    assert run.record["lr"] == 2e-3 and run.record["teacher"] == "model" and run.record["seed"] == 3
    assert run.record["data_seed"] == 5 and run.record["sampler_options"] == {}
    texts = [q for q, _ in test]
    with torch.no_grad():
        from batchlab.recipes.dual_encoder import tokenize

        expected = torch.nn.functional.normalize(result.model.eval()(tokenize(texts)), dim=-1)
    assert torch.allclose(run.encode(texts), expected, atol=1e-6)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BatchlabInputError, match="not a readable"):
        load_run(tmp_path / "junk.pt")


def test_seed_and_data_seed_are_separate():
    train, test = _pairs(48), _pairs(16, offset=48)
    kw = dict(sampler="random", batch_size=16, epochs=1, progress=False, eval_every=0)
    base = train_dual_encoder(train, test, seed=0, data_seed=0, **kw)
    other_order = train_dual_encoder(train, test, seed=0, data_seed=1, **kw)
    other_init = train_dual_encoder(train, test, seed=1, data_seed=0, **kw)
    assert base.losses != other_order.losses and base.losses != other_init.losses
    same = train_dual_encoder(train, test, seed=0, **kw)  # data_seed defaults to seed
    assert same.losses == base.losses


def test_schedule_matches_transformers_after_warmup_and_follows_the_real_length():
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=40).lr_lambdas[0]
    ours = warmup_cosine(40, 5)
    assert [ours(s) for s in range(5, 41)] == pytest.approx([theirs(s) for s in range(5, 41)], abs=1e-12)
    assert ours(0) == pytest.approx(theirs(1)) and theirs(0) == 0.0  # their first step does not learn
    horizon = {"total": 40}
    live = warmup_cosine(lambda: horizon["total"], 5)
    horizon["total"] = 30  # an epoch turned out shorter: the decay ends at the real last step
    assert live(30) == pytest.approx(0.0, abs=1e-12) and live(29) > 0


def test_learning_rate_reaches_zero_on_the_last_real_step():
    """Epoch 1 is random (4 batches of 16 of 64 pairs); the model-teacher communities of epoch 2 hold
    another number of batches; the cosine must end on the real last step either way."""
    train, test = _pairs(64), _pairs(16, offset=64)
    seen = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = spy
    try:
        result = train_dual_encoder(train, test, eval_every=0, **{**KW, "sampler_options": {"group_size": 8,
                                                                                          "rank_window": (1, 9)}})
    finally:
        torch.optim.AdamW.step = original
    assert len(seen) == len(result.losses)
    lr = 2e-3
    steps = len(seen)
    warmup = 1  # min(20, first estimate // 10 + 1), the first estimate being 4 random batches x 2 epochs
    # the last step's rate is the cosine at (steps - 1 - warmup) / (steps - warmup) of its way down
    expected = lr * 0.5 * (1 + math.cos(math.pi * (steps - 1 - warmup) / (steps - warmup)))
    assert seen[-1] == pytest.approx(expected, rel=1e-6)


def test_a_ready_sampler_is_used_as_given_with_the_default_teacher():
    from batchlab.recipes import RandomBatchSampler

    train, test = _pairs(48), _pairs(16, offset=48)
    kw = dict(batch_size=16, epochs=1, progress=False, eval_every=0)
    given = train_dual_encoder(train, test, sampler=RandomBatchSampler(48, 16, seed=7), **kw)
    named = train_dual_encoder(train, test, sampler="random", data_seed=7, **kw)
    assert given.losses == named.losses  # not replaced by a random first epoch of data_seed 0
