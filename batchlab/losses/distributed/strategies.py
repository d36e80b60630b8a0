"""Contrastive losses over ``torch.distributed``: all-gather and ring strategies.

W processes each hold a shard (``q_r``, ``k_r``) of one global batch of N pairs.
Every strategy computes exactly the loss and the gradients of one process holding
all N, under this convention (the one DDP needs to reproduce single-process training):

* the **mean over ranks of the returned loss** is the global loss;
* **each rank's embedding gradient is W times** the global loss's gradient for its
  shard, so that DDP's averaging over ranks gives the single-process update;
* the **mean over ranks of the logit scale's (and bias's) gradient** equals the
  single-process gradient: each rank keeps its own share, and DDP's averaging does
  the rest (never all-reduce it yourself: that double counts, a bug several public
  libraries shipped).

Concretely, rank r returns ``W * (its examples' share of the global loss)``; for
``reduction="mean"`` that is ``W / N * sum_{i in shard r} loss_i``.

Strategies
----------
``allgather``
    Gathers queries and keys *with gradient* (open_clip's ``gather_with_grad`` +
    ``local_loss``): local rows against global columns, and local columns against
    global rows, through the single-process implementation (reference, tiled or
    Triton). Simple and fast for small worlds and batches; holds all N x d embeddings.
``ring``
    Key blocks travel around the ring with point-to-point sends that overlap the
    block computation (as Inf-CL does), but with ONE ring for both directions of the
    symmetric loss: the column log-sum-exp statistics (forward) and the key gradients
    (backward) travel with their key block and arrive home after a full circle.
    Traffic is in the inputs' dtype (bf16 stays bf16). Never holds more than two key
    blocks. Each block runs on the fused Triton kernels (``impl="triton"``, or
    ``"auto"`` on CUDA, for diagonal positives) or tile by tile on the tiled engine's
    block primitives, which also take global ``targets`` and a callable ``neg_mask``.
    Supports InfoNCE, SigLIP and DCL/DCLW, plus extra negatives.
``auto``
    ``ring`` where its blocks run on the Triton kernels (CUDA, diagonal positives:
    faster than the all-gather at every size measured), else ``allgather`` when the
    gathered embeddings stay under 1 GiB, else ``ring``; NT-Xent and ``return_lse``
    always gather.

Shards may be uneven (the last batch of an epoch): sizes are exchanged first.
Global ``targets`` index the *global* key set (rank order), so positives may live on
another rank (allgather strategy).

Example (run under ``torchrun --nproc-per-node 2``)::

    loss = info_nce(q_local, k_local, scale, distributed="ring")
    loss.backward()   # then DDP averages gradients over ranks
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from batchlab.errors import BatchlabInputError
from batchlab.losses._common import LSE, compute_dtype

#: ``distributed="auto"`` gathers when the global embeddings take less than this.
AUTO_ALLGATHER_MAX_BYTES = 1 << 30


# ---------------------------------------------------------------------------
# process-group helpers
# ---------------------------------------------------------------------------
def world_and_rank(group=None) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def gather_sizes(n_local: int, device: torch.device, group=None) -> list[int]:
    """Every rank's shard size, in rank order."""
    world, _ = world_and_rank(group)
    mine = torch.tensor([n_local], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


def _all_gather_uneven(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (sizes along dim 0 may differ), without gradient."""
    biggest = max(sizes)
    padded = x.new_zeros((biggest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        return _all_gather_uneven(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_with_grad(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """All-gather ``x`` (n_r, ...) -> (N, ...) along dim 0, differentiable.

    The gradient of rank r's rows is the sum over ranks of their gradients for those
    rows, which is what makes the per-rank loss convention above exact.
    """
    sizes = sizes or gather_sizes(x.shape[0], x.device, group)
    return _GatherWithGrad.apply(x, sizes, group)


def _offset(sizes: list[int], rank: int) -> int:
    return sum(sizes[:rank])


def _share(per_example_sum: torch.Tensor, reduction: str, world: int, n_global: int) -> torch.Tensor:
    """Rank r's returned loss, so that the mean over ranks is the global loss."""
    if reduction == "sum":
        return world * per_example_sum
    return world * per_example_sum / n_global


def _shift_neg_mask(neg_mask, row_offset: int, transpose: bool) -> Callable | None:
    """A callable neg_mask over global indices, seen from local rows (optionally transposed)."""
    if neg_mask is None:
        return None
    if not callable(neg_mask) or isinstance(neg_mask, torch.Tensor):
        raise BatchlabInputError(
            "under distributed=..., pass neg_mask as a callable fn(global_rows, global_cols) -> BoolTensor, "
            "so that every rank can ask for its own tiles"
        )
    if transpose:
        return lambda rows, cols: neg_mask(cols, rows + row_offset).T
    return lambda rows, cols: neg_mask(rows + row_offset, cols)


# ---------------------------------------------------------------------------
# entry point used by the loss functions
# ---------------------------------------------------------------------------
def distributed_loss(family: str, strategy: str, group, *args, **kwargs):
    """Run ``family`` ("info_nce", "siglip", "dcl", "nt_xent") over ``group`` with ``strategy``."""
    world, _ = world_and_rank(group)
    first = args[0]
    if strategy == "auto":
        n_global = first.shape[-2] * world
        nbytes = 2 * n_global * first.shape[-1] * first.element_size()
        triton_ring = family in ("info_nce", "dcl") and _ring_uses_triton(
            "auto", first.device, kwargs.get("targets"), kwargs.get("neg_mask"))
        # measured on 2 H200s (benchmarks/results/distributed-2xH200.json): the ring on Triton
        # blocks makes one fused pass for both directions and beats the all-gather's two
        # one-way passes at every size (20 vs 34 ms at N=65,536; 4.2 vs 8.0 s at 1M)
        if family == "nt_xent" or kwargs.get("return_lse"):  # only the all-gather has these
            strategy = "allgather"
        elif triton_ring:
            strategy = "ring"
        else:
            strategy = "allgather" if nbytes <= AUTO_ALLGATHER_MAX_BYTES else "ring"
    if strategy == "ring":
        if family == "nt_xent":
            raise BatchlabInputError("nt_xent supports distributed='allgather' (every view against every view)")
        return _RING[family](group, *args, **kwargs)
    return _ALLGATHER[family](group, *args, **kwargs)


# ---------------------------------------------------------------------------
# all-gather strategy: local rows x global columns, through the single-process path
# ---------------------------------------------------------------------------
def _global_row_targets(targets, n_local, offset, device):
    if targets is None:
        return torch.arange(offset, offset + n_local, device=device)
    return targets


def _column_targets(targets, sizes, rank, device, group):
    """For the key->query direction: the global query index whose positive is each local key."""
    offset, n_local = _offset(sizes, rank), sizes[rank]
    if targets is None:
        return torch.arange(offset, offset + n_local, device=device)
    all_targets = _all_gather_uneven(targets, sizes, group)
    n_global = sum(sizes)
    owner = torch.full((n_global,), -1, dtype=torch.long, device=device)
    counts = torch.bincount(all_targets, minlength=n_global)
    if bool((counts != 1).any()):
        raise BatchlabInputError(
            "the symmetric distributed loss needs global targets that form a permutation (each key the "
            "positive of exactly one query); pass symmetric=False, or use pos_mask on one process"
        )
    owner[all_targets] = torch.arange(n_global, device=device)
    return owner[offset : offset + n_local]


def _allgather_pairwise(family, group, q, k, scale, *, symmetric, targets, pos_mask, extra_negatives, neg_mask,
                        reduction, return_lse, impl, bias=None, weighted=False, sigma=0.5, **impl_options):
    from batchlab.losses import dcl, info_nce, siglip

    if pos_mask is not None:
        raise BatchlabInputError(
            "pos_mask is not supported under distributed=...; pass global targets (indices into the global keys)"
        )
    world, rank = world_and_rank(group)
    sizes = gather_sizes(q.shape[0], q.device, group)
    if k.shape[0] != q.shape[0]:
        raise BatchlabInputError(
            f"each rank needs as many keys as queries under distributed=..., got {q.shape[0]} and {k.shape[0]}"
        )
    n_global, offset = sum(sizes), _offset(sizes, rank)
    k_all = gather_with_grad(k, group, sizes)
    row_targets = _global_row_targets(targets, q.shape[0], offset, q.device)
    common = dict(reduction="none", impl=impl, **impl_options)
    row_mask = _shift_neg_mask(neg_mask, offset, transpose=False)

    if family == "siglip":
        rows = siglip(q, k_all, scale, bias, targets=row_targets, extra_negatives=extra_negatives,
                      neg_mask=row_mask, **common)
        return _share(rows.sum(), reduction, world, n_global) if reduction != "none" else rows

    one_way = info_nce if family == "info_nce" else dcl
    extra_kw = {} if family == "info_nce" else dict(weighted=False)
    row_out = one_way(q, k_all, scale, symmetric=False, targets=row_targets, extra_negatives=extra_negatives,
                      neg_mask=row_mask, return_lse=True, **extra_kw, **common)
    rows, row_lse = row_out[0], row_out[1].row
    col_lse = None
    if symmetric:
        q_all = gather_with_grad(q, group, sizes)
        col_targets = _column_targets(targets, sizes, rank, q.device, group)
        col_mask = _shift_neg_mask(neg_mask, offset, transpose=True)
        cols, col_lse = one_way(k, q_all, scale, symmetric=False, targets=col_targets, neg_mask=col_mask,
                                return_lse=True, **extra_kw, **common)
        col_lse = col_lse.row
    if family == "dcl" and weighted:
        # DCLW: loss_i = lse_i - w_i * pos_i = (lse_i - pos_i) + (1 - w_i) * pos_i, with w from the
        # global batch's positive cosines (w is a constant, so its gradient is the pos term's)
        rows = rows + _dclw_correction(q, k_all[row_targets], scale, sigma, sizes, group)
        if symmetric:
            cols = cols + _dclw_correction(k, q_all[col_targets], scale, sigma, sizes, group)
    if reduction == "none":
        per = rows if not symmetric else (rows + cols) / 2
        return (per, LSE(row_lse, col_lse)) if return_lse else per
    total = rows.sum() if not symmetric else (rows.sum() + cols.sum()) / 2
    loss = _share(total, reduction, world, n_global)
    return (loss, LSE(row_lse, col_lse)) if return_lse else loss


def _dclw_correction(a, b, scale, sigma, sizes, group):
    """(1 - w_i) * s * cos_i for local rows, w from DCLW's softmax over the global batch."""
    cos = (a.to(compute_dtype(a.dtype)) * b.to(compute_dtype(a.dtype))).sum(-1)
    w = _dclw_global_weights(cos.detach(), sigma, sizes, group, dist.get_rank(group))
    return (1 - w) * scale * cos


def _allgather_info_nce(group, q, k, scale, **kw):
    return _allgather_pairwise("info_nce", group, q, k, scale, **kw)


def _allgather_dcl(group, q, k, scale, **kw):
    return _allgather_pairwise("dcl", group, q, k, scale, **kw)


def _allgather_siglip(group, q, k, scale, bias, **kw):
    return _allgather_pairwise("siglip", group, q, k, scale, bias=bias, symmetric=False, return_lse=False, **kw)


def _allgather_nt_xent(group, views, scale, *, reduction, return_lse, impl, **impl_options):
    """Local anchors (every view of the local examples) against every view of the global batch."""
    from batchlab.losses import info_nce

    world, rank = world_and_rank(group)
    v, n_local, d = views.shape
    sizes = gather_sizes(n_local, views.device, group)
    n_global, offset = sum(sizes), _offset(sizes, rank)
    # (V, N, d): gather along the example axis for every view
    gathered = gather_with_grad(views.transpose(0, 1).reshape(n_local, v * d), group, sizes)
    keys = gathered.reshape(n_global, v, d).transpose(0, 1).reshape(v * n_global, d)
    anchors = views.reshape(v * n_local, d)
    view_of = torch.arange(v, device=views.device).repeat_interleave(n_local)
    example_of = torch.arange(n_local, device=views.device).repeat(v) + offset
    self_col = view_of * n_global + example_of

    def not_self(rows, cols):
        return self_col[rows][:, None] == cols[None, :]

    if v == 2:
        pos = dict(targets=(1 - view_of) * n_global + example_of)
    else:
        key_example = torch.arange(v * n_global, device=views.device) % n_global
        mask = (example_of[:, None] == key_example[None, :])
        mask[torch.arange(v * n_local, device=views.device), self_col] = False
        pos = dict(pos_mask=mask)
    per, lse = info_nce(anchors, keys, scale, symmetric=False, neg_mask=not_self, reduction="none",
                        return_lse=True, impl=impl, **pos, **impl_options)
    if reduction == "none":
        out = per.reshape(v, n_local)
    else:
        out = world * per.sum() / (v * n_global) if reduction == "mean" else world * per.sum()
    return (out, lse) if return_lse else out


_ALLGATHER = {
    "info_nce": _allgather_info_nce,
    "dcl": _allgather_dcl,
    "siglip": _allgather_siglip,
    "nt_xent": _allgather_nt_xent,
}


# ---------------------------------------------------------------------------
# ring strategy
# ---------------------------------------------------------------------------
class _Ring:
    """Point-to-point exchange with the ring neighbours (send to r+1, receive from r-1)."""

    def __init__(self, group, sizes: list[int]):
        self.group = group
        self.world, self.rank = world_and_rank(group)
        self.sizes = sizes
        self.to_rank = dist.get_global_rank(group, (self.rank + 1) % self.world) if group else (self.rank + 1) % self.world
        self.from_rank = (
            dist.get_global_rank(group, (self.rank - 1) % self.world) if group else (self.rank - 1) % self.world
        )

    def source_of(self, step: int) -> int:
        """The rank whose block this rank holds at ``step`` (blocks move one rank per step)."""
        return (self.rank - step) % self.world

    def start(self, tensors: list[torch.Tensor], incoming_rank: int) -> tuple[list, list[torch.Tensor]]:
        """Start sending ``tensors`` forward and receiving the previous rank's; returns (requests, buffers)."""
        if self.world == 1:  # a ring of one: the block is already home
            return [], list(tensors)
        n_in = self.sizes[incoming_rank]
        buffers = [t.new_empty((n_in, *t.shape[1:])) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.to_rank, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, self.from_rank, self.group) for b in buffers]
        return dist.batch_isend_irecv(ops), buffers

    @staticmethod
    def wait(requests) -> None:
        for r in requests:
            r.wait()


class _ComputeOnlyRing(_Ring):
    """A ring that moves nothing: every "received" block is a copy of the sent one.

    Used by the benchmark to time the ring's computation alone, so that the share of
    communication hidden behind compute can be reported. Never use it for training.
    """

    def start(self, tensors, incoming_rank):
        n_in = self.sizes[incoming_rank]
        return [], [t[:n_in].clone() if t.shape[0] >= n_in else t.new_zeros((n_in, *t.shape[1:])) for t in tensors]


#: the exchange the ring functions use (the benchmark swaps in _ComputeOnlyRing)
RING_EXCHANGE = _Ring

def _ring_tile(tile_size, device: torch.device):
    from batchlab.losses.tiled.engine import resolve_tile

    return resolve_tile(tile_size, device)


def _global_targets(targets, sizes, rank, device, group) -> torch.Tensor:
    """(N_global,) key index of every global row's positive (the diagonal by default)."""
    if targets is None:
        return torch.arange(sum(sizes), device=device)
    return _all_gather_uneven(targets.long(), sizes, group)


def _dclw_global_weights(pos_cos: torch.Tensor, sigma: float, sizes, group, rank) -> torch.Tensor:
    """DCLW weights of the local rows from the softmax over the GLOBAL batch's positive cosines."""
    from batchlab.losses.dcl import dclw_weights

    start = _offset(sizes, rank)
    return dclw_weights(_all_gather_uneven(pos_cos, sizes, group), sigma)[start : start + pos_cos.shape[0]]


class _RingContrastive(torch.autograd.Function):
    """InfoNCE / DCL / DCLW over a ring, one ring for both directions.

    Forward: key blocks travel; each block's column statistics (log-sum-exp and positive
    cosine sums) travel with it and arrive home after a full circle. Backward: key blocks,
    their final column LSE and column coefficients travel the same way, with an
    accumulating key gradient; dq stays local. Every block is computed by the tiled
    engine's block primitives (``lse_block_forward`` / ``lse_block_backward``) with global
    offsets, so global ``targets`` and callable ``neg_mask`` work across ranks.
    """

    @staticmethod
    def forward(ctx, q, k, extra, scale, spec, group, sizes):
        from batchlab.losses.tiled.engine import extra_logits, lse_block_forward

        ring = RING_EXCHANGE(group, sizes)
        cd = compute_dtype(q.dtype)
        n, offset = q.shape[0], _offset(sizes, ring.rank)
        row_lse = torch.full((n,), float("-inf"), device=q.device, dtype=cd)
        row_pos = torch.zeros(n, device=q.device, dtype=cd)
        block = k
        col_lse = torch.full((k.shape[0],), float("-inf"), device=q.device, dtype=cd)
        col_pos = torch.zeros(k.shape[0], device=q.device, dtype=cd)
        for step in range(ring.world):
            src = ring.source_of(step)
            # keys go out while this block is computed; its column statistics follow after
            if step < ring.world - 1:
                key_req, (next_block,) = ring.start([block], ring.source_of(step + 1))
            st = lse_block_forward(q, block, scale, spec["pairs"], row_offset=offset,
                                   col_offset=_offset(sizes, src), need_col=spec["symmetric"],
                                   exclude_positives=spec["decoupled"], tile=spec["tile"])
            row_lse = torch.logaddexp(row_lse, st.row_lse)
            row_pos += st.row_pos
            col_pos = col_pos + st.col_pos
            if spec["symmetric"]:
                col_lse = torch.logaddexp(col_lse, st.col_lse)
            acc_req, (col_lse, col_pos) = ring.start([col_lse, col_pos], ring.source_of(step + 1))
            ring.wait(acc_req)
            if step < ring.world - 1:
                ring.wait(key_req)
                block = next_block
        # the column statistics are home after the full circle
        if extra is not None and extra.shape[1]:
            row_lse = torch.logaddexp(row_lse, torch.logsumexp(extra_logits(q, extra, scale), 1))
        if spec["decoupled"]:
            # one host read for both sides: a query, or (symmetric) a key, left with no negative
            empty = torch.isneginf(row_lse).any()
            if spec["symmetric"]:
                empty = empty | torch.isneginf(col_lse).any()
            if bool(empty):
                from batchlab.losses.dcl import check_has_negatives

                check_has_negatives(row_lse)
                check_has_negatives(col_lse, "key(s)")
        row_n, col_n = spec["row_counts"], spec["col_counts"]
        row_w = col_w = None
        if spec["weighted"]:
            row_w = _dclw_global_weights(row_pos / row_n, spec["sigma"], sizes, group, ring.rank)
            col_w = _dclw_global_weights(col_pos / col_n, spec["sigma"], sizes, group, ring.rank)
        rows = row_lse - (1 if row_w is None else row_w) * scale * row_pos / row_n
        cols = None
        if spec["symmetric"]:
            cols = col_lse - (1 if col_w is None else col_w) * scale * col_pos / col_n
        ctx.save_for_backward(q, k, extra, scale, row_lse, col_lse)
        ctx.spec, ctx.group, ctx.sizes, ctx.weights = spec, group, sizes, (row_w, col_w)
        reduction = spec["reduction"]
        if reduction == "none":
            return rows if cols is None else (rows + cols) / 2
        total = rows.sum() if cols is None else (rows.sum() + cols.sum()) / 2
        return _share(total, reduction, ring.world, sum(sizes))

    @staticmethod
    def backward(ctx, grad_out):
        from batchlab.losses.tiled.engine import LSECoefficients, extra_backward, extra_logits, lse_block_backward

        q, k, extra, scale, row_lse, col_lse = ctx.saved_tensors
        spec, group, sizes = ctx.spec, ctx.group, ctx.sizes
        row_w, col_w = ctx.weights
        ring = RING_EXCHANGE(group, sizes)
        cd = compute_dtype(q.dtype)
        offset = _offset(sizes, ring.rank)
        symmetric = spec["symmetric"]
        # d(returned loss) / d(row loss_i) and / d(col loss_j) for the local examples
        a = _loss_coefficients(grad_out, spec["reduction"], ring.world, sum(sizes), q.shape[0], cd)
        if symmetric:
            a = a / 2
        alpha = a * (1 if row_w is None else row_w) / spec["row_counts"]
        b = a if symmetric else None
        beta = b * (1 if col_w is None else col_w) / spec["col_counts"] if symmetric else None
        U = torch.zeros(q.shape, device=q.device, dtype=cd)
        block, bundle = k, ([col_lse, b, beta] if symmetric else [])
        dk = torch.zeros(k.shape, device=q.device, dtype=cd)
        for step in range(ring.world):
            src = ring.source_of(step)
            if step < ring.world - 1:
                key_req, incoming = ring.start([block, *bundle], ring.source_of(step + 1))
            coef = LSECoefficients(a, alpha, *(bundle[1:] if symmetric else (None, None)))
            u, v = lse_block_backward(q, block, scale, spec["pairs"], row_lse=row_lse,
                                      col_lse=bundle[0] if symmetric else None, coef=coef, row_offset=offset,
                                      col_offset=_offset(sizes, src), exclude_positives=spec["decoupled"],
                                      tile=spec["tile"])
            U += u
            grad_req, (dk,) = ring.start([dk + v], ring.source_of(step + 1))
            ring.wait(grad_req)
            if step < ring.world - 1:
                ring.wait(key_req)
                block, *bundle = incoming
        # dk is home after the full circle
        d_extra = None
        if extra is not None and extra.shape[1]:
            dE = torch.exp(extra_logits(q, extra, scale) - row_lse[:, None]) * a[:, None]
            u_extra, d_extra = extra_backward(q, extra, scale, dE)
            U += u_extra
            d_extra = d_extra.to(extra.dtype)
        dscale = (q.to(cd) * U).sum()
        return (scale * U).to(q.dtype), (scale * dk).to(k.dtype), d_extra, dscale, None, None, None


class _RingTritonContrastive(torch.autograd.Function):
    """The ring of :class:`_RingContrastive` with each block on the fused Triton kernels.

    Positives on the diagonal of the global batch only (no ``targets``/``neg_mask``: those
    go through the tiled engine). Per block, ``lse_forward`` gives base-2 row and column
    log-sum-exp partials in one pass and ``lse_backward`` recomputes the block once for
    its ``dq``, ``dk`` and ``ds`` shares; the positive and extra-negative terms are local.
    """

    @staticmethod
    def forward(ctx, q, k, extra, scale, spec, group, sizes):
        from batchlab.losses.tiled.engine import extra_logits
        from batchlab.losses.triton._launch import LN2
        from batchlab.losses.triton._lse import lse_forward

        ring = RING_EXCHANGE(group, sizes)
        n = q.shape[0]
        symmetric, decoupled = spec["symmetric"], spec["decoupled"]
        own_targets = torch.arange(n, device=q.device) if decoupled else None
        # the first block's statistics start the accumulators (no -inf buffers, no extra launches)
        row2 = col2 = None
        block = k
        for step in range(ring.world):
            own = ring.source_of(step) == ring.rank
            if step < ring.world - 1:
                key_req, (next_block,) = ring.start([block], ring.source_of(step + 1))
            r2, c2 = lse_forward(q, block.contiguous(), scale, own_targets if own and decoupled else None,
                                 cols=symmetric, exclude=own and decoupled)
            row2 = r2 if row2 is None else torch.logaddexp2(row2, r2)
            if symmetric:  # the column statistics travel with their key block
                col2 = c2 if col2 is None else torch.logaddexp2(col2, c2)
                acc_req, (col2,) = ring.start([col2], ring.source_of(step + 1))
                ring.wait(acc_req)
            if step < ring.world - 1:
                ring.wait(key_req)
                block = next_block
        row_lse, col_lse = row2 * LN2, (col2 * LN2 if symmetric else None)
        if extra is not None and extra.shape[1]:
            row_lse = torch.logaddexp(row_lse, torch.logsumexp(extra_logits(q, extra, scale), 1))
        cos = (q.float() * k.float()).sum(1)
        weight = None
        if spec["weighted"]:
            weight = _dclw_global_weights(cos, spec["sigma"], sizes, group, ring.rank)
        pos = (1 if weight is None else weight) * scale * cos
        rows = row_lse - pos
        cols = col_lse - pos if symmetric else None
        ctx.save_for_backward(q, k, extra, scale, row_lse, col_lse)
        ctx.spec, ctx.group, ctx.sizes, ctx.weight = spec, group, sizes, weight
        if spec["reduction"] == "none":
            return rows if cols is None else (rows + cols) / 2
        total = rows.sum() if cols is None else (rows.sum() + cols.sum()) / 2
        return _share(total, spec["reduction"], ring.world, sum(sizes))

    @staticmethod
    def backward(ctx, grad_out):
        from batchlab.losses.tiled.engine import extra_backward, extra_logits
        from batchlab.losses.triton._launch import LOG2E
        from batchlab.losses.triton._lse import lse_backward

        q, k, extra, scale, row_lse, col_lse = ctx.saved_tensors
        spec, group, sizes, weight = ctx.spec, ctx.group, ctx.sizes, ctx.weight
        ring = RING_EXCHANGE(group, sizes)
        symmetric, decoupled = spec["symmetric"], spec["decoupled"]
        n = q.shape[0]
        a = _loss_coefficients(grad_out, spec["reduction"], ring.world, sum(sizes), n, torch.float32)
        if symmetric:
            a = a / 2
        own_targets = torch.arange(n, device=q.device) if decoupled else None
        row2 = (row_lse * LOG2E).contiguous()
        block, bundle = k, ([(col_lse * LOG2E).contiguous(), a.contiguous()] if symmetric else [])
        dq = dk = dscale = None  # fp32 accumulators, started by the first block (no zero fills)
        for step in range(ring.world):
            own = ring.source_of(step) == ring.rank
            if step < ring.world - 1:
                key_req, incoming = ring.start([block, *bundle], ring.source_of(step + 1))
            dq_b, dk_b, ds_b = lse_backward(
                q, block.contiguous(), scale, own_targets if own and decoupled else None, row2,
                bundle[0] if symmetric else None, a, bundle[1] if symmetric else None, exclude=own and decoupled)
            dq_b, ds_b = dq_b.float(), ds_b.float().reshape(())
            dq = dq_b if dq is None else dq + dq_b
            dscale = ds_b if dscale is None else dscale + ds_b
            grad_req, (dk,) = ring.start([dk_b.float() if dk is None else dk + dk_b.float()], ring.source_of(step + 1))
            ring.wait(grad_req)
            if step < ring.world - 1:
                ring.wait(key_req)
                block, *bundle = incoming
        # positive terms (local: the diagonal of the global batch), weights constant
        qf, kf = q.float(), k.float()
        pos_c = (1 if weight is None else weight) * (2 * a if symmetric else a)
        dq -= scale * pos_c[:, None] * kf
        dk -= scale * pos_c[:, None] * qf
        dscale -= (pos_c * (qf * kf).sum(1)).sum()
        d_extra = None
        if extra is not None and extra.shape[1]:
            dE = torch.exp(extra_logits(q, extra, scale) - row_lse[:, None]) * a[:, None]
            u_extra, d_extra = extra_backward(q, extra, scale, dE)
            dq += scale * u_extra
            dscale += (qf * u_extra).sum()
            d_extra = d_extra.to(extra.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), d_extra, dscale.to(scale.dtype), None, None, None


def _ring_uses_triton(impl: str, device: torch.device, targets, neg_mask) -> bool:
    """Triton blocks for ``impl="triton"``, or ``"auto"`` where Triton runs and the pairs are the diagonal."""
    from batchlab.losses import _dispatch

    if impl == "triton":
        if targets is not None or neg_mask is not None:
            raise BatchlabInputError(
                "distributed='ring' with impl='triton' supports positives on the global diagonal only; "
                "use impl='tiled' for targets or neg_mask"
            )
        return True
    return impl == "auto" and targets is None and neg_mask is None and _dispatch._triton_usable(device)


def _loss_coefficients(grad_out, reduction, world, n_global, n_local, dtype):
    """d(returned loss)/d(loss_i) for each local example i."""
    if reduction == "none":
        return grad_out.to(dtype)
    factor = world if reduction == "sum" else world / n_global
    return (grad_out.to(dtype) * factor).expand(n_local)


def _check_ring_inputs(q, k, pos_mask, neg_mask) -> None:
    """What the ring accepts, from metadata only."""
    if pos_mask is not None:
        raise BatchlabInputError(
            "pos_mask is not supported under distributed=...; pass global targets (indices into the global keys)"
        )
    if q.shape[0] != k.shape[0]:
        raise BatchlabInputError(f"each rank needs as many keys as queries, got {q.shape[0]} and {k.shape[0]}")
    if neg_mask is not None and (isinstance(neg_mask, torch.Tensor) or not callable(neg_mask)):
        raise BatchlabInputError(
            "under distributed=..., pass neg_mask as a callable fn(global_rows, global_cols) -> BoolTensor"
        )


def _ring_pairs(q, k, targets, pos_mask, neg_mask, sizes, rank, group, need_columns):
    """Positives and masks of the global batch, as the tiled engine's ``Pairs``."""
    from batchlab.losses.tiled.engine import Pairs

    _check_ring_inputs(q, k, pos_mask, neg_mask)
    glob = _global_targets(targets, sizes, rank, q.device, group)
    n_global, offset = sum(sizes), _offset(sizes, rank)
    cd = compute_dtype(q.dtype)
    if targets is None:  # the global diagonal: one positive per key, nothing to count (no host sync)
        ones = torch.ones(q.shape[0], device=q.device, dtype=cd)
        return Pairs(targets=glob, neg_mask=neg_mask), ones, ones
    if int(glob.min()) < 0 or int(glob.max()) >= n_global:
        raise BatchlabInputError(f"global targets must index keys in [0, {n_global})")
    counts = torch.bincount(glob, minlength=n_global)
    if need_columns and bool((counts == 0).any()):
        raise BatchlabInputError(
            f"{int((counts == 0).sum())} key(s) are nobody's target; the symmetric loss needs a positive for "
            "every key: pass symmetric=False, or targets that cover every key"
        )
    local_counts = counts[offset : offset + k.shape[0]].to(cd).clamp_min(1)
    return Pairs(targets=glob, neg_mask=neg_mask), torch.ones(q.shape[0], device=q.device, dtype=cd), local_counts


def _ring_contrastive(group, q, k, scale, *, symmetric, targets, pos_mask, extra_negatives, neg_mask, reduction,
                      return_lse, impl, decoupled=False, weighted=False, sigma=0.5, tile_size=None,
                      **impl_options):
    if return_lse:
        raise BatchlabInputError("return_lse is not available with distributed='ring'; use 'allgather'")
    world, rank = world_and_rank(group)
    sizes = gather_sizes(q.shape[0], q.device, group)  # the one host sync per call: shards may be uneven
    if _ring_uses_triton(impl, q.device, targets, neg_mask):
        # diagonal positives: the Triton blocks need no pairs, counts or tiles (metadata checks only)
        _check_ring_inputs(q, k, pos_mask, neg_mask)
        spec = dict(symmetric=symmetric, decoupled=decoupled, weighted=weighted, sigma=sigma, reduction=reduction)
        return _RingTritonContrastive.apply(q, k, extra_negatives, scale, spec, group, sizes)
    pairs, row_counts, col_counts = _ring_pairs(q, k, targets, pos_mask, neg_mask, sizes, rank, group, symmetric)
    spec = dict(pairs=pairs, symmetric=symmetric, decoupled=decoupled, weighted=weighted, sigma=sigma,
                reduction=reduction, tile=_ring_tile(tile_size, q.device), row_counts=row_counts,
                col_counts=col_counts)
    return _RingContrastive.apply(q, k, extra_negatives, scale, spec, group, sizes)


def _ring_info_nce(group, q, k, scale, **kw):
    return _ring_contrastive(group, q, k, scale, **kw)


def _ring_dcl(group, q, k, scale, **kw):
    return _ring_contrastive(group, q, k, scale, decoupled=True, **kw)


class _RingSigLIP(torch.autograd.Function):
    """SigLIP over the ring: no normaliser, so each block's terms and gradients are final.

    Built on the tiled engine's ``sigmoid_block``; the key gradient travels with its block.
    """

    @staticmethod
    def forward(ctx, q, k, extra, scale, bias, spec, group, sizes):
        from batchlab.losses.tiled.engine import extra_logits, sigmoid_block

        ring = RING_EXCHANGE(group, sizes)
        offset = _offset(sizes, ring.rank)
        per_row = torch.zeros(q.shape[0], device=q.device, dtype=compute_dtype(q.dtype))
        block = k
        for step in range(ring.world):
            src = ring.source_of(step)
            if step < ring.world - 1:
                req, (nxt,) = ring.start([block], ring.source_of(step + 1))
            per_row += sigmoid_block(q, block, scale, bias, spec["pairs"], row_offset=offset,
                                     col_offset=_offset(sizes, src), tile=spec["tile"]).per_row
            if step < ring.world - 1:
                ring.wait(req)
                block = nxt
        if extra is not None and extra.shape[1]:
            per_row += torch.nn.functional.softplus(extra_logits(q, extra, scale) + bias).sum(1)
        ctx.save_for_backward(q, k, extra, scale, bias)
        ctx.spec, ctx.group, ctx.sizes = spec, group, sizes
        if spec["reduction"] == "none":
            return per_row
        return _share(per_row.sum(), spec["reduction"], ring.world, sum(sizes))

    @staticmethod
    def backward(ctx, grad_out):
        from batchlab.losses.tiled.engine import extra_backward, extra_logits, sigmoid_block

        q, k, extra, scale, bias = ctx.saved_tensors
        spec, group, sizes = ctx.spec, ctx.group, ctx.sizes
        ring = RING_EXCHANGE(group, sizes)
        cd = compute_dtype(q.dtype)
        offset = _offset(sizes, ring.rank)
        c = _loss_coefficients(grad_out, spec["reduction"], ring.world, sum(sizes), q.shape[0], cd)
        U = torch.zeros(q.shape, device=q.device, dtype=cd)
        dbias = torch.zeros((), device=q.device, dtype=cd)
        block, dk = k, torch.zeros(k.shape, device=q.device, dtype=cd)
        for step in range(ring.world):
            src = ring.source_of(step)
            if step < ring.world - 1:
                req, (nxt,) = ring.start([block], ring.source_of(step + 1))
            out = sigmoid_block(q, block, scale, bias, spec["pairs"], row_coef=c, row_offset=offset,
                                col_offset=_offset(sizes, src), tile=spec["tile"])
            U += out.U
            dbias += out.dbias
            grad_req, (dk,) = ring.start([dk + out.V], ring.source_of(step + 1))
            ring.wait(grad_req)
            if step < ring.world - 1:
                ring.wait(req)
                block = nxt
        d_extra = None
        if extra is not None and extra.shape[1]:
            dE = torch.sigmoid(extra_logits(q, extra, scale) + bias) * c[:, None]
            u_extra, d_extra = extra_backward(q, extra, scale, dE)
            U += u_extra
            dbias += dE.sum()
            d_extra = d_extra.to(extra.dtype)
        dscale = (q.to(cd) * U).sum()
        return (scale * U).to(q.dtype), (scale * dk).to(k.dtype), d_extra, dscale, dbias, None, None, None


def _ring_siglip(group, q, k, scale, bias, *, targets, pos_mask, extra_negatives, neg_mask, reduction, impl,
                 tile_size=None, **impl_options):
    world, rank = world_and_rank(group)
    sizes = gather_sizes(q.shape[0], q.device, group)
    pairs, _, _ = _ring_pairs(q, k, targets, pos_mask, neg_mask, sizes, rank, group, need_columns=False)
    spec = dict(pairs=pairs, reduction=reduction, tile=_ring_tile(tile_size, q.device))
    return _RingSigLIP.apply(q, k, extra_negatives, scale, bias, spec, group, sizes)


_RING = {"info_nce": _ring_info_nce, "dcl": _ring_dcl, "siglip": _ring_siglip}
