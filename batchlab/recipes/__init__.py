"""Training recipes: tiny open_clip models trained end to end with batchlab's samplers and losses.

* :func:`train_dual_encoder`: text to text (e.g. docstring -> code on ``codesearch``).
* :func:`train_clip`: image to text (e.g. ``fashion_mnist`` with caption templates).
* :func:`retrieval_metrics`: recall@k and MRR on a held-out split.
* :class:`TfidfTeacher` / :func:`tfidf_views`: an offline lexical teacher for batch construction.
* :func:`make_sampler`: batch samplers by name (random, cluster, community, hard_negative).
* :func:`load_run`: a saved run's model (``run.encode(texts)``), record and history.
* :func:`compare`: several batch constructions x several seeds, with seed-paired claim
  checks (:mod:`batchlab.recipes.compare`; what ``batchlab demo`` runs).

Heavy imports (open_clip, faiss) happen inside the functions.
"""

from batchlab.recipes._loop import ContrastiveHead, TrainResult
from batchlab.recipes.clip import train_clip
from batchlab.recipes.compare import ARMS, Arm, Comparison, compare, paired_difference, register_arm
from batchlab.recipes.dual_encoder import train_dual_encoder
from batchlab.recipes.evaluate import retrieval_metrics
from batchlab.recipes.runs import Run, load_run
from batchlab.recipes.samplers import SAMPLERS, RandomBatchSampler, SamplerSchedule, make_sampler
from batchlab.recipes.teachers import TeacherViews, TfidfTeacher, tfidf_views

__all__ = [
    "ARMS",
    "Arm",
    "Comparison",
    "Run",
    "compare",
    "load_run",
    "paired_difference",
    "register_arm",
    "ContrastiveHead",
    "RandomBatchSampler",
    "SAMPLERS",
    "SamplerSchedule",
    "TeacherViews",
    "TfidfTeacher",
    "TrainResult",
    "make_sampler",
    "retrieval_metrics",
    "tfidf_views",
    "train_clip",
    "train_dual_encoder",
]
