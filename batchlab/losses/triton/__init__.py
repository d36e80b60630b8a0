"""Fused Triton kernels behind ``impl="triton"`` (and ``impl="auto"`` on CUDA).

Importing this package imports Triton (an ImportError when it is missing tells the
dispatcher to fall back) and registers the implementations of ``info_nce``,
``siglip``, ``dcl`` and ``sogclr``. Use the public functions in :mod:`batchlab.losses` with
``impl="triton"``, or the thin wrappers here:

>>> from batchlab.losses.triton import triton_available  # doctest: +SKIP
>>> triton_available(torch.device("cuda"))  # doctest: +SKIP
True

How the work is split (see ``_lse.py``, ``_siglip.py``, ``_kernels.py``): the
forward is one tiled pass that yields row and column log-sum-exps; the backward
recomputes each tile once and writes the logit gradient per panel of rows, which two
matrix products turn into ``dq`` and ``dk``. Memory beyond inputs and gradients is
the panel buffer (``workspace_bytes``: by default 8,192 rows of the (N, M) logit gradient,
1 GiB of bf16 at M = 65,536, at most 16 GiB), an fp32 ``dk`` accumulator and O(N) statistics.
The scale gradient is summed in fp32 inside the backward kernels (exact at any temperature).
Measured on one H200 (d=512, bf16, forward + backward of the symmetric loss,
``benchmarks/results/losses-h200-s7/``): 31.6-32.3 ms at N = 65,536 (open_clip ``ClipLoss`` 71.8 ms
in the same sweep), 1.25 GiB beyond inputs and gradients, 84 launches, and 7.94 s at
N = 1,048,576; the H100 history is in ``benchmarks/losses-triton-notes.md``.
"""

from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError here means: no Triton backend)

from batchlab.losses.triton import _impl  # noqa: F401  (registers the implementations)
from batchlab.losses.triton import _sogclr  # noqa: F401  (registers sogclr's, so available_impls lists them)


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``.

    True on CUDA GPUs of compute capability 8.0+ (bf16 matrix units) when Triton imports;
    on the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``, slow: tests only).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_info_nce(q, k, logit_scale, **kwargs):
    """:func:`batchlab.losses.info_nce` with ``impl="triton"`` (same arguments)."""
    from batchlab.losses import info_nce

    return info_nce(q, k, logit_scale, impl="triton", **kwargs)


def triton_siglip(q, k, logit_scale, logit_bias, **kwargs):
    """:func:`batchlab.losses.siglip` with ``impl="triton"`` (same arguments)."""
    from batchlab.losses import siglip

    return siglip(q, k, logit_scale, logit_bias, impl="triton", **kwargs)


def triton_dcl(q, k, logit_scale, **kwargs):
    """:func:`batchlab.losses.dcl` with ``impl="triton"`` (same arguments)."""
    from batchlab.losses import dcl

    return dcl(q, k, logit_scale, impl="triton", **kwargs)


__all__ = ["triton_available", "triton_info_nce", "triton_siglip", "triton_dcl"]
