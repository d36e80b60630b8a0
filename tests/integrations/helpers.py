"""Comparing a loss's value and parameter gradients with a reference loss."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def value_and_grads(loss, model, features):
    """The loss value and every trainable parameter's gradient, from a fresh backward."""
    model.zero_grad(set_to_none=True)
    value = loss([dict(f) for f in features], None)
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return value.detach(), grads


def assert_same(ours, theirs, tol: float = 1e-5):
    (v1, g1), (v2, g2) = ours, theirs
    assert rel_err(v1, v2) <= tol, (v1.item(), v2.item())
    assert g1.keys() == g2.keys()
    flat1 = torch.cat([g1[k].flatten() for k in sorted(g1)])
    flat2 = torch.cat([g2[k].flatten() for k in sorted(g2)])
    assert flat2.abs().max() > 0
    assert rel_err(flat1, flat2) <= tol, rel_err(flat1, flat2)
