"""Project error classes.

Every error batchlab raises for bad input is a :class:`BatchlabInputError`, a
subclass of :class:`ValueError`, so ``except ValueError`` keeps working. Messages
say what was wrong, what was expected, and how to fix it.
"""

from __future__ import annotations


class BatchlabInputError(ValueError):
    """Bad input to a batchlab function: wrong shape, device, dtype, or values."""


class StaleArtifactError(BatchlabInputError):
    """A saved artifact (index, mined negatives, graph) does not match the data it is used with."""
