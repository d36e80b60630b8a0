"""Helpers shared by the compat losses: the peers' dtype rules and arbitrary-norm features.

batchlab's losses take unit-norm rows (and check them); open_clip does not ask for
that. :func:`lift_to_unit` maps any (q, k) pair to unit rows whose scaled dot products
are exactly the original logits, so the compat classes can run on batchlab's losses
(every backend) without changing a single logit.
"""

from __future__ import annotations

import torch

from batchlab._checks import _row_norms
from batchlab.errors import BatchlabInputError

#: rows whose norm is within this of 1 are passed to batchlab as they are (its own check allows 2e-2)
UNIT_TOL = 1e-2


def autocast_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two feature tensors to one dtype the way the peer's ``a @ b.T`` would.

    Under autocast the product runs in the autocast dtype, so both are cast to it (the
    gradients flow back in each input's own dtype, as with autocast). Outside autocast
    PyTorch refuses a matmul of two dtypes, and so does this.
    """
    for name, x in zip(names, (a, b)):
        if not isinstance(x, torch.Tensor):
            raise BatchlabInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if a.device != b.device:
        raise BatchlabInputError(f"{names[1]} is on {b.device} but {names[0]} is on {a.device}")
    if torch.is_autocast_enabled(a.device.type):
        dtype = torch.get_autocast_dtype(a.device.type)
        return a.to(dtype), b.to(dtype)
    if a.dtype != b.dtype:
        raise BatchlabInputError(
            f"{names[0]} is {a.dtype} but {names[1]} is {b.dtype}; the peer's matmul refuses mixed dtypes "
            "outside autocast: cast one, or run under torch.autocast"
        )
    return a, b


def norm_dtype(x: torch.Tensor) -> torch.dtype:
    """Where the row norms are computed: fp32, or fp64 for fp64 features (the peers take those too)."""
    return torch.promote_types(x.dtype, torch.float32)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of every row of ``x`` in :func:`norm_dtype` (no gradient)."""
    return _row_norms(x.detach())


def max_row_norm(x: torch.Tensor) -> torch.Tensor:
    """The largest L2 row norm of ``x`` (no gradient): a norm bound for :func:`lift_to_unit`,
    1 when every row is zero (any bound lifts zero rows; a zero one would divide by it)."""
    bound = row_norms(x).max()
    return torch.where(bound > 0, bound, torch.ones_like(bound))


def needs_lift(*xs: torch.Tensor) -> torch.Tensor:
    """A 0-d fp32 tensor: the largest distance of any row norm from 1."""
    return torch.stack([(row_norms(x) - 1).abs().max().float() for x in xs]).max()


def lift_to_unit(q: torch.Tensor, k: torch.Tensor, rq: torch.Tensor, rk: torch.Tensor):
    """Unit rows ``u`` (n, d+2), ``v`` (m, d+2) with ``rq * rk * (u @ v.T) == q @ k.T``.

    ``u_i = [q_i / rq, sqrt(1 - |q_i|^2 / rq^2), 0]`` and ``v_j = [k_j / rk, 0, sqrt(...)]``
    for norm bounds ``rq >= max|q_i|``, ``rk >= max|k_j|`` (constants). The padding
    coordinates never meet (one is zero in the other), so their gradient is exactly
    zero and they are built without one (sqrt has no derivative at 0). Multiply the
    logit scale by ``rq * rk``.
    """
    def pad(x, r, first):
        sq = x.detach().to(norm_dtype(x)).pow(2).sum(-1) / r.to(norm_dtype(x)).pow(2)
        fill = (1 - sq).clamp_min(0).sqrt().to(x.dtype)[:, None]
        zero = torch.zeros_like(fill)
        return torch.cat([x / r.to(x.dtype), fill, zero] if first else [x / r.to(x.dtype), zero, fill], dim=1)

    return pad(q, rq, True), pad(k, rk, False)


def peer_result_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the peers' loss: the features' own, or float32 when autocast runs their
    cross-entropy (batchlab accumulates in fp32 and casts the result to this)."""
    return torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
