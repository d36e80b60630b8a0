"""Test settings for a 2-core CI machine.

Torch is pinned to one thread: with two threads, torch collapses (10-100x slower)
whenever anything else runs on the other core (../shared/research/feasibility.md).
open_clip must never wait on the hub.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test (fresh random inputs, reproducible failures)."""
    return torch.Generator().manual_seed(1234)
