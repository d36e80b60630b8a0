"""Front ends for the trainers people already use, backed by batchlab's losses and samplers.

``batchlab.integrations.sentence_transformers``: losses that take a
``SentenceTransformer`` (same constructors as sentence-transformers' own), batch
samplers the ``SentenceTransformerTrainer`` accepts, and a dataset-in / dataset-out
``mine_hard_negatives``. Needs the ``st`` extra: ``pip install batchlab[st]``.

Integrations sit above the losses, samplers and index, and below recipes and commands;
nothing in ``batchlab`` below this package imports it.
"""
