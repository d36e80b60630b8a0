"""Issue 21, session 6 (run on a CUDA machine; not collected by pytest): checks of the dense path's
in-kernel totals, the tiled forward computing its own tiles (``DOT``) against reading the fp32
product, and the kernels each call launches.

    OUT=dir python tests/losses/gpu_large_run.py all       # check, ab, kernels, ds, compile/graph (~85 s)

``check`` (exits 1 on a failure): InfoNCE and SigLIP (bf16) against the fp32 reference (values
and gradients, tolerances of ``gpu_check_overhead``) under ``set_sync_debug_mode("error")`` at the
``GPU_LARGE_CASES`` (default N x d = 1 x 512, 255 x 512 (ragged), 1,000 x 768, 8,192 x 512,
16,384 x 512 and x 768 (the tiled CLIP forward, whose loss is added up in ``clip_combine_kernel``),
20,000 x 512 (the streaming kernels, one-tile forward)); a second backward through the same graph
(``retain_graph``) gives the same gradients (the counter of the in-kernel totals is set back to
zero); the same with the C-launcher call off (``_dense.RAW_LAUNCH``: Triton's launcher wrapper)
gives the same results; then ``torch.compile(fullgraph=True)`` and CUDA-graph replay at N = 1,024
(the custom ops' signatures changed). Cases left when ``GPU_LARGE_CHECK_S`` seconds have passed
are skipped (and say so). ``ab``: see :func:`part_ab`. ``kernels``: the CUDA kernels (and
memsets) of one forward + backward of the default path, by name, at N = 16,384, d = 512 and 768.
``ds``, ``verify`` (the second call), ``s7`` (session 7: the streaming path's new defaults): see
:func:`part_ds`, :func:`part_verify`, :func:`part_s7`. Each part writes
``$OUT/large-<part>.json``. Dry run on the CPU: ``TRITON_INTERPRET=1
GPU_LARGE_DEVICE=cpu GPU_LARGE_CASES=1x24,37x24 python tests/losses/gpu_large_run.py check``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from batchlab.losses import dcl, info_nce, siglip  # noqa: E402
from batchlab.losses.triton import _dense  # noqa: E402
from tests.losses.gpu_check_overhead import GRAD_TOL, VALUE_TOL, compile_and_graph_check, rel  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/gpu_large"))
#: ``GPU_LARGE_DEVICE=cpu`` (with ``TRITON_INTERPRET=1`` and tiny ``GPU_LARGE_SIZES``/``GPU_LARGE_DIMS``):
#: a dry run of the check on the CPU through the interpreter.
DEVICE = os.environ.get("GPU_LARGE_DEVICE", "cuda")
#: (N, d) of the check: the dense path (ragged, N=1, the tiled forward at 16,384) and one streaming size.
CASES = [tuple(int(x) for x in case.split("x")) for case in os.environ.get(
    "GPU_LARGE_CASES", "1x512,255x512,1000x768,8192x512,16384x512,16384x768,20000x512").split(",")]
#: Seconds the check may take before the remaining cases are skipped (the run has a fixed budget).
CHECK_BUDGET_S = float(os.environ.get("GPU_LARGE_CHECK_S", "50"))
#: N of the A/B (16,384: the tiled forward) and of part ds (precision, time); smaller for a CPU dry run.
AB_N = int(os.environ.get("GPU_LARGE_AB_N", "16384"))
DS_N = tuple(int(x) for x in os.environ.get("GPU_LARGE_DS_N", "4096,65536").split(","))
#: part verify: every size divided by this (a CPU dry run), and its widths.
VERIFY_DIV = int(os.environ.get("GPU_LARGE_VERIFY_DIV", "1"))
VERIFY_D = tuple(int(x) for x in os.environ.get("GPU_LARGE_VERIFY_D", "512,768").split(","))


def _median_ms(call, reps):
    """Median ms of one call (CUDA events: ``gpu_small_run.timed``; the host clock on the CPU dry run)."""
    if DEVICE == "cuda":
        from tests.losses.gpu_small_run import timed  # noqa: E402  (CUDA at import)

        return timed(call, reps=reps)[0]
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]
T0 = time.time()


def say(*args):
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def dump(part, payload):
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"large-{part}.json").write_text(json.dumps(payload, indent=1, default=str))


#: The implementation the parts call (``triton`` on the CPU dry run: ``auto`` never picks the interpreter).
IMPL = "auto" if DEVICE == "cuda" else "triton"


def loss_of(family, q, k, s, b, impl="auto"):
    return info_nce(q, k, s, impl=impl) if family == "info_nce" else siglip(q, k, s, b, impl=impl)


def leaves(n, d, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = F.normalize(torch.randn(n, d, device=DEVICE, generator=g), dim=1).bfloat16().requires_grad_()
    k = F.normalize(torch.randn(n, d, device=DEVICE, generator=g), dim=1).bfloat16().requires_grad_()
    s = torch.tensor(1 / 0.07, device=DEVICE, requires_grad=True)
    b = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
    return q, k, s, b


_KERNELS = (_dense._clip_lse, _dense._clip_tiles, _dense._clip_combine, _dense._clip_grad, _dense._siglip_fwd,
            _dense._siglip_grad)


def _raw_launch(on: bool) -> None:
    """Switch the C-launcher call on or off (compiled entries forgotten: they remember the choice)."""
    _dense.RAW_LAUNCH = on
    for kernel in _KERNELS:
        kernel.compiled.clear()


def _sync_debug(mode) -> None:
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode(mode)


def _sync_warnings(call, reps: int = 1) -> list[str]:
    """Messages of the warnings ``reps`` calls of ``call`` raise under ``set_sync_debug_mode("warn")``
    (count them with ``batchlab.bench.losses.count_syncs``; none on the CPU dry run)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sync_debug("warn")
        try:
            for _ in range(reps):
                call()
        finally:
            _sync_debug(0)
    return [str(w.message) for w in caught]


def check_one(family, n, d):
    q, k, s, b = leaves(n, d, seed=n + d)
    inputs = [q, k, s] + ([b] if family == "siglip" else [])
    impl = IMPL
    loss_of(family, q, k, s, b, impl)  # compile first
    _sync_debug("error")
    try:
        loss = loss_of(family, q, k, s, b, impl)
        first = torch.autograd.grad(loss, inputs, retain_graph=True)
        second = torch.autograd.grad(loss, inputs)
    finally:
        _sync_debug(0)
    _raw_launch(False)
    try:
        for _ in range(2):  # the first call goes through Triton's launch, the second through kernel.run
            loss_w = loss_of(family, q, k, s, b, impl)
            wrapper = torch.autograd.grad(loss_w, inputs)
    finally:
        _raw_launch(True)
    ref_in = [x.detach().float().requires_grad_() for x in inputs]
    ref = loss_of(family, ref_in[0], ref_in[1], ref_in[2], ref_in[3] if family == "siglip" else b, "reference")
    ref_g = torch.autograd.grad(ref, ref_in)
    row = {"family": family, "N": n, "d": d, "loss": float(loss.detach()), "loss_err": rel(loss, ref),
           "grad_err": max(rel(g, r) for g, r in zip(first, ref_g)),
           "scale_grad": float(first[2]), "scale_grad_err": rel(first[2], ref_g[2]),
           # same inputs, same kernels: equal up to cuBLAS's own run-to-run behaviour
           "second_backward_err": max(rel(a, c) for a, c in zip(second, first)),
           "raw_vs_wrapper_err": max(rel(a, c) for a, c in zip([loss_w, *wrapper], [loss, *first]))}
    # the streaming forward adds its row and column sums with atomics (their order, hence the last
    # bits, change from call to call): two of its calls agree to ~1e-5, the dense path's bit for bit
    same = 1e-6 if n * n <= _dense.DENSE_MAX_LOGITS else 1e-4
    row["ok"] = (row["loss_err"] < VALUE_TOL and row["grad_err"] < GRAD_TOL and row["second_backward_err"] < same
                 and row["raw_vs_wrapper_err"] < same)
    return row


#: ``all`` runs the compile and CUDA-graph checks last (after the A/B and the kernel names).
GRAPH_LAST = False


def part_check(rows=None) -> int:
    rows = [] if rows is None else rows
    for n, d in CASES:
        for family in ("info_nce", "siglip"):
            if time.time() - T0 > CHECK_BUDGET_S:
                rows.append({"family": family, "N": n, "d": d, "ok": True, "skipped": "time budget"})
                continue
            try:
                rows.append(check_one(family, n, d))
            except Exception as exc:  # noqa: BLE001 - a failing case is a result
                rows.append({"family": family, "N": n, "d": d, "ok": False, "error": repr(exc)[:600]})
            say(json.dumps(rows[-1]))
            dump("check", rows)
    if not GRAPH_LAST:
        part_graph(rows)
    return _verdict(rows)


def _verdict(rows) -> int:
    failed = [r for r in rows if not r["ok"]]
    say(f"{len(rows) - len(failed)}/{len(rows)} checks passed"
        f" ({sum('skipped' in r for r in rows)} skipped for time)")
    return 1 if failed else 0


def part_graph(rows) -> None:
    """torch.compile(fullgraph=True) and CUDA-graph replay of a training step, N = 1,024 (appended to ``rows``)."""
    for family in ("info_nce", "siglip") if DEVICE == "cuda" else ():
        results: list = []
        try:
            compile_and_graph_check(family, 1024, 64, 512, results)
        except Exception as exc:  # noqa: BLE001
            results.append({"check": "compile/graph setup", "family": family, "ok": False, "error": repr(exc)[:600]})
        for r in results:
            say(json.dumps(r))
        rows += results
        dump("check", rows)


def part_ab() -> int:
    """The tiled CLIP forward reading the fp32 product (default) vs computing its tiles (``DOT``),
    InfoNCE forward + backward at N = 16,384, d = 512 and 768 (checked against the fp32 reference
    once per variant). Writes ``large-ab.env``: ``BATCHLAB_DENSE_TILE_DOT[_CONFIG]`` when a DOT
    variant is at least 3% faster at both widths (the settings the bench then runs with)."""
    variants = {"product": None, "dot 128x128 w4": (128, 128, 64, 4, 3), "dot 64x128 w4": (64, 128, 64, 4, 3),
                "dot 128x128 w8": (128, 128, 64, 8, 3)}
    rows = []
    for d in (512, 768):
        q, k, s, b = leaves(AB_N, d, seed=d)
        ref_in = [x.detach().float().requires_grad_() for x in (q, k, s)]
        ref = info_nce(*ref_in, impl="reference")
        ref_g = torch.autograd.grad(ref, ref_in)
        for name, cfg in variants.items():
            _dense.TILE_DOT = cfg is not None
            if cfg is not None:
                _dense._TILE_DOT_CONFIG = cfg
            try:
                loss = info_nce(q, k, s, impl=IMPL)
                grads = torch.autograd.grad(loss, [q, k, s])
                err = max([rel(loss, ref)] + [rel(g, r) for g, r in zip(grads, ref_g)])
                ms = _median_ms(lambda: torch.autograd.grad(info_nce(q, k, s, impl=IMPL), [q, k, s]), 20)
                rows.append({"variant": name, "d": d, "ms": ms, "max_err": err, "ok": err < GRAD_TOL,
                             "launches": len(kernels_of(lambda: torch.autograd.grad(info_nce(q, k, s, impl=IMPL),
                                                                                     [q, k, s])))})
            except Exception as exc:  # noqa: BLE001
                rows.append({"variant": name, "d": d, "ok": False, "error": repr(exc)[:300]})
            say(json.dumps(rows[-1]))
    _dense.TILE_DOT, _dense._TILE_DOT_CONFIG = False, variants["dot 128x128 w4"]
    best = {}
    for d in (512, 768):
        by_variant = {r["variant"]: r["ms"] for r in rows if r["d"] == d and r.get("ok")}
        best[d] = by_variant
    choice = None
    if all("product" in t for t in best.values()):
        wins = [name for name in variants if name != "product" and all(
            name in t and t[name] <= 0.97 * t["product"] for t in best.values())]
        if wins:
            choice = min(wins, key=lambda name: sum(t[name] for t in best.values()))
    env = ""
    if choice:
        env = ("export BATCHLAB_DENSE_TILE_DOT=1 BATCHLAB_DENSE_TILE_DOT_CONFIG="
               + ",".join(map(str, variants[choice])) + "\n")
    (OUT / "large-ab.env").write_text(env)
    say(f"choice: {choice or 'product (default)'}")
    dump("ab", {"rows": rows, "choice": choice})
    return 0


def kernels_of(call, calls=2) -> list[str]:
    """Names of the CUDA kernels and memsets one ``call()`` launches (none on the CPU dry run)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    if DEVICE != "cuda":
        return []
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
             and "memcpy" not in e.name.lower()]
    return names[: len(names) // calls]


def part_kernels() -> int:
    """Kernel names of one forward + backward of the default path at N = 16,384 (d = 512, 768)."""
    rows = []
    for d in (512, 768):
        for family in ("info_nce", "siglip"):
            q, k, s, b = leaves(AB_N, d)
            inputs = [q, k, s] + ([b] if family == "siglip" else [])
            try:
                names = kernels_of(lambda: torch.autograd.grad(loss_of(family, q, k, s, b, IMPL), inputs))
                rows.append({"family": family, "N": 16384, "d": d, "launches": len(names),
                             "kernels": [name[:100] for name in names]})
            except Exception as exc:  # noqa: BLE001
                rows.append({"family": family, "N": 16384, "d": d, "error": repr(exc)[:300]})
            say(family, d, rows[-1].get("launches"), rows[-1].get("kernels"))
    dump("kernels", rows)
    return 0


def part_ds() -> int:
    """The streaming backward summing the scale gradient in fp32 in-kernel (``_lse.DS_SUM``) against the
    default (from the bf16 logit gradient's product): InfoNCE at N = 4,096 (streaming forced), s = 0.01
    and 14.3, scale-gradient error against the fp32 reference (the lead's call-1 FAIL); time at
    N = 65,536, d = 512 (median of 10) for the default, DS on the looped kernel, and DS on the one-tile
    TWO_EXP kernel (sm_90: 131, 759 and 108 spill instructions)."""
    from batchlab.losses.triton import _launch, _lse

    base = dict(_launch.CONFIGS["bwd"])
    variants = {"default": (False, {}), "DS loop": (True, {}), "DS tile two-exp": (True, dict(TILE=1, TWO_EXP=1))}
    rows = []
    limit = _dense.DENSE_MAX_LOGITS
    try:
        for name, (ds, extra) in variants.items():
            _lse.DS_SUM = ds
            _launch.CONFIGS["bwd"] = dict(base, **extra)
            _dense.DENSE_MAX_LOGITS = 0
            for scale in (0.01, 14.3):
                q, k, _, _ = leaves(DS_N[0], 512 if DEVICE == "cuda" else 24, seed=7)
                s = torch.tensor(scale, device=DEVICE, requires_grad=True)
                g = torch.autograd.grad(info_nce(q, k, s, impl=IMPL), [s])[0]
                s_ref = torch.tensor(scale, device=DEVICE, requires_grad=True)
                g_ref = torch.autograd.grad(info_nce(q.detach().float(), k.detach().float(), s_ref,
                                                     impl="reference"), [s_ref])[0]
                rows.append({"variant": name, "N": DS_N[0], "scale": scale, "scale_grad": float(g_ref),
                             "scale_grad_err": float((g.double() - g_ref.double()).abs() / g_ref.double().abs())})
                say(json.dumps(rows[-1]))
            _dense.DENSE_MAX_LOGITS = limit
            q, k, s, _ = leaves(DS_N[1], 512 if DEVICE == "cuda" else 24)
            ms = _median_ms(lambda: torch.autograd.grad(info_nce(q, k, s, impl=IMPL), [q, k, s]), 10)
            rows.append({"variant": name, "N": DS_N[1], "ms": ms})
            say(json.dumps(rows[-1]))
            dump("ds", rows)
    finally:
        _lse.DS_SUM = False
        _launch.CONFIGS["bwd"] = base
        _dense.DENSE_MAX_LOGITS = limit
    return 0


def _once_ms(call) -> float:
    """ms of one ``call()`` between CUDA events (no warm-up: for calls of seconds, already compiled)."""
    if DEVICE != "cuda":
        return _median_ms(call, 1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _peak_mib(call) -> tuple[float, float]:
    """(peak MiB above what was allocated before, MiB still allocated after) of one ``call()``."""
    if DEVICE != "cuda":
        call()
        return 0.0, 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return ((torch.cuda.max_memory_allocated() - before) / 2**20, (torch.cuda.memory_allocated() - before) / 2**20)


def part_verify() -> int:
    """Second device call (after call 3): (1) syncs and peak memory at N = 256 ... 8,192 in a fresh
    process, first call and later calls apart, syncs counted as ``batchlab bench losses`` now counts
    them and under ``set_sync_debug_mode("error")``; (2) N = 20,000 (streaming): two identical calls
    differ by the forward's atomic sums (no raw launch there); (3) N = 65,536: InfoNCE and SigLIP time
    and memory beyond inputs and gradients at d = 512 and 768 (panel workspace freed before dk's last
    step, no fp32 temporaries); (4) forward only, one-tile vs looped, at N = 262,144 and 1,048,576, and
    InfoNCE forward + backward at 1,048,576 with the default forward (then: looped above 256 MiB
    of keys; no limit since: ``_lse.TILE_FWD_MAX_KEY_BYTES``)."""
    from batchlab.bench.losses import count_syncs
    from batchlab.losses.triton import _lse

    out: dict = {"sync_peak": [], "repeat_20000": [], "n65536": [], "fwd_ab": [], "n1m": []}

    for n in map(_size, (256, 1024, 4096, 8192)):
        for family in ("info_nce", "siglip"):
            q, k, s, b = leaves(n, VERIFY_D[0], seed=n)
            inputs = [q, k, s] + ([b] if family == "siglip" else [])

            def call():
                return torch.autograd.grad(loss_of(family, q, k, s, b, IMPL), inputs)

            first = _peak_mib(call)
            second = _peak_mib(call)
            caught = _sync_warnings(call, reps=2)
            _sync_debug("error")
            try:
                call()
                error_mode = "no sync"
            except Exception as exc:  # noqa: BLE001
                error_mode = repr(exc)[:200]
            finally:
                _sync_debug(0)
            out["sync_peak"].append({"family": family, "N": n, "first_peak_mib": first[0], "first_kept_mib": first[1],
                                     "peak_mib": second[0], "syncs_per_call": count_syncs(caught) / 2,
                                     "warnings": sorted({m[:80] for m in caught}), "error_mode": error_mode})
            say(json.dumps(out["sync_peak"][-1]))
            dump("verify", out)
    q, k, s, b = leaves(_size(20000), VERIFY_D[0], seed=3)
    for family in ("info_nce", "siglip"):
        inputs = [q, k, s] + ([b] if family == "siglip" else [])
        runs = []
        for _ in range(2):
            loss = loss_of(family, q, k, s, b, IMPL)
            runs.append([loss.detach(), *torch.autograd.grad(loss, inputs)])
        out["repeat_20000"].append({"family": family, "max_rel_diff": max(rel(a, c) for a, c in zip(*runs))})
        say(json.dumps(out["repeat_20000"][-1]))
    dump("verify", out)
    for d in VERIFY_D:
        for family in ("info_nce", "siglip"):
            q, k, s, b = leaves(_size(65536), d)
            inputs = [q, k, s] + ([b] if family == "siglip" else [])

            def call():
                return torch.autograd.grad(loss_of(family, q, k, s, b, IMPL), inputs)

            peak, _ = _peak_mib(call)
            grads = 2 * _size(65536) * d * 2 / 2**20
            ms = _median_ms(call, 5)
            out["n65536"].append({"family": family, "d": d, "ms": ms, "peak_mib": peak, "beyond_grads_mib": peak - grads})
            say(json.dumps(out["n65536"][-1]))
            dump("verify", out)
    del q, k
    for n in (262144, 1048576):
        q, k, s, _ = leaves(_size(n), VERIFY_D[0])
        for name, limit in (("one-tile", 2**62), ("looped", 0)):
            _lse.TILE_FWD_MAX_KEY_BYTES = limit
            try:
                fwd = lambda: _lse.lse_forward(q.detach(), k.detach(), s.detach(), None, cols=True, exclude=False)  # noqa: E731
                # both kernels are compiled at 262,144 (one warm-up call there); at 1M one timed call each
                ms = _median_ms(fwd, 3) if n < 10**6 else _once_ms(fwd)  # n: the size before the dry run's division
            finally:
                _lse.TILE_FWD_MAX_KEY_BYTES = 256 * 2**20
            out["fwd_ab"].append({"N": n, "forward": name, "ms": ms})
            say(json.dumps(out["fwd_ab"][-1]))
            dump("verify", out)
    _time_info_nce(q, k, s, out["n1m"])
    dump("verify", out)
    return 0


def _time_info_nce(q, k, s, rows) -> None:
    """Seconds of one InfoNCE forward + backward (host clock, synchronised), appended to ``rows``."""
    start = time.perf_counter()
    torch.autograd.grad(info_nce(q, k, s, impl=IMPL), [q, k, s])
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    rows.append({"family": "info_nce", "N": q.shape[0], "d": q.shape[1], "s": time.perf_counter() - start})
    say(json.dumps(rows[-1]))


#: part s7: sizes of the reference checks and of the timing (divided by VERIFY_DIV on a CPU dry run).
S7_CHECK_N = tuple(int(x) for x in os.environ.get("GPU_LARGE_S7_CHECK_N", "20000,65536").split(","))


def _scale_grad_condition(q, k, s) -> float:
    """``sum |G_ij S_ij| / |sum G_ij S_ij|`` of symmetric InfoNCE (``S = q . k``, ``G`` its logit gradient), fp32."""
    qf, kf = q.detach().float(), k.detach().float()
    logits = (s.detach().float() * (qf @ kf.T)).requires_grad_()
    labels = torch.arange(q.shape[0], device=q.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    g = torch.autograd.grad(loss, logits)[0]
    terms = g * (qf @ kf.T)
    return float(terms.abs().sum() / terms.sum().abs())


def _free() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _size(n: int) -> int:
    """``n`` divided by ``GPU_LARGE_VERIFY_DIV`` (a CPU dry run), at least 2."""
    return max(2, n // VERIFY_DIV)


_S7_FNS = {"info_nce": lambda q, k, s, b, impl: info_nce(q, k, s, impl=impl),
           "dcl": lambda q, k, s, b, impl: dcl(q, k, s, impl=impl),
           "siglip": lambda q, k, s, b, impl: siglip(q, k, s, b, impl=impl)}


def _s7_case(out, q, k, b, family, scale) -> bool:
    """One reference check of part s7 (DS on and off), appended to ``out["check"]``; whether it passed."""
    from batchlab.losses.triton import _lse

    fn, n = _S7_FNS[family], q.shape[0]
    s = torch.tensor(scale, device=DEVICE, requires_grad=True)
    inputs = [q, k, s] + ([b] if family == "siglip" else [])
    ref_in = [x.detach().float().requires_grad_() for x in inputs]
    ref = fn(*ref_in[:3], ref_in[3] if family == "siglip" else b, "reference")
    ref_g = torch.autograd.grad(ref, ref_in)
    ref = ref.detach()
    del ref_in
    row = {"family": family, "N": n, "scale": scale, "ref_scale_grad": float(ref_g[2])}
    for ds in (True, False):
        _lse.DS_SUM = ds
        try:
            loss = fn(q, k, s, b, IMPL)
            grads = torch.autograd.grad(loss, inputs)
        finally:
            _lse.DS_SUM = True
        tag = "" if ds else "_ds_off"
        row["loss_err" + tag] = rel(loss, ref)
        row["grad_err" + tag] = max(rel(g, r) for g, r in zip(grads, ref_g))
        row["scale_grad_err" + tag] = rel(grads[2], ref_g[2])
    if family == "info_nce" and n <= _size(20000):
        row["condition"] = _scale_grad_condition(q, k, s)
    row["ok"] = row["loss_err"] < VALUE_TOL and row["grad_err"] < GRAD_TOL and row["scale_grad_err"] < 1e-4
    out["check"].append(row)
    say(json.dumps(row))
    return row["ok"]


def _s7_check(out) -> int:
    bad = 0
    for n in map(_size, S7_CHECK_N):
        q, k, _, b = leaves(n, VERIFY_D[0], seed=n)
        # above 20,000 InfoNCE only: the fp32 DCL and SigLIP references hold several N x N tensors
        # (DCL's at 65,536 ran out of the H200's 140 GiB in call 2)
        for family in _S7_FNS if n <= _size(20000) else ("info_nce",):
            for scale in (0.01, 14.3):
                bad += not _s7_case(out, q, k, b, family, scale)
                dump("s7", out)
                _free()
        del q, k
    return bad


def _s7_launches(out) -> None:
    from batchlab.bench.losses import count_syncs

    n = _size(65536)
    for family in ("info_nce", "siglip"):
        q, k, s, b = leaves(n, VERIFY_D[0])
        inputs = [q, k, s] + ([b] if family == "siglip" else [])

        def call():
            return torch.autograd.grad(loss_of(family, q, k, s, b, IMPL), inputs)

        names = kernels_of(call)
        caught = _sync_warnings(call)
        out["launches"].append({"family": family, "N": n, "launches": len(names),
                                "syncs": count_syncs(caught),
                                "by_kernel": {name[:60]: names.count(name) for name in set(names)}})
        say(json.dumps(out["launches"][-1]))
        dump("s7", out)
        del q, k
        _free()


def _s7_time(out) -> None:
    from batchlab.losses.triton import _launch, _lse

    base = dict(_launch.CONFIGS["bwd"])
    looped = {key: v for key, v in base.items() if key not in ("TILE", "TWO_EXP")}
    variants = {"default": (True, base), "looped bwd + DS": (True, looped), "DS off": (False, base)}
    n = _size(65536)
    for d in VERIFY_D:
        for family in ("info_nce", "siglip"):
            q, k, s, b = leaves(n, d)
            inputs = [q, k, s] + ([b] if family == "siglip" else [])

            def call():
                return torch.autograd.grad(loss_of(family, q, k, s, b, IMPL), inputs)

            for name, (ds, cfg) in variants.items():
                if family == "siglip" and name == "looped bwd + DS":
                    continue
                _lse.DS_SUM, _launch.CONFIGS["bwd"] = ds, dict(cfg)
                try:
                    peak, _ = _peak_mib(call)
                    ms = _median_ms(call, 10)
                finally:
                    _lse.DS_SUM, _launch.CONFIGS["bwd"] = True, dict(base)
                out["time"].append({"family": family, "N": n, "d": d, "variant": name, "ms": ms,
                                    "beyond_grads_mib": peak - 2 * n * d * 2 / 2**20})
                say(json.dumps(out["time"][-1]))
                dump("s7", out)
            del q, k
            _free()


def _s7_n1m(out) -> None:
    q, k, s, _ = leaves(_size(1048576), VERIFY_D[0])
    for _ in range(2):
        _time_info_nce(q, k, s, out["n1m"])
        dump("s7", out)


def part_s7() -> int:
    """Session 7 (issue 21): the streaming path's new defaults on the GPU; each step runs even if
    the one before failed.

    (1) InfoNCE, DCL and SigLIP (bf16, streaming: N = 20,000; InfoNCE also at 65,536) against the
    fp32 reference at s = 0.01 and 14.3: loss, gradients, and the scale gradient alone (fp32
    in-kernel sum, ``_lse.DS_SUM``), also with ``DS_SUM`` off (the product's value, the old default)
    and, at 20,000, the sum's condition ``sum |G S| / |sum G S|``; (2) launches (kernels + memsets)
    and syncs per call at 65,536; (3) time at 65,536 (median of 10), d = 512 and 768: the default
    (one-tile TWO_EXP backward, DS), the looped backward with DS, and DS off, InfoNCE and SigLIP,
    with the peak memory beyond inputs and gradients; (4) InfoNCE at 1,048,576 twice."""
    out: dict = {"check": [], "launches": [], "time": [], "n1m": [], "errors": []}
    bad = 0
    for step in (_s7_check, _s7_launches, _s7_time, _s7_n1m):
        try:
            bad += step(out) or 0
        except Exception as exc:  # noqa: BLE001 - the next step still runs
            bad += 1
            out["errors"].append(f"{step.__name__}: {exc!r}"[:600])
            say(out["errors"][-1])
            _free()
        dump("s7", out)
    say(f"s7: {len(out['check'])} checks, {bad} failed or errors")
    return 1 if bad else 0


def part_all() -> int:
    """check's cases, then ab, kernels and ds, then the compile and CUDA-graph checks (slowest)."""
    global GRAPH_LAST
    GRAPH_LAST = True
    rows: list = []
    part_check(rows)
    for part in (part_ab, part_kernels, part_ds):
        try:
            part()
        except Exception as exc:  # noqa: BLE001 - the next part still runs
            say(f"{part.__name__} failed: {exc!r}")
    part_graph(rows)
    return _verdict(rows)


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else "check"
    sys.exit({"check": part_check, "ab": part_ab, "kernels": part_kernels, "ds": part_ds,
              "all": part_all, "verify": part_verify, "s7": part_s7}[part]())
