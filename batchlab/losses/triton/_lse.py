"""Row and column log-sum-exp of ``s * q @ k.T`` as one autograd function, on Triton kernels.

``pair_lse(q, k, scale, targets, cols=..., exclude=...)`` returns ``(row_lse (N,),
col_lse (M,) or None)`` in fp32 without ever holding the (N, M) logits:

* forward: one pass (``lse_fwd_kernel``) gives the rows' exact online log-sum-exp
  and the columns' sums against a fixed shift; columns whose sum underflowed (only
  possible when ``|s| > ~55``) are recomputed exactly by a second pass on swapped
  inputs, so the result is exact at any scale.
* backward: for each panel of rows, ``lse_bwd_tile_kernel`` (default; ``lse_bwd_kernel``
  without ``TILE``) recomputes the tiles once and writes ``s G`` (``G``: the logit gradient;
  bf16/fp32 like the inputs; fp16 holds ``G / gscale``); two matrix products turn it into
  ``dq = s G k`` and ``dk = s G^T q`` (fp32 accumulation across panels), and the kernel sums
  ``ds = sum G * (q . k)`` in fp32 per program (:data:`DS_SUM`). FLOPs: 1 GEMM forward +
  3 backward = ``8 N M d``. Launches per panel: the kernel and the two products.

Host syncs: none. The logits' bound, the column shift and the choice of epilogue live
in a small device tensor (``ctl``, two small kernels: :func:`control`) that the kernels read;
the exact recomputation of underflowed columns is decided per program on the GPU
(``lse_fwd_kernel``'s ``FIX``).

``exclude=True`` leaves each query's target out of both sums (DCL's denominator).

:func:`stream_loss` (the default for InfoNCE/DCL with the diagonal positives, bf16/fp32): the loss
itself in one autograd node on the same kernels, with the positives, the loss, the upstream weights,
the positives' gradients, dk's rounding and the scale gradient's sum in the small kernels of
:mod:`._glue` (forward 6 launches, backward 2 + 3 per panel). ``BATCHLAB_TRITON_STREAM_LOSS=0``: the
log-sum-exps alone (:func:`pair_lse`) and PyTorch's ops around them, as before session 9.

With ``BATCHLAB_CUTE=auto`` or ``1`` (and the ``cute`` extra on a Hopper GPU) the forward's tile kernel and the
backward's panel kernel are replaced by the CuTe epilogue GEMMs of :mod:`batchlab.losses.cute` for the calls they
take (:func:`batchlab.losses.cute.unsupported`); the rest of this module is the same either way.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton

from batchlab.losses import cute as _cute
from batchlab.losses.triton import _glue, _kernels
from batchlab.losses.triton._launch import (
    LN2,
    LOG2E,
    config,
    gradients_from_panels,
    interpreting,
    kernel_flags,
    logit_grad_factor,
    operands,
    panel_output,
    panel_rows,
    tile_shares,
)

#: Columns whose shifted sum falls below this are recomputed exactly: above it, the
#: terms flushed to zero (each < 2**-126, at most 2**31 of them) are < 2**-29 of the sum.
_UNDERFLOW = 2.0**-66
#: The column shift sits this many binary orders below the logits' bound: a term is at
#: most 2**92 and a sum of up to 2**31 of them stays below fp32's 2**128.
_HEADROOM2 = 92.0


#: The logits' bound is taken this much above ``|s| max|q| max|k|`` (rounding of the norms).
_BOUND_MARGIN = 1.001


def logit_bound(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``B = |s| max|q_i| max|k_j| >= |L_ij|`` as a 0-d fp32 device tensor, with a margin for rounding
    (torch's ops; :func:`control` computes the same bound in two kernels)."""
    qn = torch.linalg.vector_norm(q, dim=1, dtype=torch.float32).max()
    kn = torch.linalg.vector_norm(k, dim=1, dtype=torch.float32).max()
    return scale.detach().abs().float() * qn * kn * _BOUND_MARGIN


#: The single-exponential epilogues (column terms derived from the row terms) are exact
#: while no row term can underflow: 2 * bound * log2(e) + log2(max(N, M)) stays below this.
_ONE_EXP_RANGE2 = 100.0
#: Set to False to force two exponentials per logit (for timing and tests).
ONE_EXP = True
#: The backward kernels (InfoNCE/DCL here, SigLIP's in ``_siglip``) sum the scale gradient
#: ``sum G * (q . k)`` in fp32 per program (``DS``) instead of taking it from the product of the
#: stored bf16/fp16 logit gradient, which loses it when the logits are nearly uniform: relative
#: error up to 3.5e-2 at s = 0.01 and ~3e-3 at s = 14.3 for InfoNCE (interpreter, N = 256, bf16;
#: benchmarks/results/losses-h200-s6/scale_grad_precision.json; H200 4.2e-2 at s = 0.01, N = 4,096),
#: 0.25-0.44 for SigLIP at s = 0.01, b = 0 (interpreter, N = 256), against ~1e-7 summed in fp32.
#: On by default since session 7; skipped when the scale needs no gradient. ``BATCHLAB_TRITON_DS_SUM=0``:
#: off (the product's value, and one fp32 product, multiply and sum more per panel).
DS_SUM = os.environ.get("BATCHLAB_TRITON_DS_SUM", "1") != "0"


#: Rows and d chunk per program of ``norm_max_kernel`` (the logits' bound in :func:`control`).
_NORM_BLOCK = (32, 128)


def control(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``ctl`` (2,) fp32 on the device: the column shift ``ref2`` and the one-exponential flag.

    ``ref2 = B log2(e) - 92`` (B: :func:`logit_bound`); the flag is 1 when
    ``2 B log2(e) + log2(max(N, M)) <= 100`` (|s| < ~30 at N = 1M), so one exp2 per logit
    is exact. Computed on the GPU by two launches (``norm_max_kernel``: each block of rows'
    largest squared norm; ``control_kernel``: the rest; torch's ops took 14): no host sync.
    """
    n, d = q.shape
    m = k.shape[0]
    rows, chunk = _NORM_BLOCK
    q_blocks = triton.cdiv(n, rows)
    blocks = q_blocks + triton.cdiv(m, rows)
    f32 = dict(device=q.device, dtype=torch.float32)
    parts = torch.empty(blocks, **f32)
    ctl = torch.empty(2, **f32)
    limit = _ONE_EXP_RANGE2 - math.log2(max(n, m, 2)) if ONE_EXP else -1.0
    _kernels.norm_max_kernel[(blocks,)](q, k, parts, n, m, d, q.stride(0), k.stride(0), q_blocks, BR=rows, BD=chunk)
    _kernels.control_kernel[(1,)](parts, scale.detach(), ctl, q_blocks, blocks, limit, _BOUND_MARGIN, _HEADROOM2,
                                  BLOCK=1024)
    return ctl


def lse_forward(q, k, scale, targets, *, cols: bool, exclude: bool, ctl: torch.Tensor | None = None,
                sums: torch.Tensor | None = None):
    """Base-2 row log-sum-exp (N,) and, when ``cols``, column log-sum-exp (M,) (or None).

    ``ctl``: :func:`control` of the inputs (computed here when None). ``sums``: zeroed fp32 (N + M,)
    for the one-tile forward's sums (allocated here when None; the looped forward ignores it).
    """
    n, d = q.shape
    m = k.shape[0]
    cfg = config("fwd", q.dtype)
    if cfg.get("TILE"):
        if m * d * k.element_size() <= TILE_FWD_MAX_KEY_BYTES:
            return _lse_forward_tiles(q, k, scale, targets, cols=cols, exclude=exclude, ctl=ctl, cfg=cfg,
                                      sums=sums)
        cfg = _looped(cfg)
    bm, bn = cfg["BM"], cfg["BN"]
    row_blocks = triton.cdiv(n, bm)
    n_tiles = triton.cdiv(m, bn)
    # Split the columns into groups when there are too few row blocks to fill the GPU.
    groups, per_group = tile_shares(n_tiles, row_blocks, q.device, 4)
    f32 = dict(device=q.device, dtype=torch.float32)
    row_m = torch.empty(groups, n, **f32)
    row_l = torch.empty(groups, n, **f32)
    col_sum = torch.zeros(m if cols else 1, **f32)
    if ctl is None:
        ctl = control(q, k, scale) if cols else torch.zeros(2, **f32)
    scale32 = scale.detach().float().reshape(1).contiguous()
    tgt = targets if targets is not None else row_m  # unused pointer when there are no targets
    flags = dict(EXCLUDE=exclude, HAS_TGT=targets is not None, **kernel_flags(q, cfg["BD"]))
    q_arg, k_arg, cfg = operands(q, k, cfg)
    _kernels.lse_fwd_kernel[(row_blocks, groups)](
        q_arg, k_arg, tgt, scale32, ctl, row_m, row_l, col_sum,
        n, m, d, q.stride(0), k.stride(0), per_group,
        COLS=cols, TGT_ON_COLS=False, **cfg, **flags,
    )
    if groups == 1:
        row_lse2 = row_m[0] + torch.log2(row_l[0])
    else:
        top = row_m.max(dim=0).values
        row_lse2 = top + torch.log2((row_l * torch.exp2(row_m - top)).sum(dim=0))
    if not cols:
        return row_lse2, None
    # The columns' finish: keys as rows, queries as columns, one group. A program walks the
    # queries (exact online max) only if one of its keys' shifted sums underflowed.
    k_arg, q_arg, cfg2 = operands(k, q, _looped(config("fwd", q.dtype)))
    cfg2.pop("FLAT", None)
    col_lse2 = _finish(k_arg, q_arg, tgt, scale32, ctl, col_sum, torch.empty(m, **f32), m, n, d, k.stride(0),
                       q.stride(0), cfg2, flags, swapped=True)
    return row_lse2, col_lse2


#: Rows per panel of the one-tile forward (one launch; it walks the panels in turn, row block
#: fastest within each), so that the programs in flight keep this many query rows in L2 while
#: the keys stream past once per panel (one launch per panel until session 7: the same order).
_TILE_PANEL_ROWS = 8192
#: Above this many bytes of keys the looped forward runs instead of the one-tile forward
#: (``BATCHLAB_TRITON_TILE_FWD_MAX_KEY_BYTES``; default: no limit). H200, d = 512, forward only
#: (benchmarks/results/losses-h200-s6/, call 4): the one-tile forward took 130.5 against 142.9 ms
#: at N = 262,144 and 2.04 against 2.35 s at 1,048,576 (and 7.79 against 9.03 ms at 65,536, call 1).
#: (A limit of 256 MiB was set after call 3 measured InfoNCE at 1M in 9.01 s; that was the first
#: call of a fresh process, and the forward A/B above showed the one-tile kernel faster there too.)
#: End to end (InfoNCE forward + backward, d = 512, session 7's call 1, benchmarks/results/losses-h200-s7/):
#: 7.89 / 7.91 / 7.91 s with the one-tile forward against 8.23 / 8.24 s looped at 1,048,576.
TILE_FWD_MAX_KEY_BYTES = int(os.environ.get("BATCHLAB_TRITON_TILE_FWD_MAX_KEY_BYTES", 2**62))
#: Pipeline stages of the looped forward when the config is the one-tile forward's (which uses 2).
_LOOPED_STAGES = 3


def _looped(cfg: dict) -> dict:
    """The forward config for ``lse_fwd_kernel`` (the looped kernel): without ``TILE``, whose stages it replaces."""
    looped = {key: v for key, v in cfg.items() if key != "TILE"}
    if cfg.get("TILE"):
        looped["num_stages"] = _LOOPED_STAGES
    return looped


def _finish(q_arg, k_arg, tgt, scale32, ctl, shifted, out, n, m, d, stride_q, stride_k, cfg, flags, *, swapped):
    """Base-2 log-sum-exp of each row of ``q_arg`` against ``k_arg`` from its shifted sum (``FIX``)."""
    _kernels.lse_fwd_kernel[(triton.cdiv(n, cfg["BM"]), 1)](
        q_arg, k_arg, tgt, scale32, ctl, out, out, shifted,
        n, m, d, stride_q, stride_k, triton.cdiv(m, cfg["BN"]),
        COLS=False, TGT_ON_COLS=swapped, FIX=True, **cfg, **flags,
    )
    return out


def _lse_forward_tiles(q, k, scale, targets, *, cols: bool, exclude: bool, ctl, cfg, sums=None):
    """:func:`lse_forward` on ``lse_fwd_tile_kernel``: one pass of shifted sums, then the two finishes.

    ``sums``: a zeroed fp32 buffer of N + M (the rows' then the columns' sums), else allocated here.
    """
    n, d = q.shape
    m = k.shape[0]
    f32 = dict(device=q.device, dtype=torch.float32)
    if ctl is None:
        ctl = control(q, k, scale)
    scale32 = scale.detach().float().reshape(1).contiguous()
    if sums is not None:
        row_sum, col_sum = sums[:n], sums[n:]
    else:
        row_sum = torch.zeros(n, **f32)
        col_sum = torch.zeros(m if cols else 1, **f32)
    tgt = targets if targets is not None else row_sum
    flags = dict(EXCLUDE=exclude, HAS_TGT=targets is not None, **kernel_flags(q, cfg["BD"]))
    tile_cfg = {key: v for key, v in cfg.items() if key not in ("TILE", "FLAT")}
    q_arg, k_arg, tile_cfg = operands(q, k, tile_cfg)
    bm, bn = tile_cfg["BM"], tile_cfg["BN"]
    if _cute.wanted(q, k, targets=targets, exclude=exclude, cols=cols):  # the same sums from a CuTe epilogue GEMM
        from batchlab.losses.cute import _streaming

        _streaming.shifted_sums(q, k, scale32, ctl, row_sum, col_sum)
    else:
        _kernels.lse_fwd_tile_kernel[(triton.cdiv(n, bm) * triton.cdiv(m, bn),)](
            q_arg, k_arg, tgt, scale32, ctl, row_sum, col_sum, n, m, d, q.stride(0), k.stride(0),
            max(1, _TILE_PANEL_ROWS // bm), COLS=cols, **tile_cfg, **flags,
        )
    # the finishes take the tile kernel's shape (the forward config less its loop options): the row
    # finish reuses its operands, the column finish swaps their roles
    row_lse2 = _finish(q_arg, k_arg, tgt, scale32, ctl, row_sum, torch.empty(n, **f32), n, m, d, q.stride(0),
                       k.stride(0), tile_cfg, flags, swapped=False)
    if not cols:
        return row_lse2, None
    k_f, q_f, fix_cfg = operands(k, q, tile_cfg)
    col_lse2 = _finish(k_f, q_f, tgt, scale32, ctl, col_sum, torch.empty(m, **f32), m, n, d, k.stride(0),
                       q.stride(0), fix_cfg, flags, swapped=True)
    return row_lse2, col_lse2


def lse_backward(q, k, scale, targets, row_lse2, col_lse2, g_row, g_col, *, exclude: bool,
                 workspace_bytes: int | None = None, need_q: bool = True, need_k: bool = True,
                 need_s: bool = True, ctl: torch.Tensor | None = None):
    """Gradients (dq, dk, ds) of ``sum_i g_row_i row_lse_i + sum_j g_col_j col_lse_j`` (``g_row`` required).

    ``ds`` is summed in fp32 by the backward kernel (:data:`DS_SUM`); ``need_s=False`` skips it
    (``ds`` is then an unset scalar).
    """
    dq, dk, ds_parts, dot, gscale, scale32 = _backward_panels(
        q, k, scale, targets, row_lse2, col_lse2, g_row, g_col, exclude=exclude, workspace_bytes=workspace_bytes,
        need_q=need_q, need_k=need_k, need_s=need_s, ctl=ctl, ds_in_kernel=need_s and DS_SUM)
    if ds_parts is not None:
        ds = ds_parts.sum()
    elif need_s:
        ds = dot * gscale
    else:
        ds = scale32.new_empty(())
    return dq, dk, ds


def _backward_panels(q, k, scale, targets, row_lse2, col_lse2, g_row, g_col, *, exclude: bool, workspace_bytes,
                     need_q: bool, need_k: bool, need_s: bool, ctl, ds_in_kernel: bool, dq=None, dk_raw=None):
    """:func:`lse_backward` up to the scale gradient's last sum: ``(dq, dk, ds_parts, dot, gscale, scale32)``
    (``ds_parts``: the kernels' fp32 partials with ``ds_in_kernel``, else None and ``dot * gscale`` is
    the scale gradient). ``dq``/``dk_raw``: see :func:`gradients_from_panels` (with ``ds_in_kernel`` or
    ``need_s`` False and bf16/fp32 inputs only: the panels then hold ``s G``)."""
    n, d = q.shape
    m = k.shape[0]
    cfg = config("bwd", q.dtype)
    bm, bn = cfg["BM"], cfg["BN"]
    cols_on = g_col is not None and col_lse2 is not None
    g_row = g_row.float().contiguous()
    if cols_on:
        g_col = g_col.float().contiguous()
    scale32 = scale.detach().float().reshape(1).contiguous()
    # the kernel stores G * ginv: s G (no multiply after the products), or G / gscale (fp16, or
    # the scale gradient from the product, which needs G without s)
    ginv, factor, gscale = logit_grad_factor(q, scale32, [g_row, g_col] if cols_on else [g_row],
                                             fold=ds_in_kernel or not need_s)
    if ctl is None:  # (the kernels read it only with COLS)
        ctl = control(q, k, scale) if cols_on else torch.zeros(2, device=q.device, dtype=torch.float32)
    rows_per_panel = panel_rows(n, m, q.element_size(), bm, workspace_bytes)
    col_groups = triton.cdiv(triton.cdiv(m, bn), cfg.get("TPP", 1))
    dummy = scale32
    q_arg, k_arg, cfg = operands(q, k, cfg)
    tile_cfg = {key: v for key, v in cfg.items() if key not in ("TILE", "TPP", "FLAT", "TMA_OUT")}
    if not cols_on:
        tile_cfg.pop("TWO_EXP", None)
    tiled = bool(cfg.get("TILE"))
    use_cute = _cute.wanted(q, k, targets=targets, exclude=exclude, cols=cols_on)
    # DS: one fp32 partial of the scale gradient per program of every panel, the panel from row r0's
    # at cdiv(r0, BM) * per_block; with the CuTe kernels, one per row
    per_block = triton.cdiv(m, bn) if tiled else col_groups
    ds_parts = torch.empty(n if use_cute else triton.cdiv(n, bm) * per_block, device=q.device,
                           dtype=torch.float32) if ds_in_kernel else None

    # the same for every panel
    common = (targets if targets is not None else dummy, scale32, ginv, ctl,
              row_lse2, col_lse2 if cols_on else dummy, g_row, g_col if cols_on else dummy)
    flags = dict(COLS=cols_on, EXCLUDE=exclude, HAS_TGT=targets is not None, DS=ds_in_kernel,
                 **kernel_flags(q, cfg["BD"]))

    def fill(p, r0, r1, buf):
        if use_cute:
            from batchlab.losses.cute import _streaming

            _streaming.logit_grad_panel(q[r0:r1], k, scale32, ginv, row_lse2[r0:r1], g_row[r0:r1], col_lse2, g_col,
                                        buf[: r1 - r0], ds_parts[r0:r1] if ds_in_kernel else None)
            return
        ds_arg = ds_parts[triton.cdiv(r0, bm) * per_block:] if ds_in_kernel else dummy
        if tiled:
            _kernels.lse_bwd_tile_kernel[(triton.cdiv(r1 - r0, bm), triton.cdiv(m, bn))](
                q_arg, k_arg, *common, buf, ds_arg, r0, r1, m, d, q.stride(0), k.stride(0), buf.stride(0),
                **tile_cfg, **flags,
            )
            return
        out, tma_out = panel_output(buf, r1 - r0, cfg)
        _kernels.lse_bwd_kernel[(triton.cdiv(r1 - r0, bm), col_groups)](
            q_arg, k_arg, *common, out, ds_arg, r0, r1, m, d, q.stride(0), k.stride(0), buf.stride(0),
            **{**cfg, "TMA_OUT": tma_out}, **flags,
        )

    dq, dk, dot = gradients_from_panels(q, k, rows_per_panel, fill, factor, need_q=need_q, need_k=need_k,
                                        dot=need_s and not ds_in_kernel, dq=dq, dk_raw=dk_raw)
    return dq, dk, ds_parts, dot, gscale, scale32


@torch.library.custom_op("batchlab::lse_forward", mutates_args=())
def lse_forward_op(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: Optional[torch.Tensor],
                   cols: bool, exclude: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_lse2 (N,), col_lse2 (M,) or (0,), ctl (2,))``: :func:`lse_forward` as an opaque op."""
    ctl = control(q, k, scale) if cols else torch.zeros(2, device=q.device, dtype=torch.float32)
    row2, col2 = lse_forward(q, k, scale, targets, cols=cols, exclude=exclude, ctl=ctl if cols else None)
    return row2, (col2 if cols else row2.new_empty(0)), ctl


@lse_forward_op.register_fake
def _(q, k, scale, targets, cols, exclude):
    f32 = dict(dtype=torch.float32)
    return q.new_empty(q.shape[0], **f32), q.new_empty(k.shape[0] if cols else 0, **f32), q.new_empty(2, **f32)


@torch.library.custom_op("batchlab::lse_backward", mutates_args=())
def lse_backward_op(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: Optional[torch.Tensor],
                    row2: torch.Tensor, col2: torch.Tensor, ctl: torch.Tensor, g_row: torch.Tensor,
                    g_col: Optional[torch.Tensor], exclude: bool, workspace_bytes: Optional[int], need_q: bool,
                    need_k: bool, need_s: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, ds)`` of :func:`lse_backward` (dq/dk empty when not needed, ds unset), as an opaque op."""
    dq, dk, ds = lse_backward(q, k, scale, targets, row2, col2 if g_col is not None else None, g_row, g_col,
                              exclude=exclude, workspace_bytes=workspace_bytes, need_q=need_q, need_k=need_k,
                              need_s=need_s, ctl=ctl)
    return (dq if need_q else q.new_empty(0)), (dk if need_k else k.new_empty(0)), ds.reshape(()).float()


@lse_backward_op.register_fake
def _(q, k, scale, targets, row2, col2, ctl, g_row, g_col, exclude, workspace_bytes, need_q, need_k, need_s=True):
    return (q.new_empty(q.shape if need_q else (0,)), k.new_empty(k.shape if need_k else (0,)),
            q.new_empty((), dtype=torch.float32))


class PairLSE(torch.autograd.Function):
    """(row_lse, col_lse) of ``scale * q @ k.T``; col_lse is empty unless ``cols``.

    The kernels run inside the custom ops above, so ``torch.compile`` traces this
    function (and a CUDA graph captures it) without looking into the launches.
    """

    @staticmethod
    def forward(ctx, q, k, scale, targets, cols, exclude, workspace_bytes):
        row2, col2, ctl = lse_forward_op(q, k, scale, targets, cols, exclude)
        ctx.save_for_backward(q, k, scale, targets, row2, col2, ctl)
        ctx.cols, ctx.exclude, ctx.workspace_bytes = cols, exclude, workspace_bytes
        return row2 * LN2, col2 * LN2

    @staticmethod
    def backward(ctx, g_row, g_col):
        q, k, scale, targets, row2, col2, ctl = ctx.saved_tensors
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        dq, dk, ds = lse_backward_op(
            q, k, scale, targets, row2, col2, ctl, g_row.contiguous(),
            g_col.contiguous() if ctx.cols else None, ctx.exclude, ctx.workspace_bytes, need_q, need_k, need_s,
        )
        return ((dq if need_q else None), (dk if need_k else None), (ds.to(scale.dtype) if need_s else None),
                None, None, None, None)


def pair_lse(q, k, scale, targets=None, *, cols: bool, exclude: bool = False, workspace_bytes: int | None = None):
    """Natural-log ``(row_lse (N,), col_lse (M,) | None)`` of ``scale * q @ k.T`` with gradients."""
    q, k = q.contiguous(), k.contiguous()
    if targets is not None:
        targets = targets.contiguous()
    row, col = PairLSE.apply(q, k, scale, targets, cols, exclude, workspace_bytes)
    return row, (col if cols else None)


# ----------------------------------------------------------------------------- the whole loss

#: InfoNCE/DCL with the diagonal positives in one autograd node (:func:`stream_loss`): the
#: positives, the loss, the gradients' glue in the small kernels of :mod:`._glue`.
#: ``BATCHLAB_TRITON_STREAM_LOSS=0``: the log-sum-exps alone (:func:`pair_lse`) and PyTorch's ops around them.
STREAM_LOSS = os.environ.get("BATCHLAB_TRITON_STREAM_LOSS", "1") != "0"
#: Use the autograd function in eager mode (the custom ops under ``torch.compile``).
STREAM_EAGER_FUNCTION = True
#: Accumulate the key gradient in the inputs' dtype (bf16: each panel's product adds into dk and rounds it,
#: 8 roundings at 65,536) instead of fp32 rounded once: half the accumulator's traffic in the products.
#: Off by default (``BATCHLAB_TRITON_DK_IN_PLACE=1``: on): 8 panels, interpreter: dk 5e-3 off float64
#: against 1.9e-3 (fp32 accumulator) and 2.6e-3 (session 8's path).
DK_IN_PLACE = os.environ.get("BATCHLAB_TRITON_DK_IN_PLACE", "0") == "1"
_REDUCTIONS = ("mean", "sum", "none")
#: Rows and d chunk per program of the gradient prologue and epilogue; rows per program of the loss
#: kernel (and entries per step of the epilogue's scale-gradient sums).
_GRAD_BLOCK = (32, 128)
_SUM_BLOCK = 1024
#: The same in the interpreter: several programs (and their last-program sums) at test sizes.
_INTERPRET_BLOCKS = dict(rows=8, sum=16)


def _glue_block(kind: str) -> int:
    if interpreting():
        return _INTERPRET_BLOCKS[kind]
    return _GRAD_BLOCK[0] if kind == "rows" else _SUM_BLOCK


def stream_ok(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether :func:`stream_loss` covers these inputs (diagonal positives assumed by the caller): bf16/fp32,
    at least as many keys as queries, and panels that hold ``s G`` (scale gradient summed in the kernels)."""
    return (STREAM_LOSS and q.dtype in (torch.bfloat16, torch.float32) and k.shape[0] >= q.shape[0]
            and (DS_SUM or not scale.requires_grad))


def _stream_coefficients(n: int, m: int, cols: bool, reduction: int) -> tuple[float, float]:
    half = 0.5 if cols else 1.0
    cr, cc = (half / n, half / m) if _REDUCTIONS[reduction] == "mean" else (half, half)
    return cr, (cc if cols else 0.0)


def _stream_forward(q, k, scale, cols: bool, exclude: bool, reduction: int):
    """``(loss, lse, row2, col2, ctl, pos)``: the loss (0-d, or (N,) for "none"), the natural row then column
    log-sum-exps (N + M or N,), and for the backward the base-2 ones, ``ctl`` and the positives (N,).

    Launches: the prologue (norms, positives, zeroed sums), ``control_kernel``, the forward pass and its two
    finishes, the loss: 6 (one-tile forward).
    """
    n, d = q.shape
    m = k.shape[0]
    f32 = dict(device=q.device, dtype=torch.float32)
    rows, chunk = _NORM_BLOCK
    q_blocks = triton.cdiv(n, rows)
    blocks = q_blocks + triton.cdiv(m, rows)
    parts, ctl, pos, sums = (torch.empty(blocks, **f32), torch.empty(2, **f32), torch.empty(n, **f32),
                             torch.empty(n + m, **f32))
    ctr = torch.empty(1, device=q.device, dtype=torch.int32)
    _glue.stream_prologue_kernel[(blocks,)](q, k, parts, pos, sums, ctr, n, m, d, q.stride(0), k.stride(0), q_blocks,
                                            BR=rows, BD=chunk)
    limit = _ONE_EXP_RANGE2 - math.log2(max(n, m, 2)) if ONE_EXP else -1.0
    _kernels.control_kernel[(1,)](parts, scale.detach(), ctl, q_blocks, blocks, limit, _BOUND_MARGIN, _HEADROOM2,
                                  BLOCK=1024)
    row2, col2 = lse_forward(q, k, scale, None, cols=cols, exclude=exclude, ctl=ctl, sums=sums)
    cr, cc = _stream_coefficients(n, m, cols, reduction)
    per_row = _REDUCTIONS[reduction] == "none"
    loss = torch.empty(n if per_row else (), **f32)
    lse = torch.empty(n + (m if cols else 0), **f32)
    block = _glue_block("sum")
    programs = triton.cdiv(n, block)
    _glue.stream_loss_kernel[(programs,)](row2, col2 if cols else row2, pos, scale.detach(), loss, lse,
                                          torch.empty(programs, **f32), ctr, n, cr, cc, COLS=cols, PER_ROW=per_row,
                                          BLOCK=block)
    return loss, lse, row2, (col2 if cols else row2.new_empty(0)), ctl, pos


def _stream_backward(q, k, scale, row2, col2, ctl, pos, g, g_lse, cols: bool, exclude: bool, reduction: int,
                     workspace_bytes, need_q: bool, need_k: bool, need_s: bool):
    """``(dq, dk, ds)`` of ``g . loss + g_lse . lse`` (``g_lse`` may be None; dq/dk/ds None when not needed).

    Launches: the gradient prologue (the log-sum-exps' upstream weights; the positives' query gradient,
    into dq), per panel the kernel and two products (``G @ k`` added into dq's rows; ``G.T @ q`` into the
    fp32 key accumulator, written by the first panel's), the epilogue (the positives' key gradient added,
    dk rounded once; the scale gradient): 2 + 3 per panel (+ 1 when ``g_lse`` is given).
    """
    n, d = q.shape
    m = k.shape[0]
    f32 = dict(device=q.device, dtype=torch.float32)
    cr, cc = _stream_coefficients(n, m, cols, reduction)
    g = g.float().contiguous()
    g_row = torch.empty(n, **f32)
    g_col = torch.empty(m, **f32) if cols else None
    dq = torch.empty_like(q) if need_q else None
    chunk = _GRAD_BLOCK[1]
    rows = _glue_block("rows")
    ctr = torch.empty(1, device=q.device, dtype=torch.int32)
    _glue.stream_grad_prologue_kernel[(triton.cdiv(n, rows),)](
        g, k, scale.detach(), g_row, g_row if g_col is None else g_col, g_row if dq is None else dq, ctr,
        n, d, k.stride(0), cr, cc, BR=rows, BD=chunk, GO_VEC=g.dim() > 0, COLS=cols, NEED_Q=need_q,
        RNE=interpreting())
    if g_lse is not None:  # the returned log-sum-exps were used too (return_lse)
        g_row += g_lse[:n]
        if cols:
            g_col += g_lse[n:]
    in_place = DK_IN_PLACE and k.dtype != torch.float32
    dq, acc, ds_parts, _, _, _ = _backward_panels(
        q, k, scale, None, row2, col2 if cols else None, g_row, g_col, exclude=exclude,
        workspace_bytes=workspace_bytes, need_q=need_q, need_k=need_k, need_s=need_s, ctl=ctl,
        ds_in_kernel=need_s, dq=dq, dk_raw=("same" if in_place else "fp32") if need_k else None)
    dk = (acc if acc.dtype == k.dtype else torch.empty_like(k)) if need_k else None
    ds = torch.empty((), **f32) if need_s else None
    n_parts = ds_parts.numel() if need_s else 0
    rows = _glue_block("rows")
    block = _glue_block("sum")
    programs = triton.cdiv(m, rows) if need_k else (triton.cdiv(max(n_parts, n), block) if need_s else 0)
    if programs:
        dummy = g_row
        _glue.stream_grad_epilogue_kernel[(programs,)](
            acc if need_k else dummy, dk if need_k else dummy, q, q.stride(0), scale.detach(),
            ds_parts if need_s else dummy, n_parts, triton.cdiv(n_parts, programs), g, pos,
            triton.cdiv(n, programs), ds if need_s else dummy, torch.empty(programs, **f32), ctr, m, n, d,
            cr + cc, BR=rows, BD=chunk, SB=block, DK=need_k, DS=need_s, GO_VEC=g.dim() > 0, RNE=interpreting())
    return dq, dk, ds


@torch.library.custom_op("batchlab::stream_loss", mutates_args=())
def stream_loss_op(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, cols: bool, exclude: bool,
                   reduction: int, workspace_bytes: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
    """:func:`_stream_forward` as an opaque op (what ``torch.compile`` traces; ``workspace_bytes`` is the
    backward's)."""
    return _stream_forward(q, k, scale, cols, exclude, reduction)


@stream_loss_op.register_fake
def _(q, k, scale, cols, exclude, reduction, workspace_bytes):
    n, m = q.shape[0], k.shape[0]
    f32 = dict(dtype=torch.float32)
    return (q.new_empty((n,) if _REDUCTIONS[reduction] == "none" else (), **f32),
            q.new_empty(n + (m if cols else 0), **f32), q.new_empty(n, **f32), q.new_empty(m if cols else 0, **f32),
            q.new_empty(2, **f32), q.new_empty(n, **f32))


@torch.library.custom_op("batchlab::stream_loss_backward", mutates_args=())
def stream_loss_backward_op(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, row2: torch.Tensor,
                            col2: torch.Tensor, ctl: torch.Tensor, pos: torch.Tensor, g: torch.Tensor,
                            g_lse: Optional[torch.Tensor], cols: bool, exclude: bool, reduction: int,
                            workspace_bytes: Optional[int], need_q: bool, need_k: bool, need_s: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, ds)`` of :func:`_stream_backward` (dq/dk empty when not needed, ds unset), as an opaque op."""
    dq, dk, ds = _stream_backward(q, k, scale, row2, col2, ctl, pos, g, g_lse, cols, exclude, reduction,
                                  workspace_bytes, need_q, need_k, need_s)
    return (dq if need_q else q.new_empty(0)), (dk if need_k else k.new_empty(0)), \
        (ds if need_s else q.new_empty((), dtype=torch.float32))


@stream_loss_backward_op.register_fake
def _(q, k, scale, row2, col2, ctl, pos, g, g_lse, cols, exclude, reduction, workspace_bytes, need_q, need_k,
      need_s):
    return (q.new_empty(q.shape if need_q else (0,)), k.new_empty(k.shape if need_k else (0,)),
            q.new_empty((), dtype=torch.float32))


def _stream_setup(ctx, inputs, output):
    q, k, scale, cols, exclude, reduction, workspace_bytes = inputs
    _, _, row2, col2, ctl, pos = output
    ctx.save_for_backward(q, k, scale, row2, col2, ctl, pos)
    ctx.args = (cols, exclude, reduction, workspace_bytes)


def _stream_grads(ctx, g, g_lse, n_args: int, op):
    q, k, scale, row2, col2, ctl, pos = ctx.saved_tensors
    need_q, need_k, need_s = ctx.needs_input_grad[:3]
    cols, exclude, reduction, workspace_bytes = ctx.args
    if g is None:
        g = torch.zeros((q.shape[0],) if _REDUCTIONS[reduction] == "none" else (), device=q.device,
                        dtype=torch.float32)
    dq, dk, ds = op(q, k, scale, row2, col2, ctl, pos, g, g_lse, cols, exclude, reduction, workspace_bytes,
                    need_q, need_k, need_s)
    ds = (ds if ds.dtype == scale.dtype else ds.to(scale.dtype)) if need_s else None
    return ((dq if need_q else None), (dk if need_k else None), ds) + (None,) * (n_args - 3)


def _stream_op_backward(ctx, g, g_lse, *_unused):
    # always the opaque op: AOTAutograd traces this backward with fake tensors (where
    # torch.compiler.is_compiling() may be False), which must never reach the kernels
    return _stream_grads(ctx, g, g_lse, 7, stream_loss_backward_op)


stream_loss_op.register_autograd(_stream_op_backward, setup_context=_stream_setup)


class _StreamLoss(torch.autograd.Function):
    """The eager twin of :func:`stream_loss_op` (an autograd function costs less host time than a custom
    op); unused gradients (the returned log-sum-exps, usually) are not materialised."""

    @staticmethod
    def forward(ctx, q, k, scale, cols, exclude, reduction, workspace_bytes):
        loss, lse, row2, col2, ctl, pos = _stream_forward(q, k, scale, cols, exclude, reduction)
        ctx.save_for_backward(q, k, scale, row2, col2, ctl, pos)
        ctx.args = (cols, exclude, reduction, workspace_bytes)
        ctx.set_materialize_grads(False)
        return loss, lse

    @staticmethod
    def backward(ctx, g, g_lse):
        if g is None and g_lse is None:
            return (None,) * 7
        return _stream_grads(ctx, g, g_lse, 7, _stream_backward)


def stream_loss(q, k, scale, *, symmetric: bool, exclude: bool, reduction: str, workspace_bytes=None):
    """``(loss, row_lse (N,), col_lse (M,) or None)`` of InfoNCE (``exclude=False``) or DCL with the
    diagonal positives (query i's is key i), from the streaming kernels: one autograd node, the positives,
    the loss and the gradients' glue in four small kernels (:mod:`._glue`).

    Launches per forward + backward: 6 + 2 + 3 per panel (the one-tile forward), against ~45 + 3 per
    panel with the log-sum-exps alone and PyTorch's ops around them.
    """
    q, k = q.contiguous(), k.contiguous()
    n = q.shape[0]
    red = _REDUCTIONS.index(reduction)
    scale = scale.reshape(()) if scale.dim() else scale
    if torch.compiler.is_compiling() or not STREAM_EAGER_FUNCTION:
        loss, lse = stream_loss_op(q, k, scale, symmetric, exclude, red, workspace_bytes)[:2]
    else:
        loss, lse = _StreamLoss.apply(q, k, scale, symmetric, exclude, red, workspace_bytes)
    return loss, lse[:n], (lse[n:] if symmetric else None)
