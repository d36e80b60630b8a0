"""Every public signature refuses an unknown keyword (TypeError or BatchlabInputError).

The walk covers ``batchlab.__all__``, ``batchlab.losses.__all__``,
``batchlab.samplers.__all__`` and the compat classes: each function, each class's
constructor and its public methods. A signature without ``**kwargs`` refuses an
unknown keyword by construction (Python's own binding, checked with ``bind_partial``);
one with ``**kwargs`` must have an entry in ``CALLS`` below that calls it with valid
inputs plus an unknown keyword and sees it refused. A new public ``**kwargs`` without
an entry fails the walk.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F

import batchlab
from batchlab.errors import BatchlabInputError

BOGUS = "zz_not_an_option"
COMPAT = {
    "open_clip": ("ClipLoss", "SigLipLoss"),
    "torchcfm": ("OTPlanSampler",),
    "lightly": ("NTXentLoss", "DCLLoss", "DCLWLoss"),
    "pytorch_metric_learning": ("NTXentLoss",),
}


def _public_objects():
    seen, out = set(), []
    for mod in (batchlab, batchlab.losses, batchlab.samplers):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or (isinstance(obj, type) and issubclass(obj, BaseException)):
                continue
            if id(obj) not in seen:
                seen.add(id(obj))
                out.append((name, obj))
    for module, names in COMPAT.items():
        mod = importlib.import_module(f"batchlab.compat.{module}")
        out += [(f"compat.{module}.{n}", getattr(mod, n)) for n in names]
    return out


def _signatures():
    """(qualified name, signature) of every public function, constructor and public method."""
    out = []
    for name, obj in _public_objects():
        if not isinstance(obj, type):
            out.append((name, inspect.signature(obj)))
            continue
        out.append((f"{name}()", inspect.signature(obj)))
        methods = {}
        for klass in reversed(obj.__mro__):  # batchlab's own methods, inherited ones included
            if klass.__module__.startswith("batchlab"):
                methods.update(vars(klass))
        for attr, member in methods.items():
            if attr.startswith("_") and attr != "__call__":
                continue
            fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            if inspect.isfunction(fn):
                out.append((f"{name}.{attr}", inspect.signature(fn)))
    return out


def _unit(n=4, d=8):
    return F.normalize(torch.randn(n, d), dim=1)


def _community_from_artifacts(monkeypatch, tmp_path):
    import numpy as np

    from batchlab.samplers import CommunityBatchSampler, communities

    meta = {"group_size": 2, "rank_window": (1, 3), "method": "greedy"}
    groups = np.arange(8).reshape(4, 2)
    monkeypatch.setattr(communities, "load_artifacts", lambda directory, embeddings=None: (meta, groups, None))
    CommunityBatchSampler.from_artifacts(tmp_path, 4, **{BOGUS: 1})


def _reference_cache(method):
    def call(monkeypatch, tmp_path):
        from batchlab.samplers import ReferenceEmbeddingCache

        cache = ReferenceEmbeddingCache(tmp_path, "h", num_examples=4, fields={"emb": 3})
        if method == "put":
            cache.put(torch.arange(2), **{BOGUS: torch.zeros(2, 3)})
        else:
            cache.get_or_compute(torch.arange(2), lambda ids: {"emb": torch.zeros(len(ids), 3)}, **{BOGUS: 1})
    return call


def _sharded_state_dict(monkeypatch, tmp_path):
    from batchlab.samplers import GlobalBatchSampler, ShardedBatchSampler

    class Fixed(GlobalBatchSampler):  # the smallest batchlab sampler: the state_dict it forwards to
        def plan_epoch(self, generator):
            return [[0, 1], [2, 3]]

    ShardedBatchSampler(Fixed(batch_size=2), num_replicas=1, rank=0).state_dict(**{BOGUS: 1})


def _loss_module(cls_name, positional=()):
    def call(monkeypatch, tmp_path):
        cls = getattr(batchlab.losses, cls_name)
        with pytest.raises((TypeError, BatchlabInputError)):
            cls(**{BOGUS: 1})
        cls()(_unit(), _unit(), 10.0, *positional, **{BOGUS: 1})
    return call


#: calls that reach each public ``**kwargs`` with valid inputs and an unknown keyword
CALLS = {
    "info_nce": lambda mp, tp: batchlab.info_nce(_unit(), _unit(), 10.0, **{BOGUS: 1}),
    "siglip": lambda mp, tp: batchlab.siglip(_unit(), _unit(), 10.0, -10.0, **{BOGUS: 1}),
    "dcl": lambda mp, tp: batchlab.dcl(_unit(), _unit(), 10.0, **{BOGUS: 1}),
    "nt_xent": lambda mp, tp: batchlab.nt_xent(torch.stack([_unit(), _unit()]), 2.0, **{BOGUS: 1}),
    "InfoNCELoss()": _loss_module("InfoNCELoss"),
    "InfoNCELoss.forward": _loss_module("InfoNCELoss"),
    "SigLIPLoss()": _loss_module("SigLIPLoss", (-10.0,)),
    "SigLIPLoss.forward": _loss_module("SigLIPLoss", (-10.0,)),
    "DCLLoss()": _loss_module("DCLLoss"),
    "DCLLoss.forward": _loss_module("DCLLoss"),
    "NTXentLoss()": _loss_module("NTXentLoss"),
    "NTXentLoss.forward": _loss_module("NTXentLoss"),
    "sogclr": lambda mp, tp: batchlab.losses.sogclr(
        _unit(), _unit(), log_u=torch.full((2, 4), float("-inf")), tau=0.1, **{BOGUS: 1}),
    "SogCLRLoss()": lambda mp, tp: batchlab.losses.SogCLRLoss(8, **{BOGUS: 1}),
    "ISogCLRLoss()": lambda mp, tp: batchlab.losses.ISogCLRLoss(8, **{BOGUS: 1}),
    "cached_step": lambda mp, tp: batchlab.losses.cached_step(
        lambda x: x, [torch.randn(4, 3)], lambda a: a.sum(), 2, **{BOGUS: 1}),
    "CommunityBatchSampler.from_artifacts": _community_from_artifacts,
    "MixedBatchSampler()": lambda mp, tp: batchlab.samplers.MixedBatchSampler(None, 8, batch_size=2, **{BOGUS: 1}),
    "ReferenceEmbeddingCache.put": _reference_cache("put"),
    "ReferenceEmbeddingCache.get_or_compute": _reference_cache("get_or_compute"),
    "ShardedBatchSampler.state_dict": _sharded_state_dict,
    "couple_global": lambda mp, tp: batchlab.samplers.couple_global(
        torch.randn(4, 2), torch.randn(4, 2), **{BOGUS: 1}),
    "compat.pytorch_metric_learning.NTXentLoss()": lambda mp, tp: importlib.import_module(
        "batchlab.compat.pytorch_metric_learning").NTXentLoss(**{BOGUS: 1}),
    # batchlab's own OTPlanSampler keeps couple()'s options for the first solve: refused there
    "OTPlanSampler()": lambda mp, tp: batchlab.samplers.OTPlanSampler(**{BOGUS: 1}).sample_plan(
        torch.randn(4, 2), torch.randn(4, 2)),
}


@pytest.mark.parametrize("name,sig", _signatures(), ids=lambda x: x if isinstance(x, str) else "")
def test_unknown_keyword_is_refused(name, sig, monkeypatch, tmp_path):
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    if not takes_any:
        with pytest.raises(TypeError):
            sig.bind_partial(**{BOGUS: 1})
        return
    assert name in CALLS, f"{name}{sig} takes **kwargs: add a call to CALLS that shows an unknown keyword is refused"
    with pytest.raises((TypeError, BatchlabInputError), match=BOGUS):
        CALLS[name](monkeypatch, tmp_path)


def test_every_call_entry_is_public():
    names = {name for name, _ in _signatures()}
    assert set(CALLS) <= names, sorted(set(CALLS) - names)


@pytest.mark.parametrize("impl", ["auto", "reference", "tiled"])
def test_temperature_gets_a_hint(impl):
    q, k = _unit(), _unit()
    with pytest.raises(BatchlabInputError, match=r"logit_scale=1/temperature"):
        batchlab.info_nce(q, k, 10.0, temperature=0.01, impl=impl)
    # an option of another backend is still dropped under auto (the reference has no tiles)
    if impl == "auto":
        torch.testing.assert_close(batchlab.info_nce(q, k, 10.0, tile_size=2), batchlab.info_nce(q, k, 10.0))


def test_open_clip_options_point_at_compat():
    for cls in (batchlab.InfoNCELoss, batchlab.SigLIPLoss, batchlab.DCLLoss, batchlab.NTXentLoss):
        with pytest.raises(BatchlabInputError, match="batchlab.compat.open_clip.ClipLoss"):
            cls(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=2)
        with pytest.raises(BatchlabInputError, match="batchlab.compat.open_clip.ClipLoss"):
            cls(False, False, True, 0, 1, False)
    with pytest.raises(BatchlabInputError, match="logit_scale=1/temperature"):
        batchlab.NTXentLoss(temperature=0.1)
    with pytest.raises(BatchlabInputError, match="batchlab.compat.lightly"):
        batchlab.NTXentLoss()(_unit(), _unit())
