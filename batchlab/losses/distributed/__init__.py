"""The losses' own exchange over ``torch.distributed`` (ring and all-gather strategies).

Lives under ``batchlab.losses`` so that the arrows point down: the loss functions
reach it through ``batchlab.losses._distributed_hook`` and it uses only the losses'
implementations below it. The samplers' rank split lives in ``batchlab.samplers``.
See :mod:`batchlab.losses.distributed.strategies` for the convention and strategies.
"""

from batchlab.losses.distributed.strategies import distributed_loss

__all__ = ["distributed_loss"]
