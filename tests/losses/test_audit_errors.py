"""Audit of the losses' bad-input handling: each case once returned a silent wrong value (-inf, a loss
picked by a truthy string, NaN temperatures) or a bare Python/torch error; now it is a
``BatchlabInputError`` that names the argument, what it got and what it takes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchlab.errors import BatchlabInputError
from batchlab.losses import (
    EmbeddingCache,
    InfoNCELoss,
    ISogCLRLoss,
    NTXentLoss,
    RowBlocks,
    SigLIPLoss,
    SogCLRLoss,
    dcl,
    info_nce,
    nt_xent,
    row_block_info_nce,
    siglip,
    sogclr,
)


def _unit(*shape):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), dim=-1)


Q, K = _unit(4, 8), _unit(4, 8)
STATE = torch.full((2, 4), float("-inf"))


@pytest.mark.parametrize("impl", ["reference", "tiled"])
@pytest.mark.parametrize(
    "make,match",
    [
        # one pair, symmetric: the key->query direction has no negative (extra negatives are the query's)
        (lambda impl: dcl(Q[:1], K[:1], 10.0, extra_negatives=_unit(1, 3, 8), impl=impl), "symmetric=False"),
        # neg_mask leaves key 0 no negative in the key->query direction (every query keeps one)
        (lambda impl: dcl(Q, K, 10.0, neg_mask=torch.tensor([[1, 0], [2, 0], [3, 0]]), impl=impl),
         r"1 key\(s\) have no negative"),
    ],
    ids=["one-pair-extra", "neg-mask-column"],
)
def test_symmetric_dcl_with_a_key_without_negatives_is_refused(make, match, impl):
    with pytest.raises(BatchlabInputError, match=match):
        make(impl)


def test_one_way_dcl_of_one_pair_with_extra_negatives_still_runs():
    loss = dcl(Q[:1], K[:1], 10.0, symmetric=False, extra_negatives=_unit(1, 3, 8))
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda v: info_nce(Q, K, 10.0, symmetric=v), "symmetric"),
        (lambda v: info_nce(Q, K, 10.0, return_lse=v), "return_lse"),
        (lambda v: info_nce(Q, K, 10.0, normalize=v), "normalize"),
        (lambda v: siglip(Q, K, 10.0, -3.0, normalize=v), "normalize"),
        (lambda v: dcl(Q, K, 10.0, weighted=v), "weighted"),
        (lambda v: dcl(Q, K, 10.0, symmetric=v), "symmetric"),
        (lambda v: nt_xent(torch.stack([Q, K]), 2.0, return_lse=v), "return_lse"),
        (lambda v: sogclr(Q, K, log_u=STATE, tau=0.1, normalize=v), "normalize"),
    ],
    ids=["info_nce-symmetric", "info_nce-return_lse", "info_nce-normalize", "siglip-normalize", "dcl-weighted",
         "dcl-symmetric", "nt_xent-return_lse", "sogclr-normalize"],
)
@pytest.mark.parametrize("value", ["no", None, 1])
def test_on_off_options_take_bools_only(make, name, value):
    # symmetric="no" (truthy) ran the symmetric loss; return_lse="no" returned a tuple
    with pytest.raises(BatchlabInputError, match=f"{name} must be True or False, got {value!r}"):
        make(value)


@pytest.mark.parametrize("sigma", [float("inf"), True, "0.5", float("nan"), 0.0])
def test_dclw_sigma_is_a_finite_positive_number(sigma):
    with pytest.raises(BatchlabInputError, match="sigma .* must be a finite positive number"):
        dcl(Q, K, 10.0, weighted=True, sigma=sigma)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=Q.numpy()), "q is a ndarray"),
        (dict(keys=[[0.0] * 8] * 4), "keys is a list"),
        (dict(scale=torch.tensor([20.0, 10.0])), r"scale is one number; got a torch.float32 tensor of shape \(2,\)"),
        (dict(scale=torch.tensor(20)), "torch.int64 tensor"),
        (dict(scale="20"), "scale must be a float, got str"),
        (dict(scale=True), "scale must be a float, got bool"),
        (dict(config={"block_bytes": 64}), r"config must be a RowBlocks\(...\), got dict"),
        (dict(q=Q.masked_fill(Q > 0.4, float("nan"))), "q contains .* non-finite"),
        (dict(keys=K.masked_fill(K > 0.4, float("inf"))), "keys contains .* non-finite"),
    ],
    ids=["q-numpy", "keys-list", "scale-two", "scale-int-tensor", "scale-str", "scale-bool", "config-dict", "q-nan",
         "keys-inf"],
)
def test_row_block_info_nce_refuses_bad_input(kwargs, match):
    args = {"q": Q, "keys": K, "scale": 20.0, "config": RowBlocks()} | kwargs
    with pytest.raises(BatchlabInputError, match=match):
        row_block_info_nce(args["q"], args["keys"], args["scale"], config=args["config"])


def test_row_block_info_nce_takes_a_one_element_scale_tensor():
    want = row_block_info_nce(Q, K, 20.0)
    torch.testing.assert_close(row_block_info_nce(Q, K, torch.tensor([20.0])), want)


@pytest.mark.parametrize(
    "cls,options,match",
    [
        (SogCLRLoss, dict(tau=float("nan")), "tau must be a finite positive float, got nan"),
        (SogCLRLoss, dict(tau=float("inf")), "tau must be a finite positive float, got inf"),
        (ISogCLRLoss, dict(eta=float("nan")), "eta must be a finite number, got nan"),
        (ISogCLRLoss, dict(beta="0.9"), "beta must be a finite number, got '0.9'"),
        (ISogCLRLoss, dict(tau_max=float("inf")), "tau_max must be a finite number, got inf"),
        (ISogCLRLoss, dict(tau_min=True), "tau_min must be a finite number, got True"),
    ],
)
def test_sogclr_module_hyperparameters_are_finite_numbers(cls, options, match):
    # a NaN eta (or tau) was stored and turned every learnt temperature NaN at the first step
    with pytest.raises(BatchlabInputError, match=match):
        cls(10, **options)


@pytest.mark.parametrize("which", [0, 1])
def test_ntxent_module_refuses_a_view_that_is_not_a_tensor(which):
    views = [Q, K]
    views[which] = views[which].numpy()
    with pytest.raises(BatchlabInputError, match=r"two views, tensors of the same shape .* ndarray \(4, 8\)"):
        NTXentLoss()(*views, 2.0)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize(
    "scale,match",
    [
        (torch.tensor([1.0, 2.0, 3.0, 4.0]), r"one number; got a torch.float32 tensor of shape \(4,\)"),
        (torch.tensor(2), "torch.int64 tensor"),
        ("2", "takes a finite float or a one-element tensor, got '2'"),
        (True, "got True"),
        (float("nan"), "got nan"),
        (torch.tensor(float("inf")), "non-finite"),
    ],
    ids=["per-column", "int-tensor", "str", "bool", "nan", "inf-tensor"],
)
def test_embedding_cache_backward_scale_is_one_finite_number(scale, match, offload):
    # a (d,) scale silently scaled each embedding column of the cached gradients by its own factor
    towers = [nn.Linear(5, 4), nn.Linear(3, 4)]
    cache = EmbeddingCache(towers, chunk_size=3)
    a, b = cache.encode(torch.randn(8, 5), torch.randn(8, 3))
    (a * b).sum().backward()
    cache.keep_gradients(offload=offload)
    with pytest.raises(BatchlabInputError, match=match):
        cache.backward(scale=scale)
    cache.backward(scale=torch.tensor([[0.5]]))  # still pending after the refusal; one element in any shape
    assert towers[0].weight.grad is not None


def test_embedding_cache_options_are_bools():
    with pytest.raises(BatchlabInputError, match="restore_rng must be True or False, got 'no'"):
        EmbeddingCache(nn.Linear(3, 2), 4, restore_rng="no")


@pytest.mark.parametrize(
    "call",
    [
        lambda: InfoNCELoss()(Q, K, 10.0, output_dict="no"),
        lambda: SigLIPLoss()(Q, K, 10.0, -3.0, output_dict=1),
        lambda: SogCLRLoss(10)(Q, K, torch.arange(4), output_dict="no"),
    ],
    ids=["InfoNCELoss", "SigLIPLoss", "SogCLRLoss"],
)
def test_modules_output_dict_is_a_bool(call):
    # output_dict="no" (truthy) returned {"contrastive_loss": ...} where a tensor was asked for
    with pytest.raises(BatchlabInputError, match="output_dict must be True or False"):
        call()


@pytest.mark.parametrize("impl", ["reference", "tiled"])
@pytest.mark.parametrize("family", ["info_nce", "siglip", "dcl"])
def test_normalize_also_normalises_the_extra_negatives(family, impl):
    # normalize=True refused raw extra negatives on the CPU ("... or pass normalize=True") and used them
    # un-normalised where the data checks are off (CUDA's default)
    extra = 3 * _unit(4, 2, 8)
    raw = extra.clone().requires_grad_()
    unit = F.normalize(extra, dim=-1).requires_grad_()

    def loss(e, normalize):
        q, k = (2 * Q, 2 * K) if normalize else (Q, K)
        if family == "siglip":
            return siglip(q, k, 10.0, -3.0, extra_negatives=e, normalize=normalize, impl=impl)
        fn = info_nce if family == "info_nce" else dcl
        return fn(q, k, 10.0, extra_negatives=e, normalize=normalize, impl=impl)

    got, want = loss(raw, True), loss(unit, False)
    torch.testing.assert_close(got, want)
    (g_raw,), (g_unit,) = torch.autograd.grad(got, [raw]), torch.autograd.grad(want, [unit])
    # the chain rule through the normalisation: the unit-sphere tangent part, divided by the norm (3)
    tangent = g_unit - (g_unit * unit.detach()).sum(-1, keepdim=True) * unit.detach()
    torch.testing.assert_close(g_raw, tangent / 3)
    with pytest.raises(BatchlabInputError, match="extra_negatives rows must be L2-normalised"):
        loss(raw, False)  # without normalize=True they are still checked


def test_row_blocks_fused_without_a_triton_device_is_refused(monkeypatch):
    # on a CPU without TRITON_INTERPRET=1 the kernel launch failed inside Triton ("0 active drivers")
    from batchlab.losses import row_blocks

    monkeypatch.setattr(row_blocks, "fused_available", lambda device: False)
    with pytest.raises(BatchlabInputError, match=r"RowBlocks\(fused=True\) .* needs Triton and a CUDA device"):
        row_block_info_nce(Q, K, 20.0, config=RowBlocks(fused=True))
    assert torch.isfinite(row_block_info_nce(Q, K, 20.0, config=RowBlocks(fused=None)))  # automatic: PyTorch ops
