"""Offline datasets: nothing here downloads anything."""

from batchlab.datasets.codesearch import CodeSearchPairs, load_codesearch
from batchlab.datasets.fashion_mnist import (
    DatasetNotInstalledError,
    FashionMNISTCaptions,
    fashion_mnist_available,
    load_fashion_mnist,
)
from batchlab.datasets.synthetic import gaussian_mixture

__all__ = [
    "CodeSearchPairs",
    "DatasetNotInstalledError",
    "FashionMNISTCaptions",
    "fashion_mnist_available",
    "gaussian_mixture",
    "load_codesearch",
    "load_fashion_mnist",
]
