r"""Global contrastive losses with per-example state: SogCLR and iSogCLR.

SogCLR (Yuan et al., "Provable Stochastic Optimization for Global Contrastive Learning:
Small Batch Does Not Harm Performance", ICML 2022) optimises the *global* contrastive
loss, whose denominator runs over every negative in the dataset, with small batches: it
keeps, for every training example ``i`` and every direction, a moving average ``u_i`` of
that denominator. iSogCLR (Qiu et al., "Not All Semantics are Created Equal: Contrastive
Self-supervised Learning with Automatic Temperature Individualization", ICML 2023) also
learns a temperature ``tau_i`` per example by a distributionally robust (DRO) objective.

The math (one direction; anchors ``a_i``, candidates ``c_j``, positive ``p_i``)
------------------------------------------------------------------------------
With ``h_ij = a_i . c_j - a_i . p_i`` over the ``n_i`` negatives ``j`` of anchor ``i`` in
the batch (every candidate except the anchor's positive and, for two views, itself):

    g_i     = 1/n_i sum_j exp(h_ij / tau_i)                      (batch estimate of E exp(h / tau_i))
    u_i    <- (1 - gamma) u_i + gamma g_i      (u_i = g_i on an example's first visit)
    loss_i  = tau_i (log u_i + rho)                             (rho = 0: SogCLR)

The gradient is the papers' estimator, not the derivative of that value (``u_i`` holds
older batches):

    d loss_i / d theta = sum_j P_ij d h_ij / d theta,          P_ij = exp(h_ij / tau_i) / (n_i u_i)
    d loss_i / d tau_i = log u_i + rho - sum_j P_ij h_ij / tau_i       (iSogCLR's temperature step)

iSogCLR then moves ``tau_i`` with momentum: ``m_i <- (1 - beta) m_i + beta dtau_i``,
``tau_i <- clip(tau_i - eta m_i, tau_min, tau_max)`` (:class:`SogCLRLoss` does this).
``loss`` is the paper's objective ``F``, tau-scaled: its gradients are ``tau`` times those
of InfoNCE at scale ``1/tau`` (with ``gamma = 1`` SogCLR's gradient is exactly ``tau``
times DCL's, which the tests check). ``u`` is kept as ``log u`` so that small
temperatures (``h / tau`` up to +-400 at ``tau = 0.005``) never overflow.

Modes
-----
``"symmetric"`` (image-text, CLIP): both directions, images against texts and texts against
images, each with its own ``u`` and ``tau`` (LibAUC's ``GCLoss_v2``). ``"one_way"``
(query -> document): rows only; keys beyond the N positives are extra negatives.
``"two_view"`` (SimCLR-style text-text or image-image): anchor ``q_i`` has the ``2(N-1)``
negatives ``{k_j, q_j : j != i}``, and the same for ``k_i`` (LibAUC's ``GCLoss_v1``).

Example
-------
>>> import torch, torch.nn.functional as F
>>> q, k = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
>>> state = torch.full((2, 8), float("-inf"))          # log u of 8 examples, never seen
>>> out = sogclr(q, k, log_u=state, tau=0.1)
>>> out.loss.shape, out.log_u.shape
(torch.Size([]), torch.Size([2, 8]))
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from batchlab._checks import check_choice, data_checks_on
from batchlab.errors import BatchlabInputError
from batchlab.losses import _dispatch
from batchlab.losses._common import (
    REDUCTIONS,
    NegMask,
    check_flags,
    check_neg_mask,
    checks_for,
    compute_dtype,
    neg_mask_tile,
    prepare_pair,
)
from batchlab.losses._distributed_hook import use_distributed

__all__ = ["sogclr", "SogCLRResult", "SogCLRLoss", "ISogCLRLoss", "MODES"]

MODES = ("symmetric", "one_way", "two_view")
_IMPLS = ("auto", "reference", "tiled", "triton")
_DISTRIBUTED = ("none", "allgather", "auto")
#: backend options some implementation of the family takes (anything else is an error)
_BACKEND_OPTIONS = ("tile_size",)


class SogCLRResult(NamedTuple):
    """What :func:`sogclr` returns.

    loss : Tensor () -- or (N,) with ``reduction="none"`` (mean over directions).
    log_u : Tensor (D, N) -- the updated ``log u`` rows (no gradient), D directions.
    tau_grad : Tensor (D, N) -- ``d loss_i / d tau_i`` per example and direction (no gradient).
    """

    loss: torch.Tensor
    log_u: torch.Tensor
    tau_grad: torch.Tensor


class Direction(NamedTuple):
    """One direction of the loss: anchors against candidate blocks (concatenated in ``cands``).

    Block ``b`` starts at ``starts[b]`` in ``cands`` and holds ``sizes[b]`` rows; anchor ``i``
    excludes the block's row ``offsets[b] + i`` (its positive, or itself) when it exists, and
    the candidates ``mask(rows, cols)`` marks (known false negatives; None: none).
    """

    anchors: torch.Tensor  # (n, d)
    cands: torch.Tensor  # (K, d)
    positives: torch.Tensor  # (n, d)
    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    mask: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


# ----------------------------------------------------------------------------- shared pieces


def touches_exclusions(direction: Direction, r0: int, r1: int, c0: int, c1: int) -> bool:
    """Whether the tile rows [r0, r1) x candidates [c0, c1) holds an excluded entry (host only).

    Without ``mask`` only the shifted diagonals ``start + offset + i`` are excluded, and most
    tiles of a large batch miss them: those tiles need no mask at all."""
    if direction.mask is not None:
        return True
    for start, size, off in zip(direction.starts, direction.sizes, direction.offsets):
        lo, hi = start + off + r0, start + min(off + r1, size)  # excluded columns of these rows
        if lo < hi and lo < c1 and hi > c0:
            return True
    return False


def excluded(direction: Direction, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bool (len(rows), len(cols)): candidate ``cols`` that are not negatives of anchor ``rows``."""
    mask = torch.zeros(len(rows), len(cols), dtype=torch.bool, device=rows.device)
    for start, size, off in zip(direction.starts, direction.sizes, direction.offsets):
        own = rows + off
        target = torch.where(own < size, start + own, -1)  # -1 never matches a column
        mask |= cols[None, :] == target[:, None]
    if direction.mask is not None:
        mask |= direction.mask(rows, cols)
    return mask


def moving_average(log_u: torch.Tensor, log_g: torch.Tensor, gamma: float) -> torch.Tensor:
    """``log((1 - gamma) u + gamma g)``; ``log u = -inf`` marks a first visit (then ``log g``)."""
    if gamma >= 1.0:
        return log_g
    mixed = torch.logaddexp(log_u + math.log1p(-gamma), log_g + math.log(gamma))
    return torch.where(torch.isneginf(log_u), log_g, mixed)


def finish_rows(lse, log_n, weighted_x, log_u, tau, gamma: float, rho: float):
    """From a direction's batch statistics to ``(value, new log u, s, tau_grad, shift)``.

    ``lse``: (n,) log sum of ``exp(h / tau)`` over each anchor's negatives; ``log_n``: log of
    their number; ``weighted_x``: softmax-weighted mean of ``h / tau``; ``s = g / u`` is
    ``sum_j P_ij``; ``shift = log u + log n`` turns ``h / tau`` into ``log P`` in the backward.
    An anchor whose negatives ``neg_mask`` removed entirely (``lse = -inf``) has no contrastive
    signal: value 0, no gradient, its ``u`` left as it was.
    """
    empty = torch.isneginf(lse)
    log_n = torch.where(empty, 0.0, log_n)
    log_g = lse - log_n
    log_u_new = torch.where(empty, log_u, moving_average(log_u, log_g, gamma))
    shift = torch.where(empty, 0.0, log_u_new + log_n)
    s = torch.where(empty, 0.0, torch.exp(log_g - log_u_new))
    tau_grad = torch.where(empty, 0.0, log_u_new + rho - s * weighted_x)
    value = torch.where(empty, 0.0, tau * (log_u_new + rho))
    return value, log_u_new, s, tau_grad, shift


# ----------------------------------------------------------------------------- the exact reference


@_dispatch.register("sogclr", "reference")
def sogclr_direction_reference(direction: Direction, tau, log_u, *, gamma: float, rho: float):
    """One direction, with the (n, K) logits materialised: the ground truth of the update rules.

    Returns ``(value (n,), new log u (n,), tau_grad (n,))``; ``value``'s gradient is the
    papers' estimator (see the module docstring), through the embeddings and ``tau``.
    """
    a, c, p = direction.anchors, direction.cands, direction.positives
    cd = compute_dtype(a.dtype)
    a, c, p = a.to(cd), c.to(cd), p.to(cd)
    n = a.shape[0]
    ex = excluded(direction, torch.arange(n, device=a.device), torch.arange(c.shape[0], device=a.device))
    h = a @ c.T - (a * p).sum(1, keepdim=True)
    x = (h / tau[:, None]).masked_fill(ex, float("-inf"))
    with torch.no_grad():
        x0 = x.detach()
        lse = torch.logsumexp(x0, 1)
        log_n = torch.log((~ex).sum(1).to(cd))
        base, log_u_new, _, _, shift = finish_rows(lse, log_n, torch.zeros_like(lse), log_u.to(cd), tau.detach(),
                                                   gamma, rho)
        weights = torch.exp(x0 - shift[:, None])  # P_ij, 0 where excluded
        # the papers' rule written out: d loss_i / d tau_i = log u_i + rho - sum_j P_ij h_ij / tau_i
        tau_grad = log_u_new + rho - (weights * x0.masked_fill(ex, 0)).sum(1)
        tau_grad = torch.where(torch.isneginf(lse), 0.0, tau_grad)
    surrogate = (weights * h.masked_fill(ex, 0)).sum(1)
    value = base + (surrogate - surrogate.detach()) + (tau - tau.detach()) * tau_grad
    return value, log_u_new, tau_grad


# ----------------------------------------------------------------------------- the public function


def directions(q, k, mode: str, *, q_all=None, k_all=None, offsets=(0, 0), neg_mask: NegMask = None) -> list[Direction]:
    """The directions of ``mode`` for local rows ``q``, ``k`` against candidates ``q_all``, ``k_all``.

    ``offsets``: the index of this shard's first row in ``q_all`` and ``k_all`` (0 in one process).
    ``neg_mask`` (query x key, one process, symmetric or one_way): pairs left out of both directions.
    """
    rows_mask = cols_mask = None
    if neg_mask is not None:
        rows_mask = lambda r, c: neg_mask_tile(neg_mask, r, c)  # noqa: E731
        cols_mask = lambda r, c: neg_mask_tile(neg_mask, c, r).T  # noqa: E731
    q_all = q if q_all is None else q_all
    k_all = k if k_all is None else k_all
    oq, ok = offsets
    nq, nk = q_all.shape[0], k_all.shape[0]
    if mode == "one_way":
        return [Direction(q, k_all, k[: q.shape[0]], (0,), (nk,), (ok,), rows_mask)]
    if mode == "symmetric":
        return [Direction(q, k_all, k, (0,), (nk,), (ok,), rows_mask), Direction(k, q_all, q, (0,), (nq,), (oq,), cols_mask)]
    return [
        Direction(q, torch.cat([k_all, q_all]), k, (0, nk), (nk, nq), (ok, oq)),
        Direction(k, torch.cat([q_all, k_all]), q, (0, nq), (nq, nk), (oq, ok)),
    ]


def _check_state(name: str, value, shape: tuple[int, int], like: torch.Tensor, *, positive: bool,
                 check: bool) -> torch.Tensor:
    cd = compute_dtype(like.dtype)
    if not isinstance(value, torch.Tensor):
        if positive and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BatchlabInputError(f"{name} must be a positive float or a tensor of shape {shape}, got {value!r}")
        if not positive:
            raise BatchlabInputError(f"{name} must be a float tensor of shape {shape} (-inf: never seen)")
        value = torch.full(shape, float(value), device=like.device, dtype=cd)
    if tuple(value.shape) != shape or not value.is_floating_point():
        raise BatchlabInputError(
            f"{name} must be a float tensor of shape {shape} (directions x batch rows), got "
            f"{value.dtype} {tuple(value.shape)}"
        )
    if value.device != like.device:
        raise BatchlabInputError(f"{name} is on {value.device} but the embeddings are on {like.device}")
    if check and positive and value.numel() and not bool((value.detach() > 0).all() & torch.isfinite(value.detach()).all()):
        raise BatchlabInputError(f"{name} must be finite and > 0 (temperatures), got min {float(value.min()):.4g}")
    if check and not positive and value.numel() and bool(torch.isnan(value).any() | torch.isposinf(value).any()):
        raise BatchlabInputError(f"{name} holds NaN or +inf; log u is finite, or -inf for an example never seen")
    return value.to(cd)


def _check_hyper(gamma, rho) -> tuple[float, float]:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise BatchlabInputError(f"gamma (the weight of the new batch in u's moving average) must be in (0, 1], got {gamma!r}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not -math.inf < rho < math.inf:
        raise BatchlabInputError(f"rho must be a finite number, got {rho!r}")
    return float(gamma), float(rho)


#: The backend modules of this family once imported (None: Triton missing); later calls read this
#: dict, which torch.compile traces (it refuses to trace importlib).
_MODULES: dict[str, object] = {}


def _backend_module(name: str):
    """``batchlab.losses.<name>`` imported once (registering its implementations), or None if it cannot be."""
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(f"batchlab.losses.{name}")
        except ImportError:
            if name == "tiled.sogclr":
                raise
            _MODULES[name] = None
    return _MODULES[name]


def _triton_module():
    """``batchlab.losses.triton._sogclr`` (registers the "triton" implementations), or None without Triton."""
    return _backend_module("triton._sogclr")


def _backend(impl: str, n: int, k: int, q: torch.Tensor, dirs: Sequence[Direction]) -> str:
    """The implementation ``impl`` names for an (n x k) problem (its module imported).

    ``auto``: the Triton kernels on a CUDA device where they run (bf16/fp32, no ``neg_mask``; strict
    fp32 above ``_dispatch.AUTO_FP32_TRITON_MAX_LOGITS`` logits takes the tiled engine, whose
    products use cuBLAS), else tiled above ``_dispatch.AUTO_TILED_MIN_LOGITS`` logits, else the
    reference. ``triton`` runs what the kernels do not cover on the tiled engine."""
    _backend_module("tiled.sogclr")  # registers the "tiled" implementations
    if impl in ("auto", "triton"):
        module = _triton_module() if (impl == "triton" or q.is_cuda) else None
        fits = (module is not None and n > 0 and module.supported(q) and all(module.direction_ok(d) for d in dirs))
        if impl == "triton":
            _dispatch.resolve("sogclr", "triton", n, k, q.device)  # refuses the CPU outside the interpreter
            return "triton" if fits else "tiled"
        strict_large = _dispatch._ieee_fp32(q.dtype) and n * k > _dispatch.AUTO_FP32_TRITON_MAX_LOGITS
        if fits and not strict_large and _dispatch._triton_usable(q.device):
            return "triton"
    if impl == "auto":
        impl = "tiled" if n * k > _dispatch.AUTO_TILED_MIN_LOGITS else "reference"
    return impl


def _validate(q, k, *, mode, reduction, impl, distributed, gamma, rho, normalize, check_inputs, impl_options):
    """:func:`sogclr`'s checks of everything but the state rows: ``(q, k, gamma, rho, check)``."""
    check_choice("mode", mode, MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("impl", impl, _IMPLS)
    check_choice("distributed", distributed, _DISTRIBUTED)
    unknown = sorted(set(impl_options) - set(_BACKEND_OPTIONS))
    if unknown:
        raise BatchlabInputError(f"sogclr got unknown keyword(s) {unknown}; backend options: {list(_BACKEND_OPTIONS)}")
    gamma, rho = _check_hyper(gamma, rho)
    check_flags(normalize=normalize)
    check = checks_for(q, check_inputs)
    q, k = prepare_pair(q, k, normalize=normalize, check=check)
    n, m = q.shape[0], k.shape[0]
    if mode != "one_way" and n != m:
        raise BatchlabInputError(f"mode={mode!r} needs as many keys as queries, got {n} and {m}; use mode='one_way'")
    if m < n:
        raise BatchlabInputError(f"query i's positive is key i, so keys ({m}) must be at least as many as queries ({n})")
    return q, k, gamma, rho, check


def sogclr(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    log_u: torch.Tensor,
    tau: torch.Tensor | float,
    gamma: float = 0.9,
    rho: float = 0.0,
    mode: str = "symmetric",
    reduction: str = "mean",
    normalize: bool = False,
    impl: str = "auto",
    distributed: str = "none",
    group=None,
    neg_mask: NegMask = None,
    check_inputs: bool | None = None,
    **impl_options,
) -> SogCLRResult:
    """The SogCLR / iSogCLR loss of one batch, given its rows of the per-example state.

    Parameters
    ----------
    q, k : Tensor (N, d), (M, d)
        L2-normalised embeddings (image/text, query/document, or two views). ``M == N``
        except for ``mode="one_way"``, where keys beyond the first N are extra negatives.
    log_u : Tensor (D, N)
        ``log u`` of the batch's examples per direction (D = 2 for symmetric and two_view,
        1 for one_way); ``-inf`` for an example never seen. Not modified: the updated rows
        come back in the result.
    tau : float or Tensor (D, N)
        Temperatures (per example for iSogCLR). A tensor that requires grad receives
        ``d loss / d tau`` (the DRO temperature gradient).
    gamma : float
        Weight of the batch estimate in ``u``'s moving average (0.9, as LibAUC; 1: no memory).
    rho : float
        iSogCLR's DRO radius (0 for SogCLR).
    mode : "symmetric" | "one_way" | "two_view"
    reduction : "mean" | "sum" | "none"
        Over rows, then the mean over directions.
    normalize : bool
        L2-normalise ``q`` and ``k`` first.
    impl : "auto" | "reference" | "tiled" | "triton"
        ``reference`` materialises the (N, K) logits; ``tiled`` never does (``tile_size=``);
        ``triton``: fused kernels with per-row (and per-column) temperatures, bf16/fp32 on
        CUDA (what they do not cover -- fp16, float64, ``neg_mask`` -- runs tiled).
        ``auto``: Triton on CUDA where it runs (strict fp32 above 8192 x 8192 logits: tiled),
        elsewhere tiled above ``_dispatch.AUTO_TILED_MIN_LOGITS`` logits, else the reference.
    distributed : "none" | "allgather" | "auto"
        ``q``, ``k`` (and ``log_u``, ``tau``) are this rank's shard of a global batch; the
        candidates are gathered with gradient. The loss and gradients follow
        :mod:`batchlab.losses.distributed`'s convention (rank r returns ``W`` times its share).
    neg_mask : BoolTensor (N, M) | LongTensor (P, 2) | callable, optional
        Known false negatives (query i, key j) left out of both directions' denominators
        (as :func:`~batchlab.losses.info_nce`'s); single process, symmetric or one_way. An anchor
        left with no negative carries no signal: value 0, no gradient, its ``u`` kept.
    check_inputs : bool, optional
        Run the checks that read values (unit rows, NaN, temperatures > 0); default on for
        CPU tensors, off on CUDA (see docs/losses.md).

    Returns
    -------
    SogCLRResult(loss, log_u, tau_grad)
    """
    q, k, gamma, rho, check = _validate(q, k, mode=mode, reduction=reduction, impl=impl, distributed=distributed,
                                        gamma=gamma, rho=rho, normalize=normalize, check_inputs=check_inputs,
                                        impl_options=impl_options)
    n, m = q.shape[0], k.shape[0]
    n_dir = 1 if mode == "one_way" else 2
    log_u = _check_state("log_u", log_u, (n_dir, n), q, positive=False, check=check)
    # a float temperature reaches the Triton kernels as one number (one exponential per logit)
    tau_value = float(tau) if isinstance(tau, (int, float)) and not isinstance(tau, bool) else None
    tau = _check_state("tau", tau, (n_dir, n), q, positive=True, check=check)

    world, q_all, k_all, offsets = 1, None, None, (0, 0)
    if neg_mask is not None:
        if mode == "two_view" or use_distributed(distributed, group):
            raise BatchlabInputError("neg_mask works in one process with mode='symmetric' or 'one_way'")
        neg_mask = check_neg_mask(neg_mask, n, m, q.device, check=check)
    if use_distributed(distributed, group):
        from batchlab.losses.distributed.strategies import gather_sizes, gather_with_grad

        world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        sizes_q = gather_sizes(n, q.device, group)
        sizes_k = sizes_q if mode != "one_way" else gather_sizes(m, q.device, group)
        k_all = gather_with_grad(k, group, sizes_k)
        q_all = gather_with_grad(q, group, sizes_q) if mode != "one_way" else None
        offsets = (sum(sizes_q[:rank]), sum(sizes_k[:rank]))
        n_global = sum(sizes_q)
    else:
        n_global = n
    dirs = directions(q, k, mode, q_all=q_all, k_all=k_all, offsets=offsets, neg_mask=neg_mask)
    # the first row has the most exclusions (its own index exists in every block): counted on the host
    fewest = min(d.cands.shape[0] - sum(off < size for size, off in zip(d.sizes, d.offsets)) for d in dirs) if n else 1
    if n and fewest < 1:
        raise BatchlabInputError(
            f"mode={mode!r} with {n_global} pair(s) leaves an anchor with no negative: the global contrastive "
            "loss averages over negatives, so a batch needs at least 2 pairs (or extra keys with mode='one_way')"
        )
    chosen = _backend(impl, n, dirs[0].cands.shape[0], q, dirs)
    if chosen == "triton" and mode == "symmetric" and world == 1:
        # one tile pass for both directions; the kernels also sum the loss (no (2, n) values to reduce)
        fn = _dispatch.resolve("sogclr_symmetric", "triton", n, m, q.device)
        _dispatch.accepted_options(fn, impl_options, impl)
        loss, new_log_u, tau_grads = fn(q, k, tau if tau_value is None else tau_value, log_u, gamma=gamma, rho=rho,
                                        reduction=reduction)
        return SogCLRResult(loss, new_log_u.detach(), tau_grads.detach())
    if chosen == "tiled" and mode == "symmetric" and world == 1:
        # one product per tile serves both directions (the per-direction path would compute it twice)
        fn = _dispatch.resolve("sogclr_symmetric", "tiled", n, m, q.device)
        options = {**_dispatch.accepted_options(fn, impl_options, impl), "neg_mask": neg_mask}
        values, new_log_u, tau_grads = fn(q, k, tau, log_u, gamma=gamma, rho=rho, **options)
    else:
        fn = _dispatch.resolve("sogclr", chosen, n, m, q.device)
        options = _dispatch.accepted_options(fn, impl_options, impl)
        one = tau_value is not None and chosen == "triton"
        values, new_log_u, tau_grads = (torch.stack(x) for x in zip(*(
            fn(d, tau_value if one else tau[i], log_u[i], gamma=gamma, rho=rho, **options) for i, d in enumerate(dirs))))
    per_row = values.mean(0)
    if reduction == "none":
        loss = per_row
    else:
        total = per_row.sum()
        loss = world * total if reduction == "sum" else world * total / max(n_global, 1)
    return SogCLRResult(loss, new_log_u.detach(), tau_grads.detach())


# ----------------------------------------------------------------------------- the stateful module

_DEFAULTS = {
    # LibAUC's defaults: GCLoss_v2 (bimodal) and GCLoss_v1 (unimodal)
    "symmetric": dict(tau=0.01, rho=6.0, tau_min=0.005, tau_max=0.05),
    "one_way": dict(tau=0.1, rho=0.3, tau_min=0.05, tau_max=0.7),
    "two_view": dict(tau=0.1, rho=0.3, tau_min=0.05, tau_max=0.7),
}
_MODULE_OPTIONS = ("mode", "tau", "gamma", "isogclr", "rho", "eta", "beta", "tau_min", "tau_max", "reduction",
                   "normalize", "impl", "distributed", "group", "check_inputs", "tile_size")


class SogCLRLoss(nn.Module):
    """SogCLR / iSogCLR with its per-example state, indexed by dataset ids.

    ``loss = SogCLRLoss(num_examples)(img, txt, ids)``: ``ids`` (N,) are the batch's
    indices into the training set (what the batch sampler yielded), so every batch sampler
    works with it. The state lives in buffers (saved by ``state_dict``, moved by ``.to``):

    * ``log_u`` (D, num_examples): ``log u`` per direction (``-inf``: never seen);
    * iSogCLR only: ``tau`` (D, num_examples) and its momentum ``tau_momentum``.

    Directions: symmetric (image-text) keeps separate ``u``, ``tau`` for images (row 0) and
    texts (row 1). one_way keeps one row. two_view keeps ONE row per example shared by its two
    views, as LibAUC's ``GCLoss_v1`` does: each view's estimate mixes into the same old ``u``
    and the stored ``u`` is their mean; the temperature step averages the two views'.

    Distributed (``distributed="allgather"`` or ``"auto"`` with a process group): each rank
    computes the loss of its own rows against the gathered batch and updates its own
    examples' rows; the ids and updated rows are then all-gathered so that every rank holds
    the same full state (``state_dict`` on any rank is the whole state, and DDP's buffer
    broadcast from rank 0, if the loss sits inside a DDP module, changes nothing).

    Parameters
    ----------
    num_examples : int
        Size of the training set (ids run over ``range(num_examples)``).
    mode : "symmetric" | "one_way" | "two_view"
    tau : float
        The temperature (SogCLR) or every example's initial temperature (iSogCLR).
        Default per mode: 0.01 symmetric, 0.1 otherwise (LibAUC's).
    gamma : float
        Moving-average weight of the new batch (0.9).
    isogclr : bool
        Learn a temperature per example (iSogCLR); see :class:`ISogCLRLoss`.
    rho, eta, beta, tau_min, tau_max : float
        iSogCLR's DRO radius, temperature step size (0.01), momentum (0.9) and bounds
        (LibAUC's defaults: 6.0 and [0.005, 0.05] symmetric; 0.3 and [0.05, 0.7] otherwise).
    reduction, normalize, impl, distributed, group, check_inputs, tile_size :
        As :func:`sogclr`.

    Example
    -------
    >>> import torch, torch.nn.functional as F
    >>> loss_fn = SogCLRLoss(100, isogclr=True)
    >>> img, txt = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    >>> loss_fn(img, txt, torch.tensor([3, 14, 15, 92])).shape
    torch.Size([])
    """

    def __init__(self, num_examples: int, **options) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(_MODULE_OPTIONS))
        if unknown:
            raise BatchlabInputError(f"SogCLRLoss got unknown keyword(s) {unknown}; it takes {list(_MODULE_OPTIONS)}")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise BatchlabInputError(f"num_examples must be a positive integer (the training set's size), got {num_examples!r}")
        mode = check_choice("mode", options.pop("mode", "symmetric"), MODES)
        only_isogclr = sorted(set(options) & {"rho", "eta", "beta", "tau_min", "tau_max"})
        if only_isogclr and not options.get("isogclr", False):
            raise BatchlabInputError(
                f"{only_isogclr} set iSogCLR's learned temperatures; SogCLR keeps one fixed tau: pass isogclr=True "
                "(or use ISogCLRLoss), or leave them out"
            )
        settings = {**_DEFAULTS[mode], "gamma": 0.9, "eta": 0.01, "beta": 0.9, "isogclr": False, **options}
        self.mode, self.num_examples = mode, num_examples
        self.isogclr = bool(settings.pop("isogclr"))
        self.gamma, rho = _check_hyper(settings.pop("gamma"), settings.pop("rho"))
        self.rho = rho if self.isogclr else 0.0
        tau = settings.pop("tau")
        for name in ("eta", "beta", "tau_min", "tau_max"):  # a NaN here would turn every temperature NaN
            value = settings[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BatchlabInputError(f"{name} must be a finite number, got {value!r}")
        self.eta, self.beta = float(settings.pop("eta")), float(settings.pop("beta"))
        self.tau_min, self.tau_max = float(settings.pop("tau_min")), float(settings.pop("tau_max"))
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf:
            raise BatchlabInputError(f"tau must be a finite positive float, got {tau!r}")
        if self.isogclr and not 0 < self.tau_min <= tau <= self.tau_max:
            raise BatchlabInputError(
                f"iSogCLR needs 0 < tau_min <= tau <= tau_max, got tau_min={self.tau_min}, tau={tau}, "
                f"tau_max={self.tau_max}"
            )
        if not 0 < self.beta <= 1 or self.eta < 0:
            raise BatchlabInputError(f"beta must be in (0, 1] and eta >= 0, got beta={self.beta}, eta={self.eta}")
        self.tau_init = float(tau)
        self.call_options = settings  # reduction, impl, distributed, group, tile_size
        rows = 1 if mode != "symmetric" else 2
        self.register_buffer("log_u", torch.full((rows, num_examples), float("-inf")))
        if self.isogclr:
            self.register_buffer("tau", torch.full((rows, num_examples), float(tau)))
            self.register_buffer("tau_momentum", torch.zeros(rows, num_examples))

    def extra_repr(self) -> str:
        return f"num_examples={self.num_examples}, mode={self.mode!r}, isogclr={self.isogclr}, tau={self.tau_init}"

    def _check_ids(self, ids, n: int) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or tuple(ids.shape) != (n,):
            raise BatchlabInputError(
                f"ids must be an integer tensor of shape ({n},): each pair's index in the training set, "
                f"got {getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}"
            )
        ids = ids.to(self.log_u.device, torch.long)
        if not data_checks_on(ids.device, self.call_options.get("check_inputs")):
            return ids
        if n and (int(ids.min()) < 0 or int(ids.max()) >= self.num_examples):
            raise BatchlabInputError(f"ids must lie in [0, {self.num_examples}), got [{int(ids.min())}, {int(ids.max())}]")
        if ids.unique().numel() != n:
            raise BatchlabInputError("ids repeat within the batch; each example's state is updated once per step")
        return ids

    def _rows(self, table: torch.Tensor, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        rows = table[:, ids].to(like.device, compute_dtype(like.dtype))
        return rows.expand(2, -1) if self.mode == "two_view" else rows

    def forward(self, image_features, text_features, ids, output_dict: bool = False, neg_mask=None):
        """The batch's loss; updates the state of the examples ``ids`` (N,) as a side effect.

        ``neg_mask``: the batch's known false negatives, as :func:`sogclr` takes them."""
        if not isinstance(image_features, torch.Tensor):
            raise BatchlabInputError("image_features must be a tensor (N, d)")
        check_flags(output_dict=output_dict)  # "no" would return the dict
        ids = self._check_ids(ids, image_features.shape[0])
        loss = self._fused_step(image_features, text_features, ids) if neg_mask is None else None
        if loss is None:
            opts = dict(self.call_options)
            tau = self._rows(self.tau, ids, image_features) if self.isogclr else self.tau_init
            out = sogclr(
                image_features, text_features, log_u=self._rows(self.log_u, ids, image_features), tau=tau,
                gamma=self.gamma, rho=self.rho, mode=self.mode, neg_mask=neg_mask, **opts,
            )
            self._update(ids, out)
            loss = out.loss
        return {"contrastive_loss": loss} if output_dict else loss

    def _fused_step(self, q, k, ids: torch.Tensor):
        """The batch's loss from the Triton kernels with the state read and written in place (one
        autograd function, no gather, no separate update: the fixed cost that bounds small batches),
        or None where :func:`sogclr` and :meth:`_update` must run: two views, distributed, value
        checks on, ``torch.compile`` (which traces the custom ops of that path), or anything the
        kernels do not take. Validates the inputs as :func:`sogclr` does."""
        opts = self.call_options
        impl = opts.get("impl", "auto")
        # metadata first: where the kernels cannot run, sogclr() validates (and value-checks) the inputs once
        if (self.mode == "two_view" or opts.get("tile_size") is not None or torch.compiler.is_compiling()
                or impl not in ("auto", "triton") or not (impl == "triton" or q.is_cuda)
                or checks_for(q, opts.get("check_inputs"))):
            return None
        module = _triton_module()
        if module is None:
            return None
        q, k, gamma, rho, _ = _validate(
            q, k, mode=self.mode, reduction=opts.get("reduction", "mean"), impl=impl,
            distributed=opts.get("distributed", "none"), gamma=self.gamma, rho=self.rho,
            normalize=opts.get("normalize", False), check_inputs=opts.get("check_inputs"), impl_options={})
        n, m = q.shape[0], k.shape[0]
        if (m < 2 or use_distributed(opts.get("distributed", "none"), opts.get("group"))
                or not module.step_ok(q, k, self._tables()) or _backend(impl, n, m, q, ()) != "triton"):
            return None
        return module.sogclr_step(
            q, k, ids, self.log_u, self.tau if self.isogclr else None, self.tau_momentum if self.isogclr else None,
            tau_value=self.tau_init, mode=self.mode, gamma=gamma, rho=rho, beta=self.beta, eta=self.eta,
            tau_min=self.tau_min, tau_max=self.tau_max, reduction=opts.get("reduction", "mean"))

    @torch.no_grad()
    def _update(self, ids: torch.Tensor, out: SogCLRResult) -> None:
        log_u, tau_grad = out.log_u, out.tau_grad
        distributed = self.call_options.get("distributed", "none")
        if (ids.is_cuda and self.call_options.get("impl", "auto") in ("auto", "triton") and log_u.dtype == torch.float32
                and not use_distributed(distributed, self.call_options.get("group"))):
            module = _triton_module()
            if module is not None and all(module.update_ok(t) for t in self._tables()):
                # one launch instead of a dozen small ones (the step's fixed cost at small N)
                module.sogclr_update(ids, log_u, tau_grad, self.log_u, self.tau if self.isogclr else None,
                                     self.tau_momentum if self.isogclr else None, self.mode == "two_view",
                                     self.beta, self.eta, self.tau_min, self.tau_max)
                return
        if self.mode == "two_view":  # one row per example: the mean of the two views' u and steps
            log_u = (torch.logsumexp(log_u, 0) - math.log(2.0))[None]
            tau_grad = tau_grad.mean(0, keepdim=True)
        log_u = log_u.to(self.log_u)
        rows = [log_u]
        if self.isogclr:
            momentum = (1 - self.beta) * self.tau_momentum[:, ids] + self.beta * tau_grad.to(self.tau)
            tau = (self.tau[:, ids] - self.eta * momentum).clamp_(self.tau_min, self.tau_max)
            rows += [tau, momentum]
        if use_distributed(distributed, self.call_options.get("group")):
            ids, rows = _gather_rows(ids, rows, self.call_options.get("group"))
        self.log_u[:, ids] = rows[0]
        if self.isogclr:
            self.tau[:, ids] = rows[1]
            self.tau_momentum[:, ids] = rows[2]

    def _tables(self) -> list[torch.Tensor]:
        return [self.log_u, self.tau, self.tau_momentum] if self.isogclr else [self.log_u]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        for name, buf in self.named_buffers():
            got = state_dict.get(name)
            if got is not None and tuple(got.shape) != tuple(buf.shape):
                raise BatchlabInputError(
                    f"saved state {name!r} has shape {tuple(got.shape)} but this loss holds {tuple(buf.shape)}: "
                    f"it was saved for another training set size or mode (num_examples={self.num_examples}, "
                    f"mode={self.mode!r}, isogclr={self.isogclr})"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class ISogCLRLoss(SogCLRLoss):
    """iSogCLR: :class:`SogCLRLoss` with a temperature per example (``isogclr=True``)."""

    def __init__(self, num_examples: int, **options) -> None:
        if "isogclr" in options:
            raise BatchlabInputError("ISogCLRLoss always learns per-example temperatures; do not pass isogclr=")
        super().__init__(num_examples, isogclr=True, **options)


def _gather_rows(ids: torch.Tensor, rows: Sequence[torch.Tensor], group):
    """Every rank's ``ids`` and state ``rows`` (D, n_r), concatenated in rank order."""
    from batchlab.losses.distributed.strategies import gather_sizes, gather_with_grad

    sizes = gather_sizes(ids.shape[0], ids.device, group)
    all_ids = gather_with_grad(ids, group, sizes)
    gathered = [gather_with_grad(r.T.contiguous(), group, sizes).T for r in rows]
    return all_ids, gathered
