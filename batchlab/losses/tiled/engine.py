"""The tile walker and the block primitives every tiled loss is built from.

A contrastive loss over queries ``q`` (N, d) and keys ``k`` (M, d) only ever needs
the logits ``L = s * q @ k.T`` one (row-block x column-block) tile at a time:

* the softmax family (InfoNCE/CLIP, DCL/DCLW, NT-Xent) keeps O(N + M) statistics --
  each row's and column's log-sum-exp, merged across tiles with log-add-exp, and the
  sums of positive cosines -- then recomputes each tile in the backward;
* the sigmoid family (SigLIP) has no normaliser: loss and gradients come out of one
  pass, tile by tile.

Peak extra memory is O(N + M + tile_rows * tile_cols) plus the (N, d) / (M, d)
gradient accumulators (fp32). Nothing N x M is ever built: positives are handled as
sparse (row, col) pairs when given as ``targets``, negative masks are asked for per
tile (:func:`~batchlab.losses._common.neg_mask_tile` semantics).

Block primitives (the distributed ring reuses these)
----------------------------------------------------
Each primitive works on a pair (local rows ``q``, one column block ``k_block``) and
takes the *global* index offsets of both, so positives (global ``targets``), negative
masks and NT-Xent's self-exclusion are found correctly wherever the block came from.

``lse_block_forward(q, k_block, scale, pairs, row_offset=, col_offset=, ...) -> BlockStats``
    Partial row log-sum-exp over this block's columns, partial column log-sum-exp
    over the local rows, and the sums of positive cosines per row and per column.
    Merge partials from several blocks with :func:`merge_stats` (``torch.logaddexp``
    for the LSEs, ``+`` for the sums).

``lse_block_backward(q, k_block, scale, pairs, row_lse=, col_lse=, coef=, ...) -> (U, V)``
    Given the *final* (global) row and column LSEs and the per-row/per-column
    coefficients of the loss (:class:`LSECoefficients`), the block's contribution to
    ``U = dLoss/dS @ k_block`` (N, d) and ``V = dLoss/dS.T @ q`` (M_block, d), with
    ``S = q @ k_block.T``. Then ``dq = s * U``, ``dk_block = s * V`` and
    ``dscale = (q * U).sum()`` (summed over blocks; extra negatives add to U).

``sigmoid_block(q, k_block, scale, bias, pairs, row_coef=, ...) -> SigmoidBlock``
    SigLIP's per-row loss over this block and, when ``row_coef`` is given, its
    gradient contributions ``U``, ``V``, ``dscale``, ``dbias`` in the same pass.

Precision: on CUDA, bf16/fp16 tiles are multiplied in their own dtype with fp32
output (``torch.mm(..., out_dtype=float32)``) and the backward's tile of
``dLoss/dS`` is rounded to the input dtype for its two products (as FlashAttention
does). On the CPU, inputs are upcast to fp32 once: PyTorch's CPU matmul has no fp32
output for bf16 operands, and rounding the logits to bf16 would cost 2^-9 * scale in
every logit. (Measured on an AMD EPYC with avx512_bf16, one thread: a 256 x 256 x 1024
tile product takes 0.32 ms in bf16 and 4.4 ms in fp32, yet bf16 InfoNCE at N=2048, d=256
runs tiled in 356 ms against the reference's 452 ms with the upcast.)
Statistics and accumulators are fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

from batchlab.errors import BatchlabInputError
from batchlab.losses._common import NegMask, compute_dtype, neg_mask_tile

#: Default (rows, cols) of a tile. CPU: tiles that stay in cache and amortise Python
#: overhead (measured in ``batchlab bench losses``); CUDA: big enough that each tile's
#: kernels are long, small enough that a handful of fp32 tiles stay well under 1 GiB.
CPU_TILE = (256, 1024)
CUDA_TILE = (4096, 8192)


def default_tile(device: torch.device) -> tuple[int, int]:
    """The default (rows, cols) tile for ``device``."""
    return CUDA_TILE if device.type == "cuda" else CPU_TILE


def resolve_tile(tile_size, device: torch.device) -> tuple[int, int]:
    """``tile_size``: None (device default), an int (square) or a (rows, cols) pair."""
    if tile_size is None:
        return default_tile(device)
    if isinstance(tile_size, int) and not isinstance(tile_size, bool):
        tile_size = (tile_size, tile_size)
    if (
        not isinstance(tile_size, (tuple, list))
        or len(tile_size) != 2
        or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in tile_size)
    ):
        raise BatchlabInputError(
            f"tile_size must be a positive int or a (rows, cols) pair of positive ints, got {tile_size!r}"
        )
    return int(tile_size[0]), int(tile_size[1])


def spans(n: int, step: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``step`` covering ``range(n)``."""
    for start in range(0, n, step):
        yield start, min(start + step, n)


# ----------------------------------------------------------------------------- precision


def uses_low_precision_matmul(x: torch.Tensor) -> bool:
    """CUDA bf16/fp16: multiply in the input dtype with fp32 accumulation and output."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def matmul_operand(x: torch.Tensor) -> torch.Tensor:
    """The form in which ``x`` enters tile products: itself on CUDA low precision, else compute dtype."""
    return x if uses_low_precision_matmul(x) else x.to(compute_dtype(x.dtype))


_MM_OUT_DTYPE = True  # torch.mm(..., out_dtype=) exists (PyTorch >= 2.8 on CUDA); set False on first failure


def tile_mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``out_dtype`` (fp32 accumulation for bf16/fp16 CUDA operands)."""
    global _MM_OUT_DTYPE
    if a.dtype == out_dtype and b.dtype == out_dtype:
        return a @ b
    if a.dtype != b.dtype:
        b = b.to(a.dtype)
    if _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=out_dtype)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    # older PyTorch: upcast the operands (exact products, slower)
    return a.to(out_dtype) @ b.to(out_dtype)


# ----------------------------------------------------------------------------- who is a positive


@dataclass
class Pairs:
    """Positives and removed pairs of an (N, M) problem, answerable one tile at a time.

    Exactly one way of naming positives: ``targets`` (N,) global key index per row
    (sparse, no dense tile is built), ``pos_mask`` (N, M) bool (sliced per tile), or
    ``labels`` (``row_labels`` (N,), ``col_labels`` (M,): positives share a label, as in
    NT-Xent). ``neg_mask`` is removed from denominators (any of its three forms);
    ``exclude_self`` also removes the global diagonal (NT-Xent: nobody is compared
    with itself) and keeps it out of the positives.
    """

    targets: torch.Tensor | None = None
    pos_mask: torch.Tensor | None = None
    row_labels: torch.Tensor | None = None
    col_labels: torch.Tensor | None = None
    neg_mask: NegMask = None
    exclude_self: bool = False

    def row_counts(self, n: int, device, dtype) -> torch.Tensor:
        """(N,) number of positives of each row."""
        if self.targets is not None:
            return torch.ones(n, device=device, dtype=dtype)
        if self.pos_mask is not None:
            return self.pos_mask.sum(1).to(dtype)
        same = _label_counts(self.row_labels, self.col_labels).to(dtype)
        return same - 1 if self.exclude_self else same

    def col_counts(self, m: int, device, dtype) -> torch.Tensor:
        """(M,) number of positives of each column."""
        if self.targets is not None:
            return torch.bincount(self.targets, minlength=m).to(dtype)
        if self.pos_mask is not None:
            return self.pos_mask.sum(0).to(dtype)
        same = _label_counts(self.col_labels, self.row_labels).to(dtype)
        return same - 1 if self.exclude_self else same

    def pos_tile(self, r0: int, r1: int, c0: int, c1: int):
        """Positives in the tile: ``("sparse", li, lj)`` local indices or ``("dense", bool tile)``."""
        if self.targets is not None:
            t = self.targets[r0:r1]
            li = ((t >= c0) & (t < c1)).nonzero().flatten()
            return "sparse", li, t[li] - c0
        if self.pos_mask is not None:
            return "dense", self.pos_mask[r0:r1, c0:c1]
        tile = self.row_labels[r0:r1, None] == self.col_labels[None, c0:c1]
        if self.exclude_self:
            tile &= ~_diagonal(r0, r1, c0, c1, tile.device)
        return "dense", tile

    def removed_tile(self, r0: int, r1: int, c0: int, c1: int, device) -> torch.Tensor | None:
        """Bool tile of pairs removed from denominators (neg_mask, self), or None."""
        tile = None
        if self.neg_mask is not None:
            if isinstance(self.neg_mask, torch.Tensor) and self.neg_mask.dtype == torch.bool:
                tile = self.neg_mask[r0:r1, c0:c1]
            else:
                rows = torch.arange(r0, r1, device=device)
                cols = torch.arange(c0, c1, device=device)
                tile = neg_mask_tile(self.neg_mask, rows, cols)
        if self.exclude_self and r0 < c1 and c0 < r1:
            diag = _diagonal(r0, r1, c0, c1, device)
            tile = diag if tile is None else tile | diag
        return tile

    def restrict_rows(self, r0: int, r1: int) -> "Pairs":
        """The same pairs with an index-form neg_mask pre-filtered to rows [r0, r1) (faster per tile)."""
        nm = self.neg_mask
        if isinstance(nm, torch.Tensor) and nm.dtype != torch.bool and nm.numel():
            nm = nm[(nm[:, 0] >= r0) & (nm[:, 0] < r1)]
            return Pairs(self.targets, self.pos_mask, self.row_labels, self.col_labels, nm, self.exclude_self)
        return self


def pairs_for(q: torch.Tensor, targets, pos_mask, neg_mask) -> Pairs:
    """The :class:`Pairs` of a (q, k) loss; ``targets`` and ``pos_mask`` both None mean the diagonal."""
    if targets is None and pos_mask is None:
        targets = torch.arange(q.shape[0], device=q.device)
    return Pairs(targets=targets, pos_mask=pos_mask, neg_mask=neg_mask)


def _label_counts(labels: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """For each entry of ``labels``, how many entries of ``other`` share its label."""
    values, counts = torch.unique(other, return_counts=True)
    idx = torch.searchsorted(values, labels).clamp(max=len(values) - 1)
    return torch.where(values[idx] == labels, counts[idx], torch.zeros_like(counts[idx]))


def _diagonal(r0: int, r1: int, c0: int, c1: int, device) -> torch.Tensor:
    rows = torch.arange(r0, r1, device=device)[:, None]
    cols = torch.arange(c0, c1, device=device)[None, :]
    return rows == cols


def _check_positive_kept(kind, pos, removed: torch.Tensor | None, r0: int, c0: int) -> None:
    """A negative mask must never remove a positive (the reference raises the same error)."""
    if removed is None:
        return
    if kind == "sparse":
        li, lj = pos
        hit = removed[li, lj].nonzero().flatten()
        if hit.numel():
            i, j = int(li[hit[0]]) + r0, int(lj[hit[0]]) + c0
            _raise_masked_positive(i, j)
    else:
        both = pos[0] & removed
        if bool(both.any()):
            i, j = both.nonzero()[0].tolist()
            _raise_masked_positive(i + r0, j + c0)


def _raise_masked_positive(i: int, j: int) -> None:
    raise BatchlabInputError(
        f"neg_mask removes a positive (query {i}, key {j}); a false-negative mask must not cover positives"
    )


# ----------------------------------------------------------------------------- the tile walk


class Tile(NamedTuple):
    """One tile of a (rows x column block) walk, with everything a tile kernel needs.

    ``r0:r1`` / ``c0:c1`` are LOCAL ranges into ``q`` / ``k_block``; ``gr0`` / ``gc0`` the
    global index of their first row / column. ``S`` (fp32 or fp64) is ``q[r0:r1] @
    k_block[c0:c1].T``; ``pos`` is :meth:`Pairs.pos_tile`'s answer and ``removed`` the
    bool tile of pairs removed by the mask (or None); ``q_t`` / ``k_t`` are the matmul
    operands for the tile's gradient products.
    """

    r0: int
    r1: int
    c0: int
    c1: int
    gr0: int
    gc0: int
    S: torch.Tensor
    pos: tuple
    removed: torch.Tensor | None
    q_t: torch.Tensor
    k_t: torch.Tensor


def walk_tiles(q, k_block, pairs: Pairs, *, row_offset: int, col_offset: int, tile: tuple[int, int]):
    """Yield every :class:`Tile` of ``q`` x ``k_block``, row block by row block.

    Also checks, per tile, that the negative mask spares every positive.
    """
    cd = compute_dtype(q.dtype)
    qm, km = matmul_operand(q), matmul_operand(k_block)
    tr, tc = tile
    for r0, r1 in spans(q.shape[0], tr):
        gr0, gr1 = row_offset + r0, row_offset + r1
        row_pairs = pairs.restrict_rows(gr0, gr1)
        q_t = qm[r0:r1]
        for c0, c1 in spans(k_block.shape[0], tc):
            gc0, gc1 = col_offset + c0, col_offset + c1
            k_t = km[c0:c1]
            pos = row_pairs.pos_tile(gr0, gr1, gc0, gc1)
            removed = row_pairs.removed_tile(gr0, gr1, gc0, gc1, q.device)
            _check_positive_kept(pos[0], pos[1:], removed, gr0, gc0)
            yield Tile(r0, r1, c0, c1, gr0, gc0, tile_mm(q_t, k_t.T, cd), pos, removed, q_t, k_t)


# ----------------------------------------------------------------------------- softmax family


class BlockStats(NamedTuple):
    """Partial statistics of one (rows x column block) pair; merge with :func:`merge_stats`.

    ``row_lse`` (N,), ``col_lse`` (M_block,) or None, ``row_pos`` (N,) and ``col_pos``
    (M_block,): sums of the positive *cosines* (divide by counts, multiply by the scale).
    """

    row_lse: torch.Tensor
    col_lse: torch.Tensor | None
    row_pos: torch.Tensor
    col_pos: torch.Tensor


def merge_stats(a: BlockStats, b: BlockStats) -> BlockStats:
    """Merge two partials over the SAME rows and columns (e.g. column tiles of one block)."""
    col = None if a.col_lse is None else torch.logaddexp(a.col_lse, b.col_lse)
    return BlockStats(torch.logaddexp(a.row_lse, b.row_lse), col, a.row_pos + b.row_pos, a.col_pos + b.col_pos)


def _denominator_logits(t: Tile, scale, exclude_positives: bool) -> torch.Tensor:
    """The tile's logits with removed pairs (and, for DCL, positives) set to -inf, in place of S."""
    L = t.S.mul_(scale)
    if t.removed is not None:
        L.masked_fill_(t.removed, float("-inf"))
    if exclude_positives:
        if t.pos[0] == "sparse":
            L[t.pos[1], t.pos[2]] = float("-inf")
        else:
            L.masked_fill_(t.pos[1], float("-inf"))
    return L


def _positive_sums(t: Tile, row_pos: torch.Tensor, col_pos: torch.Tensor) -> None:
    """Add the tile's positive cosines to the per-row and per-column sums (before S is scaled)."""
    if t.pos[0] == "sparse":
        li, lj = t.pos[1], t.pos[2]
        if li.numel():
            vals = t.S[li, lj]
            row_pos.index_add_(0, li + t.r0, vals)
            col_pos.index_add_(0, lj + t.c0, vals)
    else:
        masked = t.S * t.pos[1]
        row_pos[t.r0 : t.r1] += masked.sum(1)
        col_pos[t.c0 : t.c1] += masked.sum(0)


def lse_block_forward(
    q: torch.Tensor,
    k_block: torch.Tensor,
    scale: torch.Tensor,
    pairs: Pairs,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    need_col: bool = True,
    exclude_positives: bool = False,
    tile: tuple[int, int] = CPU_TILE,
) -> BlockStats:
    """Row/column log-sum-exp partials and positive-cosine sums of ``q`` x ``k_block``.

    Parameters
    ----------
    q : Tensor (N, d)
        Local queries (global rows ``row_offset .. row_offset + N``).
    k_block : Tensor (Mb, d)
        A block of keys (global columns ``col_offset .. col_offset + Mb``).
    scale : Tensor ()
        The logit scale (compute dtype).
    pairs : Pairs
        Positives and removed pairs in global indices.
    need_col : bool
        Also compute the column LSE (symmetric losses).
    exclude_positives : bool
        Remove positives from the denominators (DCL).
    tile : (rows, cols)

    Returns
    -------
    BlockStats with row_lse (N,), col_lse (Mb,) or None, row_pos (N,), col_pos (Mb,).

    Example
    -------
    >>> q = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    >>> st = lse_block_forward(q, q, torch.tensor(10.0), Pairs(targets=torch.arange(5)), tile=(2, 3))
    >>> torch.allclose(st.row_lse, torch.logsumexp(10 * q @ q.T, 1))
    True
    """
    cd = compute_dtype(q.dtype)
    n, mb = q.shape[0], k_block.shape[0]
    device = q.device
    row_lse = torch.full((n,), float("-inf"), device=device, dtype=cd)
    col_lse = torch.full((mb,), float("-inf"), device=device, dtype=cd) if need_col else None
    row_pos = torch.zeros(n, device=device, dtype=cd)
    col_pos = torch.zeros(mb, device=device, dtype=cd)
    for t in walk_tiles(q, k_block, pairs, row_offset=row_offset, col_offset=col_offset, tile=tile):
        _positive_sums(t, row_pos, col_pos)
        L = _denominator_logits(t, scale, exclude_positives)
        row_lse[t.r0 : t.r1] = torch.logaddexp(row_lse[t.r0 : t.r1], torch.logsumexp(L, dim=1))
        if need_col:
            col_lse[t.c0 : t.c1] = torch.logaddexp(col_lse[t.c0 : t.c1], torch.logsumexp(L, dim=0))
    return BlockStats(row_lse, col_lse, row_pos, col_pos)


def _accumulate_products(G, t: Tile, U, V, low: bool, cd) -> None:
    """``U[rows] += G @ k_t`` and ``V[cols] += G.T @ q_t`` (G rounded to bf16/fp16 on CUDA, as FlashAttention)."""
    Gm = G.to(t.q_t.dtype) if low else G
    U[t.r0 : t.r1] += tile_mm(Gm, t.k_t, cd)
    if V is not None:
        V[t.c0 : t.c1] += tile_mm(Gm.T, t.q_t, cd)


class LSECoefficients(NamedTuple):
    """How each row/column statistic enters the loss.

    The loss is ``sum_i a_i (row_lse_i - w_i * s * row_pos_i / n_i)
    + sum_j b_j (col_lse_j - w'_j * s * col_pos_j / n'_j)``, so
    ``dLoss/dL_ij = a_i P_ij + b_j P'_ij - [ij positive] (alpha_i + beta_j)`` with
    ``alpha = a * w / n`` and ``beta = b * w' / n'``. ``col`` and ``beta`` are None for
    one-way losses.
    """

    row: torch.Tensor
    alpha: torch.Tensor
    col: torch.Tensor | None
    beta: torch.Tensor | None


def lse_block_backward(
    q: torch.Tensor,
    k_block: torch.Tensor,
    scale: torch.Tensor,
    pairs: Pairs,
    *,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor | None,
    coef: LSECoefficients,
    row_offset: int = 0,
    col_offset: int = 0,
    exclude_positives: bool = False,
    need_v: bool = True,
    tile: tuple[int, int] = CPU_TILE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(U, V)``: this block's share of ``G @ k_block`` (N, d) and ``G.T @ q`` (Mb, d).

    ``G = dLoss/dL`` for the tile (see :class:`LSECoefficients`); ``row_lse``/``col_lse``
    are the FINAL statistics (all blocks merged), ``col_lse`` and ``coef.col`` for this
    block's columns only. Multiply ``U``, ``V`` by the scale for ``dq``, ``dk_block``;
    ``dscale += (q * U).sum()``.
    """
    cd = compute_dtype(q.dtype)
    n, mb = q.shape[0], k_block.shape[0]
    device = q.device
    low = uses_low_precision_matmul(q)
    U = torch.zeros(n, q.shape[1], device=device, dtype=cd)
    V = torch.zeros(mb, q.shape[1], device=device, dtype=cd) if need_v else None
    a, alpha, b, beta = coef
    for t in walk_tiles(q, k_block, pairs, row_offset=row_offset, col_offset=col_offset, tile=tile):
        r0, r1, c0, c1 = t.r0, t.r1, t.c0, t.c1
        L = _denominator_logits(t, scale, exclude_positives)
        G = torch.exp(L - row_lse[r0:r1, None]).mul_(a[r0:r1, None])
        if b is not None:
            G.add_(L.sub_(col_lse[None, c0:c1]).exp_().mul_(b[None, c0:c1]))
        # the positive term is linear in L: subtract its coefficients at the positive pairs
        if t.pos[0] == "sparse":
            li, lj = t.pos[1], t.pos[2]
            if li.numel():
                corr = alpha[r0:r1][li] + (beta[c0:c1][lj] if beta is not None else 0)
                G.index_put_((li, lj), -corr, accumulate=True)
        else:
            corr = alpha[r0:r1, None] + (beta[None, c0:c1] if beta is not None else 0)
            G.sub_(t.pos[1] * corr)
        _accumulate_products(G, t, U, V, low, cd)
    return U, V


# ----------------------------------------------------------------------------- extra negatives


def extra_logits(q: torch.Tensor, extra: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(N, m) logits of each query against its own extra negatives (compute dtype)."""
    cd = compute_dtype(q.dtype)
    return scale * torch.einsum("nd,nmd->nm", q.to(cd), extra.to(cd))


def extra_backward(q: torch.Tensor, extra: torch.Tensor, scale: torch.Tensor, dE: torch.Tensor):
    """Given ``dE = dLoss/dE`` (N, m): the (N, d) addition to ``U`` and ``dLoss/dextra`` (N, m, d)."""
    cd = compute_dtype(q.dtype)
    U_add = torch.einsum("nm,nmd->nd", dE, extra.to(cd))
    d_extra = scale * dE[:, :, None] * q.to(cd)[:, None, :]
    return U_add, d_extra


# ----------------------------------------------------------------------------- sigmoid family


class SigmoidBlock(NamedTuple):
    """SigLIP over one (rows x column block) pair: per-row loss (N,) and, if asked, grads."""

    per_row: torch.Tensor
    U: torch.Tensor | None
    V: torch.Tensor | None
    dscale: torch.Tensor | None
    dbias: torch.Tensor | None


def sigmoid_block(
    q: torch.Tensor,
    k_block: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    pairs: Pairs,
    *,
    row_coef: torch.Tensor | None = None,
    row_offset: int = 0,
    col_offset: int = 0,
    need_v: bool = True,
    tile: tuple[int, int] = CPU_TILE,
) -> SigmoidBlock:
    """SigLIP terms ``softplus(-y_ij L_ij)`` of ``q`` x ``k_block`` summed per row, in one pass.

    With ``row_coef`` (N,) (the loss's weight of each row), also returns
    ``U = G @ k_block``, ``V = G.T @ q``, ``dscale = sum G * S`` and ``dbias = sum G``
    for ``G = row_coef_i * dterm_ij/dL_ij``. Pairs removed by the mask contribute nothing.

    Example
    -------
    >>> q = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    >>> out = sigmoid_block(q, q, torch.tensor(10.0), torch.tensor(-10.0), Pairs(targets=torch.arange(5)))
    >>> out.per_row.shape
    torch.Size([5])
    """
    cd = compute_dtype(q.dtype)
    n, mb, d = q.shape[0], k_block.shape[0], q.shape[1]
    device = q.device
    low = uses_low_precision_matmul(q)
    per_row = torch.zeros(n, device=device, dtype=cd)
    grads = row_coef is not None
    U = torch.zeros(n, d, device=device, dtype=cd) if grads else None
    V = torch.zeros(mb, d, device=device, dtype=cd) if grads and need_v else None
    dbias = torch.zeros((), device=device, dtype=cd) if grads else None
    for t in walk_tiles(q, k_block, pairs, row_offset=row_offset, col_offset=col_offset, tile=tile):
        # terms softplus(-y L) with y = +1 for positives, -1 otherwise: z = -y L
        z = t.S.mul_(scale).add_(bias)
        sparse = t.pos[0] == "sparse"
        if sparse:
            li, lj = t.pos[1], t.pos[2]
            z[li, lj] = -z[li, lj]
        else:
            z = torch.where(t.pos[1], -z, z)
        terms = F.softplus(z)
        if t.removed is not None:
            terms.masked_fill_(t.removed, 0.0)
        per_row[t.r0 : t.r1] += terms.sum(1)
        if not grads:
            continue
        # d softplus(-y L) / dL = -y sigmoid(-y L) = -y sigmoid(z)
        G = torch.sigmoid(z)
        if sparse:
            G[li, lj] = -G[li, lj]
        else:
            G = torch.where(t.pos[1], -G, G)
        if t.removed is not None:
            G.masked_fill_(t.removed, 0.0)
        G.mul_(row_coef[t.r0 : t.r1, None])
        dbias += G.sum()
        _accumulate_products(G, t, U, V, low, cd)
    dscale = (q.to(cd) * U).sum() if grads else None
    return SigmoidBlock(per_row, U, V, dscale, dbias)

