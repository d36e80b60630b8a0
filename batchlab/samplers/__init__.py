"""Batch construction: which examples meet in a batch.

Every batch sampler here follows :class:`~batchlab.samplers.base.GlobalBatchSampler`'s
contract (seed, ``set_epoch``, exact ``__len__``, ``state_dict``, rank split).
"""

from batchlab.samplers.base import GlobalBatchSampler
from batchlab.samplers.community_sampler import CommunityBatchSampler
from batchlab.samplers.jest import JESTSelection, JointExampleSelector

__all__ = ["GlobalBatchSampler", "CommunityBatchSampler", "JointExampleSelector", "JESTSelection"]
