"""Audit of the recipes' resume contract: a run interrupted at an epoch boundary and resumed from its
checkpoint gives the same steps, losses and metrics as the uninterrupted run, for every per-run state
(the SogCLR / iSogCLR head, the JEST and CoLM selectors, the samplers), and a checkpoint of another
configuration or a damaged one is refused with a reason."""

from __future__ import annotations

import pytest
import torch

from batchlab.errors import BatchlabInputError
from batchlab.recipes import load_run, train_dual_encoder
from tests.test_recipes_runs import _pairs, _Stop, _stop_at_epoch

TRAIN, TEST = _pairs(48), _pairs(16, offset=48)


def _selector(kind):
    from batchlab.samplers import CoLMSelector, JointExampleSelector

    if kind == "jest":
        return JointExampleSelector(n_chunks=2, filter_ratio=0.5, seed=0)
    if kind == "coreset":
        return CoLMSelector(filter_ratio=0.5, seed=0)
    return None


def _interrupted_then_resumed(tmp_path, stop_at, **kw):
    """(uninterrupted, resumed) results of the same settings; selectors are built fresh per run, as the
    command line builds them."""
    selector = kw.pop("selector", None)
    whole = train_dual_encoder(TRAIN, TEST, out=tmp_path / "a", name="run", jest=_selector(selector), **kw)
    with pytest.raises(_Stop):
        train_dual_encoder(TRAIN, TEST, out=tmp_path / "b", name="run", jest=_selector(selector),
                           **{**kw, "progress": _stop_at_epoch(stop_at)})
    resumed = train_dual_encoder(TRAIN, TEST, out=tmp_path / "b", name="run", jest=_selector(selector),
                                 resume=tmp_path / "b" / "run.pt", **kw)
    return whole, resumed


BASE = dict(batch_size=8, epochs=3, progress=False)


@pytest.mark.parametrize("case,stop_at", [
    (dict(sampler="random", loss="sogclr"), 2),
    (dict(sampler="random", loss="info_nce", selector="jest"), 2),  # failed before the selector state was saved
    (dict(sampler="random", loss="info_nce", selector="jest"), 3),
    (dict(sampler="random", loss="isogclr", selector="coreset"), 3),
    (dict(sampler="hard_negative", loss="dcl", teacher="tfidf"), 2),
    # the model teacher refreshed every 2 epochs: epoch 4 reuses epoch 3's teacher (failed before it was saved)
    (dict(sampler="community", refresh_every=2, epochs=4, eval_every=0,
          sampler_options={"group_size": 4, "rank_window": (1, 9)}), 4),
], ids=lambda c: "-".join(str(v) for v in c.values()) if isinstance(c, dict) else f"stop{c}")
def test_resume_at_each_epoch_boundary_gives_the_uninterrupted_run(tmp_path, case, stop_at):
    whole, resumed = _interrupted_then_resumed(tmp_path, stop_at, **{**BASE, **case})
    assert resumed.losses == whole.losses
    assert resumed.history == [{**h, "seconds": r["seconds"]} for h, r in zip(whole.history, resumed.history)]
    assert resumed.metrics == whole.metrics and resumed.losses
    a, b = torch.load(whole.checkpoint, weights_only=True), torch.load(resumed.checkpoint, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["head"]:  # SogCLR / iSogCLR per-example state lives in the head
        assert torch.equal(a["head"][key], b["head"][key]), key


def test_a_checkpoint_is_refused_by_another_selector_other_data_or_when_damaged(tmp_path):
    kw = dict(sampler="random", batch_size=8, epochs=2, eval_every=0)
    with pytest.raises(_Stop):
        train_dual_encoder(TRAIN, TEST, out=tmp_path, name="run", jest=_selector("jest"), progress=_stop_at_epoch(2), **kw)
    path = tmp_path / "run.pt"
    assert torch.load(path, weights_only=True)["selector"]["step"] == 3  # 48 pairs in super-batches of 16
    # the same filter ratio and seed, but CoLM: the JEST state is refused, naming the selector
    with pytest.raises(BatchlabInputError, match="JointExampleSelector"):
        train_dual_encoder(TRAIN, TEST, jest=_selector("coreset"), resume=path, progress=False, **kw)
    with pytest.raises(BatchlabInputError, match="train_pairs"):
        train_dual_encoder(TRAIN[:40], TEST, jest=_selector("jest"), resume=path, progress=False, **kw)
    with pytest.raises(BatchlabInputError, match="jest"):
        train_dual_encoder(TRAIN, TEST, resume=path, progress=False, **kw)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])  # a copy cut short
    bad = tmp_path / "cut.pt"
    with pytest.raises(BatchlabInputError, match="not a readable batchlab checkpoint"):
        train_dual_encoder(TRAIN, TEST, jest=_selector("jest"), resume=bad, progress=False, **kw)
    with pytest.raises(BatchlabInputError, match="not a readable batchlab checkpoint"):
        load_run(bad)


def test_a_checkpoint_is_refused_on_other_pairs_of_the_same_count(tmp_path):
    kw = dict(sampler="random", batch_size=16, epochs=2, eval_every=0)
    with pytest.raises(_Stop):
        train_dual_encoder(TRAIN, TEST, out=tmp_path, name="run", progress=_stop_at_epoch(2), **kw)
    path = tmp_path / "run.pt"
    other = [(q, d + " ") for q, d in TRAIN]  # the same number of pairs, another document text
    with pytest.raises(BatchlabInputError, match="data_hash"):
        train_dual_encoder(other, TEST, resume=path, progress=False, **kw)
    with pytest.raises(BatchlabInputError, match="data_hash"):
        train_dual_encoder(TRAIN, TEST[::-1], resume=path, progress=False, **kw)
    # a checkpoint written before the hash was recorded still resumes
    state = torch.load(path, weights_only=True)
    del state["record"]["data_hash"]
    assert len(train_dual_encoder(TRAIN, TEST, resume=state, progress=False, **kw).losses) == 6


def test_clip_resume_with_a_teacher_refreshed_every_two_epochs_gives_the_uninterrupted_run(tmp_path):
    from batchlab.recipes import train_clip
    from tests.test_recipes import _TinyImages

    train, test = _TinyImages(32, 0), _TinyImages(8, 1)
    kw = dict(sampler="cluster", batch_size=8, epochs=4, refresh_every=2, eval_every=0, progress=False)
    whole = train_clip(train, test, out=tmp_path / "a", name="run", **kw)
    with pytest.raises(_Stop):
        train_clip(train, test, out=tmp_path / "b", name="run", **{**kw, "progress": _stop_at_epoch(4)})
    resumed = train_clip(train, test, out=tmp_path / "b", name="run", resume=tmp_path / "b" / "run.pt", **kw)
    assert resumed.losses == whole.losses and resumed.metrics == whole.metrics
