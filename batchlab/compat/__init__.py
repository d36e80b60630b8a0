"""The peers' own classes, with their constructors, calls and conventions, backed by batchlab.

Each module reproduces one library's API exactly, so that porting a training script
is one changed import, and its tests run the peer itself and compare values and
gradients:

* :mod:`batchlab.compat.open_clip`: ``ClipLoss``, ``SigLipLoss`` (open_clip 3.3)
* :mod:`batchlab.compat.torchcfm`: ``OTPlanSampler`` (torchcfm 1.0.7)
* :mod:`batchlab.compat.lightly`: ``NTXentLoss``, ``DCLLoss``, ``DCLWLoss`` (lightly 1.6)
* :mod:`batchlab.compat.pytorch_metric_learning`: ``NTXentLoss`` (pytorch-metric-learning 2.9)

batchlab's own API (``batchlab.losses``, ``batchlab.samplers``) sometimes chooses a
different convention (unit-norm inputs, a scale instead of a temperature, exact
distributed gradients, permutation couplings); each compat class says where in its
docstring, and docs/compat.md has the parity table. The modules are imported on
first use, so ``import batchlab.compat`` pulls in none of them.
"""

import importlib

_MODULES = ("open_clip", "torchcfm", "lightly", "pytorch_metric_learning")

__all__ = list(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"batchlab.compat.{name}")
    raise AttributeError(f"module 'batchlab.compat' has no attribute {name!r}")
