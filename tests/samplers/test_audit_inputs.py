"""Audit of the samplers' and selectors' input checks: a wrong type is refused by name, not coerced.

``float("0.5")`` made a string a valid neighbourhood cap or random share, ``float(None)``
raised a bare TypeError, and ``int(1.7)`` silently named source 1 as a small CoLM source.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchlab.errors import BatchlabInputError
from batchlab.recipes import RandomBatchSampler
from batchlab.samplers import CoLMSelector, CommunityBatchSampler, HardNegativeBatchSampler, JointExampleSelector
from batchlab.samplers import MixedBatchSampler

PARTNERS = (torch.arange(8) ^ 1).unsqueeze(1)

BUILDERS = {
    "max_neighbourhood_fraction": lambda v: HardNegativeBatchSampler(PARTNERS, 4, max_neighbourhood_fraction=v),
    "mix_random": lambda v: MixedBatchSampler(RandomBatchSampler(8, 2), 8, batch_size=4, mix_random=v),
    "small_fraction": lambda v: CoLMSelector(small_fraction=v),
    "eps": lambda v: CoLMSelector(eps=v),
    "beta2": lambda v: CoLMSelector(beta2=v),
    "small_sources": lambda v: CoLMSelector(small_sources=[0, v]),
}


@pytest.mark.parametrize(
    "name, bad", [(name, bad) for name in BUILDERS for bad in ("0.5", None, True)] + [("small_sources", 1.7)]
)
def test_a_wrong_type_is_refused_by_name(name, bad):
    with pytest.raises(BatchlabInputError, match=name):
        BUILDERS[name](bad)


@pytest.mark.parametrize("name, value", [("max_neighbourhood_fraction", 1.5), ("mix_random", 1.0),
                                         ("small_fraction", -0.1), ("eps", 0.0), ("beta2", 1.0)])
def test_an_out_of_range_number_is_refused(name, value):
    with pytest.raises(BatchlabInputError, match=name):
        BUILDERS[name](value)


def test_numpy_numbers_are_numbers():
    assert HardNegativeBatchSampler(PARTNERS, 4, max_neighbourhood_fraction=np.float32(0.5)).neighbourhood_cap == 2
    assert MixedBatchSampler(RandomBatchSampler(8, 2), 8, batch_size=4, mix_random=np.float64(0.5)).num_random == 2
    # seeds as numpy ints, as GlobalBatchSampler and load_state_dict take them; saved as plain ints
    for selector in (JointExampleSelector(seed=np.int64(3)), CoLMSelector(seed=np.int64(3), small_sources=[np.int64(1)])):
        state = selector.state_dict()
        assert (state["seed"], state["step"]) == (3, 0) and type(state["seed"]) is int and type(selector.seed) is int
    for bad in (-1, 2.0, "3"):
        with pytest.raises(BatchlabInputError, match="seed must be a non-negative integer"):
            JointExampleSelector(seed=bad)


def test_community_groups_larger_than_the_dataset_say_what_fits():
    with pytest.raises(BatchlabInputError, match=r"group_size=4 is larger than N=3; use group_size <= 3"):
        CommunityBatchSampler(None, 4, group_size=4, groups=[0, 0, 1])


def test_an_explicit_selection_step_is_a_non_negative_integer():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(20, 4, generator=g), dim=1) for _ in range(2))
    jest = JointExampleSelector(n_chunks=2, filter_ratio=0.5)
    calls = {"jest": lambda step: jest.select(learner=(q, k, 5.0), reference=(k, q, 5.0), step=step),
             "colm": lambda step: CoLMSelector(0.5).select(gradients=q, step=step)}
    for name, call in calls.items():
        assert torch.equal(call(np.int64(1)), call(1)), name
        for bad in (1.5, "1", True, -1):
            with pytest.raises(BatchlabInputError, match="step must be a non-negative integer"):
                call(bad)
    assert jest.step == 0  # explicit steps leave the counter alone


def test_sizes_take_numpy_ints_and_refuse_bools_and_floats():
    # sizes often come from numpy (len of an array, np.int64 from a config): taken as plain ints
    sampler = RandomBatchSampler(np.int64(10), np.int64(4), seed=0)
    assert [len(b) for b in sampler] == [4, 4, 2] and type(sampler.num_examples) is int
    for bad in (True, np.bool_(True), 4.0, "4", None, np.int64(0)):
        with pytest.raises(BatchlabInputError, match=r"batch_size must be an integer >= 1"):
            RandomBatchSampler(10, bad)


def test_a_state_of_another_dataset_size_names_the_size():
    from batchlab.bench.jest_quality import RoundSampler
    from batchlab.integrations.sentence_transformers.samplers import _RandomBatches

    for build, other, setting in ((lambda: RandomBatchSampler(20, 4, seed=0), lambda: RandomBatchSampler(24, 4, seed=0),
                                   "num_examples=20 in the state but num_examples=24"),
                                  (lambda: _RandomBatches(20, 4, seed=0), lambda: _RandomBatches(21, 4, seed=0),
                                   "num_examples=20 in the state but num_examples=21"),
                                  (lambda: RoundSampler(10, 4, steps=5, seed=0), lambda: RoundSampler(10, 4, steps=6, seed=0),
                                   "steps=5 in the state but steps=6")):
        sampler = build()
        batches = iter(sampler)
        next(batches)
        state = sampler.state_dict(consumed=1)
        with pytest.raises(BatchlabInputError, match=setting):
            other().load_state_dict(state)
        build().load_state_dict(state)  # the same settings resume


def test_a_selector_state_of_another_class_or_settings_is_refused(caplog):
    jest = JointExampleSelector(n_chunks=4, filter_ratio=0.5, seed=1)
    jest.step = 7
    state = jest.state_dict()
    for other, difference in ((JointExampleSelector(n_chunks=8, filter_ratio=0.5), "n_chunks=4 in the state but 8 here"),
                              (JointExampleSelector(n_chunks=4, filter_ratio=0.5, score="hard_learner"), "score=.learnability."),
                              (CoLMSelector(0.5), "selector 'JointExampleSelector' in the state but 'CoLMSelector'")):
        with pytest.raises(BatchlabInputError, match=difference):
            other.load_state_dict(state)
    again = JointExampleSelector(n_chunks=4, filter_ratio=0.5, block_size=8, seed=0)  # block_size: how, not what
    again.load_state_dict(state)
    assert (again.seed, again.step) == (1, 7)
    colm = CoLMSelector(0.5, small_sources=[2], seed=2)
    with pytest.raises(BatchlabInputError, match=r"small_sources=\[2\] in the state but 'auto' here"):
        CoLMSelector(0.5, seed=2).load_state_dict(colm.state_dict())
    # a state saved before the settings were recorded still loads, with a warning
    with caplog.at_level("WARNING"):
        CoLMSelector(0.5).load_state_dict({"seed": 4, "step": 2})
    assert "records no selector class or settings" in caplog.text
