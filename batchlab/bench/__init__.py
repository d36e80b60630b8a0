"""Benchmarks behind ``batchlab bench ...``: they write under ``results/bench`` (git-ignored) unless ``--out`` says
otherwise; the results the docs cite are committed in ``benchmarks/results``."""
