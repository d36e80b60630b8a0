"""Helpers for loss tests: random unit embeddings and gradient comparison."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit(n: int, d: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """(n, d) random rows with unit norm, as a leaf tensor that wants a gradient."""
    x = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    return x.to(dtype).requires_grad_(True)


def grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of a scalar ``loss`` with respect to ``tensors`` (None -> zeros)."""
    out = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, out)]


def assert_close_all(actual, expected, *, rtol: float, atol: float, what: str = "") -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert torch.isfinite(a).all(), f"{what}[{i}] has non-finite values"
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}[{i}]: {m}")
