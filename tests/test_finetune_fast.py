"""The fast paths and the newer options of batchlab.recipes.finetune, each against its reference.

A one-layer BERT SentenceTransformer built locally (no dropout) stands in for MiniLM. Tolerances:
the same float32 operations in the same order are compared exactly; other orders (one forward
for both sides vs two; the evaluator's batching vs ours) within 1e-5 relative / 1e-6 absolute.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sentence_transformers")

from batchlab.errors import BatchlabInputError, StaleArtifactError  # noqa: E402
from batchlab.integrations.sentence_transformers.testing import save_tiny_model  # noqa: E402
from batchlab.recipes._encoder import load_model, sentence_encoder, token_table  # noqa: E402
from batchlab.recipes._evaluation import ir_metrics, retrieval_metrics_from_tables  # noqa: E402
from batchlab.recipes.batch_losses import MOCHI_DEFAULTS, make_batch_loss, mochi_negatives  # noqa: E402
from batchlab.recipes.finetune import _Clock, finetune  # noqa: E402
from tests.test_finetune import PAIRS, TEST, TRAIN  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-fast"), hidden_size=32)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def first_batch(batch_size: int, order_seed: int, n: int) -> torch.Tensor:
    from batchlab.recipes.samplers import make_sampler

    sampler = make_sampler("random", None, batch_size=batch_size, seed=order_seed, num_examples=n, drop_last=True)
    sampler.set_epoch(0)
    return torch.as_tensor(next(iter(sampler)), dtype=torch.long)


def test_mean_pooling_fast_path_is_the_sentence_transformers_forward(tiny_path):
    model = load_model(tiny_path)
    table = token_table(model, [q for q, _ in PAIRS], CPU)
    features = table.take(torch.arange(10))
    fast = sentence_encoder(model, fast=True)(features)
    slow = sentence_encoder(model, fast=False)(features)
    assert torch.equal(fast, slow)
    assert torch.equal(slow, model(dict(features))["sentence_embedding"])


def test_fast_path_refuses_other_layouts(tiny_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    from batchlab.recipes._encoder import _mean_pooling_transformer

    model = load_model(tiny_path)
    assert _mean_pooling_transformer(model) is not None
    cls = SentenceTransformer(modules=[model[0], modules.Pooling(32, pooling_mode="cls")], device="cpu")
    assert _mean_pooling_transformer(cls) is None  # falls back to the model's own forward
    features = token_table(model, [q for q, _ in PAIRS], CPU).take(torch.arange(4))
    assert torch.equal(sentence_encoder(cls)(features), cls(dict(features))["sentence_embedding"])


def test_token_tables_are_shared_by_runs_with_the_same_texts(tiny_path):
    model = load_model(tiny_path)
    texts = [q for q, _ in PAIRS]
    a, b = token_table(model, texts, CPU), token_table(model, list(texts), CPU)
    assert a is b
    assert token_table(model, texts[:-1], CPU) is not a
    model.max_seq_length = 8
    c = token_table(model, texts, CPU)
    assert c is not a and c.features["input_ids"].shape[1] == 8


def test_device_side_metrics_equal_the_sentence_transformers_evaluator(tiny_path):
    model = load_model(tiny_path)
    queries, documents = [q for q, _ in PAIRS], [d for _, d in PAIRS]
    ours = retrieval_metrics_from_tables(model, token_table(model, queries, CPU), token_table(model, documents, CPU),
                                         block=7)  # ragged query blocks
    reference = ir_metrics(model, queries, documents)
    assert ours == pytest.approx(reference, rel=1e-6, abs=1e-9)


def test_one_forward_for_both_sides_gives_the_two_pass_training(tiny_path):
    kw = dict(batch_size=8, steps=3, lr=1e-3, mined_negatives=1)
    two = finetune(tiny_path, TRAIN, TEST, fuse_sides=False, **kw)
    one = finetune(tiny_path, TRAIN, TEST, fuse_sides=True, **kw)
    torch.testing.assert_close(torch.tensor(one.losses), torch.tensor(two.losses), rtol=1e-5, atol=0)
    a, b = weights(two.model), weights(one.model)
    for key in a:  # Adam: a near-zero gradient coordinate may move by a small share of one step (1e-3)
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)


def test_evaluators_agree_on_the_trained_model(tiny_path):
    fast = finetune(tiny_path, TRAIN, TEST, batch_size=8, steps=2, lr=1e-3)
    slow = finetune(tiny_path, TRAIN, TEST, batch_size=8, steps=2, lr=1e-3, evaluator="sentence-transformers")
    assert fast.before == pytest.approx(slow.before, rel=1e-6) and fast.after == pytest.approx(slow.after, rel=1e-6)


# -- MoCHi ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, extra_keys", [(1, 1), (5, 0), (6, 6)])
def test_mochi_negatives_are_mixing_with_the_batch_as_bank(n, extra_keys):
    """The per-query form equals mix_hard_negatives over the keys with targets=arange(N) (same draws)."""
    from batchlab.samplers.mixing import mix_hard_negatives

    g = torch.Generator().manual_seed(n)
    q = F.normalize(torch.randn(n, 16, generator=g), dim=1)
    keys = F.normalize(torch.randn(n + extra_keys, 16, generator=g), dim=1)
    if n + extra_keys < 2:
        keys = F.normalize(torch.randn(2, 16, generator=g), dim=1)
    options = {**MOCHI_DEFAULTS, "num_hardest": 3}
    ours = mochi_negatives(q, keys, options, torch.Generator().manual_seed(11))
    reference = mix_hard_negatives(q, keys, targets=torch.arange(n), generator=torch.Generator().manual_seed(11), **options)
    assert ours.shape == (n, options["num_synthetic"] + options["mix_query"], 16)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_mochi_loss_is_infonce_with_the_mixed_negatives(tiny_path):
    """Step 1's loss = -log softmax over [in-batch keys, synthetic negatives], computed by hand."""
    order_seed, batch = 3, 8
    result = finetune(tiny_path, TRAIN, None, batch_size=batch, steps=1, lr=1e-3, mochi=True, seed=0, order_seed=order_seed)
    model = load_model(tiny_path)
    idx = first_batch(batch, order_seed, len(TRAIN))
    encode = sentence_encoder(model)
    q = F.normalize(encode(token_table(model, [p[0] for p in TRAIN], CPU).take(idx)), dim=-1)
    k = F.normalize(encode(token_table(model, [p[1] for p in TRAIN], CPU).take(idx)), dim=-1)
    from batchlab.samplers.mixing import mix_hard_negatives

    with torch.no_grad():
        extra = mix_hard_negatives(q, k, targets=torch.arange(batch),
                                   generator=torch.Generator().manual_seed(order_seed * 1_000_003), **MOCHI_DEFAULTS)
        logits = torch.cat([20.0 * q @ k.T, 20.0 * torch.einsum("nd,nmd->nm", q, extra)], dim=1)
        expected = (torch.logsumexp(logits, 1) - 20.0 * (q * k).sum(1)).mean()
    assert extra.shape[1] == MOCHI_DEFAULTS["num_synthetic"] + MOCHI_DEFAULTS["mix_query"]
    assert result.losses[0] == pytest.approx(float(expected), rel=1e-5)
    plain = finetune(tiny_path, TRAIN, None, batch_size=batch, steps=1, lr=1e-3, seed=0, order_seed=order_seed)
    assert result.losses[0] > plain.losses[0]  # harder negatives in every denominator


def test_mochi_resumes_exactly(tiny_path, tmp_path):
    kw = dict(batch_size=16, steps=4, lr=1e-3, mochi={"num_hardest": 4, "num_synthetic": 3, "mix_query": 1})
    full = finetune(tiny_path, TRAIN, None, out=tmp_path / "full", **kw)
    resumed = finetune(tiny_path, TRAIN, None, resume=tmp_path / "full" / "checkpoints" / "step-2", **kw)
    a, b = weights(full.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a resume with other MoCHi / CoLM / loss settings than the checkpoint's is refused, naming the setting
    for change, name in (({"mochi": {"num_hardest": 2}}, "mochi"), ({"mochi": None}, "mochi"),
                         ({"coreset": 0.5}, "coreset"), ({"loss": "dcl"}, "loss")):
        with pytest.raises(StaleArtifactError, match=f"{name}="):
            finetune(tiny_path, TRAIN, None, resume=tmp_path / "full" / "checkpoints" / "step-2", **{**kw, **change})


# -- CoLM -------------------------------------------------------------------------------------
def test_colm_keeps_the_weighted_medoids_of_each_super_batch(tiny_path):
    from batchlab.losses import info_nce
    from batchlab.samplers.colm import CoLMSelector

    order_seed = 5
    result = finetune(tiny_path, TRAIN, None, batch_size=4, steps=1, lr=1e-3, coreset=0.5, seed=0, order_seed=order_seed)
    assert result.examples == 4 and result.steps == 1 and result.settings["coreset"] == 0.5
    model = load_model(tiny_path)
    encode = sentence_encoder(model)
    qt, dt = token_table(model, [p[0] for p in TRAIN], CPU), token_table(model, [p[1] for p in TRAIN], CPU)
    sup = first_batch(8, order_seed, len(TRAIN))
    with torch.no_grad():
        learner = (F.normalize(encode(qt.take(sup)), dim=-1), F.normalize(encode(dt.take(sup)), dim=-1), 20.0)
    chosen = CoLMSelector(filter_ratio=0.5, seed=order_seed).select(learner=learner, step=0, return_weights=True)
    idx = sup[chosen.indices]
    q, k = F.normalize(encode(qt.take(idx)), dim=-1), F.normalize(encode(dt.take(idx)), dim=-1)
    with torch.no_grad():
        expected = (info_nce(q, k, 20.0, symmetric=False, reduction="none") * chosen.weights).mean()
    assert result.losses[0] == pytest.approx(float(expected), rel=1e-5)
    assert float(chosen.weights.mean()) == pytest.approx(1.0)


def test_colm_and_jest_are_exclusive_and_global_losses_take_neither(tiny_path):
    with pytest.raises(BatchlabInputError, match="one of them"):
        finetune(tiny_path, TRAIN, None, batch_size=4, steps=1, coreset=0.5, jest=0.5)
    with pytest.raises(BatchlabInputError, match="neither"):
        finetune(tiny_path, TRAIN, None, batch_size=4, steps=1, coreset=0.5, loss="isogclr")
    with pytest.raises(BatchlabInputError, match="neither"):
        finetune(tiny_path, TRAIN, None, batch_size=4, steps=1, mochi=True, loss="sogclr")
    with pytest.raises(BatchlabInputError, match="filter ratio"):
        finetune(tiny_path, TRAIN, None, batch_size=4, steps=1, coreset=1.5)
    with pytest.raises(BatchlabInputError, match="unknown option"):
        finetune(tiny_path, TRAIN, None, batch_size=4, steps=1, mochi={"hardest": 2})
    with pytest.raises(BatchlabInputError, match="synthesises no negative"):
        finetune(tiny_path, TRAIN, None, batch_size=4, steps=1, mochi={"num_synthetic": 0, "mix_query": 0})
    for bad, message in (({"num_hardest": 0}, "num_hardest must be an integer >= 1, got 0"),
                         ({"mix_query": 1.5}, "mix_query must be an integer >= 0, got 1.5"),
                         ({"query_weight_max": float("nan")}, r"query_weight_max must be a number in \[0, 1\], got nan")):
        with pytest.raises(BatchlabInputError, match=message):  # before the model loads
            finetune(tiny_path / "missing", TRAIN, None, batch_size=4, steps=1, mochi=bad)


# -- iSogCLR ------------------------------------------------------------------------------------
def test_isogclr_learns_temperatures_that_change_revisited_examples(tiny_path, tmp_path):
    """3 epochs of 2 batches: from the second visit on, iSogCLR's per-query temperatures differ from 1/scale."""
    kw = dict(batch_size=16, steps=6, lr=1e-3)
    sog = finetune(tiny_path, TRAIN, None, loss="sogclr", **kw)
    iso = finetune(tiny_path, TRAIN, None, loss="isogclr", out=tmp_path / "iso", **kw)
    from batchlab.recipes.global_loss import RECIPE_ISOGCLR_OPTIONS

    offset = RECIPE_ISOGCLR_OPTIONS["rho"] / 20.0  # loss_i = tau_i (log u_i + rho); first visits: every tau is 1/scale
    assert iso.losses[0] == pytest.approx(sog.losses[0] + offset, rel=1e-5)
    assert iso.losses[2] != pytest.approx(sog.losses[2] + offset, rel=1e-5)
    state = torch.load(tmp_path / "iso" / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=True)["global_loss"]
    assert not torch.all(state["tau"] == 0.05) and float(state["tau"].min()) >= 0.02 and float(state["tau"].max()) <= 0.2
    resumed = finetune(tiny_path, TRAIN, None, loss="isogclr", resume=tmp_path / "iso" / "checkpoints" / "step-4", **kw)
    a, b = weights(iso.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(StaleArtifactError, match="loss_options="):
        finetune(tiny_path, TRAIN, None, loss="isogclr", loss_options={"gamma": 0.5},
                 resume=tmp_path / "iso" / "checkpoints" / "step-4", **kw)


# -- the SogCLR ablation: DCL, gamma = 1, rescaled ------------------------------------------------
def _grads(batch_loss, q0, k0, ids):
    q, k = q0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
    value = batch_loss(F.normalize(q, dim=1), F.normalize(k, dim=1), None, ids, None, None)
    value.backward()
    return value.detach(), q.grad, k.grad


@pytest.mark.parametrize("extra_keys", [0, 3])
def test_recipe_dcl_is_infonce_without_the_positive(extra_keys):
    torch.manual_seed(0)
    q0, k0 = torch.randn(6, 8, dtype=torch.float64), torch.randn(6 + extra_keys, 8, dtype=torch.float64)
    fn, state = make_batch_loss("dcl", scale=20.0, num_examples=6)
    value, gq, gk = _grads(fn, q0, k0, torch.arange(6))
    q, k = q0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
    logits = 20.0 * F.normalize(q, dim=1) @ F.normalize(k, dim=1).T
    pos = logits.diagonal()
    negatives = logits.masked_fill(torch.eye(6, 6 + extra_keys, dtype=torch.bool), float("-inf"))
    (torch.logsumexp(negatives, 1) - pos).mean().backward()
    assert state is None
    torch.testing.assert_close(gq, q.grad)
    torch.testing.assert_close(gk, k.grad)


@pytest.mark.parametrize("extra_keys", [0, 3])
def test_recipe_sogclr_gradient_is_tau_times_dcl_with_gamma_one(extra_keys):
    """The recipe's SogCLR (one-way, tau = 1/scale) against its DCL, on two visits of the same ids:
    gamma = 1 gives tau x DCL's gradient on both, ``rescale`` DCL's own; gamma 0.9 departs on the revisit."""
    torch.manual_seed(1)
    scale, n, ids = 20.0, 6, torch.tensor([4, 0, 7, 2, 9, 5])
    dcl_fn, _ = make_batch_loss("dcl", scale=scale, num_examples=10)
    arms = {"gamma1": make_batch_loss("sogclr", scale=scale, num_examples=10, loss_options={"gamma": 1.0})[0],
            "rescaled": make_batch_loss("sogclr", scale=scale, num_examples=10,
                                        loss_options={"gamma": 1.0, "rescale": True})[0],
            "default": make_batch_loss("sogclr", scale=scale, num_examples=10)[0]}
    for visit in range(2):
        q0, k0 = torch.randn(n, 8, dtype=torch.float64), torch.randn(n + extra_keys, 8, dtype=torch.float64)
        _, dq, dk = _grads(dcl_fn, q0, k0, ids)
        got = {name: _grads(fn, q0, k0, ids) for name, fn in arms.items()}
        torch.testing.assert_close(got["gamma1"][1], dq / scale)
        torch.testing.assert_close(got["gamma1"][2], dk / scale)
        torch.testing.assert_close(got["rescaled"][1], dq)
        torch.testing.assert_close(got["rescaled"][2], dk)
        if visit == 0:  # first visit: u = the batch's own estimate, whatever gamma
            torch.testing.assert_close(got["default"][1], dq / scale)
        else:
            assert not torch.allclose(got["default"][1], dq / scale, rtol=1e-3, atol=1e-8)


def test_finetune_sogclr_with_gamma_one_rescaled_trains_as_dcl(tiny_path):
    """End to end (ids, state, optimizer): 3 epochs of SogCLR with gamma = 1 times 1/tau give DCL's weights;
    the default gamma 0.9 does not."""
    kw = dict(batch_size=16, steps=6, lr=1e-3, seed=0)
    dcl = weights(finetune(tiny_path, TRAIN, None, loss="dcl", **kw).model)
    same = weights(finetune(tiny_path, TRAIN, None, loss="sogclr", loss_options={"gamma": 1.0, "rescale": True},
                            **kw).model)
    other = weights(finetune(tiny_path, TRAIN, None, loss="sogclr", loss_options={"rescale": True}, **kw).model)
    # float32 sums in another order, through Adam's normalisation (measured: 8.5e-6; gamma 0.9: 6e-4)
    assert max(float((same[k] - dcl[k]).abs().max()) for k in dcl) < 5e-5
    assert max(float((other[k] - dcl[k]).abs().max()) for k in dcl) > 2e-4


def test_loss_options_are_checked(tiny_path):
    for loss, options, match in (("mnrl", {"gamma": 1.0}, "only"), ("sogclr", {"beta": 1}, "unknown"),
                                 ("sogclr", {"rescale": 1}, "True or False"), ("sogclr", {"gamma": 0.0}, "gamma")):
        with pytest.raises(BatchlabInputError, match=match):
            finetune(tiny_path, TRAIN, None, batch_size=16, steps=1, loss=loss, loss_options=options)


def test_mochi_without_query_mixes(tiny_path):
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
    options = {**MOCHI_DEFAULTS, "num_hardest": 4, "num_synthetic": 5, "mix_query": 0}
    extra = mochi_negatives(q, k, options, torch.Generator().manual_seed(0))
    assert extra.shape == (8, 5, 16)
    result = finetune(tiny_path, TRAIN, None, batch_size=16, steps=1, lr=1e-3, mochi={"mix_query": 0})
    assert result.settings["mochi"]["mix_query"] == 0 and result.steps == 1


# -- same wall time -------------------------------------------------------------------------------
def test_time_budget_stops_before_the_budget_and_caps_at_steps(tiny_path):
    none = finetune(tiny_path, TRAIN, TEST, batch_size=8, time_budget=1e-9, lr=1e-3)
    assert none.steps == 0 and none.after == none.before and none.settings["total_steps"] is None
    capped = finetune(tiny_path, TRAIN, None, batch_size=8, steps=3, time_budget=3600.0, lr=1e-3)
    assert capped.steps == 3
    with pytest.raises(BatchlabInputError, match="cannot resume"):
        finetune(tiny_path, TRAIN, None, batch_size=8, time_budget=10.0, resume="somewhere")
    for bad in (0, float("inf"), float("nan")):  # an infinite budget without steps would never stop
        with pytest.raises(BatchlabInputError, match="finite positive number"):
            finetune(tiny_path, TRAIN, None, batch_size=8, time_budget=bad)


def test_time_budget_schedule_follows_the_share_of_the_budget():
    seconds = {"teacher": 1.0, "mining": 0.0, "sampler": 0.0, "train": 0.0}
    clock = _Clock(11.0, seconds, warmup=0.1, sync=lambda: None)
    clock.start_steps(0.0)
    assert clock.setup == pytest.approx(1.0 + clock.spent(0.0) - 1.0)
    for fraction, factor in ((0.0, 0.01), (0.05, 0.5), (0.1, 1.0), (0.55, 0.5), (1.0, 0.0)):
        clock.fraction = fraction
        assert clock.factor(0) == pytest.approx(factor)


def test_widths_rounded_to_a_multiple_change_no_embedding(tiny_path):
    from batchlab.recipes._encoder import TokenTable

    model = load_model(tiny_path)
    texts = [q for q, _ in PAIRS]
    exact, rounded = TokenTable(model, texts, CPU), TokenTable(model, texts, CPU, multiple=16)
    idx = torch.tensor([3, 7, 11])
    a, b = exact.take(idx), rounded.take(idx)
    assert a["input_ids"].shape[1] == int(exact.lengths[idx].max()) and b["input_ids"].shape[1] % 16 == 0
    assert b["input_ids"].shape[1] <= rounded.width
    assert TokenTable(model, texts, CPU, multiple=1000).take(idx)["input_ids"].shape[1] == rounded.width  # capped
    encode = sentence_encoder(model)
    torch.testing.assert_close(encode(b), encode(a), rtol=1e-5, atol=1e-6)
