"""The two epilogue GEMMs of the streaming InfoNCE path, written with quack's ``@gemm_epilogue`` (imports quack).

Both take ``A = q`` (rows, d) and ``B = k`` (M, d) and work in base 2 (``l2 = acc * s * log2(e)``, one ``exp2``
per term), as the Triton kernels do (:mod:`batchlab.losses.triton._kernels`):

* :data:`shifted_sums` (by ``ragged``): per-CTA-tile partial sums ``sum_j 2^(l2_ij - ref2)`` of each row (``rsum``, (rows,
  column tiles)) and ``sum_i`` of each column (``csum``, (row tiles, M)); no logits are stored.
* :data:`logit_grad` / :data:`logit_grad_ds` (by ``ragged``): the logit gradient ``G_ij = g_i 2^(l2_ij - lse_i) + h_j 2^(l2_ij -
  lse_j)`` stored as ``G * ginv`` (bf16/fp16 ``D``); ``logit_grad_ds`` also the per-tile partial sums of
  ``G_ij (q_i . k_j)`` of each row in fp32 (``ds``, the scale gradient's).

Ragged edges: quack's add-reduces fold the accumulator's out-of-range lanes as they are (zeros, the identity of a
sum of the accumulator), but here the folded value is ``2^(0 - ref2)`` or ``G`` computed from vector lanes that
were never loaded, so :class:`MaskedColSum` / :class:`MaskedRowSum` mask them to 0 with the coordinate test that
quack uses for its max-reduces.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.math import pexp2
from quack.epilogue.ops import ColVecLoad, ColVecReduce, RowVecLoad, RowVecReduce

LOG2E = 1.4426950408889634


class _ZeroOutOfRange:
    """Mixin for quack's add-reduces: out-of-range lanes of the reduced dimension are set to 0 before the fold."""

    def _mask_oob_active(self):
        return True

    def config_key(self):
        return (*super().config_key(), "oob-zero")

    @cute.jit
    def _mask_oob(self, frag, coords, limit, tile_shape_mn):
        rd = self._reduce_dim()
        lay_r = cute.composition(cute.make_layout(tile_shape_mn, stride=(1, 0) if rd == 0 else (0, 1)),
                                 coords.layout)
        limit_rel = limit - coords[0][rd]
        for i in cutlass.range(cute.size(frag), unroll_full=True):
            frag[i] = frag[i] if cute.crd2idx(i, lay_r) < limit_rel else 0.0


class MaskedColSum(_ZeroOutOfRange, ColVecReduce):
    """Per-row partial sums (rows, column tiles) without the lanes past the last column."""


class MaskedRowSum(_ZeroOutOfRange, RowVecReduce):
    """Per-column partial sums (row tiles, M) without the lanes past the last row."""


def _sums_fn(acc, scale, ref2):
    p = pexp2(acc * (scale * LOG2E) - ref2)
    return {"rsum": p, "csum": p}


def _logit_grad(acc, scale, lse_r, g_r, lse_c, g_c):
    """``G = g_r 2^(l2 - lse_r) + g_c 2^(l2 - lse_c)``, ``l2 = acc * s * log2(e)`` (one element)."""
    s2 = scale * LOG2E
    return g_r * pexp2(acc * s2 - lse_r) + g_c * pexp2(acc * s2 - lse_c)


def _grad_fn(acc, scale, lse_r, g_r, lse_c, g_c, ginv):
    return {"D": _logit_grad(acc, scale, lse_r, g_r, lse_c, g_c) * ginv}


def _grad_ds_fn(acc, scale, lse_r, g_r, lse_c, g_c, ginv):
    g = _logit_grad(acc, scale, lse_r, g_r, lse_c, g_c)
    return {"D": g * ginv, "ds": (g, acc)}


def _vectors():
    return {"lse_r": ColVecLoad("lse_r"), "g_r": ColVecLoad("g_r"), "lse_c": RowVecLoad("lse_c"),
            "g_c": RowVecLoad("g_c")}


#: Keyed by ``ragged``: the masked reduces cost registers (spills at some tile shapes), so tile-divisible problems
#: take the plain ones, whose out-of-range lanes do not exist.
shifted_sums = {
    False: gemm_epilogue(reduces={"rsum": ColVecReduce("rsum"), "csum": RowVecReduce("csum")})(_sums_fn),
    True: gemm_epilogue(reduces={"rsum": MaskedColSum("rsum"), "csum": MaskedRowSum("csum")})(_sums_fn),
}
logit_grad = gemm_epilogue(ops=_vectors())(_grad_fn)
logit_grad_ds = {
    False: gemm_epilogue(reduces={"ds": ColVecReduce("ds", scaled=True)}, ops=_vectors())(_grad_ds_fn),
    True: gemm_epilogue(reduces={"ds": MaskedColSum("ds", scaled=True)}, ops=_vectors())(_grad_ds_fn),
}
