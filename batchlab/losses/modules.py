"""``nn.Module`` wrappers whose call mirrors open_clip's loss classes.

``loss(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``
so they drop into open_clip's training loop (``loss(**model_out, output_dict=True)``).
Options set at construction are passed to the functional form on every call; they
are checked when the module is built, so an option of another library (open_clip's
``local_loss``, lightly's ``temperature``) fails at once, with the way to say it here
(the peers' own constructors live in :mod:`batchlab.compat`).

>>> import torch, torch.nn.functional as F
>>> loss_fn = InfoNCELoss(impl="reference")
>>> img, txt = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
>>> sorted(loss_fn(img, txt, torch.tensor(10.0), output_dict=True))
['contrastive_loss']
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from batchlab.errors import BatchlabInputError
from batchlab.losses import _dispatch
from batchlab._checks import check_flags
from batchlab.losses.dcl import dcl
from batchlab.losses.infonce import info_nce
from batchlab.losses.nt_xent import nt_xent
from batchlab.losses.siglip import siglip

#: Constructor arguments of the peers' classes, and where a porting user finds them.
_OPEN_CLIP = "batchlab.compat.open_clip.ClipLoss / SigLipLoss (open_clip's constructor, exactly)"
_LIGHTLY = "batchlab.compat.lightly (lightly's NTXentLoss / DCLLoss / DCLWLoss, exactly)"
_PEER_OPTIONS = {
    "local_loss": _OPEN_CLIP,
    "gather_with_grad": _OPEN_CLIP,
    "cache_labels": _OPEN_CLIP,
    "rank": _OPEN_CLIP,
    "world_size": _OPEN_CLIP,
    "use_horovod": _OPEN_CLIP,
    "dist_impl": _OPEN_CLIP,
    "memory_bank_size": _LIGHTLY,
    "gather_distributed": _LIGHTLY,
    "weight_fn": _LIGHTLY,
}
_PEER_FIXES = {
    "temperature": "batchlab's losses take the multiplier: pass logit_scale=1/temperature to the call",
    "local_loss": "batchlab's own losses take distributed='allgather' | 'ring' | 'auto' and the process group",
    "gather_with_grad": "batchlab's distributed strategies always gather with gradient (exact DDP gradients)",
    "world_size": "batchlab reads the world size and rank from the process group (group=)",
    "rank": "batchlab reads the world size and rank from the process group (group=)",
    "gather_distributed": "batchlab's own losses take distributed='allgather'",
}


class _PairLoss(nn.Module):
    """Shared open_clip-style call for losses over (image, text) feature pairs."""

    #: the functional form the module calls (its keyword options are the module's options)
    _fn: Callable
    _family: str

    def __init__(self, *args, **options) -> None:
        super().__init__()
        name = type(self).__name__
        if args:
            raise BatchlabInputError(
                f"{name} takes keyword options only, got {len(args)} positional argument(s); positional "
                f"(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod) are open_clip's "
                f"ClipLoss arguments: use {_OPEN_CLIP}"
            )
        self._check_options(name, options)
        self.options = options

    @classmethod
    def _check_options(cls, name: str, options: dict) -> None:
        """Refuse an option the functional form (or every backend of its family) does not take."""
        params = inspect.signature(cls._fn).parameters
        takes = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        for key in options:
            if key in takes:
                continue
            if key in _PEER_OPTIONS or key == "temperature":
                where = f" The peer's constructor is {_PEER_OPTIONS[key]}." if key in _PEER_OPTIONS else ""
                fix = f" {_PEER_FIXES[key]}." if key in _PEER_FIXES else ""
                raise BatchlabInputError(f"{name} does not take {key}=.{fix}{where}")
        backend = {k: v for k, v in options.items() if k not in takes}
        reference = _dispatch.resolve(cls._family, "reference", 1, 1, torch.device("cpu"))
        try:
            _dispatch.accepted_options(reference, backend, "auto")
        except BatchlabInputError as exc:
            raise BatchlabInputError(
                f"{name}: {exc}; its options are {sorted(takes)} and the backend options"
            ) from None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def _compute(self, image_features, text_features, logit_scale, logit_bias, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, image_features, text_features=None, logit_scale=None, logit_bias=None, output_dict=False,
                **kwargs):
        if logit_scale is None:
            raise BatchlabInputError(
                f"{type(self).__name__} needs logit_scale (the multiplier, 1/temperature; open_clip's "
                "logit_scale.exp()); a call without it, loss(z0, z1), is lightly's: use " + _LIGHTLY
            )
        self._check_options(type(self).__name__, kwargs)
        check_flags(output_dict=output_dict)  # "no" would return the dict
        loss = self._compute(image_features, text_features, logit_scale, logit_bias, **kwargs)
        return {"contrastive_loss": loss} if output_dict else loss


class InfoNCELoss(_PairLoss):
    """Symmetric CLIP / InfoNCE loss; keyword options as :func:`~batchlab.losses.info_nce`.

    Takes open_clip's *call* (``InfoNCELoss()(img, txt, model.logit_scale.exp())``) but
    not ``ClipLoss``'s constructor: under DDP batchlab's ``distributed=`` strategies give
    exact single-process gradients, and features must be unit-norm (``normalize=True``
    otherwise). For open_clip's exact constructor and conventions (``local_loss``,
    ``gather_with_grad=False``'s gradients) use :class:`batchlab.compat.open_clip.ClipLoss`.
    """

    _fn = staticmethod(info_nce)
    _family = "info_nce"

    def __init__(self, *args, symmetric: bool = True, **options) -> None:
        super().__init__(*args, symmetric=symmetric, **options)

    def _compute(self, image_features, text_features, logit_scale, logit_bias, **kwargs):
        if logit_bias is not None:
            raise BatchlabInputError("InfoNCE has no logit bias; got logit_bias (did you mean SigLIPLoss?)")
        return info_nce(image_features, text_features, logit_scale, **{**self.options, **kwargs})


class SigLIPLoss(_PairLoss):
    """SigLIP's sigmoid loss with open_clip's call (needs ``logit_bias``).

    For ``SigLipLoss``'s constructor (``cache_labels, rank, world_size, dist_impl``) use
    :class:`batchlab.compat.open_clip.SigLipLoss`; here ``distributed=`` picks the strategy.
    """

    _fn = staticmethod(siglip)
    _family = "siglip"

    def _compute(self, image_features, text_features, logit_scale, logit_bias, **kwargs):
        if logit_bias is None:
            raise BatchlabInputError("SigLIPLoss needs logit_bias (the model's learnable bias, e.g. -10 at init)")
        return siglip(image_features, text_features, logit_scale, logit_bias, **{**self.options, **kwargs})


class DCLLoss(_PairLoss):
    """Decoupled contrastive loss (``weighted=True`` for DCLW); options as :func:`~batchlab.losses.dcl`.

    batchlab's DCL is the image-text form (each query's negatives are the other view's
    keys); lightly's ``DCLLoss``/``DCLWLoss`` use SimCLR's 2N-2 negatives (both views) and
    take ``temperature``: :class:`batchlab.compat.lightly.DCLLoss` reproduces them.
    """

    _fn = staticmethod(dcl)
    _family = "dcl"

    def __init__(self, *args, weighted: bool = False, sigma: float = 0.5, **options) -> None:
        super().__init__(*args, weighted=weighted, sigma=sigma, **options)

    def _compute(self, image_features, text_features, logit_scale, logit_bias, **kwargs):
        if logit_bias is not None:
            raise BatchlabInputError("DCL has no logit bias; got logit_bias")
        return dcl(image_features, text_features, logit_scale, **{**self.options, **kwargs})


class NTXentLoss(_PairLoss):
    """NT-Xent (SimCLR). Call with two views ``loss(view0, view1, logit_scale)``, or with
    a (V, N, d) tensor and ``text_features=None`` for more views.

    With more than two views batchlab averages an anchor's positives in one term
    (poly-view "L_out"); pytorch-metric-learning makes one term per positive pair, and
    lightly takes ``temperature`` and normalises for you: see
    :mod:`batchlab.compat.pytorch_metric_learning` and :mod:`batchlab.compat.lightly`.
    """

    _fn = staticmethod(nt_xent)
    _family = "nt_xent"

    def _compute(self, image_features, text_features, logit_scale, logit_bias, **kwargs):
        if logit_bias is not None:
            raise BatchlabInputError("NT-Xent has no logit bias; got logit_bias")
        if text_features is None:
            views = image_features
        else:
            if (not isinstance(image_features, torch.Tensor) or not isinstance(text_features, torch.Tensor)
                    or image_features.shape != text_features.shape):
                raise BatchlabInputError(
                    "NTXentLoss needs two views, tensors of the same shape (N, d); got "
                    f"{type(image_features).__name__} {tuple(getattr(image_features, 'shape', ()))} and "
                    f"{type(text_features).__name__} {tuple(getattr(text_features, 'shape', ()))}"
                )
            views = torch.stack([image_features, text_features])
        return nt_xent(views, logit_scale, **{**self.options, **kwargs})
