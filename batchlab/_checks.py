"""Cheap input checks shared by losses and samplers.

Each check raises :class:`~batchlab.errors.BatchlabInputError` with a message that
names the argument, what it was, and what was expected.

Two kinds of check: *metadata* checks (shapes, dtypes, devices) cost nothing and always
run; *data* checks (NaN/Inf, unit norms, index ranges) read values, which on CUDA means
waiting for the GPU (a host-device synchronisation). :func:`data_checks_on` says when
the losses run the data checks: always on the CPU, on CUDA only when asked
(``check_inputs=True`` or the environment variable ``BATCHLAB_CHECK_INPUTS=1``).
"""

from __future__ import annotations

import numbers
import operator
import os
from typing import Any, Sequence

import numpy as np
import torch

from batchlab.errors import BatchlabInputError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


#: Environment switch for the data checks: "1" turns them on everywhere (CUDA too), "0" off
#: everywhere (the CPU too); unset: on for CPU tensors, off for CUDA tensors.
CHECK_INPUTS_ENV = "BATCHLAB_CHECK_INPUTS"


@torch.compiler.assume_constant_result
def _env_switch() -> str:
    """``BATCHLAB_CHECK_INPUTS`` as set now (a constant to torch.compile, which does not trace os.environ)."""
    return os.environ.get(CHECK_INPUTS_ENV, "").strip()


def data_checks_on(device: torch.device, check_inputs: bool | None = None) -> bool:
    """Whether to run the checks that read tensor values (NaN/Inf, unit norm, index ranges).

    ``check_inputs`` (a loss's keyword) wins when given; else ``BATCHLAB_CHECK_INPUTS``
    ("1"/"0"); else on for every device but CUDA, where a check would synchronise the
    host with the GPU on every call.
    """
    if check_inputs is not None:
        if not isinstance(check_inputs, bool):
            raise BatchlabInputError(f"check_inputs must be True, False or None, got {check_inputs!r}")
        return check_inputs
    env = _env_switch()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise BatchlabInputError(f"{CHECK_INPUTS_ENV} must be 0 or 1, got {env!r}")
    return device.type != "cuda"


def check_embeddings(name: str, x: torch.Tensor, *, ndim: int = 2, allow_empty: bool = False,
                     finite: bool = True) -> None:
    """Check that ``x`` is a floating tensor of ``ndim`` dimensions (and, with ``finite``, has finite values)."""
    if not isinstance(x, torch.Tensor):
        raise BatchlabInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        expected = {2: "(N, d)", 3: "(V, N, d) or (N, m, d)"}.get(ndim, f"{ndim} dimensions")
        raise BatchlabInputError(f"{name} must have shape {expected}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise BatchlabInputError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    if not allow_empty and x.numel() == 0:
        raise BatchlabInputError(f"{name} is empty (shape {tuple(x.shape)}); a batch needs at least one example")
    if finite:
        check_finite(name, x)


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise if ``x`` holds NaN or Inf (one reduction; syncs on CUDA).

    ``aminmax`` propagates NaN and exposes +-Inf in one pass with no (n, d) boolean
    temporary: 20x faster than ``isfinite(x).all()`` on the CPU (0.2 vs 4.2 ms at 512 x 3072).
    """
    if not x.numel() or not torch.is_floating_point(x) or x.device.type == "meta":
        return
    lo, hi = torch.aminmax(x.detach())
    if not bool(torch.isfinite(torch.stack([lo, hi])).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise BatchlabInputError(
            f"{name} contains {bad} non-finite value(s) (NaN or Inf); check the encoder output "
            "or the mixed-precision loss scale"
        )


def check_same_device_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """All tensors on one device with one dtype."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise BatchlabInputError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; move both to one device"
            )
        if t.dtype != first.dtype:
            raise BatchlabInputError(
                f"{name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; cast both to one dtype"
            )


def _row_norms(rows: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row, accumulated in fp32 (fp64 stays fp64)."""
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(rows, dim=-1, dtype=dtype)


def check_normalized(name: str, x: torch.Tensor, *, atol: float = 2e-2) -> None:
    """Check that EVERY row of ``x`` (..., d) is finite with unit L2 norm (one pass; syncs on CUDA).

    One fp32 norm per row: a NaN or Inf anywhere in a row makes its norm non-finite, so
    the same reduction finds non-finite values too. The tolerance admits bf16 rounding
    (relative error about 4e-3 per element).
    """
    rows = x.detach().reshape(-1, x.shape[-1])
    if rows.shape[0] == 0 or rows.device.type == "meta":
        return
    norms = _row_norms(rows)
    off = (norms - 1).abs()
    worst = off.max()
    if bool(worst <= atol):  # NaN compares False: falls through to the messages below
        return
    check_finite(name, x)
    bad = off > atol
    first = int(bad.nonzero()[0, 0])
    raise BatchlabInputError(
        f"{name} rows must be L2-normalised (norm 1 +- {atol:g}), but {int(bad.sum())} of {rows.shape[0]} "
        f"row(s) are not (first: row {first}, norm {float(norms[first]):.4g}); normalise with "
        "torch.nn.functional.normalize(x, dim=-1) or pass normalize=True"
    )


def check_nonzero_rows(name: str, x: torch.Tensor) -> None:
    """Refuse all-zero rows (they have no direction to normalise to) and non-finite values (syncs on CUDA)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    if rows.shape[0] == 0 or rows.device.type == "meta":
        return
    norms = _row_norms(rows)
    if bool(torch.isfinite(norms).all() & (norms > 0).all()):
        return
    check_finite(name, x)
    zero = (norms == 0).nonzero().flatten()
    raise BatchlabInputError(
        f"{name} has {zero.numel()} all-zero row(s) (first: row {int(zero[0])}); normalize=True cannot give "
        "them a direction (torch's normalize would silently return zeros): check the encoder output"
    )


def check_positive_int(name: str, value: int, *, minimum: int = 1) -> int:
    """``value`` is an integer >= ``minimum`` (a Python or numpy int, not a bool); returns it as an int."""
    try:
        number = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise BatchlabInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def check_real(name: str, value: Any) -> float:
    """``value`` as a float (numpy numbers welcome; bools, strings and None refused, not coerced)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise BatchlabInputError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_flags(**flags: bool) -> None:
    """Each on/off option is a bool (a truthy string or None would silently pick another behaviour)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise BatchlabInputError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """``value`` is one of ``choices``; returns it."""
    if value not in choices:
        raise BatchlabInputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
