"""open_clip's ``ClipLoss`` and ``SigLipLoss``, exactly, on batchlab's losses.

Change ``from open_clip.loss import ClipLoss`` to ``from batchlab.compat.open_clip import
ClipLoss`` and nothing else: same constructor (positional order, names, defaults), same
call, same values and gradients, in one process and under ``torch.distributed`` with
``rank``/``world_size`` given as open_clip takes them. Checked against open_clip 3.3.0
(tests/compat/test_open_clip.py runs open_clip itself).

What batchlab's own API (:class:`batchlab.losses.InfoNCELoss`, ``info_nce``) does
differently, on purpose:

* open_clip's ``gather_with_grad=False`` (its default) keeps gradients only for the
  local slice of the gathered features, so each rank's embedding gradient is the
  global loss's gradient *once*, while ``gather_with_grad=True`` gives it W times;
  and ``local_loss=True, gather_with_grad=False`` drops the cross-rank terms of the
  gradient altogether. batchlab's ``distributed=`` strategies always give every rank
  W times the global gradient (what DDP's averaging needs to reproduce one process).
* open_clip accepts features of any norm; batchlab's losses check unit rows (or
  ``normalize=True``). Here features of any norm are mapped exactly onto unit rows
  (:func:`batchlab.compat._features.lift_to_unit`), so the logits are open_clip's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from batchlab.compat._features import (
    UNIT_TOL,
    autocast_pair,
    lift_to_unit,
    max_row_norm,
    needs_lift,
    peer_result_dtype,
)
from batchlab.errors import BatchlabInputError
from batchlab.losses import info_nce, siglip
from batchlab.losses.distributed.strategies import gather_sizes, gather_with_grad

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _horovod():
    """``horovod.torch`` (open_clip's ``use_horovod=True`` gathers with it)."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise BatchlabInputError("use_horovod=True needs horovod: pip install horovod") from exc
    return hvd


def _check_world(name: str, rank: int, world_size: int, x: torch.Tensor, hvd=None):
    """The process group (Horovod's world with ``hvd``) open_clip's ``rank``/``world_size``
    describe; error if they disagree. Returns every rank's batch size."""
    if hvd is not None:  # open_clip's Horovod path needs no torch.distributed group
        actual, where = (hvd.size(), hvd.rank()), "Horovod's world"
    else:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise BatchlabInputError(
                f"{name}(world_size={world_size}) needs an initialised torch.distributed process group "
                "(open_clip gathers over it too); call torch.distributed.init_process_group first"
            )
        actual, where = (dist.get_world_size(), dist.get_rank()), "the process group"
    if actual != (world_size, rank):
        raise BatchlabInputError(
            f"{name} was built with rank={rank}, world_size={world_size} but {where} has "
            f"rank {actual[1]} of {actual[0]}; pass its values"
        )
    if hvd is not None:
        sizes = [int(s) for s in hvd.allgather(torch.tensor([x.shape[0]], device=x.device)).tolist()]
    else:
        sizes = gather_sizes(x.shape[0], x.device)
    if len(set(sizes)) != 1:
        raise BatchlabInputError(
            f"{name} (like open_clip) needs the same batch size on every rank, got {sizes}; "
            "drop the last uneven batch (drop_last=True)"
        )
    return sizes


def _scaled_pair(q: torch.Tensor, k: torch.Tensor, scale, lift: bool):
    """``(q', k', scale')`` with unit rows and the same logits ``scale' * q' @ k'.T``."""
    if not lift:
        return q, k, scale
    rq, rk = max_row_norm(q), max_row_norm(k)
    u, v = lift_to_unit(q, k, rq, rk)
    return u, v, scale * (rq * rk)


def _with_bias_grad(loss: torch.Tensor, logit_bias) -> torch.Tensor:
    """A constant bias on every logit leaves cross-entropy unchanged (gradient 0), but the
    bias still gets its (zero) gradient, as in open_clip."""
    if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
        return loss + 0 * logit_bias.sum()
    return loss


class ClipLoss(nn.Module):
    """open_clip's CLIP loss: ``ClipLoss(local_loss, gather_with_grad, cache_labels, rank,
    world_size, use_horovod)(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)``.

    Parameters
    ----------
    local_loss : bool
        With ``world_size > 1``: each rank's loss covers its own rows (images and texts)
        against the gathered columns (labels offset by ``rank * n``); else every rank
        computes the full global loss.
    gather_with_grad : bool
        Gather with gradient (``torch.distributed.nn.all_gather``). Without it, the
        gathered features carry no gradient except this rank's own slice (replaced by
        the local tensor, global loss only), open_clip's default.
    cache_labels : bool
        Accepted (open_clip caches the label tensor; the values do not change).
    rank, world_size : int
        This process's rank and the world size; ``world_size > 1`` needs an initialised
        process group that agrees with them.
    use_horovod : bool
        Gather with Horovod instead (needs ``horovod.torch`` and ``hvd.init()``, no
        torch.distributed group; ``rank``/``world_size`` are checked against Horovod's).

    Call: ``image_features`` (n, d), ``text_features`` (n, d) of any norm (under
    autocast they may differ in dtype), ``logit_scale`` the multiplier
    (``model.logit_scale.exp()``), ``logit_bias`` optional, one element (added to every
    logit: no effect on the value; a per-logit bias is refused). Returns the loss, or
    ``{"contrastive_loss": loss}``. Features may be fp64, as in open_clip.

    batchlab's own :class:`~batchlab.losses.InfoNCELoss` differs: keyword options,
    unit-norm features, and ``distributed=`` with exact (W x) gradients on every rank
    instead of open_clip's ``gather_with_grad=False`` convention (module docstring).

    Examples
    --------
    >>> import torch
    >>> loss = ClipLoss()(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(10.0))
    >>> loss.shape
    torch.Size([])
    """

    def __init__(
        self,
        local_loss=False,
        gather_with_grad=False,
        cache_labels=False,
        rank=0,
        world_size=1,
        use_horovod=False,
    ):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def _gather(self, x: torch.Tensor, sizes: list[int], hvd=None) -> torch.Tensor:
        """open_clip's ``gather_features`` for one tensor (with Horovod's ``hvd.allgather`` if given)."""
        if hvd is not None:
            gather = hvd.allgather
        else:
            def gather(t):
                return gather_with_grad(t, None, sizes)
        if self.gather_with_grad:
            return gather(x)
        with torch.no_grad():
            everything = gather(x.detach())
        if self.local_loss:
            return everything
        # the local slice keeps its gradient: open_clip puts the local tensor back in place
        start = self.rank * x.shape[0]
        return torch.cat([everything[:start], x, everything[start + x.shape[0]:]])

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        img, txt = autocast_pair(image_features, text_features, ("image_features", "text_features"))
        if isinstance(logit_bias, torch.Tensor) and logit_bias.numel() != 1:
            # a bias that varies over the logits changes the cross-entropy: no InfoNCE form
            raise BatchlabInputError(
                f"ClipLoss takes a scalar logit_bias (one element, as open_clip's models return), got shape "
                f"{tuple(logit_bias.shape)}; use open_clip's ClipLoss for a per-logit bias"
            )
        if self.world_size > 1:
            hvd = _horovod() if self.use_horovod else None
            sizes = _check_world("ClipLoss", self.rank, self.world_size, img, hvd)
            all_img, all_txt = self._gather(img, sizes, hvd), self._gather(txt, sizes, hvd)
            lift = bool(needs_lift(img, txt, all_img, all_txt) > UNIT_TOL)
            if self.local_loss:
                n = img.shape[0]
                targets = torch.arange(n, device=img.device) + n * self.rank
                loss = (self._one_way(img, all_txt, logit_scale, targets, lift)
                        + self._one_way(txt, all_img, logit_scale, targets, lift)) / 2
            else:
                loss = info_nce(*_scaled_pair(all_img, all_txt, logit_scale, lift))
        else:
            lift = bool(needs_lift(img, txt) > UNIT_TOL)
            loss = info_nce(*_scaled_pair(img, txt, logit_scale, lift))
        loss = _with_bias_grad(loss, logit_bias).to(peer_result_dtype(img))
        return {"contrastive_loss": loss} if output_dict else loss

    @staticmethod
    def _one_way(q, k, scale, targets, lift):
        return info_nce(*_scaled_pair(q, k, scale, lift), symmetric=False, targets=targets)


class SigLipLoss(nn.Module):
    """open_clip's SigLIP loss: ``SigLipLoss(cache_labels=False, rank=0, world_size=1,
    dist_impl=None)(image_features, text_features, logit_scale, logit_bias, output_dict=False)``.

    The loss is ``-sum_ij log sigmoid(y_ij (s q_i.k_j + b)) / n`` over this rank's images
    and every rank's texts (y = +1 on the diagonal of the local block). ``dist_impl``
    ("bidir", default; "shift", "reduce", "gather") names open_clip's exchange; all four
    give the same values and gradients, and here they map to batchlab's distributed
    strategies: ``"bidir"``/``"shift"`` to its ring (texts travel rank to rank, never
    all held at once), ``"reduce"``/``"gather"`` to its all-gather.

    batchlab's own :class:`~batchlab.losses.SigLIPLoss` differs only in taking keyword
    options, unit-norm features and the process group instead of ``rank``/``world_size``;
    its distributed gradients follow the same convention as open_clip's SigLIP.

    Examples
    --------
    >>> import torch
    >>> loss = SigLipLoss()(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(10.0), torch.tensor(-10.0))
    >>> loss.shape
    torch.Size([])
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: Optional[str] = None,
    ):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in DIST_IMPLS:
            raise BatchlabInputError(f"dist_impl must be one of {DIST_IMPLS} (or None), got {dist_impl!r}")

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        img, txt = autocast_pair(image_features, text_features, ("image_features", "text_features"))
        if logit_bias is None:
            raise BatchlabInputError("SigLipLoss needs logit_bias (open_clip's model returns it with the features)")
        distributed = "none"
        deviation, rq, rk = needs_lift(img, txt), max_row_norm(img), max_row_norm(txt)
        if self.world_size > 1:
            _check_world("SigLipLoss", self.rank, self.world_size, img)
            distributed = "ring" if self.dist_impl in ("bidir", "shift") else "allgather"
            # every rank must lift (or not) alike, with the same norm bounds
            stats = torch.stack([deviation.to(rq.dtype), rq, rk.to(rq.dtype)])
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
            deviation, rq, rk = stats
        if bool(deviation > UNIT_TOL):
            img, txt = lift_to_unit(img, txt, rq, rk)
            logit_scale = logit_scale * (rq * rk)
        loss = siglip(img, txt, logit_scale, logit_bias, distributed=distributed).to(peer_result_dtype(img))
        return {"contrastive_loss": loss} if output_dict else loss
