"""lightly's ``NTXentLoss``, ``DCLLoss`` and ``DCLWLoss``, exactly, on batchlab's losses.

Change ``from lightly.loss import NTXentLoss`` to ``from batchlab.compat.lightly import
NTXentLoss``: same constructor (``temperature``, ``memory_bank_size``,
``gather_distributed``; ``weight_fn``; ``sigma``), same call ``loss(out0, out1)`` on
unnormalised projections, same values and gradients in one process and with
``gather_distributed=True`` under ``torch.distributed``. Checked against lightly 1.6.0
(tests/compat/test_lightly.py runs lightly itself).

What batchlab's own API does differently, on purpose:

* it takes the multiplier ``logit_scale = 1 / temperature`` and unit-norm embeddings
  (``normalize=True`` to let it normalise);
* its :func:`batchlab.losses.dcl` is the image-text form: query i's negatives are the
  *other* view's keys (N-1), while lightly's DCL is SimCLR's: both views, 2N-2
  negatives per anchor (here: :func:`batchlab.losses.dcl` over the 2N embeddings with the
  anchor itself masked);
* DCLW's weights under ``distributed=`` are computed over the global batch, lightly's
  over each rank's local batch (reproduced here).

One deliberate difference from lightly: with a single example (N = 1) DCL has no
negative at all and lightly returns ``-inf``; this raises a
:class:`~batchlab.errors.BatchlabInputError` instead.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from batchlab._checks import check_nonzero_rows
from batchlab.compat._features import peer_result_dtype
from batchlab.errors import BatchlabInputError
from batchlab.losses import dcl, info_nce, nt_xent
from batchlab.losses.dcl import dclw_weights


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _check_distributed_available(gather_distributed: bool) -> None:
    if gather_distributed and not torch.distributed.is_available():
        raise BatchlabInputError(
            "gather_distributed is True but torch.distributed is not available. Please set "
            "gather_distributed=False or install a torch version with distributed support."
        )


def _peer_call(loss_fn, out0: Tensor, out1: Tensor) -> Tensor:
    """``loss_fn(out0, out1)`` in the peer's result dtype; when batchlab refuses the normalised rows,
    a zero row of the input (lightly keeps it at zero, batchlab's unit rows cannot) is named first."""
    try:
        return loss_fn(out0, out1).to(peer_result_dtype(out0))
    except BatchlabInputError:
        check_nonzero_rows("out0", out0)
        check_nonzero_rows("out1", out1)
        raise


def _weights(w, n: int, dtype: torch.dtype) -> Tensor:
    """``weight_fn``'s output as (n,) weights: lightly multiplies its (n,) positive term by it."""
    w = torch.as_tensor(w)
    if w.dim() > 1 or w.numel() not in (1, n):
        raise BatchlabInputError(
            f"weight_fn must return one weight per example, shape ({n},) (or a scalar), got {tuple(w.shape)}"
        )
    return w.to(dtype).expand(n)


class MemoryBank(nn.Module):
    """lightly's ``MemoryBankModule`` (a FIFO queue of past ``out1`` projections).

    ``size`` is 0 (no bank) or ``(num_features, dim)``; the bank starts as normalised
    ``torch.randn(size)`` drawn at construction (so a seeded run gets lightly's bank).
    """

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False) -> None:
        super().__init__()
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if any(x < 0 for x in size_tuple):
            raise BatchlabInputError(f"Illegal memory bank size {size}, all entries must be non-negative.")
        if isinstance(size, int) and size > 0:
            raise BatchlabInputError(
                f"Memory bank size 'size={size}' does not specify the feature dimension. Set it with "
                f"'size=({size}, dim)', or pass 'size=0' to disable the memory bank."
            )
        if size_tuple != (0,) and len(size_tuple) != 2:
            raise BatchlabInputError(
                f"Illegal memory bank size {size}, expected a (num_features, dim) tuple, or 'size=0' to "
                "disable the memory bank."
            )
        self.size = size_tuple
        self.gather_distributed = gather_distributed
        self.register_buffer("bank", torch.empty(size_tuple, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.empty(1, dtype=torch.long), persistent=False)
        if len(size_tuple) > 1:
            with torch.no_grad():
                self.bank = nn.functional.normalize(torch.randn(size_tuple).type_as(self.bank), dim=-1)
                self.bank_ptr = torch.zeros(1).type_as(self.bank_ptr)

    @property
    def enabled(self) -> bool:
        return self.size[0] != 0

    def read_and_update(self, batch: Tensor, update: bool) -> Tensor:
        """The bank's rows (num_features, dim) before this batch; then enqueue ``batch``."""
        rows = self.bank.clone().detach()
        if update:
            self._enqueue(batch)
        return rows

    @torch.no_grad()
    def _enqueue(self, batch: Tensor) -> None:
        world, _ = _world()
        if self.gather_distributed and world > 1:
            parts = [torch.empty_like(batch) for _ in range(world)]
            torch.distributed.all_gather(parts, batch.contiguous())
            batch = torch.cat(parts)
        n, ptr = batch.shape[0], int(self.bank_ptr)
        if ptr + n >= self.size[0]:
            self.bank[ptr:] = batch[: self.size[0] - ptr].detach()
            self.bank_ptr.zero_()
        else:
            self.bank[ptr: ptr + n] = batch.detach()
            self.bank_ptr[0] = ptr + n


class NTXentLoss(nn.Module):
    """lightly's NT-Xent (SimCLR; MoCo with a memory bank): ``NTXentLoss(temperature=0.5,
    memory_bank_size=0, gather_distributed=False)(out0, out1)``.

    ``out0``, ``out1`` (n, d): projections of two views (normalised here). Without a
    bank every embedding is an anchor against the other 2n - 1 (the global 2N - 1 with
    ``gather_distributed``): :func:`batchlab.losses.nt_xent`, over ranks with its
    ``distributed="allgather"``. With a bank (``memory_bank_size=(K, d)``) each ``out0``
    row is an anchor against its ``out1`` row and the K banked negatives, and ``out1`` is
    enqueued when ``out0`` requires a gradient.

    batchlab's :func:`~batchlab.losses.nt_xent` takes ``logit_scale = 1/temperature``
    and unit-norm (V, N, d) views; it also averages an anchor's positives for V > 2.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
    ):
        super().__init__()
        self.memory_bank = MemoryBank(size=memory_bank_size, gather_distributed=gather_distributed)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.eps = 1e-8
        if abs(self.temperature) < self.eps:
            raise BatchlabInputError("Illegal temperature: abs({}) < 1e-8".format(self.temperature))
        _check_distributed_available(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return _peer_call(self._loss, out0, out1)

    def _loss(self, out0: Tensor, out1: Tensor) -> Tensor:
        out0 = nn.functional.normalize(out0, dim=1)
        out1 = nn.functional.normalize(out1, dim=1)
        scale = 1.0 / self.temperature
        if self.memory_bank.enabled:
            bank = self.memory_bank.read_and_update(out1, update=out0.requires_grad).to(out0)
            n = out0.shape[0]
            keys = torch.cat([out1, bank])

            def other_batch_rows(rows, cols):  # only the own out1 row and the bank are in a denominator
                return (cols[None, :] < n) & (cols[None, :] != rows[:, None])

            return info_nce(out0, keys, scale, symmetric=False, neg_mask=other_batch_rows)
        world, _ = _world()
        distributed = "allgather" if self.gather_distributed and world > 1 else "none"
        return nt_xent(torch.stack([out0, out1]), scale, distributed=distributed)


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """lightly's DCLW weights ``2 - n * softmax(<out0_i, out1_i> / sigma)`` (no gradient)."""
    return dclw_weights(torch.einsum("nm,nm->n", out0.detach(), out1.detach()), sigma)


class DCLLoss(nn.Module):
    """lightly's decoupled contrastive loss: ``DCLLoss(temperature=0.1, weight_fn=None,
    gather_distributed=False)(out0, out1)``.

    Every embedding of the 2n (normalised) is an anchor; its positive is the other view
    of its example and its negatives are the other 2n - 2 (2N - 2 over ranks with
    ``gather_distributed``), the positive being left out of the denominator. ``weight_fn
    (out0, out1) -> (n,)`` scales the positive term (lightly's ``w``).

    batchlab's :func:`~batchlab.losses.dcl` is the two-tower form (N - 1 negatives from
    the other view) and takes ``logit_scale``; see the module docstring.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        gather_distributed: bool = False,
    ):
        super().__init__()
        self.temperature = temperature
        self.weight_fn = weight_fn
        self.gather_distributed = gather_distributed
        _check_distributed_available(gather_distributed)

    def _vmf_sigma(self) -> Optional[float]:
        """DCLW's sigma when ``weight_fn`` is the von Mises-Fisher weighting (batchlab computes it)."""
        fn = self.weight_fn
        if isinstance(fn, partial) and fn.func is negative_mises_fisher_weights and not fn.args:
            return fn.keywords.get("sigma", 0.5)
        return None

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return _peer_call(self._loss, out0, out1)

    def _loss(self, out0: Tensor, out1: Tensor) -> Tensor:
        out0 = nn.functional.normalize(out0, dim=1)
        out1 = nn.functional.normalize(out1, dim=1)
        n = out0.shape[0]
        scale = 1.0 / self.temperature
        world, rank = _world()
        distributed = self.gather_distributed and world > 1
        z = torch.cat([out0, out1])  # anchors: both views of this rank's examples
        offset = 2 * n * rank if distributed else 0  # batchlab gathers the keys in rank order
        own = torch.arange(2 * n, device=z.device)
        targets = offset + (own + n) % (2 * n)

        def itself(rows, cols):  # an anchor is never its own negative
            return rows[:, None] == cols[None, :]

        sigma = self._vmf_sigma()
        if not distributed and (self.weight_fn is None or sigma is not None):
            weights = dict(weighted=True, sigma=sigma) if sigma is not None else {}
            return dcl(z, z, scale, symmetric=False, targets=targets, neg_mask=itself, **weights)
        loss = dcl(z, z, scale, symmetric=False, targets=targets, neg_mask=itself,
                   distributed="allgather" if distributed else "none")
        if self.weight_fn is None:
            return loss
        # lightly scales the positive term by w (from this rank's batch): -w s cos = -s cos + (1 - w) s cos
        w = torch.cat([_weights(self.weight_fn(a, b), n, z.dtype) for a, b in ((out0, out1), (out1, out0))])
        cos = (out0 * out1).sum(-1)
        return loss + ((1 - w) * scale * torch.cat([cos, cos])).mean()


class DCLWLoss(DCLLoss):
    """lightly's weighted DCL: ``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``,
    DCL with the negative von Mises-Fisher weights (batchlab's ``dcl(weighted=True)``)."""

    def __init__(
        self,
        temperature: float = 0.1,
        sigma: float = 0.5,
        gather_distributed: bool = False,
    ):
        super().__init__(
            temperature=temperature,
            weight_fn=partial(negative_mises_fisher_weights, sigma=sigma),
            gather_distributed=gather_distributed,
        )
