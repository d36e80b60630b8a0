"""Offline datasets: nothing here downloads anything."""

from batchlab.datasets.synthetic import gaussian_mixture

__all__ = ["gaussian_mixture"]
