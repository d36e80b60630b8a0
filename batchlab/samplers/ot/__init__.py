"""Mini-batch optimal-transport couplings for flow matching and diffusion.

``couple(x0, x1, method=...)`` pairs two batches; :class:`OTPlanSampler` has
torchcfm's call shape; :func:`wcfm_weights` gives W-CFM's Gibbs weights without a
solve; :func:`couple_global` solves over the global batch under torch.distributed.
"""

from batchlab.samplers.ot.costs import condition_cost, pairwise_cost
from batchlab.samplers.ot.couple import METHODS, couple
from batchlab.samplers.ot.distributed import couple_global
from batchlab.samplers.ot.plan_sampler import OTPlanSampler
from batchlab.samplers.ot.solvers import exact_assignment
from batchlab.samplers.ot.weights import wcfm_weights

__all__ = [
    "METHODS",
    "OTPlanSampler",
    "condition_cost",
    "couple",
    "couple_global",
    "exact_assignment",
    "pairwise_cost",
    "wcfm_weights",
]
