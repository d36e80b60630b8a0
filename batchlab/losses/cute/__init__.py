"""Optional CuTe kernels (CUTLASS's Python DSL, through ``quack``) for the streaming InfoNCE/CLIP path on Hopper.

The streaming path (N above the dense path's limit, :mod:`batchlab.losses.triton._lse`) spends its time in two
GEMM-shaped passes over the (N, M) logits: the forward's shifted row and column sums, and each gradient panel's
logit gradient. Both are a matrix product with an element-wise epilogue, which is what a warp-specialised Hopper
GEMM with a fused epilogue does best (the copy engine, the tensor cores and the epilogue of another tile run at
the same time). This package runs those two passes as ``quack`` epilogue GEMMs; everything around them (the
bound and shift ``ctl``, the exact recomputation of underflowed sums, the products, the glue) stays as it is.

Install the extra to get it: ``pip install "batchlab[cute]"`` (``quack-kernels``, which brings
``nvidia-cutlass-dsl``). Triton stays the portable path and the one CI runs.

``BATCHLAB_CUTE`` (read at each call): ``0`` (default) never uses them, ``auto`` uses them where they run
(:func:`unavailable`) and take the call (:func:`unsupported`), ``1`` as ``auto`` but raises ``RuntimeError`` with the
reason when they cannot run at all (no quack, not a Hopper GPU) instead of falling back silently. :data:`MODE`
(``None``: the variable) overrides it in-process.

Why they are off by default: on one H200 (session 10, ``benchmarks/results/losses-h200-s10/``) each pass alone is
faster than its Triton kernel in some runs (the logit-gradient pass 8.9-9.9 ms against ~10.2-11.3 ms for 8 panels at
N = 65,536), but a whole InfoNCE step at 65,536 runs at the GPU's 700 W power cap (SM clock ~1.5 GHz instead of
1.98), and there the two paths take the same time (31.5 against 31.2 ms, 31.8 against 31.8 ms); at N = 1,048,576
the CuTe path took 8.02 s against 8.16 s. The issue's rule: use it only where it wins clearly.

Example::

    import os
    os.environ["BATCHLAB_CUTE"] = "1"      # fail loudly if the CuTe kernels cannot run here
    loss = batchlab.losses.info_nce(q, k, scale)   # N = 65,536 bf16 on an H100/H200
"""

from __future__ import annotations

import functools
import os

import torch

#: In-process override of ``BATCHLAB_CUTE`` ("auto", "0" or "1"); None reads the variable at each call.
MODE: str | None = None
_MODES = ("auto", "0", "1")


def mode() -> str:
    """The switch in force: :data:`MODE`, else ``BATCHLAB_CUTE``, else ``"0"``."""
    value = MODE if MODE is not None else os.environ.get("BATCHLAB_CUTE", "0")
    if value not in _MODES:
        raise ValueError(f"BATCHLAB_CUTE={value!r}: expected one of {', '.join(_MODES)} "
                         "(0: never, the default; auto: use the CuTe kernels where they apply; 1: as auto, but raise "
                         "if they cannot run here)")
    return value


@functools.lru_cache(maxsize=None)
def import_error() -> str | None:
    """Why ``quack`` (and the CUTLASS DSL under it) cannot be imported, or None when it can."""
    try:
        import quack.epilogue.frontend  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means the extra is not usable
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unavailable(device: torch.device) -> str | None:
    """Why the CuTe kernels cannot run on ``device`` at all (None: they can): not CUDA, not Hopper, no quack."""
    if device.type != "cuda":
        return f"the inputs are on {device.type}, not a CUDA device"
    if _capability(device.index if device.index is not None else torch.cuda.current_device())[0] != 9:
        return "the kernels are built for Hopper GPUs (sm_90: H100, H200)"
    error = import_error()
    if error is not None:
        return f"quack is not importable ({error}); install the extra: pip install 'batchlab[cute]'"
    return None


def unsupported(q: torch.Tensor, k: torch.Tensor, *, targets=None, exclude: bool = False,
                cols: bool = True) -> str | None:
    """Why the CuTe kernels do not take this kind of call (None: they do). Metadata only: no sync.

    They take the symmetric InfoNCE/CLIP statistics with the diagonal positives (no ``targets``, no excluded
    positives, column statistics on) of bf16/fp16 rows, with ``d`` and ``M`` multiples of 8 (16-byte rows for
    the copy engine), contiguous and 16-byte aligned. Everything else (DCL's exclusion, targets, fp32) stays on
    the Triton kernels.
    """
    if targets is not None or exclude or not cols:
        return "only the symmetric loss with the diagonal positives (no targets, no exclusion, both directions)"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype:
        return f"inputs must be bf16 or fp16 (got {q.dtype}, {k.dtype})"
    if q.shape[1] % 8 or k.shape[0] % 8:
        return f"d and M must be multiples of 8 (d={q.shape[1]}, M={k.shape[0]})"
    if not (q.is_contiguous() and k.is_contiguous()) or q.data_ptr() % 16 or k.data_ptr() % 16:
        return "the inputs must be contiguous and 16-byte aligned"
    return None


def wanted(q: torch.Tensor, k: torch.Tensor, **kw) -> bool:
    """Whether this streaming call goes to the CuTe kernels (keywords: :func:`unsupported`'s).

    ``BATCHLAB_CUTE=1`` raises ``RuntimeError`` when the kernels cannot run on the device at all
    (:func:`unavailable`); kinds of call they do not take (:func:`unsupported`) use Triton in every mode.
    """
    switch = mode()
    if switch == "0":
        return False
    reason = unavailable(q.device)
    if reason is not None:
        if switch == "1":
            raise RuntimeError(f"BATCHLAB_CUTE=1 but the CuTe kernels cannot run: {reason}. "
                               "Set BATCHLAB_CUTE=0 (or unset it) to use the Triton kernels.")
        return False
    return unsupported(q, k, **kw) is None
