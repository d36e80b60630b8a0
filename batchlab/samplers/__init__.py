"""Batch construction: which examples meet in a batch.

Every batch sampler here follows :class:`~batchlab.samplers.base.GlobalBatchSampler`'s
contract (seed, ``set_epoch``, exact ``__len__``, ``state_dict``, rank split).
"""

from batchlab.samplers.base import GlobalBatchSampler, ShardedBatchSampler
from batchlab.samplers.clusters import ClusterBatchSampler, balanced_kmeans
from batchlab.samplers.community_sampler import CommunityBatchSampler
from batchlab.samplers.hard_negatives import HardNegativeBatchSampler
from batchlab.samplers.mixed import MixedBatchSampler
from batchlab.samplers.tas import TASBalancedBatchSampler
from batchlab.samplers.jest import JESTSelection, JointExampleSelector
from batchlab.samplers.colm import CoLMSelection, CoLMSelector, last_layer_gradients
from batchlab.samplers.reference_cache import ReferenceEmbeddingCache, model_hash
from batchlab.samplers.false_negatives import GuidedNegativeMask, guided_negative_mask
from batchlab.samplers.mining import MinedNegatives, mine_hard_negatives
from batchlab.samplers.mixing import mix_hard_negatives
from batchlab.samplers.ot import OTPlanSampler, couple, couple_global, wcfm_weights

__all__ = [
    "GlobalBatchSampler",
    "ShardedBatchSampler",
    "ClusterBatchSampler",
    "CommunityBatchSampler",
    "balanced_kmeans",
    "TASBalancedBatchSampler",
    "HardNegativeBatchSampler",
    "MixedBatchSampler",
    "JointExampleSelector",
    "JESTSelection",
    "CoLMSelector",
    "CoLMSelection",
    "last_layer_gradients",
    "ReferenceEmbeddingCache",
    "model_hash",
    "mine_hard_negatives",
    "MinedNegatives",
    "guided_negative_mask",
    "GuidedNegativeMask",
    "mix_hard_negatives",
    "couple",
    "couple_global",
    "OTPlanSampler",
    "wcfm_weights",
]
