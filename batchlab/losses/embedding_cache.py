"""Gradient caching (GradCache, BASIC): contrastive batches larger than the encoders fit.

A contrastive loss couples every example of the batch, so the batch cannot simply be
split into micro-batches. Gradient caching splits it anyway, in three phases:

1. **encode** every tower's inputs chunk by chunk under ``no_grad`` (activation memory
   of one chunk), remembering each chunk's RNG state (CPU and CUDA);
2. compute the **loss** on all the embeddings, which are leaves that want a gradient,
   and backpropagate to them (and to any parameter the loss uses directly, such as
   CLIP's ``logit_scale``); the tiled losses keep this step O(N) in memory;
3. **re-encode** each chunk with autograd on, with its RNG state restored so dropout
   draws the same masks, and call ``backward(cached_embedding_gradient)``: the
   parameter gradients add up to those of one big backward.

The cost is one extra encoder forward (about +33% of encoder compute).

>>> import torch
>>> from torch import nn
>>> enc_a, enc_b = nn.Linear(6, 4), nn.Linear(5, 4)
>>> cache = EmbeddingCache([enc_a, enc_b], chunk_size=3)
>>> loss = cache.step(torch.randn(8, 6), torch.randn(8, 5),
...                   loss_fn=lambda a, b: (a @ b.T).logsumexp(1).mean())
>>> enc_a.weight.grad.shape
torch.Size([4, 6])

Notes: BatchNorm sees chunk statistics (as in GradCache). Under DDP, gradient
synchronisation fires on every re-encode; wrap the call in ``model.no_sync()`` and
synchronise once, or call the towers through ``model.module``. With fp16 loss scaling,
return ``scaler.scale(loss)`` from ``loss_fn``.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from batchlab._checks import check_finite, check_positive_int, data_checks_on
from batchlab.errors import BatchlabInputError
from batchlab._checks import check_flags

log = logging.getLogger(__name__)

Inputs = Any  # a Tensor, or a tuple/list/dict of tensors sharing their first dimension


def _batch_len(x: Inputs, where: str) -> int:
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise BatchlabInputError(f"{where}: a 0-d tensor has no batch dimension to split")
        return x.shape[0]
    if isinstance(x, Mapping):
        items = list(x.values())
    elif isinstance(x, (tuple, list)):
        items = list(x)
    else:
        raise BatchlabInputError(
            f"{where}: inputs must be a tensor, or a tuple/list/dict of tensors, got {type(x).__name__}"
        )
    lengths = {_batch_len(v, where) for v in items}
    if len(lengths) != 1:
        raise BatchlabInputError(f"{where}: all tensors must share their first (batch) dimension, got {sorted(lengths)}")
    return lengths.pop()


def _take(x: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    if isinstance(x, Mapping):
        return {key: _take(v, start, stop) for key, v in x.items()}
    return type(x)(_take(v, start, stop) for v in x)


def _call(encoder: Callable, chunk: Inputs) -> torch.Tensor:
    out = encoder(**chunk) if isinstance(chunk, Mapping) else encoder(*chunk) if isinstance(chunk, (tuple, list)) \
        else encoder(chunk)
    if not isinstance(out, torch.Tensor):
        raise BatchlabInputError(
            f"an encoder must return one embedding tensor, got {type(out).__name__}; wrap it, e.g. "
            "lambda x: model(x)['image_features']"
        )
    return out


class _RngState:
    """The CPU and (initialised) CUDA generator states at one moment."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        self.cuda = [torch.cuda.get_rng_state(i) for i in self.cuda_devices]

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body from this state, leaving the global generators as they were."""
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def _check_scale(scale: torch.Tensor | float | None) -> torch.Tensor | float | None:
    """:meth:`EmbeddingCache.backward`'s ``scale``: one finite number (a (d,) tensor would scale columns)."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise BatchlabInputError(
                f"backward(scale=) multiplies every cached gradient by one number; got a {scale.dtype} tensor of "
                f"shape {tuple(scale.shape)}: pass a float or a one-element floating tensor"
            )
        if data_checks_on(scale.device):
            check_finite("backward(scale=)", scale)
        return scale.detach().reshape(())
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise BatchlabInputError(f"backward(scale=) takes a finite float or a one-element tensor, got {scale!r}")
    return scale


class _HostGradient:
    """An embedding gradient parked in host memory (:meth:`EmbeddingCache.keep_gradients` with ``offload``).

    The copy to pinned host memory and every chunk's copy back are queued on the device
    (an event orders them when the re-encode runs on another stream), so the host never
    waits; the caching allocators keep both buffers alive until the copies that use them ran.
    """

    def __init__(self, grad: torch.Tensor) -> None:
        self.device = grad.device
        self.host = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=grad.is_cuda)
        self.host.copy_(grad, non_blocking=grad.is_cuda)
        self.copied = None
        if grad.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(grad.device))

    def chunk(self, start: int, stop: int, scale: torch.Tensor | float | None) -> torch.Tensor:
        """Rows ``start:stop`` back on the device, times ``scale`` (as the whole gradient would be)."""
        if self.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied)
        part = self.host[start:stop]
        part = part.to(self.device, non_blocking=True) if self.device.type != "cpu" else part.clone()
        if scale is not None:
            part.mul_(scale.to(part.dtype) if isinstance(scale, torch.Tensor) else scale)
        return part


class EmbeddingCache:
    """Chunked encoding with cached embedding gradients (GradCache) for one or more towers.

    Parameters
    ----------
    encoders : callable or sequence of callables
        One encoder per tower: ``nn.Module`` s, or bound methods of one model
        (``[model.encode_image, model.encode_text]`` for open_clip). Each maps a chunk of
        its inputs to (chunk, d) embeddings; tuple inputs are passed as positional
        arguments, dict inputs as keyword arguments.
    chunk_size : int or sequence of int
        Examples per encoder call (per tower if a sequence).
    restore_rng : bool
        Replay each chunk's RNG state in the re-encode so dropout matches (default True).
    progress : bool
        Show a tqdm bar over chunks.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> from torch import nn
    >>> from batchlab.losses import info_nce
    >>> img, txt = nn.Sequential(nn.Linear(10, 8), nn.Dropout(0.1)), nn.Linear(7, 8)
    >>> logit_scale = nn.Parameter(torch.tensor(2.0))
    >>> def loss_fn(a, b):
    ...     return info_nce(F.normalize(a, dim=1), F.normalize(b, dim=1), logit_scale.exp())
    >>> cache = EmbeddingCache([img, txt], chunk_size=16)
    >>> loss = cache.step(torch.randn(64, 10), torch.randn(64, 7), loss_fn=loss_fn)
    >>> logit_scale.grad is not None and img[0].weight.grad is not None
    True
    """

    def __init__(
        self,
        encoders: Callable | Sequence[Callable],
        chunk_size: int | Sequence[int],
        *,
        restore_rng: bool = True,
        progress: bool = False,
    ) -> None:
        self.encoders = list(encoders) if isinstance(encoders, (list, tuple)) else [encoders]
        if not self.encoders or not all(callable(e) for e in self.encoders):
            raise BatchlabInputError("encoders must be a callable or a non-empty list of callables (one per tower)")
        sizes = list(chunk_size) if isinstance(chunk_size, (list, tuple)) else [chunk_size] * len(self.encoders)
        if len(sizes) != len(self.encoders):
            raise BatchlabInputError(f"got {len(sizes)} chunk sizes for {len(self.encoders)} encoders")
        for size in sizes:
            check_positive_int("chunk_size", size)
        check_flags(restore_rng=restore_rng, progress=progress)
        self.chunk_sizes = sizes
        self.restore_rng = restore_rng
        self.progress = progress
        self._pending: list[tuple[Inputs, list[tuple[int, int, _RngState | None]]]] | None = None
        self._embeddings: list[torch.Tensor] | None = None
        self._grads: list[torch.Tensor | _HostGradient | None] | None = None  # after keep_gradients()

    def _chunks(self, tower: int, n: int) -> list[tuple[int, int]]:
        size = self.chunk_sizes[tower]
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    def encode(self, *inputs: Inputs) -> list[torch.Tensor]:
        """Phase 1: embeddings of every tower, computed chunk by chunk without a graph.

        Returns one (N_t, d_t) leaf tensor per tower with ``requires_grad=True``; compute
        the loss on them and call ``loss.backward()``, then :meth:`backward`.
        """
        if len(inputs) != len(self.encoders):
            raise BatchlabInputError(f"got inputs for {len(inputs)} towers but {len(self.encoders)} encoders")
        lengths = [_batch_len(x, f"inputs of tower {t}") for t, x in enumerate(inputs)]
        if 0 in lengths:
            raise BatchlabInputError(
                f"inputs of tower {lengths.index(0)} have 0 rows (batch sizes per tower: {lengths}); "
                "a contrastive step needs at least one example per tower: skip empty batches"
            )
        self._pending, self._embeddings, self._grads = [], [], None
        with self._bar(sum(len(self._chunks(t, n)) for t, n in enumerate(lengths)), "encode (no grad)") as bar:
            for tower, (encoder, x, n) in enumerate(zip(self.encoders, inputs, lengths)):
                parts, chunks = [], []
                for start, stop in self._chunks(tower, n):
                    state = _RngState() if self.restore_rng else None
                    with torch.no_grad():
                        parts.append(_call(encoder, _take(x, start, stop)))
                    chunks.append((start, stop, state))
                    bar.update()
                emb = torch.cat(parts).requires_grad_(True)
                self._pending.append((x, chunks))
                self._embeddings.append(emb)
        log.debug("encoded %s examples in %s chunks", lengths, sum(len(c) for _, c in self._pending))
        return list(self._embeddings)

    def keep_gradients(self, *, offload: bool = False) -> None:
        """After the loss's backward: hold only the embeddings' gradients, not the embeddings.

        :meth:`backward` needs nothing else, so once the caller drops its own references the
        embeddings are freed before the re-encode (phase 3's peak memory is then that of the
        gradients and one chunk's activations, as in sentence-transformers' cached losses).

        ``offload=True`` also moves the gradients to host memory (pinned, for CUDA tensors: an
        asynchronous copy, no host synchronisation); :meth:`backward` brings each chunk's slice
        back just before its push, so phase 3 holds one chunk's gradient on the device instead
        of all of them (N x d x towers: 192 MiB at 65,536 pairs x 384 x 2 columns in fp32), for
        one device-to-host copy of the gradients and one host-to-device copy per chunk.

        Example
        -------
        >>> import torch
        >>> from torch import nn
        >>> towers = [nn.Linear(5, 4), nn.Linear(3, 4)]
        >>> cache = EmbeddingCache(towers, chunk_size=4)
        >>> a, b = cache.encode(torch.randn(8, 5), torch.randn(8, 3))
        >>> (a * b).sum().backward()
        >>> cache.keep_gradients(offload=True)  # host memory (pinned for CUDA tensors)
        >>> del a, b  # nothing holds the embeddings now
        >>> cache.backward(scale=0.5)  # the re-encode, pushing half the cached gradients
        >>> towers[0].weight.grad.shape
        torch.Size([4, 5])
        """
        if not isinstance(offload, bool):  # not `in (True, False)`: 1 == True would pass
            raise BatchlabInputError(f"keep_gradients(offload=) takes True or False, got {offload!r}")
        if self._pending is None or self._embeddings is None:
            raise BatchlabInputError("keep_gradients() comes after encode() and the loss's backward")
        grads = [e.grad for e in self._embeddings]
        self._grads = [_HostGradient(g) if offload and g is not None else g for g in grads]
        self._embeddings = None

    def backward(self, scale: torch.Tensor | float | None = None) -> None:
        """Phase 3: re-encode chunk by chunk with autograd and push the cached embedding gradients.

        Towers whose embeddings got no gradient (the loss ignored them) are skipped, and so
        are frozen towers (their first re-encoded chunk needs no gradient). ``scale``
        multiplies the cached gradients first, in place (the upstream gradient of a loss
        whose backward runs this phase: gradient accumulation, fp16 loss scaling).
        """
        if self._pending is None or (self._embeddings is None and self._grads is None):
            raise BatchlabInputError("call encode() (and loss.backward()) before backward(), or use step()")
        scale = _check_scale(scale)
        pending = self._pending
        grads = self._grads if self._grads is not None else [e.grad for e in self._embeddings]
        self._pending = self._embeddings = self._grads = None
        with self._bar(sum(len(c) for _, c in pending), "re-encode (grad)") as bar:
            for encoder, (x, chunks), grad in zip(self.encoders, pending, grads):
                if grad is None:
                    bar.update(len(chunks))
                    continue
                host = isinstance(grad, _HostGradient)
                if scale is not None and not host:
                    grad.mul_(scale.to(grad.dtype) if isinstance(scale, torch.Tensor) else scale)
                for done, (start, stop, state) in enumerate(chunks):
                    with state.replay() if state is not None else nullcontext():
                        out = _call(encoder, _take(x, start, stop))
                    if not out.requires_grad:  # a frozen tower (LiT's locked image tower): nothing to push
                        bar.update(len(chunks) - done)
                        break
                    out.backward((grad.chunk(start, stop, scale) if host else grad[start:stop]).to(out.dtype))
                    bar.update()

    def step(self, *inputs: Inputs, loss_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        """All three phases: returns the (detached) loss; parameter ``.grad`` s are accumulated.

        ``loss_fn(*embeddings) -> scalar`` may use parameters directly (``logit_scale``):
        their gradients come from its backward.
        """
        embeddings = self.encode(*inputs)
        loss = loss_fn(*embeddings)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise BatchlabInputError("loss_fn must return a scalar tensor")
        loss.backward()
        self.backward()
        return loss.detach()


def cached_step(
    encoders: Callable | Sequence[Callable],
    inputs: Sequence[Inputs],
    loss_fn: Callable[..., torch.Tensor],
    chunk_size: int | Sequence[int],
    **options,
) -> torch.Tensor:
    """Functional form: ``EmbeddingCache(encoders, chunk_size, **options).step(*inputs, loss_fn=loss_fn)``."""
    return EmbeddingCache(encoders, chunk_size, **options).step(*inputs, loss_fn=loss_fn)
