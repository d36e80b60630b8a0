"""Audit: every seed a sampler accepts ([0, 2**32)) works in every clustering backend.

faiss keeps its k-means seed in a C int, so seeds from 2**31 on raised OverflowError inside
faiss: TASBalancedBatchSampler (method="kmeans" by default), ClusterBatchSampler(method="kmeans")
and EmbeddingIndex(kind="ivf" / "ivf-gemm").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchlab.errors import BatchlabInputError
from batchlab.index import EmbeddingIndex, faiss_seed
from batchlab.samplers import ClusterBatchSampler, TASBalancedBatchSampler
from batchlab.samplers.clusters import kmeans


TOP = 2**32 - 1  # the largest seed GlobalBatchSampler accepts


def test_kmeans_samplers_take_every_seed_they_accept():
    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(0))
    tas = TASBalancedBatchSampler(x, 8, n_clusters=3, seed=TOP)  # method="kmeans", the default
    cluster = ClusterBatchSampler(x, 8, cluster_size=4, method="kmeans", seed=TOP)
    for sampler in (tas, cluster):
        assert sorted(i for b in sampler for i in b) == list(range(48))
    # seeds below 2**31 keep their clustering; above, it is that of the folded seed
    assert torch.equal(kmeans(x, 3, seed=TOP), kmeans(x, 3, seed=faiss_seed(TOP)))
    assert faiss_seed(12345) == 12345 and 0 <= faiss_seed(TOP) < 2**31


@pytest.mark.parametrize("kind", ["ivf", "ivf-gemm"])
def test_trained_indexes_take_every_seed(kind):
    x = F.normalize(torch.randn(256, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    index = EmbeddingIndex(x, kind=kind, nlist=4, nprobe=4, seed=TOP, progress=False, check_recall=False)
    scores, ids = index.search(x[:3], 2)
    assert ids[:, 0].tolist() == [0, 1, 2]  # nprobe = nlist: every list searched, each row finds itself


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_index_seed_is_checked(bad):
    with pytest.raises(BatchlabInputError, match="seed must be a non-negative integer"):
        EmbeddingIndex(torch.eye(4), kind="torch", seed=bad)
