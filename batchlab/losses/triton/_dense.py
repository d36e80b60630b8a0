"""The small-batch path of ``impl="triton"``: few launches, little host work, no host synchronisation.

Below ``DENSE_MAX_LOGITS`` logits (N x M) the whole loss is a handful of kernels. Eager calls
go through one ``torch.autograd.Function`` per loss (:class:`_ClipDense`, :class:`_SiglipDense`)
whose forward and backward call cuBLAS and the Triton kernels, each compiled kernel launched
directly through its launcher after its first use (:class:`_Kernel`); under ``torch.compile``
the same code runs as PyTorch custom ops (``torch.library``, with fake implementations and
autograd formulas), so that ``fullgraph=True`` traces them without graph breaks. Both can be
captured in CUDA graphs.

==========  ==================================================================  ========
loss        forward + backward                                                  launches
==========  ==================================================================  ========
CLIP        ``S = q @ k.T`` (cuBLAS, fp32) ; ``clip_lse_kernel`` ; sum of the          6
            per-program partials || ``clip_grad_kernel`` (recomputes the tiles,
            adds up the scale gradient itself) ; ``G @ k`` ; ``G.T @ q``
CLIP from   ``clip_tile_stats_kernel`` (computes its tile of ``q @ k.T``:            5
``TILED_*`` ``TILE_DOT``) ; ``clip_combine_kernel`` (adds up the loss itself) ||
            as above
SigLIP      ``siglip_loss_kernel`` ; sum || ``siglip_grad_kernel`` (adds up the        5
            scale and bias gradients itself) ; ``G @ k`` ; ``G.T @ q``
==========  ==================================================================  ========

(plus the upstream gradient autograd creates, and the memsets cuBLAS adds for some shapes: the
H200 counted 7-8 for CLIP and 6 for SigLIP per call up to N = 8,192, 6 and 8 at 16,384 for
d = 512 and 768; before the in-kernel totals and ``TILE_DOT`` 8-10 and 7-9, and 12 for CLIP at
16,384 and d = 768). Measured on an H200 (benchmarks/results/losses-h200-s6/, call 3):
0.42-0.74x open_clip's time at N = 256 ... 8,192 (host-bound: ~1 ms per call on that machine's
CPU), 0.51-0.61x at 16,384.

Memory: below ``TILED_STATS_MIN_LOGITS`` the fp32 (N, M) product of the CLIP forward (freed
before the backward), and the (N, M) logit gradient in the inputs' dtype: at N = 16,384 0.5 GiB
(bf16) beyond inputs and gradients, a quarter of what open_clip's own loss holds at that size.

Covered: bf16/fp32 inputs, the diagonal or ``targets``, symmetric or one-way, every
reduction, ``return_lse`` (with gradients through it). Anything else (pos_mask,
extra negatives, neg_mask, DCL, fp16: the logit gradient could underflow) goes to
the streaming kernels (:mod:`._lse`, :mod:`._siglip`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from batchlab.losses.triton import _dense_kernels as kd
from batchlab.losses.triton import _launch
from batchlab.losses.triton._launch import config, interpreting, kernel_flags, mm_f32

#: The small-batch path runs up to this many logits (N * M): 16,384 x 16,384 (then 1 GiB of
#: fp32 product in the forward, 0.5 GiB of bf16 logit gradient in the backward: less than
#: open_clip holds at that size). Above it the streaming kernels hold O(N + M) instead of
#: O(N M) (benchmarks/results/losses-h200-small/ has the measured crossover).
#: ``BATCHLAB_DENSE_MAX_LOGITS`` overrides it (0: always stream).
DENSE_MAX_LOGITS = int(os.environ.get("BATCHLAB_DENSE_MAX_LOGITS", 16384 * 16384))
#: Input dtypes of the small-batch path (fp16 logit gradients could underflow: streaming path).
DENSE_DTYPES = (torch.bfloat16, torch.float32)
#: Owned block and swept chunk of ``clip_lse_kernel``; interpreter: small, several blocks at test sizes.
_LSE_BLOCKS = (64, 128)
_INTERPRET_LSE_BLOCKS = (16, 32)
#: From this many logits on, the CLIP forward reads the fp32 product once, tile by tile
#: (``clip_tile_stats_kernel`` on a 2-D grid, then ``clip_combine_kernel``: one launch more);
#: below it one ``clip_lse_kernel`` sweeps it by rows and by columns (fewest launches). Measured
#: on an H200 (InfoNCE, d=512, bf16, forward + backward; benchmarks/results/losses-h200-small/):
#: N=16,384 2.82 ms tiled vs 3.90 ms one kernel; N=8,192 1.34 vs 1.28 ms; 4,096 0.90 vs 0.98 ms
#: (host-bound there). ``BATCHLAB_DENSE_TILED_MIN_LOGITS`` overrides it.
TILED_STATS_MIN_LOGITS = int(os.environ.get("BATCHLAB_DENSE_TILED_MIN_LOGITS", 16384 * 16384))
#: (tile rows, tile columns, merge block, partials per merge step) of the tiled forward, and the
#: warps of its tile kernel: 64 x 128 with 4 warps measured 2.78 ms at N=16,384 against 3.09 ms
#: (64 x 256, 8 warps) and 3.33 ms (128 x 128, 8 warps).
_TILED_BLOCKS = (64, 128, 128, 32)
_TILED_WARPS = 4
#: The tiled forward's tile kernel computes ``q . k`` itself (``clip_tile_stats_kernel``'s ``DOT``)
#: instead of cuBLAS writing the fp32 product first: one launch and the (N, M) fp32 buffer less.
#: H200, InfoNCE forward + backward at N = 16,384 (benchmarks/results/losses-h200-s6/): d = 512
#: 2.42 ms against 2.79 ms reading the product, d = 768 3.38 against 3.64 ms; 6 and 8 launches
#: per call against 8 and 10 (``BATCHLAB_DENSE_TILE_DOT=0``: read the product). Its tile (rows,
#: columns, d chunk),
#: warps and pipeline stages (``BATCHLAB_DENSE_TILE_DOT_CONFIG="128,128,64,4,3"``): compiled for sm_90
#: (Triton 3.6, d=768 bf16) 128 x 128 with 4 warps takes 244 registers, no spills, 2 CTAs per SM;
#: 64 x 128 / 4 warps 164 (3 per SM); 128 x 128 / 8 warps 173 (1 per SM); 128 x 256 spills.
TILE_DOT = os.environ.get("BATCHLAB_DENSE_TILE_DOT", "1") == "1"


def _tile_dot_config(text: str) -> tuple[int, ...]:
    """``BATCHLAB_DENSE_TILE_DOT_CONFIG``: five positive integers BM,BN,BD,num_warps,num_stages."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 5 or min(values) < 1:
        raise ValueError(f"BATCHLAB_DENSE_TILE_DOT_CONFIG takes five positive integers BM,BN,BD,num_warps,num_stages "
                         f"(e.g. 128,128,64,4,3), got {text!r}")
    return values


_TILE_DOT_CONFIG = _tile_dot_config(os.environ.get("BATCHLAB_DENSE_TILE_DOT_CONFIG", "128,128,64,4,3"))
_TILED_BLOCKS_INTERPRET = (16, 16, 16, 4)
_REDUCTIONS = ("mean", "sum", "none")


def dense_ok(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether an (N x M) problem of this dtype takes the small-batch path."""
    return q.dtype in DENSE_DTYPES and q.shape[0] * k.shape[0] <= DENSE_MAX_LOGITS


def _coefficients(n: int, m: int, symmetric: bool, reduction: int) -> tuple[float, float]:
    """Weights of one row loss and one column loss in the total (``reduction`` indexes _REDUCTIONS)."""
    half = 0.5 if symmetric else 1.0
    if _REDUCTIONS[reduction] == "mean":
        return half / n, half / m
    return half, half


def _grad_flags(q: torch.Tensor, cfg: dict) -> dict:
    flags = kernel_flags(q, cfg["BD"])
    return dict(BM=cfg["BM"], BN=cfg["BN"], BD=cfg["BD"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"], **flags)


# ----------------------------------------------------------------------------- low-overhead launches


#: Eager calls go through :class:`_ClipDense` / :class:`_SiglipDense` (autograd functions); the
#: custom ops (what torch.compile traces) cost more host time per call. False: custom ops always.
EAGER_FUNCTION = os.environ.get("BATCHLAB_DENSE_EAGER_FUNCTION", "1") != "0"
#: Triton releases whose compiled-kernel launcher (``CompiledKernel.run``'s argument order) the
#: direct launch below was checked against on a GPU; that launcher is Triton-internal and can change.
DIRECT_LAUNCH_TRITON = ("3.6",)
#: Launch the compiled kernels directly (``BATCHLAB_TRITON_DIRECT_LAUNCH=0``: through Triton's
#: ``kernel[grid](...)`` every time; ``=1``: also on an unchecked Triton). Never under the interpreter.
DIRECT_LAUNCH = os.environ.get(
    "BATCHLAB_TRITON_DIRECT_LAUNCH",
    "1" if triton.__version__.startswith(tuple(v + "." for v in DIRECT_LAUNCH_TRITON)) else "0",
) != "0"


#: Whether the kernels run in Triton's interpreter: decided when they were defined (``triton.jit``
#: reads ``TRITON_INTERPRET`` then), so read once here (an environment lookup costs microseconds).
_INTERPRET = interpreting()


try:
    from triton.tools.tensor_descriptor import TensorDescriptor as _Descriptor
except ImportError:  # a Triton without host tensor descriptors: no argument is one
    _Descriptor = None


def _descriptor_key(a) -> tuple:
    """What Triton specialises a host tensor descriptor on: its element type, block shape and options
    (two descriptors of one class but other dtypes must not share a compiled kernel)."""
    dtype = getattr(getattr(a, "base", None), "dtype", None) or getattr(a, "dtype", None)  # Tritons differ here
    return (a.__class__, dtype, tuple(a.block_shape), getattr(a, "padding", None),  # options: newer Tritons only
            getattr(a, "round_f32_to_tf32", None))


def _arg_key(a):
    """What Triton specialises an argument on: a tensor's dtype and 16-byte alignment, an int's value,
    a tensor descriptor's dtype and block shape (:func:`_descriptor_key`)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if a.__class__ is _Descriptor:
        return _descriptor_key(a)
    return a if a.__class__ is int else a.__class__


def _current_stream() -> int:
    """The current CUDA stream's handle (what Triton's own launch path asks for)."""
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())


#: Call the compiled kernel's C launch function itself when the kernel needs no scratch memory
#: (skipping the Python wrapper of Triton 3.6's ``CudaLauncher.__call__``, which only allocates
#: scratch space): ``BATCHLAB_TRITON_RAW_LAUNCH=0`` turns it off.
RAW_LAUNCH = os.environ.get("BATCHLAB_TRITON_RAW_LAUNCH", "1") != "0"


def _raw_launch(kernel):
    """``(launch, cooperative, pdl)`` of a compiled kernel's launcher when it allocates no scratch
    memory (what ``CudaLauncher.__call__`` passes to it then), else None (call ``kernel.run``)."""
    run = kernel.run
    try:
        if run.global_scratch_size or run.profile_scratch_size:
            return None
        return run.launch, run.launch_cooperative_grid, run.launch_pdl
    except AttributeError:  # another launcher (or Triton release): go through kernel.run
        return None


class _Kernel:
    """A ``@triton.jit`` kernel launched through its compiled launcher.

    ``kernel[grid](...)`` binds and specialises every argument, reads Triton's settings and
    builds launch metadata on every call (tens of microseconds of host time). Here the first
    launch of each specialisation goes through it and returns the compiled kernel; later
    launches with the same key (what Triton specialises on: tensor dtypes and alignment,
    integer values, constexprs) call that kernel's launcher directly (its C launch function
    when no scratch memory is needed: :data:`RAW_LAUNCH`). Launch hooks (profilers that
    register with ``triton.knobs.runtime``) are honoured.
    """

    def __init__(self, fn):
        self.fn = fn
        self.compiled: dict = {}
        self.tail_names: tuple = ()

    def __call__(self, grid, args: tuple, consts: dict):
        """Launch on ``grid`` with the runtime ``args`` (signature order) and the constexpr/launch options ``consts``."""
        if not DIRECT_LAUNCH or _INTERPRET:
            self.fn[grid](*args, **consts)
            return
        # _arg_key, inlined (one Python call less per argument)
        key = (tuple(consts.items()), tuple([
            (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else
            a if a.__class__ is int else _descriptor_key(a) if a.__class__ is _Descriptor else a.__class__
            for a in args]))
        entry = self.compiled.get(key)
        if entry is None:
            kernel = self.fn[grid](*args, **consts)
            if kernel is not None and hasattr(kernel, "packed_metadata") and not hasattr(kernel, "result"):
                names = self.fn.arg_names[len(args):]
                params = self.fn.params[len(args):]
                tail = tuple(consts[name] if name in consts else p.default for name, p in zip(names, params))
                self.compiled[key] = (kernel, tail, _raw_launch(kernel) if RAW_LAUNCH else None)
            return
        kernel, tail, raw = entry
        stream = _current_stream()
        runtime = triton.knobs.runtime
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        if enter is None or not getattr(enter, "calls", True):  # no hook installed (3.6: an empty HookChain)
            meta = enter = leave = None
        else:
            meta = kernel.launch_metadata(grid, stream, *args, *tail)
        n = len(grid)
        gx, gy, gz = grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1
        if raw is not None:
            launch, cooperative, pdl = raw
            launch(gx, gy, gz, stream, kernel.function, cooperative, pdl, None, None, kernel.packed_metadata, meta,
                   enter, leave, *args, *tail)
        else:
            kernel.run(gx, gy, gz, stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *args, *tail)


_clip_lse = _Kernel(kd.clip_lse_kernel)
_clip_tiles = _Kernel(kd.clip_tile_stats_kernel)
_clip_combine = _Kernel(kd.clip_combine_kernel)
_clip_grad = _Kernel(kd.clip_grad_kernel)
_siglip_fwd = _Kernel(kd.siglip_loss_kernel)
_siglip_grad = _Kernel(kd.siglip_grad_kernel)

_FLAGS: dict = {}


def _cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` without its host cost (a ``constexpr_function`` in Triton 3.6: microseconds a call)."""
    return -(-a // b)


def _total_block() -> int:
    """Partials added per step by the program that finishes a total (``_finish_total``'s RB)."""
    return 4 if _INTERPRET else 1024


def _grad_flags_cached(q: torch.Tensor) -> dict:
    """:func:`_grad_flags` of the backward config, computed once per (dtype, d, TF32 switch, config)."""
    cfg_obj = None if _INTERPRET else _launch.CONFIGS["bwd"]
    key = (q.dtype, q.shape[1], q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    entry = _FLAGS.get(key)
    if entry is None or entry[0] is not cfg_obj:  # the sweep replaces CONFIGS["bwd"]: recompute
        entry = (cfg_obj, _grad_flags(q, config("bwd", q.dtype)))
        _FLAGS[key] = entry
    return entry[1]


def _lse_blocks() -> tuple[int, int]:
    return _INTERPRET_LSE_BLOCKS if _INTERPRET else _LSE_BLOCKS


# ----------------------------------------------------------------------------- CLIP / InfoNCE


def _product_f32(q, k):
    """``q @ k.T`` in fp32 (``torch.mm(..., out_dtype=)`` where it exists: one dispatch less)."""
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE and q.is_cuda and q.dtype != torch.float32:
        try:
            return torch.mm(q, k.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE = False
    return mm_f32(q, k.t())


_MM_OUT_DTYPE = True


def _clip_forward(q, k, scale, targets, symmetric: bool, reduction: int):
    """``(loss, stats, ws)`` of the CLIP loss (see :func:`clip_dense`)."""
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    tiled = n * m >= TILED_STATS_MIN_LOGITS
    dot = tiled and TILE_DOT
    s = q if dot else _product_f32(q, k)  # (with DOT: a placeholder pointer, never read)
    none = reduction == 2
    dev, f32 = q.device, torch.float32
    stats = torch.empty(n + (m if symmetric else 0), device=dev, dtype=f32)
    counted = targets is not None and symmetric
    # ws: the backward's counter (set to zero by the forward kernel), then the positives per column
    ws = torch.empty(1 + m if counted else 1, device=dev, dtype=torch.int32)
    cr, cc = _coefficients(n, m, symmetric, reduction)
    tgt = targets if targets is not None else stats  # a placeholder pointer without targets
    flags = dict(SYM=symmetric, HAS_TGT=targets is not None)
    if tiled:
        # large N: every tile of S read (or computed) once by a 2-D grid, then the partials merged (and added up)
        br, bc, block, tb = _TILED_BLOCKS_INTERPRET if _INTERPRET else _TILED_BLOCKS
        tile_opts = dict(num_warps=_TILED_WARPS)
        if dot:
            tile_opts = _tile_dot_options(q)
            br, bc = tile_opts.pop("BR"), tile_opts.pop("BC")
        tc, tr = _cdiv(m, bc), _cdiv(n, br)
        sym_m = m if symmetric else 1
        buf = torch.empty(3 * tc * n + 3 * tr * sym_m, device=dev, dtype=f32)
        rm, rl, rp = buf[: tc * n], buf[tc * n: 2 * tc * n], buf[2 * tc * n: 3 * tc * n]
        base = 3 * tc * n
        cm, cl, cp = (buf[base: base + tr * sym_m], buf[base + tr * sym_m: base + 2 * tr * sym_m],
                      buf[base + 2 * tr * sym_m:])
        cpos = torch.empty(tr * m, device=dev, dtype=torch.int32) if counted else cm
        _clip_tiles((tr, tc), (s, q, k, scale, tgt, rm, rl, rp, cm, cl, cp, cpos, ws, n, m, d, 0 if dot else s.stride(0),
                               q.stride(0), k.stride(0)), dict(BR=br, BC=bc, **tile_opts, **flags))
        programs = _cdiv(n, block) + (_cdiv(m, block) if symmetric else 0)
        parts, rows, cols = _loss_buffers(programs, n, m, symmetric, none, dev)
        loss = parts if none else torch.empty((), device=dev, dtype=f32)
        _clip_combine((programs,), (rm, rl, rp, cm, cl, cp, cpos, stats, rows, cols, ws, parts, loss, n, m, tc, tr,
                                    cr, cc), dict(BLOCK=block, TB=tb, STORE_LOSSES=none, RB=_total_block(), **flags))
    else:
        block, chunk = _lse_blocks()
        programs = _cdiv(n, block) + (_cdiv(m, block) if symmetric else 0)
        parts, rows, cols = _loss_buffers(programs, n, m, symmetric, none, dev)
        _clip_lse((programs,), (s, scale, tgt, stats, rows, cols, ws, parts, n, m, s.stride(0), cr, cc),
                  dict(BLOCK=block, CHUNK=chunk, STORE_LOSSES=none, **flags))
        loss = None if none else parts.sum()
    if none:
        loss = (rows + cols) * 0.5 if symmetric else rows
    return loss, stats, ws


def _tile_dot_options(q) -> dict:
    """Launch options of ``clip_tile_stats_kernel`` with ``DOT`` (tile, d chunk, warps, stages, flags)."""
    br, bc, bd, warps, stages = _TILE_DOT_CONFIG
    if _INTERPRET:
        br, bc, bd, warps, stages = 16, 16, 16, 4, 1
    elif q.dtype == torch.float32:
        bd = min(bd, _launch.FP32_BD)
    return dict(BR=br, BC=bc, BD=bd, DOT=True, num_warps=warps, num_stages=stages, **kernel_flags(q, bd))


def _loss_buffers(programs, n, m, symmetric, none, dev):
    """``(parts, rows, cols)``: one partial loss sum per program; the per-row and per-column losses
    for ``reduction="none"`` only (else placeholders)."""
    parts = torch.empty(programs, device=dev, dtype=torch.float32)
    if not none:
        return parts, parts, parts
    return (parts, torch.empty(n, device=dev, dtype=torch.float32),
            torch.empty(m if symmetric else 1, device=dev, dtype=torch.float32))


def _clip_backward_impl(q, k, scale, targets, stats, ws, g, g_stats, symmetric: bool, reduction: int,
                        need_q: bool, need_k: bool):
    """``(dq, dk, dscale)`` of ``g * loss + g_stats . stats`` (``g_stats`` None: zero; dq/dk None when not
    needed); ``ws`` is the forward's (counter, positives per column)."""
    n, d = q.shape
    m = k.shape[0]
    flags = _grad_flags_cached(q)
    grad = torch.empty(n, m, device=q.device, dtype=q.dtype)
    grid = (_cdiv(n, flags["BM"]), _cdiv(m, flags["BN"]))
    programs = grid[0] * grid[1]
    parts = torch.empty(programs + 1, device=q.device, dtype=torch.float32)  # partials, then their sum
    cr, cc = _coefficients(n, m, symmetric, reduction)
    has_tgt = targets is not None
    _clip_grad(grid, (q, k, scale, targets if has_tgt else parts, stats,
                      g_stats if g_stats is not None else parts, ws, g, grad,
                      parts, n, m, d, q.stride(0), k.stride(0), grad.stride(0), cr, cc),
               dict(SYM=symmetric, HAS_TGT=has_tgt, G_VEC=g.dim() > 0, HAS_GSTATS=g_stats is not None,
                    RB=_total_block(), **flags))
    dq = torch.mm(grad, k) if need_q else None
    dk = torch.mm(grad.t(), q) if need_k else None
    ds = parts[programs]
    return dq, dk, (ds if ds.dtype == scale.dtype else ds.to(scale.dtype))


@torch.library.custom_op("batchlab::clip_dense", mutates_args=())
def clip_dense(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: Optional[torch.Tensor],
               symmetric: bool, reduction: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, stats, ws)``: the loss (0-d, or (N,) for "none"), the row then column
    log-sum-exps (N + M,) fp32, and an int32 workspace for the backward: a counter (zero),
    then the positives per column (M,) when symmetric with targets. The op that
    ``torch.compile`` traces; eager calls take :class:`_ClipDense`."""
    return _clip_forward(q, k, scale, targets, symmetric, reduction)


@clip_dense.register_fake
def _(q, k, scale, targets, symmetric, reduction):
    n, m = q.shape[0], k.shape[0]
    loss_shape = (n,) if _REDUCTIONS[reduction] == "none" else ()
    return (q.new_empty(loss_shape, dtype=torch.float32), q.new_empty(n + (m if symmetric else 0), dtype=torch.float32),
            q.new_empty(1 + m if targets is not None and symmetric else 1, dtype=torch.int32))


@torch.library.custom_op("batchlab::clip_dense_backward", mutates_args=())
def clip_dense_backward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: Optional[torch.Tensor],
                        stats: torch.Tensor, ws: torch.Tensor, g: torch.Tensor, g_stats: torch.Tensor,
                        symmetric: bool, reduction: int, need_q: bool, need_k: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dscale)`` of ``g * loss + g_stats . stats`` (dq/dk empty when not needed). ``ws``'s
    counter is used and left at zero again (not a mutation a caller can see)."""
    dq, dk, ds = _clip_backward_impl(q, k, scale, targets, stats, ws, g, g_stats, symmetric, reduction,
                                     need_q, need_k)
    return (dq if need_q else q.new_empty(0)), (dk if need_k else k.new_empty(0)), ds


@clip_dense_backward.register_fake
def _(q, k, scale, targets, stats, ws, g, g_stats, symmetric, reduction, need_q, need_k):
    return (q.new_empty(q.shape if need_q else (0,)), k.new_empty(k.shape if need_k else (0,)),
            scale.new_empty(()))


def _clip_setup(ctx, inputs, output):
    q, k, scale, targets, symmetric, reduction = inputs
    _, stats, ws = output
    ctx.save_for_backward(q, k, scale, targets, stats, ws)
    ctx.symmetric, ctx.reduction = symmetric, reduction


def _clip_backward(ctx, g, g_stats, _g_ws):
    q, k, scale, targets, stats, ws = ctx.saved_tensors
    need_q, need_k, need_s = ctx.needs_input_grad[:3]
    # an upstream gradient may be an expanded view (stride 0): the kernel reads it by index
    dq, dk, ds = clip_dense_backward(q, k, scale, targets, stats, ws, g.contiguous(), g_stats.contiguous(),
                                     ctx.symmetric,
                                     ctx.reduction, need_q, need_k)
    return (dq if need_q else None), (dk if need_k else None), (ds if need_s else None), None, None, None


clip_dense.register_autograd(_clip_backward, setup_context=_clip_setup)


class _ClipDense(torch.autograd.Function):
    """The eager twin of :func:`clip_dense`: the same kernels without the custom-op dispatch.

    An autograd function costs a fraction of a custom op's host time per call (measured on
    the CPU: ~5 vs ~20-37 us forward); gradients left unused (the returned log-sum-exps,
    usually) are not materialised as zeros: the kernel skips them.
    """

    @staticmethod
    def forward(ctx, q, k, scale, targets, symmetric, reduction):
        loss, stats, ws = _clip_forward(q, k, scale, targets, symmetric, reduction)
        ctx.save_for_backward(q, k, scale, targets, stats, ws)
        ctx.symmetric, ctx.reduction = symmetric, reduction
        ctx.set_materialize_grads(False)
        return loss, stats

    @staticmethod
    def backward(ctx, g, g_stats):
        q, k, scale, targets, stats, ws = ctx.saved_tensors
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        if g is None and g_stats is None:
            return None, None, None, None, None, None
        if g is None:
            g = torch.zeros((q.shape[0],) if ctx.reduction == 2 else (), device=q.device, dtype=torch.float32)
        dq, dk, ds = _clip_backward_impl(q, k, scale, targets, stats, ws, g.contiguous(),
                                         None if g_stats is None else g_stats.contiguous(), ctx.symmetric,
                                         ctx.reduction, need_q, need_k)
        return dq, dk, (ds if need_s else None), None, None, None


def clip_loss(q, k, scale, targets, *, symmetric: bool, reduction: str):
    """``(loss, row_lse (N,), col_lse (M,) or None)`` of InfoNCE/CLIP on the small-batch path."""
    n = q.shape[0]
    red = _REDUCTIONS.index(reduction)
    if not EAGER_FUNCTION or torch.compiler.is_compiling():
        loss, stats, _ = clip_dense(q.contiguous(), k.contiguous(), scale.reshape(()), targets, symmetric, red)
    else:
        loss, stats = _ClipDense.apply(q.contiguous(), k.contiguous(), scale.reshape(()) if scale.dim() else scale,
                                       targets, symmetric, red)
    return loss, stats[:n], (stats[n:] if symmetric else None)


# ----------------------------------------------------------------------------- SigLIP


def _siglip_forward(q, k, scale, bias, targets, reduction: int):
    """``(loss, ctr)``: the loss (0-d fp32) and the backward's counter (int32 (1,), set to zero in-kernel)."""
    n, d = q.shape
    m = k.shape[0]
    flags = _grad_flags_cached(q)
    grid = (_cdiv(n, flags["BM"]), _cdiv(m, flags["BN"]))
    parts = torch.empty(grid[0] * grid[1], device=q.device, dtype=torch.float32)
    ctr = torch.empty(1, device=q.device, dtype=torch.int32)
    coef = 1.0 / n if reduction == 0 else 1.0
    _siglip_fwd(grid, (q, k, scale, bias, targets if targets is not None else parts, parts, ctr, n, m, d,
                       q.stride(0), k.stride(0), coef), dict(HAS_TGT=targets is not None, **flags))
    return parts.sum(), ctr


def _siglip_backward_impl(q, k, scale, bias, targets, ctr, g, reduction: int, need_q: bool, need_k: bool):
    """``(dq, dk, ds_db (2,) fp32)``; dq/dk None when not needed; ``ctr``: the forward's counter."""
    n, d = q.shape
    m = k.shape[0]
    flags = _grad_flags_cached(q)
    grid = (_cdiv(n, flags["BM"]), _cdiv(m, flags["BN"]))
    programs = grid[0] * grid[1]
    grad = torch.empty(n, m, device=q.device, dtype=q.dtype)
    parts = torch.empty(programs + 1, 2, device=q.device, dtype=torch.float32)  # partials, then their sums
    coef = 1.0 / n if reduction == 0 else 1.0
    _siglip_grad(grid, (q, k, scale, bias, targets if targets is not None else parts, g, grad, parts, ctr,
                        n, m, d, q.stride(0), k.stride(0), grad.stride(0), coef),
                 dict(HAS_TGT=targets is not None, RB=_total_block(), **flags))
    dq = torch.mm(grad, k) if need_q else None
    dk = torch.mm(grad.t(), q) if need_k else None
    return dq, dk, parts[programs]


@torch.library.custom_op("batchlab::siglip_dense", mutates_args=())
def siglip_dense(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 targets: Optional[torch.Tensor], reduction: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, ctr)``: the summed (``reduction`` 1) or mean-per-query (0) SigLIP loss, 0-d fp32, and the
    backward's counter (int32 (1,)) (traced by torch.compile)."""
    return _siglip_forward(q, k, scale, bias, targets, reduction)


@siglip_dense.register_fake
def _(q, k, scale, bias, targets, reduction):
    return q.new_empty((), dtype=torch.float32), q.new_empty(1, dtype=torch.int32)


@torch.library.custom_op("batchlab::siglip_dense_backward", mutates_args=())
def siglip_dense_backward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                          targets: Optional[torch.Tensor], ctr: torch.Tensor, g: torch.Tensor, reduction: int,
                          need_q: bool, need_k: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, [dscale, dbias])`` of ``g * loss`` (fp32 (2,); dq/dk empty when not needed). ``ctr`` is
    used and left at zero again (not a mutation a caller can see)."""
    dq, dk, dsb = _siglip_backward_impl(q, k, scale, bias, targets, ctr, g, reduction, need_q, need_k)
    return (dq if need_q else q.new_empty(0)), (dk if need_k else k.new_empty(0)), dsb


@siglip_dense_backward.register_fake
def _(q, k, scale, bias, targets, ctr, g, reduction, need_q, need_k):
    return (q.new_empty(q.shape if need_q else (0,)), k.new_empty(k.shape if need_k else (0,)),
            q.new_empty(2, dtype=torch.float32))


def _siglip_setup(ctx, inputs, output):
    q, k, scale, bias, targets, reduction = inputs
    ctx.save_for_backward(q, k, scale, bias, targets, output[1])
    ctx.reduction = reduction


def _siglip_backward(ctx, g, _g_ctr):
    q, k, scale, bias, targets, ctr = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk, dsb = siglip_dense_backward(q, k, scale, bias, targets, ctr, g, ctx.reduction, need[0], need[1])
    ds, db = dsb.to(scale.dtype).unbind()
    return (dq if need[0] else None), (dk if need[1] else None), (ds if need[2] else None), \
        (db if need[3] else None), None, None


siglip_dense.register_autograd(_siglip_backward, setup_context=_siglip_setup)


class _SiglipDense(torch.autograd.Function):
    """The eager twin of :func:`siglip_dense` (see :class:`_ClipDense`)."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, targets, reduction):
        loss, ctr = _siglip_forward(q, k, scale, bias, targets, reduction)
        ctx.save_for_backward(q, k, scale, bias, targets, ctr)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, g):
        q, k, scale, bias, targets, ctr = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dk, dsb = _siglip_backward_impl(q, k, scale, bias, targets, ctr, g.contiguous(), ctx.reduction, need[0],
                                            need[1])
        ds = db = None
        if need[2] or need[3]:
            ds, db = (dsb if dsb.dtype == scale.dtype else dsb.to(scale.dtype)).unbind()
        return dq, dk, ds, db, None, None


def siglip_loss(q, k, scale, bias, targets, *, reduction: str):
    """SigLIP's summed or mean loss (0-d) on the small-batch path (``reduction`` "mean" or "sum")."""
    red = _REDUCTIONS.index(reduction)
    if not EAGER_FUNCTION or torch.compiler.is_compiling():
        return siglip_dense(q.contiguous(), k.contiguous(), scale.reshape(()), bias.reshape(()), targets, red)[0]
    return _SiglipDense.apply(q.contiguous(), k.contiguous(), scale.reshape(()) if scale.dim() else scale,
                              bias.reshape(()) if bias.dim() else bias, targets, red)
