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
    blocks. Supports InfoNCE, SigLIP and DCL/DCLW with positives on the diagonal of the
    global batch (pair i of the global batch is positive), plus extra negatives.
``auto``
    ``allgather`` when the gathered embeddings stay under 1 GiB, else ``ring``.

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
    from batchlab.losses.dcl import dclw_weights

    dtype = compute_dtype(a.dtype)
    cos = (a.to(dtype) * b.to(dtype)).sum(-1)
    all_cos = _all_gather_uneven(cos.detach(), sizes, group)
    w_all = dclw_weights(all_cos, sigma)
    rank = dist.get_rank(group)
    w = w_all[_offset(sizes, rank) : _offset(sizes, rank) + a.shape[0]]
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

#: tile edge inside a ring block: bounds the fp32 logits held at once (4096^2 fp32 = 64 MiB on
#: the CPU; 16384^2 = 1 GiB on a GPU, where fewer, larger products keep the tensor cores busy)
RING_TILE = 4096
RING_TILE_CUDA = 16384


def default_ring_tile(device: torch.device) -> int:
    return RING_TILE_CUDA if device.type == "cuda" else RING_TILE


def _tiles(n_rows: int, n_cols: int, tile: int):
    """(row_start, row_end, col_start, col_end) tiles covering an n_rows x n_cols block."""
    for a in range(0, n_rows, tile):
        for c in range(0, n_cols, tile):
            yield a, min(n_rows, a + tile), c, min(n_cols, c + tile)


def _cos_tile(q_rows: torch.Tensor, k_cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q_rows @ k_cols.T`` accumulated and returned in ``dtype`` (fp32).

    On CUDA, bf16/fp16 inputs go through the tensor cores with an fp32 output
    (``out_dtype``), instead of being upcast (3-8x slower) or rounded to bf16 logits
    (an error of scale * 2^-8 per logit).
    """
    if q_rows.device.type == "cuda" and q_rows.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(q_rows, k_cols.T, out_dtype=dtype)
        except (TypeError, RuntimeError):
            pass
    return q_rows.to(dtype) @ k_cols.to(dtype).T


def _diagonal_mask(a: int, b: int, c: int, d: int, device) -> torch.Tensor | None:
    """Where global-diagonal entries fall inside the tile [a:b) x [c:d) of the home block."""
    lo, hi = max(a, c), min(b, d)
    if lo >= hi:
        return None
    idx = torch.arange(lo, hi, device=device)
    return idx - a, idx - c


class _RingContrastive(torch.autograd.Function):
    """Symmetric/one-way InfoNCE or DCL with diagonal positives, one ring for both directions.

    Forward: key blocks travel; each block's column log-sum-exp accumulator travels with it
    and arrives home after a full circle. Backward: key blocks, their final column LSE and an
    accumulating key gradient travel the same way; dq stays local. Within a block the work
    is done in RING_TILE x RING_TILE tiles, so memory is O(n_local * d + RING_TILE^2).
    """

    @staticmethod
    def forward(ctx, q, k, scale, extra, symmetric, decoupled, pos_weight, reduction, group, sizes, tile):
        ring = RING_EXCHANGE(group, sizes)
        dtype = compute_dtype(q.dtype)
        n_global = sum(sizes)
        neg_inf = float("-inf")
        row_lse = torch.full((q.shape[0],), neg_inf, device=q.device, dtype=dtype)
        block = k
        col_acc = torch.full((k.shape[0],), neg_inf, device=q.device, dtype=dtype)
        for step in range(ring.world):
            src = ring.source_of(step)
            # keys go out while this block is computed; its column statistics follow after
            if step < ring.world - 1:
                key_req, (next_block,) = ring.start([block], ring.source_of(step + 1))
            col_acc = col_acc.clone()
            for a, b, c, d in _tiles(q.shape[0], block.shape[0], tile):
                logits = scale * _cos_tile(q[a:b], block[c:d], dtype)
                if decoupled and src == ring.rank:
                    diag = _diagonal_mask(a, b, c, d, q.device)
                    if diag is not None:
                        logits[diag] = neg_inf  # the positive leaves the denominator
                row_lse[a:b] = torch.logaddexp(row_lse[a:b], torch.logsumexp(logits, 1))
                col_acc[c:d] = torch.logaddexp(col_acc[c:d], torch.logsumexp(logits, 0))
            acc_req, (col_in,) = ring.start([col_acc], ring.source_of(step + 1))
            ring.wait(acc_req)
            col_acc = col_in
            if step < ring.world - 1:
                ring.wait(key_req)
                block = next_block
        col_lse = col_acc  # home after the full circle
        qf = q.to(dtype)
        if extra is not None and extra.shape[1]:
            extra_logits = scale * torch.einsum("nd,nmd->nm", qf, extra.to(dtype))
            row_lse = torch.logaddexp(row_lse, torch.logsumexp(extra_logits, 1))
        pos = scale * (qf * k.to(dtype)).sum(1)
        w = 1.0 if pos_weight is None else pos_weight
        rows = row_lse - w * pos
        cols = col_lse - w * pos if symmetric else None
        ctx.save_for_backward(q, k, scale, extra, row_lse, col_lse)
        ctx.meta = (symmetric, decoupled, pos_weight, reduction, group, sizes, tile)
        if reduction == "none":
            return rows if cols is None else (rows + cols) / 2
        total = rows.sum() if cols is None else (rows.sum() + cols.sum()) / 2
        return _share(total, reduction, ring.world, n_global)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, scale, extra, row_lse, col_lse = ctx.saved_tensors
        symmetric, decoupled, pos_weight, reduction, group, sizes, tile = ctx.meta
        ring = RING_EXCHANGE(group, sizes)
        dtype = compute_dtype(q.dtype)
        c = _loss_coefficients(grad_out, reduction, ring.world, sum(sizes), q.shape[0], dtype)
        if symmetric:
            c = c / 2  # each direction carries half; the column loss of key j has row j's coefficient
        dq = torch.zeros(q.shape, device=q.device, dtype=dtype)
        dscale = torch.zeros((), device=q.device, dtype=dtype)
        block, block_col_lse, block_c = k, col_lse, c
        dk_acc = torch.zeros(k.shape, device=q.device, dtype=dtype)
        for step in range(ring.world):
            src = ring.source_of(step)
            if step < ring.world - 1:
                send = [block, block_col_lse, block_c] if symmetric else [block]
                key_req, incoming = ring.start(send, ring.source_of(step + 1))
            dk_acc = dk_acc.clone()
            for a, b, cc, dd in _tiles(q.shape[0], block.shape[0], tile):
                cos = _cos_tile(q[a:b], block[cc:dd], dtype)
                logits = scale * cos
                if decoupled and src == ring.rank:
                    diag = _diagonal_mask(a, b, cc, dd, q.device)
                    if diag is not None:
                        logits[diag] = float("-inf")
                g = torch.exp(logits - row_lse[a:b, None]) * c[a:b, None]
                if symmetric:
                    g = g + torch.exp(logits - block_col_lse[None, cc:dd]) * block_c[None, cc:dd]
                g_in = g.to(q.dtype) if q.dtype in (torch.bfloat16, torch.float16) else g
                dq[a:b] += scale * _mm(g_in, block[cc:dd], dtype)
                dk_acc[cc:dd] += scale * _mm(g_in.T, q[a:b], dtype)
                dscale += (g * cos).sum()
            grad_req, (dk_in,) = ring.start([dk_acc], ring.source_of(step + 1))
            ring.wait(grad_req)
            dk_acc = dk_in
            if step < ring.world - 1:
                ring.wait(key_req)
                if symmetric:
                    block, block_col_lse, block_c = incoming
                else:
                    (block,) = incoming
        dk = dk_acc  # home after the full circle
        # positive terms (local: the diagonal of the global batch)
        qf, kf = q.to(dtype), k.to(dtype)
        w = torch.ones_like(c) if pos_weight is None else pos_weight
        pos_c = w * (2 * c if symmetric else c)
        dq -= scale * pos_c[:, None] * kf
        dk -= scale * pos_c[:, None] * qf
        dscale -= (pos_c * (qf * kf).sum(1)).sum()
        dextra = None
        if extra is not None and extra.shape[1]:
            ef = extra.to(dtype)
            cos_e = torch.einsum("nd,nmd->nm", qf, ef)
            ge = torch.exp(scale * cos_e - row_lse[:, None]) * c[:, None]
            dq += scale * torch.einsum("nm,nmd->nd", ge, ef)
            dextra = (scale * ge[:, :, None] * qf[:, None, :]).to(extra.dtype)
            dscale += (ge * cos_e).sum()
        return dq.to(q.dtype), dk.to(k.dtype), dscale, dextra, None, None, None, None, None, None, None


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``dtype``, through the tensor cores for bf16/fp16 on CUDA (see _cos_tile)."""
    return _cos_tile(a, b.T, dtype)


def _loss_coefficients(grad_out, reduction, world, n_global, n_local, dtype):
    """d(returned loss)/d(loss_i) for each local example i."""
    if reduction == "none":
        return grad_out.to(dtype)
    factor = world if reduction == "sum" else world / n_global
    return (grad_out.to(dtype) * factor).expand(n_local)


def _check_ring_pairs(q, k, targets, pos_mask, neg_mask):
    if targets is not None or pos_mask is not None or neg_mask is not None:
        raise BatchlabInputError(
            "distributed='ring' supports positives on the global diagonal (pair i is positive) and "
            "extra negatives; for targets, pos_mask or neg_mask use distributed='allgather'"
        )
    if q.shape[0] != k.shape[0]:
        raise BatchlabInputError(f"each rank needs as many keys as queries, got {q.shape[0]} and {k.shape[0]}")


def _ring_contrastive(group, q, k, scale, *, symmetric, targets, pos_mask, extra_negatives, neg_mask, reduction,
                      return_lse, impl, decoupled=False, weighted=False, sigma=0.5, tile_size=None,
                      **impl_options):
    _check_ring_pairs(q, k, targets, pos_mask, neg_mask)
    sizes = gather_sizes(q.shape[0], q.device, group)
    weight = None
    if weighted:
        from batchlab.losses.dcl import dclw_weights

        dtype = compute_dtype(q.dtype)
        cos = (q.to(dtype) * k.to(dtype)).sum(1).detach()
        w_all = dclw_weights(_all_gather_uneven(cos, sizes, group), sigma)
        start = _offset(sizes, dist.get_rank(group))
        weight = w_all[start : start + q.shape[0]]
    loss = _RingContrastive.apply(q, k, scale, extra_negatives, symmetric, decoupled, weight, reduction, group,
                                  sizes, tile_size or default_ring_tile(q.device))
    if return_lse:
        raise BatchlabInputError("return_lse is not available with distributed='ring'; use 'allgather'")
    return loss


def _ring_info_nce(group, q, k, scale, **kw):
    return _ring_contrastive(group, q, k, scale, **kw)


def _ring_dcl(group, q, k, scale, **kw):
    return _ring_contrastive(group, q, k, scale, decoupled=True, **kw)


class _RingSigLIP(torch.autograd.Function):
    """SigLIP over the ring: no normaliser, so each tile's terms and gradients are final."""

    @staticmethod
    def _labels(logits, own_block, a, b, c, d):
        labels = -torch.ones_like(logits)
        if own_block:
            diag = _diagonal_mask(a, b, c, d, logits.device)
            if diag is not None:
                labels[diag] = 1.0
        return labels

    @staticmethod
    def forward(ctx, q, k, scale, bias, extra, reduction, group, sizes, tile):
        ring = RING_EXCHANGE(group, sizes)
        dtype = compute_dtype(q.dtype)
        per_row = torch.zeros(q.shape[0], device=q.device, dtype=dtype)
        block = k
        for step in range(ring.world):
            own = ring.source_of(step) == ring.rank
            if step < ring.world - 1:
                req, (nxt,) = ring.start([block], ring.source_of(step + 1))
            for a, b, c, d in _tiles(q.shape[0], block.shape[0], tile):
                logits = scale * _cos_tile(q[a:b], block[c:d], dtype) + bias
                labels = _RingSigLIP._labels(logits, own, a, b, c, d)
                per_row[a:b] += torch.nn.functional.softplus(-labels * logits).sum(1)
            if step < ring.world - 1:
                ring.wait(req)
                block = nxt
        if extra is not None and extra.shape[1]:
            extra_logits = scale * torch.einsum("nd,nmd->nm", q.to(dtype), extra.to(dtype)) + bias
            per_row += torch.nn.functional.softplus(extra_logits).sum(1)
        ctx.save_for_backward(q, k, scale, bias, extra)
        ctx.meta = (reduction, group, sizes, tile)
        if reduction == "none":
            return per_row
        return _share(per_row.sum(), reduction, ring.world, sum(sizes))

    @staticmethod
    def backward(ctx, grad_out):
        q, k, scale, bias, extra = ctx.saved_tensors
        reduction, group, sizes, tile = ctx.meta
        ring = RING_EXCHANGE(group, sizes)
        dtype = compute_dtype(q.dtype)
        c = _loss_coefficients(grad_out, reduction, ring.world, sum(sizes), q.shape[0], dtype)
        dq = torch.zeros(q.shape, device=q.device, dtype=dtype)
        dscale = torch.zeros((), device=q.device, dtype=dtype)
        dbias = torch.zeros((), device=q.device, dtype=dtype)
        block = k
        dk_acc = torch.zeros(k.shape, device=q.device, dtype=dtype)
        for step in range(ring.world):
            own = ring.source_of(step) == ring.rank
            if step < ring.world - 1:
                req, (nxt,) = ring.start([block], ring.source_of(step + 1))
            dk_acc = dk_acc.clone()
            for a, b, cc, dd in _tiles(q.shape[0], block.shape[0], tile):
                cos = _cos_tile(q[a:b], block[cc:dd], dtype)
                logits = scale * cos + bias
                labels = _RingSigLIP._labels(logits, own, a, b, cc, dd)
                # d softplus(-y z) / dz = -y * sigmoid(-y z)
                g = -labels * torch.sigmoid(-labels * logits) * c[a:b, None]
                g_in = g.to(q.dtype) if q.dtype in (torch.bfloat16, torch.float16) else g
                dq[a:b] += scale * _mm(g_in, block[cc:dd], dtype)
                dk_acc[cc:dd] += scale * _mm(g_in.T, q[a:b], dtype)
                dscale += (g * cos).sum()
                dbias += g.sum()
            grad_req, (dk_in,) = ring.start([dk_acc], ring.source_of(step + 1))
            ring.wait(grad_req)
            dk_acc = dk_in
            if step < ring.world - 1:
                ring.wait(req)
                block = nxt
        dextra = None
        if extra is not None and extra.shape[1]:
            qf, ef = q.to(dtype), extra.to(dtype)
            cos_e = torch.einsum("nd,nmd->nm", qf, ef)
            ge = torch.sigmoid(scale * cos_e + bias) * c[:, None]
            dq += scale * torch.einsum("nm,nmd->nd", ge, ef)
            dextra = (scale * ge[:, :, None] * qf[:, None, :]).to(extra.dtype)
            dscale += (ge * cos_e).sum()
            dbias += ge.sum()
        return dq.to(q.dtype), dk_acc.to(k.dtype), dscale, dbias, dextra, None, None, None, None


def _ring_siglip(group, q, k, scale, bias, *, targets, pos_mask, extra_negatives, neg_mask, reduction, impl,
                 tile_size=None, **impl_options):
    _check_ring_pairs(q, k, targets, pos_mask, neg_mask)
    sizes = gather_sizes(q.shape[0], q.device, group)
    return _RingSigLIP.apply(q, k, scale, bias, extra_negatives, reduction, group, sizes, tile_size or default_ring_tile(q.device))


_RING = {"info_nce": _ring_info_nce, "dcl": _ring_dcl, "siglip": _ring_siglip}
