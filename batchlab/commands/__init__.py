"""Subcommands of the ``batchlab`` command.

Each module exposes ``add_parser(subparsers)``, which registers one subcommand and
sets ``func=run``, and ``run(args) -> int`` (the exit code). Heavy imports (torch
models, faiss, open_clip) happen inside ``run`` so that ``batchlab --help`` stays fast.
"""
