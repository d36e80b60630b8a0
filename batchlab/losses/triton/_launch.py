"""Launch settings shared by the Triton losses: tile configs, precision, workspace, fp32 products."""

from __future__ import annotations

import math
import os

import torch
import triton

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` when the kernels were defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Tile configurations per kernel: block rows, block columns, d chunk, warps, pipeline
#: stages, TMA (tensor-descriptor loads; off automatically when rows are not 16-byte
#: aligned) and, for the kernels that write gradient panels, TMA_OUT (tile stores through
#: the copy engine), and the loop options of KERNEL_OPTIONS. Chosen by the sweeps on one
#: H100 (d=512, bf16, N=32,768): ``benchmarks/results/losses-triton-sweep-h100-80gb-hbm3-v3.json``
#: (forward, siglip) and ``-v6.json`` (backward: 128x128 tiles and 4 warps won in v4, v5 and
#: v6; TPP and FLAT measured within noise of it, so they stay off). The forward since the H200
#: grid at N=65,536 (d=512, bf16; benchmarks/results/losses-h200-s6/): the one-tile kernel
#: (``TILE``, fixed-shift sums, no running max) with 2 stages, 7.79 ms against 9.03 ms for the
#: looped kernel (backward and SigLIP: no variant beat the defaults). SigLIP since session 9's
#: call 4 (H200, N = 65,536, d = 512, bf16): the lean kernel (``TILE=2``, ``siglip_lean_kernel``)
#: 64x128, 4 warps, 3 stages, ``maxnreg=168`` (a launch option: registers per thread capped),
#: 25.89 ms for the pass against 30.34 ms with the previous default. Edit at run time to
#: try others (the sweep does this; ``python -m batchlab.bench.losses_triton --sweep``).
CONFIGS: dict[str, dict[str, int]] = {
    "fwd": dict(BM=128, BN=128, BD=64, num_warps=4, num_stages=2, TMA=1, TILE=1),
    "bwd": dict(BM=128, BN=128, BD=64, num_warps=4, num_stages=3, TMA=1, TMA_OUT=0, TILE=1, TWO_EXP=1),
    "siglip": dict(BM=64, BN=128, BD=64, num_warps=4, num_stages=3, TMA=1, TMA_OUT=0, TILE=2, maxnreg=168),
}
#: fp32 inputs double the bytes per chunk: halve the d chunk.
FP32_BD = 32
#: Small blocks in the interpreter: several tiles and d chunks even at test sizes.
INTERPRET_CONFIG = dict(BM=16, BN=32, BD=16, num_warps=4, num_stages=1, TMA=0)
#: The kernel choice the interpreter takes from the GPU defaults (the looped InfoNCE kernels keep their own
#: interpreter coverage; the one-tile ones have explicit tests).
INTERPRET_KERNEL_CHOICE = {"siglip": {"TILE": CONFIGS["siglip"].get("TILE", 0)}}


#: Speed-only options each kernel understands besides the tile shape (``_kernels`` says
#: what they do): loop flattening (FLAT), column tiles per program (TPP), tile stores
#: through the copy engine (TMA_OUT); TILE=1 switches to the one-tile-per-program kernels
#: (``*_tile_kernel``), which take WS (Triton's Hopper warp specialisation of the d loop,
#: with TMA only) and, in the backward, TWO_EXP (a branch-free epilogue).
KERNEL_OPTIONS = {"fwd": ("FLAT", "TILE"), "bwd": ("TMA_OUT", "TPP", "FLAT", "TILE", "WS", "TWO_EXP"),
                  "siglip": ("TMA_OUT", "TILE", "WS", "TPP", "FLAT")}
SHAPE_KEYS = ("BM", "BN", "BD", "num_warps", "num_stages", "TMA", "maxnreg")
#: Why WS is ignored on the GPU unless ``BATCHLAB_TRITON_WS=1``: the first H200 run that used the
#: warp-specialised one-tile kernels (Triton 3.6) never finished (2026-12-02,
#: benchmarks/results/losses-h200-large); the interpreter ignores the flag, so tests still run the path.
WS_NOTE = "warp-specialised kernels hung on an H200 with Triton 3.6; opt in with BATCHLAB_TRITON_WS=1"


def config(kernel: str, dtype: torch.dtype) -> dict[str, int]:
    """Launch keywords for ``kernel`` ("fwd", "bwd" or "siglip") on inputs of ``dtype``."""
    if interpreting():
        # Small shapes, but SigLIP's kernel as on the GPU (the lean one-tile kernel, TILE=2), so that the
        # interpreter suites check the kernel the default path runs; a test may still set TILE itself.
        cfg = {**INTERPRET_KERNEL_CHOICE.get(kernel, {}), **INTERPRET_CONFIG}
    else:
        cfg = dict(CONFIGS[kernel])
    cfg = {key: v for key, v in cfg.items() if key in SHAPE_KEYS or key in KERNEL_OPTIONS[kernel]}
    cfg.setdefault("TMA", 0)
    if cfg.get("WS") and not interpreting() and os.environ.get("BATCHLAB_TRITON_WS", "0") != "1":
        cfg["WS"] = 0  # see WS_NOTE
    if dtype == torch.float32 and not interpreting():
        cfg["BD"] = min(cfg["BD"], FP32_BD)
    return cfg


def operands(q: torch.Tensor, k: torch.Tensor, cfg: dict) -> tuple:
    """``(q_arg, k_arg, cfg)``: tensor descriptors when ``cfg["TMA"]`` and the layout allows, else the tensors.

    The copy engine needs 16-byte aligned rows and base addresses; otherwise TMA is switched off.
    """
    cfg = dict(cfg)
    aligned = all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
                  for t in (q, k))
    if not (cfg.get("TMA") and aligned):
        cfg["TMA"] = 0
        if cfg.get("WS"):  # warp specialisation needs the copy engine's loads
            cfg["WS"] = 0
        return q, k, cfg
    from triton.tools.tensor_descriptor import TensorDescriptor

    return (TensorDescriptor.from_tensor(q, [cfg["BM"], cfg["BD"]]),
            TensorDescriptor.from_tensor(k, [cfg["BN"], cfg["BD"]]), cfg)


def panel_output(buf: torch.Tensor, rows: int, cfg: dict):
    """``(out_arg, TMA_OUT)`` for a gradient-panel kernel writing ``buf[:rows]``.

    With ``cfg["TMA_OUT"]`` (and 16-byte aligned rows) a tensor descriptor of the panel,
    so that the kernel stores its tiles through the copy engine; else the buffer itself.
    """
    out = buf[:rows]
    aligned = (out.stride(0) * out.element_size()) % 16 == 0 and out.data_ptr() % 16 == 0
    if not (cfg.get("TMA_OUT") and aligned and out.is_cuda):
        return buf, False
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(out, [cfg["BM"], cfg["BN"]]), True


def kernel_flags(x: torch.Tensor, bd: int) -> dict:
    """Compile-time flags that depend on the inputs: d divisibility, interpreter, fp32 dot precision."""
    # fp32 inputs follow torch's TF32 switch; for bf16/fp16 the setting is moot, so keep
    # Triton's default there (which never steers the compiler off the matrix units).
    prec = "tf32"
    if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        prec = "ieee"
    return dict(EVEN_D=x.shape[1] % bd == 0, UPCAST=interpreting(), PREC=prec)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def tile_shares(n_tiles: int, programs: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    """``(shares, tiles_per_share)``: cut a loop over ``n_tiles`` tiles into shares so that
    ``programs * shares`` reaches ``per_sm`` programs per SM (no share left empty)."""
    shares = max(1, min(n_tiles, math.ceil(per_sm * num_sms(device) / max(1, programs))))
    per_share = triton.cdiv(n_tiles, shares)
    return triton.cdiv(n_tiles, per_share), per_share


def panel_rows(n: int, m: int, elem_bytes: int, block_rows: int, workspace_bytes: int | None) -> int:
    """Rows per gradient panel: the (rows x m) gradient buffer stays within ``workspace_bytes``.

    Default: 8,192 rows (1 GiB of bf16 at 65,536 keys), fewer when that would pass 16 GiB.
    Tall panels keep the two gradient products at full rate and the fp32 ``dk``
    accumulation (one read-modify-write of M x d per panel) cheap.
    """
    if workspace_bytes is None:
        workspace_bytes = min(16 * 2**30, 8192 * m * elem_bytes)
    if OVERLAP:  # two buffers share the workspace
        workspace_bytes //= 2
    rows = max(block_rows, workspace_bytes // max(1, m * elem_bytes))
    rows = (rows // block_rows) * block_rows
    return int(min(rows, n))


#: Double-buffer the gradient panels on CUDA: the Triton kernel fills panel p+1 on a side
#: stream while cuBLAS consumes panel p (each buffer gets half the workspace).
OVERLAP = os.environ.get("BATCHLAB_TRITON_OVERLAP", "0") == "1"

_MM_F32: bool | None = None


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32 (no bf16 rounding of the result)."""
    global _MM_F32
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if _MM_F32 is not False and a.is_cuda:
        try:
            out = torch.ops.aten.mm.dtype(a, b, torch.float32)
            _MM_F32 = True
            return out
        except (RuntimeError, AttributeError, NotImplementedError):
            _MM_F32 = False
    return torch.mm(a, b).float() if a.is_cuda else torch.mm(a.float(), b.float())


_ADDMM_F32: bool | None = None


def _addmm_f32_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``aten.addmm.dtype_out`` accumulates a half-precision product into fp32 in place, right."""
    try:
        a = torch.randn(64, 48, device=device).to(dtype)
        b = torch.randn(48, 32, device=device).to(dtype)
        acc = torch.randn(64, 32, device=device)
        expected = acc + a.float() @ b.float()
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
        return bool(torch.allclose(acc, expected, rtol=1e-4, atol=1e-4))
    except (RuntimeError, AttributeError, NotImplementedError, TypeError):
        return False


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 ``acc``; in place through cuBLAS when the build allows it."""
    global _ADDMM_F32
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        if _ADDMM_F32 is None:
            _ADDMM_F32 = _addmm_f32_works(a.device, a.dtype)
        if _ADDMM_F32:
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
            return
    acc += mm_f32(a, b)


def logit_grad_factor(q: torch.Tensor, scale32: torch.Tensor, g: list, *, fold: bool):
    """``(ginv, factor, gscale)`` for a gradient-panel kernel that stores ``G * ginv`` (``G``: the logit
    gradient of the loss, ``g``: the upstream gradients it is linear in).

    ``fold`` with bf16/fp32 inputs: ``ginv = s``, so the buffer holds ``s G``, the products give
    ``dq`` and ``dk`` without a multiply (``factor`` None, ``gscale`` None; bf16 has fp32's exponent
    range). Otherwise (fp16, whose range ``s G`` could leave; or a scale gradient taken from the
    product, which needs ``G`` without ``s``): ``gscale = sum of max |g|``, so that ``G / gscale`` lies
    in [-1, 1], ``ginv = 1 / gscale`` and ``factor = s gscale``.
    """
    if fold and q.dtype != torch.float16:
        return scale32, None, None
    gscale = g[0].abs().max()
    for other in g[1:]:
        gscale = gscale + other.abs().max()
    gscale = gscale.clamp_min(1e-30)
    return (1.0 / gscale).reshape(1), scale32 * gscale, gscale


def gradients_from_panels(q, k, rows_per_panel: int, fill, factor, *, need_q: bool, need_k: bool,
                          dot: bool = True, dq: torch.Tensor | None = None, dk_raw: str | None = None):
    """``dq = factor * G @ k``, ``dk = factor * G.T @ q`` and ``sum_i q_i . (G @ k)_i``, panel by panel.

    ``fill(p, r0, r1, buf)`` writes rows [r0, r1) of ``G / factor`` into ``buf[: r1 - r0]``
    (a (rows_per_panel, M) buffer in the inputs' dtype). ``factor``: an fp32 device scalar, or
    None when the buffer already holds the gradient's logit factor (``G`` itself: no multiply,
    ``dq`` written by the product). The products accumulate in fp32; ``dk`` sums over panels in
    an fp32 buffer when there is more than one. The last value (fp32 scalar, without ``factor``)
    is ``sum_ij G_ij (q_i . k_j) / factor``: the scale gradient (None with ``dot=False``: the
    caller sums it otherwise, and no fp32 product of ``G @ k`` is made).

    Launches per panel: ``fill``, ``G @ k`` (into ``dq``'s rows, or fp32 then scaled with
    ``factor``: one more), ``G.T @ q`` (into the fp32 accumulator, which the first panel's product
    writes); with ``dot`` two more.

    ``dq`` (the inputs' dtype), when given, already holds a part of the query gradient (the positives',
    ``_lse.stream_loss``): ``G @ k`` is added into its rows (accumulated in fp32, rounded once, ``beta = 1``).
    ``dk_raw``: the key gradient is returned as accumulated, not rounded: ``"fp32"``: in fp32 (the caller
    rounds it), ``"same"``: in the inputs' dtype (each panel's product adds into it and rounds); the first
    panel's product writes it (no zero fill). Both only with ``factor`` None.
    """
    n, d = q.shape
    m = k.shape[0]
    panels = [(p, r0, min(n, r0 + rows_per_panel)) for p, r0 in enumerate(range(0, n, rows_per_panel))]
    several = len(panels) > 1
    double = OVERLAP and several and q.is_cuda
    bufs = [torch.empty(rows_per_panel, m, device=q.device, dtype=q.dtype) for _ in range(2 if double else 1)]
    add_q = dq is not None
    if (add_q or dk_raw) and factor is not None:
        raise ValueError("gradients_from_panels takes dq or dk_raw only without a factor")
    if dq is None and need_q:
        dq = torch.empty_like(q)
    dk32 = None  # the key gradient's accumulator: written by the first panel's product (no zero fill)
    dk = None
    want_dot, dot = dot, (torch.zeros((), device=q.device, dtype=torch.float32) if dot else None)
    if double:
        main, side = torch.cuda.current_stream(q.device), torch.cuda.Stream(q.device)
        side.wait_stream(main)  # inputs and statistics are ready
        freed: list = [None, None]  # event: main has finished reading buffer i
        filled: dict = {}

        def launch(p):
            i = p % 2
            with torch.cuda.stream(side):
                if freed[i] is not None:
                    side.wait_event(freed[i])
                fill(*panels[p], bufs[i])
                filled[p] = torch.cuda.Event()
                filled[p].record(side)

        launch(0)
    for p, r0, r1 in panels:
        buf = bufs[p % 2] if double else bufs[0]
        if double:
            if p + 1 < len(panels):
                launch(p + 1)
            main.wait_event(filled.pop(p))
        else:
            fill(p, r0, r1, buf)
        g = buf[: r1 - r0]
        if want_dot or (need_q and factor is not None):
            gk = mm_f32(g, k)
            if want_dot:
                dot += (gk * q[r0:r1]).sum()
            if need_q:
                if add_q:
                    dq[r0:r1].add_(gk)
                elif factor is None:
                    dq[r0:r1].copy_(gk)
                else:
                    torch.mul(gk, factor, out=dq[r0:r1])  # scaled and rounded in one op, no fp32 temporary
        elif need_q and add_q:
            dq[r0:r1].addmm_(g, k)  # dq's rows + G @ k, accumulated in fp32, rounded once
        elif need_q:
            torch.mm(g, k, out=dq[r0:r1])  # fp32 accumulation, rounded once into dq
        if need_k:
            if (several or dk_raw) and dk32 is None:  # the first panel writes the accumulator
                dk32 = torch.mm(g.t(), q[r0:r1]) if dk_raw == "same" else mm_f32(g.t(), q[r0:r1])
            elif dk_raw == "same":  # accumulated in the inputs' dtype: rounded once per panel
                dk32.addmm_(g.t(), q[r0:r1])
            elif several or dk_raw:
                addmm_f32_(dk32, g.t(), q[r0:r1])
            elif factor is None:
                dk = torch.mm(g.t(), q[r0:r1])
            else:
                dk = torch.mul(mm_f32(g.t(), q[r0:r1]), factor, out=torch.empty_like(k))
        if double:
            freed[p % 2] = torch.cuda.Event()
            freed[p % 2].record(main)
    if double:
        main.wait_stream(side)
    bufs.clear()  # the panel workspace is free before dk's last step (it set the peak at 65,536)
    if dk_raw:
        dk = dk32
    elif dk32 is not None:
        dk = dk32.to(k.dtype) if factor is None else torch.mul(dk32, factor, out=torch.empty_like(k))
    return dq, dk, dot
