"""``batchlab bench <name>``: run one benchmark from :mod:`batchlab.bench`.

Each benchmark is a module ``batchlab.bench.<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``. The module is imported only when
its benchmark runs, so a missing or broken benchmark never breaks the others; running
one that is missing says so and exits with code 3.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from batchlab.commands._common import EXIT_MISSING, add_subcommand

BENCHMARKS = {
    "losses": "speed and memory of the tiled losses against open_clip's ClipLoss and the reference",
    "losses_triton": "the fused Triton kernels (CUDA) against open_clip and Inf-CL, with TFLOP/s",
    "samplers": "mining speed and batch hardness of the hard-negative and cluster samplers",
    "communities": "B3 graph, community detection and batches, against networkx and pymetis",
    "hardness": "B3 batch hardness against random batches (K x rank window x B3++ extras) on the demo's data",
    "mining": "hard-negative mining at scale (exact and approximate indexes)",
    "ot": "mini-batch optimal-transport couplings against scipy and POT",
    "jest": "joint example selection cost and quality",
    "sogclr": "SogCLR / iSogCLR cost per step against InfoNCE (and --check: tiled and Triton vs the float64 reference on the device)",
    "distributed": "ring and all-gather losses across processes",
    "st-cached": "Cached MNRL: sentence-transformers' own against batchlab's (step, loss part, peak memory)",
    "quality": "fine-tune a pretrained encoder with each batch construction, seed-paired against random-64",
}


def module_of(name: str) -> str:
    """The module behind benchmark ``name`` (``st-cached`` -> ``batchlab.bench.st_cached``)."""
    return f"batchlab.bench.{name.replace('-', '_')}"


def available(name: str) -> bool:
    """Whether ``batchlab.bench.<name>`` exists in this installation (without importing it)."""
    try:
        return importlib.util.find_spec(module_of(name)) is not None
    except ImportError:
        return False


def add_parser(subparsers) -> None:
    lines = [f"  {name:<12} {text}{'' if available(name) else '  [not available]'}" for name, text in BENCHMARKS.items()]
    parser = add_subcommand(
        subparsers,
        "bench",
        help="run a benchmark: " + ", ".join(BENCHMARKS),
        description="Run one benchmark. It prints a table with the anchors measured in the same run and the "
        "ratio to each, and writes <out>/<name>-<device>.json plus a PNG plot.\n\nbenchmarks:\n" + "\n".join(lines)
        + "\n\nEvery benchmark takes --device, --seed and --out; `batchlab bench NAME --help` lists its sizes.",
        example="batchlab bench losses --device cpu --out benchmarks/results",
    )
    parser.add_argument("name", choices=list(BENCHMARKS), help="which benchmark")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for that benchmark (see NAME --help)")
    parser.set_defaults(func=run)


def build_bench_parser(name: str, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"batchlab bench {name}",
        description=(module.__doc__ or BENCHMARKS[name]).strip().splitlines()[0],
        epilog=f"example:\n  batchlab bench {name} --device cpu --out benchmarks/results",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser


def run(args) -> int:
    name = args.name
    if not available(name):
        print(
            f"batchlab bench {name}: this benchmark is not available in this installation "
            f"(no module batchlab.bench.{name}). Available: "
            + (", ".join(n for n in BENCHMARKS if available(n)) or "none"),
            file=sys.stderr,
        )
        return EXIT_MISSING
    try:
        module = importlib.import_module(module_of(name))
    except ImportError as error:  # e.g. an optional dependency of that benchmark is missing
        print(f"batchlab bench {name}: this benchmark cannot run here ({type(error).__name__}: {error})", file=sys.stderr)
        return EXIT_MISSING
    parser = build_bench_parser(name, module)
    try:
        bench_args = parser.parse_args(args.bench_args)
    except SystemExit as exit_:  # --help or an argparse error inside the benchmark's flags
        return int(exit_.code or 0) if isinstance(exit_.code, int) else 2
    return int(module.run(bench_args) or 0)
