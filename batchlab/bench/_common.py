"""Shared benchmark plumbing: timing, peak memory, tables, results files and plots.

Every benchmark measures its anchors (open_clip, Inf-CL, POT, scipy, networkx, ...)
in the same run as batchlab and reports the ratio to each, so that numbers from
different machines are never compared.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from batchlab._table import format_table  # noqa: F401  (re-exported: the benchmarks print with it)

#: Where benchmarks write unless --out says otherwise: under results/, which git ignores, so a
#: run never overwrites the committed results in benchmarks/results that the docs cite.
DEFAULT_OUT = "results/bench"


def device_name(device: str | torch.device) -> str:
    """A human name for the device results were taken on (GPU model or CPU core count)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def synchronize(device: str | torch.device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, device: str | torch.device = "cpu", warmup: int = 1, repeats: int = 3) -> float:
    """Median wall-clock seconds of ``fn()`` after ``warmup`` untimed calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_and_time(fn: Callable[[], Any], device: str | torch.device) -> tuple[float, int | None, Any]:
    """(seconds, peak bytes allocated above what was allocated before, the result) of one ``fn()``.

    The device is synchronised before and after; the peak is CUDA's allocator peak (None on the CPU).
    """
    cuda = torch.device(device).type == "cuda"
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated(device) - before) if cuda else None, out


def peak_memory_call(fn: Callable[[], Any], device: str | torch.device) -> int | None:
    """Peak bytes allocated by ``fn()`` above what was allocated before it (CUDA only; None on CPU)."""
    return peak_and_time(fn, device)[1]


def _cute_state() -> str:
    """Whether the streaming InfoNCE path ran on the optional CuTe kernels (``batchlab.losses.cute``)."""
    from batchlab.losses import cute

    if not torch.cuda.is_available():
        return "n/a (no CUDA)"
    reason = cute.unavailable(torch.device("cuda"))
    return f"BATCHLAB_CUTE={cute.mode()}; " + ("available" if reason is None else f"unavailable: {reason}")


def write_results(out_dir: str | Path, name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` plus environment facts to ``out_dir/name.json``; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            # CPU timings on a shared 2-core machine mean little without this
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "cpu_count": os.cpu_count(),
            "cute_kernels": _cute_state(),
        },
        **payload,
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def plot_series(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = True,
    logy: bool = True,
) -> Path:
    """One line per named (x, y) series, saved as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Lay out ``fig``, save it as ``path`` (folders made as needed), close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def script_main(module: str, doc: str | None, add_arguments: Callable, run: Callable,
                argv: Sequence[str] | None = None, *, log_level: int | None = None) -> int:
    """``python -m batchlab.bench.NAME``: the same flags and run as ``batchlab bench NAME``."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING if log_level is None else log_level)
    return run(parser.parse_args(argv))
