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
        _BACKEND_OPTIONS.pop(family, None)  # a new backend may take new options
        _TRITON_USABLE.clear()
        return fn

    return decorate


#: Backends already imported (or known missing): later calls answer from this dict, which
#: torch.compile can trace (it refuses to trace importlib).
_LOADED: dict[str, bool] = {}


def _load_backend(impl: str) -> bool:
    module = _BACKEND_MODULES.get(impl)
    if module is None:
        return True
    if module not in _LOADED:
        try:
            importlib.import_module(module)
            _LOADED[module] = True
        except ImportError:
            _LOADED[module] = False
    return _LOADED[module]


#: ``_triton_usable`` per CUDA device, answered once (a device's capability does not change; the
#: CUDA queries cost microseconds on every call otherwise). Cleared by :func:`register`.
_TRITON_USABLE: dict = {}


@torch.compiler.assume_constant_result
def _triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device`` (a constant to torch.compile: no import is traced)."""
    if device.type != "cuda":  # auto never picks the interpreter
        return False
    usable = _TRITON_USABLE.get(device)
    if usable is None:
        usable = _TRITON_USABLE[device] = _probe_triton(device)
    return usable


def _probe_triton(device: torch.device) -> bool:
    if not _load_backend("triton"):
        return False
    triton_mod = importlib.import_module(_BACKEND_MODULES["triton"])
    return bool(getattr(triton_mod, "triton_available", lambda d: False)(device))


#: Above this many logits the Triton kernels stream tiles through ``tl.dot``; in fp32 with
#: TF32 off (torch's default) that dot runs without tensor cores, so ``auto`` takes the tiled
#: engine (cuBLAS SGEMM per tile) instead. Measured on an H200 (Cached MNRL loss part,
#: N=65,536, d=384, fp32; benchmarks/results/st-cached-h200/): Triton 12.5 s, tiled 0.43 s.
#: Below it the Triton small-batch path multiplies with cuBLAS and stays the choice.
AUTO_FP32_TRITON_MAX_LOGITS = 8192 * 8192


def _ieee_fp32(dtype: torch.dtype | None) -> bool:
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def resolve(family: str, impl: str, n: int, m: int, device: torch.device,
            dtype: torch.dtype | None = None) -> Callable:
    """The implementation of ``family`` that ``impl`` names for an (n x m) problem on ``device``.

    ``dtype`` (the embeddings') lets ``auto`` avoid the streaming Triton kernels in strict
    fp32, where they are far slower than the tiled engine's cuBLAS products.
    """
    if impl == "auto":
        strict_fp32_large = _ieee_fp32(dtype) and n * m > AUTO_FP32_TRITON_MAX_LOGITS
        if strict_fp32_large and _load_backend("tiled") and (family, "tiled") in _REGISTRY:
            impl = "tiled"
        elif _triton_usable(device) and (family, "triton") in _REGISTRY:
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

    An option that no registered implementation of ``fn``'s family takes is an error
    whatever ``impl`` is, so a misspelt or foreign option (open_clip's ``local_loss``,
    ``temperature``) never passes silently. With ``impl="auto"`` an option that another
    backend of the family takes (``tile_size`` when auto picks the reference) is
    dropped; with an explicit ``impl`` it is an error.
    """
    if not options:
        return options
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    unknown = sorted(set(options) - set(params))
    if not unknown:
        return options
    hint = _foreign_hint(unknown)
    if impl != "auto":
        raise BatchlabInputError(
            f"impl={impl!r} does not take option(s) {unknown}; it takes "
            f"{sorted(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)}{hint}"
        )
    family = next((f for (f, _), g in _REGISTRY.items() if g is fn), None)
    check_known_options(family, {n: options[n] for n in unknown})
    return {k: v for k, v in options.items() if k in params}


#: what users of other libraries pass, and what batchlab calls it
_FOREIGN_HINTS = {
    "temperature": "batchlab takes the multiplier: use logit_scale=1/temperature",
    "tau": "batchlab takes the multiplier: use logit_scale=1/tau",
    "local_loss": "open_clip's options belong to batchlab.compat.open_clip.ClipLoss; "
                  "batchlab's own losses take distributed='allgather' | 'ring' | 'auto'",
    "gather_with_grad": "use batchlab.compat.open_clip.ClipLoss, or distributed='allgather'",
    "gather_distributed": "use batchlab.compat.lightly, or distributed='allgather'",
}


def _foreign_hint(names) -> str:
    return "".join(f"; {n}: {_FOREIGN_HINTS[n]}" for n in names if n in _FOREIGN_HINTS)


_BACKEND_OPTIONS: dict[str | None, frozenset] = {}


def _backend_options(family: str | None) -> frozenset:
    """The keyword-only options some backend of ``family`` takes beyond the reference's
    arguments; computed once per family (signature inspection is too slow for every call)."""
    if family not in _BACKEND_OPTIONS:
        for backend in _BACKEND_MODULES:
            _load_backend(backend)
        names = {
            name
            for (f, _), g in _REGISTRY.items() if f == family
            for name, p in inspect.signature(g).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        reference = _REGISTRY.get((family, "reference"))
        if reference is not None:  # the reference's own arguments are not backend options
            names -= set(inspect.signature(reference).parameters)
        _BACKEND_OPTIONS[family] = frozenset(names)
    return _BACKEND_OPTIONS[family]


def check_known_options(family: str | None, options: dict) -> None:
    """Refuse backend options that no registered implementation of ``family`` takes.

    Called by :func:`accepted_options` and, before the distributed strategies (which
    pass options on to several backends), by the public loss functions, so that an
    unknown keyword is an error whatever ``impl`` and ``distributed`` resolve to.
    """
    if not options:
        return
    backend_options = _backend_options(family)
    foreign = sorted(n for n in options if n not in backend_options)
    if foreign:
        raise BatchlabInputError(
            f"unknown option(s) {foreign}: no implementation of {family} takes them (backend options: "
            f"{sorted(backend_options) or 'none'}){_foreign_hint(foreign)}"
        )


def available_impls(family: str) -> list[str]:
    """The implementations of ``family`` that can be imported here."""
    for impl in _BACKEND_MODULES:
        _load_backend(impl)
    return sorted(i for f, i in _REGISTRY if f == family)
