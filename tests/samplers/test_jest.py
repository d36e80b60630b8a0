"""JointExampleSelector: conditional scores against brute force, preferences, determinism, errors.

The brute force evaluates the definition directly: the conditional score of candidate i
given the selected set S is Loss(S + {i}) - Loss(S), with the batch loss computed by
batchlab's reference losses on the sub-batch (reduction="sum"), for learner and reference.
"""

from __future__ import annotations

import os

# The fused kernel runs on the CPU only under Triton's interpreter, which must be chosen
# before any kernel is defined (tests/losses/test_triton.py sets the same).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F

from batchlab.errors import BatchlabInputError
from batchlab.losses import info_nce, siglip
from batchlab.samplers import JointExampleSelector


def unit(n, d, gen):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).float()


def model(n, d, gen, scale, bias=None):
    q = unit(n, d, gen)
    # keys correlated with their queries so positives are not all hopeless
    k = F.normalize(q + 0.8 * unit(n, d, gen), dim=1)
    return (q, k, scale) if bias is None else (q, k, scale, bias)


def batch_loss(m, idx, loss, symmetric=True):
    if idx.numel() == 0:
        return 0.0
    q, k = m[0][idx].double(), m[1][idx].double()
    if loss == "siglip":
        return float(siglip(q, k, m[2], m[3], reduction="sum", impl="reference"))
    return float(info_nce(q, k, m[2], symmetric=symmetric, reduction="sum", impl="reference"))


def brute_scores(learner, reference, selected, loss, score, symmetric=True):
    n = (learner or reference)[0].shape[0]
    out = torch.full((n,), float("-inf"), dtype=torch.float64)
    taken = set(selected.tolist())
    for i in range(n):
        if i in taken:
            continue
        with_i = torch.cat([selected, torch.tensor([i])])
        delta = {}
        for name, m in (("L", learner), ("R", reference)):
            if m is not None:
                delta[name] = batch_loss(m, with_i, loss, symmetric) - batch_loss(m, selected, loss, symmetric)
        out[i] = {"learnability": lambda: delta["L"] - delta["R"],
                  "hard_learner": lambda: delta["L"],
                  "easy_reference": lambda: -delta["R"]}[score]()
    return out


@pytest.mark.parametrize(
    "loss,score,symmetric",
    [
        ("info_nce", "learnability", True),
        ("info_nce", "hard_learner", False),
        ("info_nce", "easy_reference", True),
        ("siglip", "learnability", True),
        ("siglip", "easy_reference", True),
    ],
)
def test_conditional_scores_match_brute_force(loss, score, symmetric, gen):
    n, d = 40, 8
    bias = -2.0 if loss == "siglip" else None
    learner = model(n, d, gen, 7.0, bias)
    # the reference embeds in another dimension (a different model, e.g. a TF-IDF teacher)
    reference = model(n, d + 5, gen, 12.0, None if bias is None else -3.0)
    sel = JointExampleSelector(n_chunks=4, filter_ratio=0.7, score=score, loss=loss, symmetric=symmetric,
                               block_size=7)  # a block size that does not divide N: exercises the tiling
    out = sel.select(learner=learner if score != "easy_reference" else None,
                     reference=reference if score != "hard_learner" else None, return_scores=True)
    assert out.indices.numel() == 12 and out.chunk_sizes == [3, 3, 3, 3]
    use_l = learner if score != "easy_reference" else None
    use_r = reference if score != "hard_learner" else None
    start = out.chunk_sizes[0]
    for t in range(1, 4):
        expected = brute_scores(use_l, use_r, out.indices[:start], loss, score, symmetric)
        got = out.scores[t].double()
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(got))
        # float32 logits with scale <= 12 against the float64 brute force: sums of <= 40 terms
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-4, atol=2e-4)
        start += out.chunk_sizes[t]


def test_first_chunk_by_score_uses_own_loss(gen):
    n, d = 30, 8
    learner, reference = model(n, d, gen, 10.0), model(n, d, gen, 10.0)
    out = JointExampleSelector(n_chunks=3, filter_ratio=0.5, first_chunk="score").select(
        learner=learner, reference=reference, return_scores=True)
    # InfoNCE: a singleton batch has zero loss, so the first chunk uses each example's
    # learnability against the whole super-batch.
    expected = (info_nce(*learner, reduction="none", impl="reference")
                - info_nce(*reference, reduction="none", impl="reference"))
    torch.testing.assert_close(out.scores[0], expected, rtol=1e-5, atol=1e-5)
    sig = JointExampleSelector(n_chunks=3, filter_ratio=0.5, loss="siglip", first_chunk="score").select(
        learner=(*learner, -1.0), reference=(*reference, -2.0), return_scores=True)
    own = lambda m, b: F.softplus(-(m[2] * (m[0] * m[1]).sum(1) + b))  # noqa: E731
    torch.testing.assert_close(sig.scores[0], own(learner, -1.0) - own(reference, -2.0))


def planted(n, d, learnable, gen, scale=20.0):
    """Reference aligns every pair; the learner aligns all but the ``learnable`` ones."""
    q = unit(n, d, gen)
    ref = (q, q.clone(), scale)
    k_learner = q.clone()
    k_learner[learnable] = unit(len(learnable), d, gen)
    return (q, k_learner, scale), ref


@pytest.mark.parametrize("loss", ["info_nce", "siglip"])
def test_prefers_learnable_examples(loss, gen):
    n, d = 200, 32
    learnable = torch.randperm(n, generator=gen)[:40]
    if loss == "siglip":  # SigLIP's initial scale and bias (10, -10)
        learner, reference = planted(n, d, learnable, gen, scale=10.0)
        learner, reference = (*learner, -10.0), (*reference, -10.0)
    else:
        learner, reference = planted(n, d, learnable, gen)
    sel = JointExampleSelector(n_chunks=4, filter_ratio=0.8, loss=loss, seed=3)
    idx = sel.select(learner=learner, reference=reference)
    # 40 of 200 are learnable (20%). The first chunk (10) is random; of the 30 chosen by score
    # at least 80% must be learnable (observed 26-30 over seeds; 6 expected by chance).
    hits = torch.isin(idx[10:], learnable).sum().item()
    assert hits >= 24, hits
    uniform = JointExampleSelector(n_chunks=4, filter_ratio=0.8, loss=loss, score="easy_reference", seed=3)
    # easy_reference: every pair is easy for the reference, so no preference for the planted set
    assert torch.isin(uniform.select(reference=reference), learnable).sum().item() < 20


def test_joint_term_prefers_hard_negatives_of_the_chosen(gen):
    """A candidate's score depends on who is already chosen: examples 0 and 1 are
    confusable for the learner only (both of 1's embeddings sit next to 0's), so 1 is
    learnable exactly when 0 is in the batch to be confused with."""
    n, d = 64, 16
    q = unit(n, d, gen)
    reference = (q, q.clone(), 10.0)
    ql = q.clone()
    ql[1] = F.normalize(q[0] + 0.05 * unit(1, d, gen)[0], dim=0)
    learner = (ql, ql.clone(), 10.0)
    with_0, without_0 = [], []
    for seed in range(8):
        out = JointExampleSelector(n_chunks=2, filter_ratio=0.5, seed=seed).select(
            learner=learner, reference=reference, return_scores=True)
        first = out.indices[: out.chunk_sizes[0]].tolist()
        if 1 in first:
            continue
        (with_0 if 0 in first else without_0).append(float(out.scores[1][1]))
        if 0 in first:
            assert int(out.scores[1].argmax()) == 1
    assert with_0 and without_0, "seeds did not produce both cases"
    # with 0 chosen: both rows/columns gain a near-positive negative (about log 2 each, times 2
    # directions, for 1 and for 0), without it 1 is an ordinary aligned pair (score ~ 0)
    assert min(with_0) > 1.0 and max(without_0) < 0.1, (with_0, without_0)


@pytest.mark.parametrize("symmetric,precision,tol", [(True, "float32", 1e-4), (False, "bf16", 0.1)])
def test_triton_neighbour_kernel_matches_torch(symmetric, precision, tol, gen):
    pytest.importorskip("triton")
    n, d = 90, 40  # d not a multiple of the kernel's d chunk; several row and column tiles
    learner, reference = model(n, d, gen, 10.0), model(n, d, gen, 12.0)
    kw = dict(n_chunks=4, filter_ratio=0.6, symmetric=symmetric, seed=2)
    a = JointExampleSelector(impl="torch", **kw).select(learner=learner, reference=reference, return_scores=True)
    b = JointExampleSelector(impl="triton", precision=precision, **kw).select(
        learner=learner, reference=reference, return_scores=True)
    finite = torch.isfinite(a.scores)
    assert torch.equal(finite, torch.isfinite(b.scores))
    # float32: same products, other summation order. bf16: products of 8-bit-mantissa inputs,
    # logit errors ~ scale * 2**-9, summed over <= 36 selected rows
    torch.testing.assert_close(b.scores[finite], a.scores[finite], rtol=0, atol=tol)
    if precision == "float32":
        assert torch.equal(a.indices, b.indices)


def test_deterministic_under_seed_and_steps(gen):
    learner, reference = model(100, 16, gen, 10.0), model(100, 16, gen, 10.0)
    a = JointExampleSelector(n_chunks=4, seed=5)
    b = JointExampleSelector(n_chunks=4, seed=5)
    first_a, first_b = a.select(learner=learner, reference=reference), b.select(learner=learner, reference=reference)
    assert torch.equal(first_a, first_b)
    second_a = a.select(learner=learner, reference=reference)
    assert not torch.equal(first_a, second_a)  # the step counter moved on
    # resumption: a fresh selector loaded with a's state continues like a
    c = JointExampleSelector(n_chunks=4, seed=0)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.select(learner=learner, reference=reference), a.select(learner=learner, reference=reference))
    assert torch.equal(a.select(learner=learner, reference=reference, step=0), first_a)
    other = JointExampleSelector(n_chunks=4, seed=6).select(learner=learner, reference=reference)
    assert not torch.equal(other, first_a)


@pytest.mark.parametrize("n,ratio,chunks", [(100, 0.8, 16), (37, 0.5, 3), (50, 0.0, 5)])
def test_indices_unique_right_size_and_dtype(n, ratio, chunks, gen):
    learner, reference = model(n, 8, gen, 5.0), model(n, 8, gen, 5.0)
    idx = JointExampleSelector(n_chunks=chunks, filter_ratio=ratio).select(learner=learner, reference=reference)
    assert idx.dtype == torch.long and idx.device == learner[0].device
    assert idx.numel() == round((1 - ratio) * n) == idx.unique().numel()
    assert int(idx.min()) >= 0 and int(idx.max()) < n


def test_tensor_scales_and_bf16_inputs(gen):
    q, k, _ = model(60, 8, gen, 1.0)
    scale = torch.tensor(10.0, requires_grad=True)
    idx = JointExampleSelector(n_chunks=3).select(learner=(q.bfloat16(), k.bfloat16(), scale),
                                                   reference=(q.bfloat16(), k.bfloat16(), scale))
    assert idx.numel() == 12


def test_bad_input(gen):
    learner, reference = model(50, 8, gen, 5.0), model(50, 8, gen, 5.0)
    sel = JointExampleSelector(n_chunks=4)
    with pytest.raises(BatchlabInputError, match="smaller than the batch"):
        sel.select(learner=learner, reference=reference, batch_size=51)
    with pytest.raises(BatchlabInputError, match="n_chunks"):
        JointExampleSelector(n_chunks=16).select(learner=model(20, 8, gen, 5.0), reference=model(20, 8, gen, 5.0))
    with pytest.raises(BatchlabInputError, match="different super-batches"):
        sel.select(learner=learner, reference=model(40, 8, gen, 5.0))
    bad = learner[0].clone()
    bad[3, 2] = float("nan")
    with pytest.raises(BatchlabInputError, match="non-finite"):
        sel.select(learner=(bad, learner[1], 5.0), reference=reference)
    with pytest.raises(BatchlabInputError, match="logit_scale"):
        sel.select(learner=(learner[0], learner[1], float("nan")), reference=reference)
    with pytest.raises(BatchlabInputError, match="same shape"):
        sel.select(learner=(learner[0], learner[1][:40], 5.0), reference=reference)
    with pytest.raises(BatchlabInputError, match="needs the reference"):
        sel.select(learner=learner)
    with pytest.raises(BatchlabInputError, match="logit_bias"):
        JointExampleSelector(n_chunks=4, loss="siglip").select(learner=learner, reference=reference)
    with pytest.raises(BatchlabInputError, match="bf16"):
        JointExampleSelector(n_chunks=4, precision="bf16", impl="torch").select(learner=learner, reference=reference)
    with pytest.raises(BatchlabInputError, match="L2-normalised"):
        sel.select(learner=(learner[0] * 2, learner[1], 5.0), reference=reference)
    with pytest.raises(BatchlabInputError, match="tuple"):
        sel.select(learner=learner[0], reference=reference)
    for kwargs in ({"filter_ratio": 1.0}, {"score": "loss"}, {"loss": "dcl"}, {"n_chunks": 0},
                   {"first_chunk": "top"}, {"seed": -1}):
        with pytest.raises(BatchlabInputError):
            JointExampleSelector(**kwargs)


def _select_on_rank(rank, world):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(7)
    learner, reference = model(100, 8, g, 10.0), model(100, 8, g, 10.0)
    lo, hi = (0, 45) if rank == 0 else (45, 100)  # uneven shards
    shard = lambda m: (m[0][lo:hi], m[1][lo:hi], m[2])  # noqa: E731
    sel = JointExampleSelector(n_chunks=4, seed=11)
    glob = sel.select(learner=shard(learner), reference=shard(reference), group=dist.group.WORLD)
    local = sel.select(learner=shard(learner), reference=shard(reference), group=dist.group.WORLD,
                       return_local=True, step=0)
    return {"global": glob, "local": local}


@pytest.mark.distributed
def test_distributed_ranks_agree_with_single_process(gen):
    from tests.gloo import run_on_ranks

    res = run_on_ranks(_select_on_rank)
    assert torch.equal(res[0]["global"], res[1]["global"])
    g = torch.Generator().manual_seed(7)
    learner, reference = model(100, 8, g, 10.0), model(100, 8, g, 10.0)
    single = JointExampleSelector(n_chunks=4, seed=11).select(learner=learner, reference=reference)
    assert torch.equal(res[0]["global"], single)
    union = torch.cat([res[0]["local"], res[1]["local"]])
    assert union.numel() == single.numel() and torch.equal(union.sort().values, single.sort().values)
    assert res[0]["local"].numel() == res[1]["local"].numel() == 10
