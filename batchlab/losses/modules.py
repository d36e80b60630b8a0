"""``nn.Module`` wrappers whose call mirrors open_clip's loss classes.

``loss(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``
so they drop into open_clip's training loop (``loss(**model_out, output_dict=True)``).
Options set at construction are passed to the functional form on every call.

>>> import torch, torch.nn.functional as F
>>> loss_fn = InfoNCELoss(impl="reference")
>>> img, txt = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
>>> sorted(loss_fn(img, txt, torch.tensor(10.0), output_dict=True))
['contrastive_loss']
"""

from __future__ import annotations

import torch
from torch import nn

from batchlab.errors import BatchlabInputError
from batchlab.losses.dcl import dcl
from batchlab.losses.infonce import info_nce
from batchlab.losses.nt_xent import nt_xent
from batchlab.losses.siglip import siglip


class _PairLoss(nn.Module):
    """Shared open_clip-style call for losses over (image, text) feature pairs."""

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def _compute(self, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False, **kwargs):
        loss = self._compute(image_features, text_features, logit_scale, logit_bias, **kwargs)
        return {"contrastive_loss": loss} if output_dict else loss


class InfoNCELoss(_PairLoss):
    """Symmetric CLIP / InfoNCE loss; keyword options as :func:`~batchlab.losses.info_nce`.

    A drop-in for open_clip's ``ClipLoss``: ``InfoNCELoss()(img, txt, model.logit_scale.exp())``.
    """

    def __init__(self, *, symmetric: bool = True, **options) -> None:
        super().__init__(symmetric=symmetric, **options)

    def _compute(self, image_features, text_features, logit_scale, logit_bias, **kwargs):
        if logit_bias is not None:
            raise BatchlabInputError("InfoNCE has no logit bias; got logit_bias (did you mean SigLIPLoss?)")
        return info_nce(image_features, text_features, logit_scale, **{**self.options, **kwargs})


class SigLIPLoss(_PairLoss):
    """SigLIP's sigmoid loss; a drop-in for open_clip's ``SigLipLoss`` (needs ``logit_bias``)."""

    def _compute(self, image_features, text_features, logit_scale, logit_bias, **kwargs):
        if logit_bias is None:
            raise BatchlabInputError("SigLIPLoss needs logit_bias (the model's learnable bias, e.g. -10 at init)")
        return siglip(image_features, text_features, logit_scale, logit_bias, **{**self.options, **kwargs})


class DCLLoss(_PairLoss):
    """Decoupled contrastive loss (``weighted=True`` for DCLW); options as :func:`~batchlab.losses.dcl`."""

    def __init__(self, *, weighted: bool = False, sigma: float = 0.5, **options) -> None:
        super().__init__(weighted=weighted, sigma=sigma, **options)

    def _compute(self, image_features, text_features, logit_scale, logit_bias, **kwargs):
        if logit_bias is not None:
            raise BatchlabInputError("DCL has no logit bias; got logit_bias")
        return dcl(image_features, text_features, logit_scale, **{**self.options, **kwargs})


class NTXentLoss(_PairLoss):
    """NT-Xent (SimCLR). Call with two views ``loss(view0, view1, logit_scale)``, or with
    a (V, N, d) tensor and ``text_features=None`` for more views."""

    def _compute(self, image_features, text_features, logit_scale, logit_bias, **kwargs):
        if logit_bias is not None:
            raise BatchlabInputError("NT-Xent has no logit bias; got logit_bias")
        if text_features is None:
            views = image_features
        else:
            if not isinstance(text_features, torch.Tensor) or image_features.shape != text_features.shape:
                raise BatchlabInputError(
                    "NTXentLoss needs two views of the same shape (N, d); got "
                    f"{tuple(image_features.shape)} and {tuple(getattr(text_features, 'shape', ()))}"
                )
            views = torch.stack([image_features, text_features])
        return nt_xent(views, logit_scale, **{**self.options, **kwargs})
