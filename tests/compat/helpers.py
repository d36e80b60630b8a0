"""Shared by the compat tests: run a loss module and compare it with its peer.

Tolerances: both sides compute in fp32 from the same fp32 inputs, in a different order
(batchlab's log-sum-exp vs torch's cross-entropy, a lifted dot product for non-unit
features), so values and gradients agree to a few ulps of the largest entry; we ask
for 1e-5 relative to the largest magnitude of each tensor (the issue's target).
"""

from __future__ import annotations

import torch


def run(module, inputs, *extra, **kwargs):
    """Loss and gradients of ``module(*leaves, *extra)`` for fresh leaf copies of ``inputs``."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    loss = module(*leaves, *extra, **kwargs)
    loss = loss["contrastive_loss"] if isinstance(loss, dict) else loss
    wanted = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(wanted, grads)]


def assert_same(got, want, rtol: float = 1e-5, what: str = "") -> None:
    """``|got - want| <= rtol * max|want|`` elementwise (and same shape and dtype)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs {want.dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = float(want.detach().double().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=rtol * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def assert_same_run(got, want, rtol: float = 1e-5, what: str = "") -> None:
    """Compare two :func:`run` results: the loss and every gradient."""
    assert_same(got[0], want[0], rtol, f"{what} loss")
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        assert_same(g, w, rtol, f"{what} grad[{i}]")


def peer_file(package: str, relpath: str):
    """Import one source file of an installed peer, without its package ``__init__``.

    open_clip's ``loss.py`` needs only torch, but ``import open_clip`` also loads
    torchvision and transformers (~6 s on the CI box, per spawned gloo rank). The file
    is the installed peer's own, unmodified.
    """
    import importlib.util
    import sys

    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is a test dependency; install it"
    import os

    path = os.path.join(list(spec.submodule_search_locations)[0], relpath)
    name = f"_peer_{package}_{relpath.replace('/', '_').removesuffix('.py')}"
    if name not in sys.modules:
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        file_spec.loader.exec_module(module)
    return sys.modules[name]
