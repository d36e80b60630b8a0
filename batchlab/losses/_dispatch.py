"""Choosing an implementation (``impl=``) for a loss family.

Implementations register themselves under ``(family, impl)``. The reference
implementations live beside each public function; the tiled engine and the Triton
kernels live in ``batchlab.losses.tiled`` and ``batchlab.losses.triton`` and are
imported only when first asked for, so ``import batchlab`` stays light.

Every implementation of a family takes the same validated arguments as the
family's reference function and returns ``(loss, lse_or_None)``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch

from batchlab.errors import BatchlabInputError

_REGISTRY: dict[tuple[str, str], Callable] = {}
_BACKEND_MODULES = {"tiled": "batchlab.losses.tiled", "triton": "batchlab.losses.triton"}

#: ``impl="auto"`` uses the reference below this many logits (N * M) and a
#: memory-efficient backend above it; 2048 x 2048 fp32 logits take 16 MiB. Measured
#: (``batchlab bench losses``, benchmarks/results/losses-cpu.json): on one CPU thread the
#: tiled loss is ~0.9x the reference's time at N = 1,024 and ~0.5x at 4,096; on an H100
#: (bf16, d=512) 0.7x at 8,192.
AUTO_TILED_MIN_LOGITS = 2048 * 2048


def register(family: str, impl: str) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` the ``impl`` implementation of loss ``family``."""

    def decorate(fn: Callable) -> Callable:
        _REGISTRY[(family, impl)] = fn
        return fn

    return decorate


def _load_backend(impl: str) -> bool:
    module = _BACKEND_MODULES.get(impl)
    if module is None:
        return True
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda" or not _load_backend("triton"):
        return False
    triton_mod = importlib.import_module(_BACKEND_MODULES["triton"])
    return bool(getattr(triton_mod, "triton_available", lambda d: False)(device))


def resolve(family: str, impl: str, n: int, m: int, device: torch.device) -> Callable:
    """The implementation of ``family`` that ``impl`` names for an (n x m) problem on ``device``."""
    if impl == "auto":
        if _triton_usable(device) and (family, "triton") in _REGISTRY:
            impl = "triton"
        elif n * m > AUTO_TILED_MIN_LOGITS and _load_backend("tiled") and (family, "tiled") in _REGISTRY:
            impl = "tiled"
        else:
            impl = "reference"
    else:
        _load_backend(impl)
        if impl == "triton" and device.type != "cuda":
            import os

            if os.environ.get("TRITON_INTERPRET") != "1":
                raise BatchlabInputError(
                    f"impl='triton' needs CUDA tensors (got {device}); use impl='tiled' on the CPU, "
                    "or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) interpreter"
                )
    fn = _REGISTRY.get((family, impl))
    if fn is None:
        available = sorted(i for f, i in _REGISTRY if f == family)
        raise BatchlabInputError(
            f"impl={impl!r} is not available for {family} in this installation; available: {available}"
        )
    return fn


def accepted_options(fn: Callable, options: dict, impl: str) -> dict:
    """The backend options (``tile_size=``, ...) that ``fn`` accepts.

    With ``impl="auto"`` an option meant for another backend is dropped (auto may pick
    the reference, which has no tiles); with an explicit ``impl`` it is an error, so a
    misspelt option never passes silently.
    """
    if not options:
        return options
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    unknown = sorted(set(options) - set(params))
    if unknown and impl != "auto":
        raise BatchlabInputError(
            f"impl={impl!r} does not take option(s) {unknown}; it takes "
            f"{sorted(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)}"
        )
    return {k: v for k, v in options.items() if k in params}


def available_impls(family: str) -> list[str]:
    """The implementations of ``family`` that can be imported here."""
    for impl in _BACKEND_MODULES:
        _load_backend(impl)
    return sorted(i for f, i in _REGISTRY if f == family)
