"""SigLIP's pairwise sigmoid loss as one autograd function on a Triton kernel.

There is no normaliser, so a single pass over the tiles gives the loss and the
logit gradient together. With a summed loss (``reduction`` "mean" or "sum") and
gradients required, the forward already produces ``dq, dk, ds, db`` (one tile pass
plus two matrix products per panel, ``6 N M d`` FLOPs) and the backward only scales
them by the incoming scalar. Per-row losses (``reduction="none"``) keep the gradient
for the backward, which recomputes the tiles with the per-row weights.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from batchlab.losses.triton import _kernels, _lse
from batchlab.losses.triton._launch import (
    config,
    gradients_from_panels,
    kernel_flags,
    logit_grad_factor,
    operands,
    panel_output,
    panel_rows,
)


def siglip_pass(q, k, scale, bias, targets, *, loss: bool, g_row=None, workspace_bytes=None,
                need_q=True, need_k=True, need_s=True):
    """Per-row loss sums (N,) when ``loss``; gradients (dq, dk, ds, db) of ``sum_i g_i row_i`` when ``g_row``.

    The scale gradient is summed in fp32 in the kernel (``_lse.DS_SUM``, on by default; else from
    the product of the stored logit gradient, which loses it at small scales); ``need_s=False``
    skips it (``ds`` is then an unset scalar).
    """
    n, d = q.shape
    m = k.shape[0]
    cfg = config("siglip", q.dtype)
    bm, bn = cfg["BM"], cfg["BN"]
    f32 = dict(device=q.device, dtype=torch.float32)
    grad = g_row is not None
    row_loss = torch.zeros(n if loss else 1, **f32)
    scale32 = scale.detach().float().reshape(1).contiguous()
    bias32 = bias.detach().float().reshape(1).contiguous()
    col_blocks = triton.cdiv(m, bn)
    q_arg, k_arg, cfg = operands(q, k, cfg)
    every = dict(cfg, HAS_TGT=targets is not None, **kernel_flags(q, cfg["BD"]))
    lean = cfg.get("TILE") == 2  # siglip_lean_kernel: siglip_kernel's arguments, plus WS, TPP and FLAT
    lean_only = ("WS", "TPP", "FLAT")
    flags = {key: v for key, v in every.items() if key != "TILE" and (lean or key not in lean_only)}
    main_kernel = _kernels.siglip_lean_kernel if lean else _kernels.siglip_kernel
    tgt = targets if targets is not None else row_loss
    # the lean kernel's programs take TPP column tiles each (a launch option where _launch.KERNEL_OPTIONS allows it)
    program_cols = triton.cdiv(col_blocks, cfg.get("TPP", 1)) if lean else col_blocks
    if not grad:
        main_kernel[(triton.cdiv(n, bm), program_cols)](
            q_arg, k_arg, tgt, scale32, bias32, row_loss, row_loss, row_loss, row_loss, row_loss, row_loss,
            0, n, m, d, q.stride(0), k.stride(0), 0, LOSS=True, GRAD=False, **{**flags, "TMA_OUT": False},
        )
        return row_loss, None
    g_row = g_row.float().contiguous()
    ds_in_kernel = need_s and _lse.DS_SUM
    ginv, factor, gscale = logit_grad_factor(q, scale32, [g_row], fold=ds_in_kernel or not need_s)
    rows_per_panel = panel_rows(n, m, q.element_size(), bm, workspace_bytes)
    panels = triton.cdiv(n, rows_per_panel)
    tiled = cfg.get("TILE") == 1
    # (panels, [ds, db], programs): each program's fp32 sums, zeros where a shorter last panel has fewer
    programs = triton.cdiv(rows_per_panel, bm) * program_cols
    sums = torch.zeros(panels, 2, 1 if tiled else programs, **f32)
    if tiled:  # per-(column tile, row) partial sums instead of atomics; summed after each panel
        tile_cfg = {key: v for key, v in every.items() if key not in ("TILE", "TMA_OUT", "TPP", "FLAT")}
        parts = torch.empty(3 if ds_in_kernel else 2, col_blocks, rows_per_panel, **f32)

    def fill(p, r0, r1, buf):
        if tiled:
            _kernels.siglip_tile_kernel[(triton.cdiv(r1 - r0, bm), col_blocks)](
                q_arg, k_arg, tgt, scale32, bias32, ginv, g_row, parts[0], buf, parts[1],
                r0, r1, m, d, q.stride(0), k.stride(0), buf.stride(0), parts.stride(1),
                LOSS=loss, GRAD=True, DS=ds_in_kernel, **tile_cfg,
            )
            if loss:
                row_loss[r0:r1] += parts[0, :, : r1 - r0].sum(0)
            torch.sum(parts[1, :, : r1 - r0], dim=(0, 1), out=sums[p, 1, 0])
            if ds_in_kernel:
                torch.sum(parts[2, :, : r1 - r0], dim=(0, 1), out=sums[p, 0, 0])
            return
        out, tma_out = panel_output(buf, r1 - r0, cfg)
        main_kernel[(triton.cdiv(r1 - r0, bm), program_cols)](
            q_arg, k_arg, tgt, scale32, bias32, ginv, g_row, row_loss, out, sums[p, 1], sums[p, 0],
            r0, r1, m, d, q.stride(0), k.stride(0), buf.stride(0), LOSS=loss, GRAD=True, DS=ds_in_kernel,
            **{**flags, "TMA_OUT": tma_out},
        )

    dq, dk, dot = gradients_from_panels(q, k, rows_per_panel, fill, factor, need_q=need_q, need_k=need_k,
                                        dot=need_s and not ds_in_kernel)
    ds_db = sums.sum((0, 2))  # [ds (0 unless summed in the kernel), db]
    ds = (dot * gscale).reshape(()) if dot is not None else ds_db[0]
    return (row_loss if loss else None), (dq, dk, ds, ds_db[1])


@torch.library.custom_op("batchlab::siglip_pass", mutates_args=())
def siglip_pass_op(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                   targets: Optional[torch.Tensor], loss: bool, g_row: Optional[torch.Tensor],
                   workspace_bytes: Optional[int], need_q: bool, need_k: bool,
                   need_s: bool = True) -> list[torch.Tensor]:
    """:func:`siglip_pass` as an opaque op: ``[rows, dq, dk, ds_db]`` (empty where not asked for)."""
    rows, grads = siglip_pass(q, k, scale, bias, targets, loss=loss, g_row=g_row, workspace_bytes=workspace_bytes,
                              need_q=need_q, need_k=need_k, need_s=need_s)
    rows = rows if loss else q.new_empty(0, dtype=torch.float32)
    if grads is None:
        return [rows, q.new_empty(0), k.new_empty(0), q.new_empty(0, dtype=torch.float32)]
    dq, dk, ds, db = grads
    return [rows, dq if need_q else q.new_empty(0), dk if need_k else k.new_empty(0),
            torch.stack([ds.float(), db.float()])]


@siglip_pass_op.register_fake
def _(q, k, scale, bias, targets, loss, g_row, workspace_bytes, need_q, need_k, need_s=True):
    grad = g_row is not None
    return [q.new_empty(q.shape[0] if loss else 0, dtype=torch.float32),
            q.new_empty(q.shape if grad and need_q else (0,)), k.new_empty(k.shape if grad and need_k else (0,)),
            q.new_empty(2 if grad else 0, dtype=torch.float32)]


def _pass(q, k, scale, bias, targets, *, loss, g_row=None, workspace_bytes=None, need_q=True, need_k=True,
          need_s=True):
    """:func:`siglip_pass` through the custom op: ``(rows or None, (dq, dk, ds, db) or None)``."""
    rows, dq, dk, dsb = siglip_pass_op(q, k, scale, bias, targets, loss, g_row, workspace_bytes, need_q, need_k,
                                       need_s)
    if g_row is None:
        return rows, None
    return rows, (dq if need_q else None, dk if need_k else None, dsb[0], dsb[1])


class SigLIPSum(torch.autograd.Function):
    """Total SigLIP loss ``sum_ij softplus(-y_ij z_ij)`` (scalar); gradients made in the forward."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, targets, workspace_bytes):
        need = ctx.needs_input_grad
        want_grad = any(need[:4])
        g_row = torch.ones(q.shape[0], device=q.device, dtype=torch.float32) if want_grad else None
        rows, grads = _pass(q, k, scale, bias, targets, loss=True, g_row=g_row,
                            workspace_bytes=workspace_bytes, need_q=need[0], need_k=need[1], need_s=need[2])
        if want_grad:
            ctx.save_for_backward(*grads)
        ctx.dtypes = (scale.dtype, bias.dtype)
        return rows.sum()

    @staticmethod
    def backward(ctx, go):
        dq, dk, ds, db = ctx.saved_tensors
        need = ctx.needs_input_grad
        out_dq = (dq * go).to(dq.dtype) if need[0] else None
        out_dk = (dk * go).to(dk.dtype) if need[1] else None
        out_ds = (ds * go).to(ctx.dtypes[0]) if need[2] else None
        out_db = (db * go).to(ctx.dtypes[1]) if need[3] else None
        return out_dq, out_dk, out_ds, out_db, None, None


class SigLIPRows(torch.autograd.Function):
    """Per-row SigLIP losses (N,); the backward recomputes the tiles with the row weights."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, targets, workspace_bytes):
        rows, _ = _pass(q, k, scale, bias, targets, loss=True)
        ctx.save_for_backward(q, k, scale, bias, targets)
        ctx.workspace_bytes = workspace_bytes
        return rows

    @staticmethod
    def backward(ctx, g_row):
        q, k, scale, bias, targets = ctx.saved_tensors
        need = ctx.needs_input_grad
        _, (dq, dk, ds, db) = _pass(q, k, scale, bias, targets, loss=False, g_row=g_row.contiguous(),
                                    workspace_bytes=ctx.workspace_bytes, need_q=need[0], need_k=need[1],
                                    need_s=need[2])
        return (dq, dk, ds.to(scale.dtype) if need[2] else None, db.to(bias.dtype) if need[3] else None,
                None, None)


def siglip_total(q, k, scale, bias, targets=None, *, per_row: bool, workspace_bytes=None):
    """Summed SigLIP loss (scalar), or per-row sums (N,) when ``per_row``."""
    q, k = q.contiguous(), k.contiguous()
    if targets is not None:
        targets = targets.contiguous()
    fn = SigLIPRows if per_row else SigLIPSum
    return fn.apply(q, k, scale, bias, targets, workspace_bytes)
