"""Test settings for a 2-core CI machine.

Torch is pinned to one thread: with two threads, torch collapses (10-100x slower)
whenever anything else runs on the other core (../shared/research/feasibility.md).
open_clip must never wait on the hub.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, the Triton kernels run in Triton's interpreter. It must be switched on
# before anything imports triton (triton.language is built once per process), so it is
# set here for the whole session rather than in the Triton test modules. ``impl="auto"``
# never picks Triton on the CPU, so no other test slows down.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test (fresh random inputs, reproducible failures)."""
    return torch.Generator().manual_seed(1234)
