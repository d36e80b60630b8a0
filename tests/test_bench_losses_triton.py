"""The Triton loss benchmark's sweep bookkeeping (no GPU needed: pure Python)."""

import pytest

pytest.importorskip("triton")

from batchlab.bench.losses_triton import SWEEP_CONFIGS, best_configs  # noqa: E402
from batchlab.losses.triton import _launch  # noqa: E402


def test_best_configs_keeps_only_each_kernels_own_options():
    rows = [
        {"kernel": "fwd", "ms": 3.0, "BM": 128, "BN": 128, "FLAT": 1, "N": 4096, "status": "ok"},
        {"kernel": "fwd", "ms": 2.0, "BM": 64, "BN": 128, "TPP": 4, "N": 4096, "status": "ok"},  # TPP: not a forward option
        {"kernel": "fwd", "ms": None, "BM": 256, "status": "OutOfResources"},  # failed configs never win
        {"kernel": "bwd_kernel_only", "ms": 4.0, "BM": 128, "TPP": 16, "FLAT": 1, "TMA_OUT": 0},
        {"kernel": "cuBLAS G@k", "ms": 0.1},  # anchors are not configs
    ]
    assert best_configs(rows) == {"fwd": {"BM": 64, "BN": 128}, "bwd": {"BM": 128, "TMA_OUT": 0, "TPP": 16, "FLAT": 1}}


def test_sweep_candidates_use_only_known_keys():
    kernel_of = {"fwd": "fwd", "bwd_kernel_only": "bwd", "siglip": "siglip"}
    for kernel, configs in SWEEP_CONFIGS.items():
        allowed = set(_launch.SHAPE_KEYS) | set(_launch.KERNEL_OPTIONS[kernel_of[kernel]])
        for cfg in configs:
            assert set(cfg) <= allowed, (kernel, cfg)


def test_grid_variants_use_only_known_keys_and_best_picks_the_fastest():
    from batchlab.bench.losses_triton import GRID_VARIANTS, grid_best

    for kernel, configs in GRID_VARIANTS.items():
        allowed = set(_launch.SHAPE_KEYS) | set(_launch.KERNEL_OPTIONS[kernel])
        for cfg in configs:
            assert set(cfg) <= allowed, (kernel, cfg)
            assert not cfg.get("WS") or (cfg.get("TMA") and cfg.get("TILE")), cfg  # WS needs both
    rows = [{"kernel": "bwd", "variant": 1, "N": 64, "ms": 2.0}, {"kernel": "bwd", "variant": 2, "N": 64, "ms": 1.0},
            {"kernel": "bwd", "variant": 0, "N": 32, "ms": 0.1}, {"kernel": "fwd", "variant": 3, "N": 64, "ms": None}]
    assert grid_best(rows, 64) == {"bwd": GRID_VARIANTS["bwd"][2]}
