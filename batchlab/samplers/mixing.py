"""Hard negative mixing (MoCHi, Kalantidis et al., NeurIPS 2020, arXiv 2010.01028).

For each query, take its ``num_hardest`` most similar negatives and synthesise
``num_synthetic`` new ones as normalised convex mixes of random pairs of them
(``h = a n_i + (1 - a) n_j``, ``a ~ U(0, 1)``), plus ``mix_query`` harder ones that
mix the query itself into a hard negative (``h' = b q + (1 - b) n_j``,
``b ~ U(0, query_weight_max)``, ``query_weight_max = 0.5`` in the paper so the negative
part dominates). The synthetic points are detached, as in the paper (they are
treated as constants, like a memory queue), and go to a loss's
``extra_negatives`` input, which adds them to that query's denominator only.

Example
-------
>>> import torch, torch.nn.functional as F
>>> from batchlab.losses import info_nce
>>> g = torch.Generator().manual_seed(0)
>>> q, k = F.normalize(torch.randn(8, 16, generator=g), dim=1), F.normalize(torch.randn(8, 16, generator=g), dim=1)
>>> extra = mix_hard_negatives(q, k, num_hardest=4, num_synthetic=6, mix_query=2, targets=torch.arange(8), seed=0)
>>> extra.shape
torch.Size([8, 8, 16])
>>> loss = info_nce(q, k, 10.0, symmetric=False, extra_negatives=extra)
"""

from __future__ import annotations

import numbers

import torch

from batchlab._checks import check_embeddings, check_positive_int
from batchlab.errors import BatchlabInputError


def _hardest_from_bank(q: torch.Tensor, bank: torch.Tensor, num_hardest: int, targets: torch.Tensor | None,
                       block: int) -> torch.Tensor:
    """(N, h, d) hardest bank rows per query, the positive column excluded (query blocks)."""
    out = []
    for r0 in range(0, q.shape[0], block):
        s = q[r0 : r0 + block].float() @ bank.float().T
        if targets is not None:
            s[torch.arange(s.shape[0], device=s.device), targets[r0 : r0 + block]] = float("-inf")
        idx = torch.topk(s, num_hardest, dim=1).indices
        out.append(bank[idx])
    return torch.cat(out)


def check_mix_options(num_hardest, num_synthetic, mix_query, query_weight_max, *, owner: str = "") -> None:
    """The ranges of :func:`mix_hard_negatives`' options, or a BatchlabInputError naming the option.

    ``owner`` prefixes the option names in the messages (the fine-tuning recipe passes ``"mochi's "``,
    so that a bad value is refused, by name, before any model loads).

    >>> check_mix_options(16, 16, 8, 0.5)
    >>> check_mix_options(16, 16, 8, 1.5, owner="mochi's ")
    Traceback (most recent call last):
    ...
    batchlab.errors.BatchlabInputError: mochi's query_weight_max must be a number in [0, 1], got 1.5
    """
    check_positive_int(f"{owner}num_hardest", num_hardest)
    check_positive_int(f"{owner}num_synthetic", num_synthetic, minimum=0)
    check_positive_int(f"{owner}mix_query", mix_query, minimum=0)
    weight = query_weight_max
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0.0 <= weight <= 1.0:
        raise BatchlabInputError(f"{owner}query_weight_max must be a number in [0, 1], got {query_weight_max!r}")


def mix_hard_negatives(
    q: torch.Tensor,
    negatives: torch.Tensor,
    *,
    num_hardest: int,
    num_synthetic: int,
    mix_query: int = 0,
    query_weight_max: float = 0.5,
    targets: torch.Tensor | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    block_size: int = 4096,
) -> torch.Tensor:
    """Synthesise extra hard negatives per query by mixing its hardest negatives (MoCHi).

    Parameters
    ----------
    q : (N, d) L2-normalised queries.
    negatives : (K, d) a bank shared by all queries (a MoCo queue, or the batch's keys),
        or (N, m, d) negatives per query (e.g. the embeddings of mined hard negatives).
    num_hardest : how many of each query's most similar negatives to mix (``N`` in the
        paper); clipped to the number available.
    num_synthetic : mixes of two hard negatives per query (``s``); may be 0.
    mix_query : mixes of the query with one hard negative (``s'``); may be 0.
    query_weight_max : upper bound of the query's weight ``b`` in those mixes (< 0.5 keeps
        the synthetic point closer to the negative than to the query).
    targets : (N,) for a 2-D bank: the column of each query's positive, excluded from its
        hardest negatives (pass ``arange(N)`` when the bank is the batch's own keys).
    seed, generator : randomness (a ``torch.Generator`` on ``q``'s device wins over ``seed``;
        change the seed every step).
    block_size : query rows per block when ranking a bank (bounds memory to block x K).

    Returns
    -------
    Tensor (N, num_synthetic + mix_query, d): unit-norm, detached, ``q``'s dtype and device.
    """
    check_embeddings("q", q)
    check_mix_options(num_hardest, num_synthetic, mix_query, query_weight_max)
    check_positive_int("block_size", block_size)
    n, d = q.shape
    if not isinstance(negatives, torch.Tensor) or negatives.dim() not in (2, 3):
        raise BatchlabInputError("negatives must be a (K, d) bank or (N, m, d) per-query negatives tensor")
    check_embeddings("negatives", negatives, ndim=negatives.dim())
    if negatives.shape[-1] != d or negatives.device != q.device:
        raise BatchlabInputError(
            f"negatives {tuple(negatives.shape)} on {negatives.device} must have dimension {d} and live on {q.device}"
        )
    q = q.detach()
    negatives = negatives.detach()
    if negatives.dim() == 3:
        if negatives.shape[0] != n:
            raise BatchlabInputError(f"per-query negatives must have shape ({n}, m, {d}), got {tuple(negatives.shape)}")
        if targets is not None:
            raise BatchlabInputError("targets only applies to a shared (K, d) bank; per-query negatives hold no positive")
        available = negatives.shape[1]
    else:
        available = negatives.shape[0] - (1 if targets is not None else 0)
        if targets is not None:
            targets = torch.as_tensor(targets, device=q.device)
            if targets.dtype not in (torch.int64, torch.int32) or tuple(targets.shape) != (n,):
                raise BatchlabInputError(f"targets must be an integer tensor of shape ({n},)")
            if int(targets.min()) < 0 or int(targets.max()) >= negatives.shape[0]:
                raise BatchlabInputError(f"targets must index bank rows in [0, {negatives.shape[0]})")
    if available < 1:
        raise BatchlabInputError("no negative to mix: the bank holds only the positive; give at least one negative")
    h = min(num_hardest, available)
    total = num_synthetic + mix_query
    if total == 0:
        return q.new_zeros(n, 0, d)

    if negatives.dim() == 3:
        sims = torch.einsum("nd,nmd->nm", q.float(), negatives.float())
        idx = torch.topk(sims, h, dim=1).indices
        hard = torch.gather(negatives, 1, idx[:, :, None].expand(n, h, d))
    else:
        hard = _hardest_from_bank(q, negatives, h, None if targets is None else targets.long(), block_size)

    if generator is None:
        generator = torch.Generator(device=q.device)
        generator.manual_seed(0 if seed is None else seed)
    rows = torch.arange(n, device=q.device)[:, None]
    parts = []
    if num_synthetic:
        i = torch.randint(h, (n, num_synthetic), generator=generator, device=q.device)
        # a distinct partner when there are at least two hard negatives
        j = (i + torch.randint(1, max(2, h), (n, num_synthetic), generator=generator, device=q.device)) % h if h > 1 else i
        a = torch.rand(n, num_synthetic, 1, generator=generator, device=q.device)
        parts.append(a * hard[rows, i].float() + (1 - a) * hard[rows, j].float())
    if mix_query:
        j = torch.randint(h, (n, mix_query), generator=generator, device=q.device)
        b = query_weight_max * torch.rand(n, mix_query, 1, generator=generator, device=q.device)
        parts.append(b * q.float()[:, None, :] + (1 - b) * hard[rows, j].float())
    mixed = torch.cat(parts, dim=1)
    return torch.nn.functional.normalize(mixed, dim=-1).to(q.dtype)
