"""Argument handling shared by every loss family and every ``impl``.

The public loss functions validate once here, then hand plain, checked tensors to
an implementation (reference, tiled, triton), so that every backend sees the same
inputs and raises the same errors.

What is checked when (``check`` below is :func:`batchlab._checks.data_checks_on`): shapes,
dtypes and devices always (metadata, free); values -- NaN/Inf, unit rows (every row),
zero rows under ``normalize=True``, index ranges of ``targets`` / ``neg_mask``, a positive
for every key of the symmetric loss -- only when ``check`` is on, because on CUDA each
of them makes the host wait for the GPU. Default targets (the diagonal) are passed to
the implementations as ``targets=None``: nothing to build, nothing to check.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Union

import torch

from batchlab._checks import (
    check_choice,
    check_flags,
    check_embeddings,
    check_finite,
    check_nonzero_rows,
    check_normalized,
    check_same_device_dtype,
    data_checks_on,
)
from batchlab.errors import BatchlabInputError

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "reference", "tiled", "triton")
DISTRIBUTED = ("none", "allgather", "ring", "auto")

#: A negative mask: a bool (N, M) tensor, a LongTensor of (P, 2) [row, col] pairs,
#: or a callable ``fn(rows, cols) -> BoolTensor(len(rows), len(cols))`` (True = remove).
NegMask = Union[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], None]


class LSE(NamedTuple):
    """Log-sum-exp statistics returned with ``return_lse=True``.

    ``row``: (N,) log-sum-exp of each query's logits (its denominator, extra negatives
    included); ``col``: (M,) the same per key for the symmetric loss, else ``None``.
    """

    row: torch.Tensor
    col: torch.Tensor | None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses accumulate in float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare_pair(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    normalize: bool,
    check: bool,
    names: tuple[str, str] = ("q", "k"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a (queries, keys) pair: 2-D, same d, device and dtype; with ``check`` also finite, unit rows."""
    check_embeddings(names[0], q, finite=False)
    check_embeddings(names[1], k, finite=False)
    check_same_device_dtype(names, (q, k))
    if q.shape[1] != k.shape[1]:
        raise BatchlabInputError(
            f"{names[0]} and {names[1]} must have the same embedding dimension, got "
            f"{names[0]} {tuple(q.shape)} and {names[1]} {tuple(k.shape)}"
        )
    return prepare_rows(names[0], q, normalize=normalize, check=check), prepare_rows(
        names[1], k, normalize=normalize, check=check)


def prepare_rows(name: str, x: torch.Tensor, *, normalize: bool, check: bool) -> torch.Tensor:
    """``x`` (..., d) normalised (``normalize``) or checked to be: every row finite, unit (or non-zero) norm."""
    if normalize:
        if check:
            check_nonzero_rows(name, x)
        return torch.nn.functional.normalize(x, dim=-1)
    if check:
        check_normalized(name, x)
    return x


def prepare_scalar(name: str, value: torch.Tensor | float, like: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """A 0-d tensor on ``like``'s device in the compute dtype, keeping the autograd link (finite if ``check``)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise BatchlabInputError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")
        if value.device != like.device and value.device.type != "cpu":
            raise BatchlabInputError(f"{name} is on {value.device} but the embeddings are on {like.device}")
        if not value.is_floating_point():
            raise BatchlabInputError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if check:
            check_finite(name, value.detach())
        value = value.reshape(()) if value.dim() else value
        dtype = compute_dtype(like.dtype)
        if value.dtype == dtype and value.device == like.device:
            return value  # the common case: no conversion op on every call
        return value.to(device=like.device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BatchlabInputError(f"{name} must be a float or a scalar tensor, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise BatchlabInputError(f"{name} must be finite, got {value}")
    return torch.tensor(float(value), device=like.device, dtype=compute_dtype(like.dtype))


def prepare_positives(
    n: int,
    m: int,
    device: torch.device,
    *,
    targets: torch.Tensor | None,
    pos_mask: torch.Tensor | None,
    need_columns: bool,
    check: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Return ``(targets, pos_mask)`` with at most one of them set; ``(None, None)`` means the diagonal.

    Default: query i's positive is key i, which needs m >= n (metadata only: no tensor is
    built). ``need_columns``: the symmetric direction needs every key to have a positive.
    Value checks (rows/columns without a positive, target ranges) run only with ``check``.
    """
    if targets is not None and pos_mask is not None:
        raise BatchlabInputError("pass either targets or pos_mask, not both")
    if pos_mask is not None:
        if not isinstance(pos_mask, torch.Tensor) or pos_mask.dtype != torch.bool:
            raise BatchlabInputError("pos_mask must be a bool tensor of shape (N, M)")
        if tuple(pos_mask.shape) != (n, m):
            raise BatchlabInputError(f"pos_mask must have shape ({n}, {m}), got {tuple(pos_mask.shape)}")
        if pos_mask.device != device:
            raise BatchlabInputError(f"pos_mask is on {pos_mask.device} but the embeddings are on {device}")
        if check:
            _check_pos_mask_covers(pos_mask, need_columns)
        return None, pos_mask
    if targets is None:
        if m < n:
            raise BatchlabInputError(
                f"without targets, query i's positive is key i, so keys ({m}) must be at least as many "
                f"as queries ({n}); pass targets= or pos_mask="
            )
        if need_columns and m != n:
            raise BatchlabInputError(f"{m - n} key(s) are nobody's target; the symmetric loss needs as many "
                                     "keys as queries: pass symmetric=False")
        return None, None
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise BatchlabInputError("targets must be an integer tensor of shape (N,) holding key indices")
    if tuple(targets.shape) != (n,):
        raise BatchlabInputError(f"targets must have shape ({n},), got {tuple(targets.shape)}")
    if targets.device != device:
        raise BatchlabInputError(f"targets is on {targets.device} but the embeddings are on {device}")
    targets = targets.long()
    if check:
        _check_targets(targets, m, need_columns)
    return targets, None


def _check_pos_mask_covers(pos_mask: torch.Tensor, need_columns: bool) -> None:
    empty_rows = (~pos_mask.any(dim=1)).nonzero().flatten()
    if empty_rows.numel():
        raise BatchlabInputError(
            f"pos_mask has {empty_rows.numel()} row(s) with no positive (first: row {int(empty_rows[0])}); "
            "every query needs at least one positive"
        )
    if need_columns:
        empty_cols = (~pos_mask.any(dim=0)).nonzero().flatten()
        if empty_cols.numel():
            raise BatchlabInputError(
                f"pos_mask has {empty_cols.numel()} column(s) with no positive (first: column "
                f"{int(empty_cols[0])}); the symmetric loss needs a positive for every key: "
                "pass symmetric=False"
            )


def _check_targets(targets: torch.Tensor, m: int, need_columns: bool) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= m):
        raise BatchlabInputError(f"targets must index keys in [0, {m}), got values in "
                                 f"[{int(targets.min())}, {int(targets.max())}]")
    if need_columns:
        hit = torch.zeros(m, dtype=torch.bool, device=targets.device)
        hit[targets] = True
        if not bool(hit.all()):
            missing = int((~hit).sum())
            raise BatchlabInputError(
                f"{missing} key(s) are nobody's target; the symmetric loss needs a positive for every "
                "key: pass symmetric=False, or targets that cover every key"
            )


def diagonal_targets(n: int, device: torch.device, targets: torch.Tensor | None) -> torch.Tensor:
    """``targets``, or ``arange(n)`` when it is None (the default diagonal), for code that needs indices."""
    return torch.arange(n, device=device) if targets is None else targets


def positive_mask(n: int, m: int, device: torch.device, targets: torch.Tensor | None,
                  pos_mask: torch.Tensor | None) -> torch.Tensor:
    """The dense (n, m) positive mask (reference implementations only)."""
    if pos_mask is not None:
        return pos_mask
    mask = torch.zeros(n, m, dtype=torch.bool, device=device)
    mask[torch.arange(n, device=device), diagonal_targets(n, device, targets)] = True
    return mask


def check_neg_mask(neg_mask: NegMask, n: int, m: int, device: torch.device, *, check: bool = True) -> NegMask:
    """Validate the three accepted forms of a negative mask (a callable is checked lazily; index
    ranges only with ``check``)."""
    if neg_mask is None or callable(neg_mask) and not isinstance(neg_mask, torch.Tensor):
        return neg_mask
    if not isinstance(neg_mask, torch.Tensor):
        raise BatchlabInputError(
            "neg_mask must be a bool (N, M) tensor, a LongTensor of (P, 2) [row, col] pairs, or a callable"
        )
    if neg_mask.device != device:
        raise BatchlabInputError(f"neg_mask is on {neg_mask.device} but the embeddings are on {device}")
    if neg_mask.dtype == torch.bool:
        if tuple(neg_mask.shape) != (n, m):
            raise BatchlabInputError(f"a bool neg_mask must have shape ({n}, {m}), got {tuple(neg_mask.shape)}")
        return neg_mask
    if neg_mask.dtype in (torch.int64, torch.int32):
        if neg_mask.dim() != 2 or neg_mask.shape[1] != 2:
            raise BatchlabInputError(f"an index neg_mask must have shape (P, 2), got {tuple(neg_mask.shape)}")
        if check and neg_mask.numel() and (
            int(neg_mask.min()) < 0 or int(neg_mask[:, 0].max()) >= n or int(neg_mask[:, 1].max()) >= m
        ):
            raise BatchlabInputError(f"neg_mask pairs must index rows in [0, {n}) and columns in [0, {m})")
        return neg_mask.long()
    raise BatchlabInputError(f"neg_mask tensor must be bool or int64, got {neg_mask.dtype}")


def neg_mask_tile(neg_mask: NegMask, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
    """The (len(rows), len(cols)) block of a negative mask, in any of its three forms.

    ``rows`` and ``cols`` are LongTensors of global indices. Returns None when there is no mask.
    This is what the tiled engine calls per tile, so no N x M mask is ever built there.
    """
    if neg_mask is None:
        return None
    if isinstance(neg_mask, torch.Tensor) and neg_mask.dtype == torch.bool:
        return neg_mask[rows][:, cols]
    if isinstance(neg_mask, torch.Tensor):
        tile = torch.zeros(len(rows), len(cols), dtype=torch.bool, device=rows.device)
        if neg_mask.numel() == 0 or len(rows) == 0 or len(cols) == 0:
            return tile
        r0, c0 = int(rows[0]), int(cols[0])
        contiguous = bool((rows == torch.arange(r0, r0 + len(rows), device=rows.device)).all()) and bool(
            (cols == torch.arange(c0, c0 + len(cols), device=cols.device)).all()
        )
        if contiguous:
            inside = (
                (neg_mask[:, 0] >= r0) & (neg_mask[:, 0] < r0 + len(rows))
                & (neg_mask[:, 1] >= c0) & (neg_mask[:, 1] < c0 + len(cols))
            )
            pairs = neg_mask[inside]
            tile[pairs[:, 0] - r0, pairs[:, 1] - c0] = True
            return tile
        row_pos = {int(r): i for i, r in enumerate(rows.tolist())}
        col_pos = {int(c): j for j, c in enumerate(cols.tolist())}
        for r, c in neg_mask.tolist():
            if r in row_pos and c in col_pos:
                tile[row_pos[r], col_pos[c]] = True
        return tile
    tile = neg_mask(rows, cols)
    if not isinstance(tile, torch.Tensor) or tile.dtype != torch.bool or tuple(tile.shape) != (len(rows), len(cols)):
        raise BatchlabInputError(
            "a callable neg_mask must return a bool tensor of shape (len(rows), len(cols)); got "
            f"{type(tile).__name__} {getattr(tile, 'dtype', '')} {tuple(getattr(tile, 'shape', ()))}"
        )
    return tile.to(rows.device)


def check_extra_negatives(extra: torch.Tensor | None, q: torch.Tensor, *, check: bool = True,
                          normalize: bool = False) -> torch.Tensor | None:
    """Extra negatives per query: (N, m, d), same device/dtype as q; finite unit rows with ``check``
    (L2-normalised here with ``normalize``, as the loss's ``q`` and ``k`` are)."""
    if extra is None:
        return None
    check_embeddings("extra_negatives", extra, ndim=3, allow_empty=True, finite=False)
    check_same_device_dtype(("q", "extra_negatives"), (q, extra))
    if extra.shape[0] != q.shape[0] or extra.shape[2] != q.shape[1]:
        raise BatchlabInputError(
            f"extra_negatives must have shape (N={q.shape[0]}, m, d={q.shape[1]}), got {tuple(extra.shape)}"
        )
    if normalize:
        return prepare_rows("extra_negatives", extra, normalize=True, check=check)
    if extra.numel() and check:
        check_normalized("extra_negatives", extra)
    return extra


def check_options(reduction: str, impl: str, distributed: str, **flags: bool) -> None:
    """The string options, and the on/off ones (``symmetric=``, ``normalize=``, ...) given as ``flags``."""
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("impl", impl, IMPLS)
    check_choice("distributed", distributed, DISTRIBUTED)
    check_flags(**flags)


def checks_for(x: torch.Tensor, check_inputs: bool | None) -> bool:
    """Whether this call reads tensor values to check them (see :func:`batchlab._checks.data_checks_on`)."""
    if not isinstance(x, torch.Tensor):
        return True  # the metadata checks will refuse it with a clear message
    return data_checks_on(x.device, check_inputs)
