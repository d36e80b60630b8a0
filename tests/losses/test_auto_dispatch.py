"""What ``impl="auto"`` picks on CUDA, checked without a GPU by pretending Triton is usable."""

import pytest
import torch

from batchlab.losses import _dispatch


@pytest.fixture
def triton_usable(monkeypatch):
    _dispatch._load_backend("tiled")
    if not _dispatch._load_backend("triton"):
        pytest.skip("batchlab.losses.triton does not import here (triton missing)")
    monkeypatch.setattr(_dispatch, "_triton_usable", lambda device: True)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.parametrize("family", ["info_nce", "siglip", "dcl"])
def test_strict_fp32_above_the_small_batch_path_takes_the_tiled_engine(triton_usable, family):
    cuda, big = torch.device("cuda"), 65536
    tiled, triton = _dispatch._REGISTRY[(family, "tiled")], _dispatch._REGISTRY[(family, "triton")]
    torch.backends.cuda.matmul.allow_tf32 = False
    assert _dispatch.resolve(family, "auto", big, big, cuda, torch.float32) is tiled
    # the small-batch path multiplies with cuBLAS: Triton stays the choice there
    assert _dispatch.resolve(family, "auto", 4096, 4096, cuda, torch.float32) is triton
    assert _dispatch.resolve(family, "auto", big, big, cuda, torch.bfloat16) is triton
    # an explicit impl is never overridden
    assert _dispatch.resolve(family, "triton", big, big, cuda, torch.float32) is triton
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores: the kernels are fast again
    assert _dispatch.resolve(family, "auto", big, big, cuda, torch.float32) is triton
