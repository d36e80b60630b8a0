"""The seam between the loss functions and the distributed strategies.

``distributed="auto"`` means: use the default strategy when a process group with
more than one rank is initialised, and the single-process path otherwise.
The strategies live in ``batchlab.losses.distributed`` (imported on first use).
"""

from __future__ import annotations

import importlib

import torch

from batchlab.errors import BatchlabInputError


def use_distributed(distributed: str, group) -> bool:
    """Whether a call should take the distributed path."""
    if distributed == "none":
        return False
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if distributed == "auto":
        return initialised and dist.get_world_size(group) > 1
    if not initialised:
        raise BatchlabInputError(
            f"distributed={distributed!r} needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group); use distributed='auto' to fall back to one process"
        )
    return True


def run_distributed(family: str, strategy: str, group, *args, **kwargs):
    """Run ``family``'s loss with ``strategy`` over ``group`` (see ``batchlab.losses.distributed``)."""
    try:
        module = importlib.import_module("batchlab.losses.distributed.strategies")
    except ImportError as exc:  # pragma: no cover - the module ships with batchlab
        raise BatchlabInputError(f"distributed losses are unavailable: {exc}") from exc
    return module.distributed_loss(family, strategy, group, *args, **kwargs)
