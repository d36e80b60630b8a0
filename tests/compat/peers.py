"""The peers' own loss classes, loaded from their installed source files.

``import open_clip`` / ``import lightly.loss`` also load torchvision and transformers
(seconds on the CI box, paid again by every spawned gloo rank); the loss files below
need only torch (lightly's NT-Xent also its memory bank), and they are the installed
peers' own, unmodified.
"""

from tests.compat.helpers import peer_file

open_clip_loss = peer_file("open_clip", "loss.py")  # open_clip 3.3.0
lightly_ntxent = peer_file("lightly", "loss/ntx_ent_loss.py")  # lightly 1.6.0
lightly_dcl = peer_file("lightly", "loss/dcl_loss.py")
LIGHTLY = {"NTXentLoss": lightly_ntxent.NTXentLoss, "DCLLoss": lightly_dcl.DCLLoss, "DCLWLoss": lightly_dcl.DCLWLoss}
