"""Benchmarks behind ``batchlab bench ...``; results files live in ``benchmarks/results``."""
