r"""Mini-batch coresets (CoLM): a small batch whose gradient matches a larger one's.

CoLM (Nguyen & Mirzasoleiman, "Mini-batch Coresets for Memory-efficient Language Model
Training on Data Mixtures", ICLR 2025) trains on ``b`` examples chosen from a random
super-batch of ``N > b`` so that their (weighted) gradient matches the super-batch's.
Three rules make gradient matching work for imbalanced mixtures and Adam:

1. **Small sources in full.** Matching picks medoids, and a source with few examples in
   the super-batch is unlikely to own one; so every example of a *small* source is kept
   (weight 1), and the rest of the budget goes to the large sources, in proportion to
   their counts.
2. **Adam-normalised gradients.** Adam moves parameter ``p`` by about
   ``g_p / sqrt(v_p)``, so the gradients are compared after dividing by
   ``sqrt(v_hat) + eps`` (``v``: Adam's ``exp_avg_sq``, bias-corrected with its step).
3. **A cheap, sparse gradient.** Only the last projection layer's gradient is matched:
   for ``y = W x`` the per-example gradient is the outer product ``dy_i x_i^T``, which
   needs no per-example backward; after normalisation only the ``dims`` coordinates with
   the largest mean magnitude are kept. (The paper estimates that gradient by zeroth-order
   differences for LLMs; for a linear layer the exact outer product is as cheap.)

Within each large source the coreset is the greedy facility-location solution (the
medoids, CRAIG's rule) under the L1 distance of the features: it maximises
``sum_i max_{j in S} (d_max - ||g_i - g_j||_1)``; each medoid's weight is the number of
the source's examples nearest to it. With those weights
``sum_{j in S} w_j g_j`` approximates ``sum_i g_i`` over the super-batch (the matching
error is bounded by the facility-location objective). The returned weights are scaled so
that they average 1 over the chosen batch (a weighted *mean* over ``b`` estimates the
super-batch's mean gradient).

Interface as :class:`~batchlab.samplers.JointExampleSelector`: a super-batch in, indices
out; seeded (the seed and a step counter fix the random parts: subsampling small sources
when they alone exceed the budget, and the order of ties); resumable through
``state_dict``. Everything runs on the inputs' device.

Example
-------
>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> grads = torch.randn(64, 10, generator=g)
>>> sel = CoLMSelector(filter_ratio=0.75, seed=0)
>>> idx = sel.select(gradients=grads)
>>> idx.shape, idx.unique().numel()
(torch.Size([16]), 16)
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from batchlab._checks import check_choice, check_embeddings, check_positive_int, check_real
from batchlab.errors import BatchlabInputError
from batchlab.samplers.base import _check_index
from batchlab.samplers.jest import JointExampleSelector, _all_gather_rows

__all__ = ["CoLMSelector", "CoLMSelection", "last_layer_gradients"]


class CoLMSelection(NamedTuple):
    """What :meth:`CoLMSelector.select` returns with ``return_weights=True``.

    indices : LongTensor (b,) -- the chosen examples: small-source examples first, then medoids.
    weights : Tensor (b,) -- per-example weights averaging 1 (weighted mean ~ super-batch mean).
    small : BoolTensor (b,) -- which chosen examples come from small sources (kept in full).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    small: torch.Tensor


def last_layer_gradients(inputs: torch.Tensor, output_grads: torch.Tensor, *, bias: bool = False) -> torch.Tensor:
    """Per-example gradients of a linear layer ``y = x W^T (+ b)``: ``(N, d_out * d_in [+ d_out])``.

    Row ``i`` is ``vec(dy_i x_i^T)`` (laid out like ``W.grad``, (d_out, d_in) row-major),
    followed by ``dy_i`` with ``bias``; the rows sum to the layer's gradient for the batch.
    """
    check_embeddings("inputs", inputs)
    check_embeddings("output_grads", output_grads)
    if inputs.shape[0] != output_grads.shape[0]:
        raise BatchlabInputError(
            f"inputs and output_grads need one row per example, got {inputs.shape[0]} and {output_grads.shape[0]}"
        )
    outer = (output_grads[:, :, None] * inputs[:, None, :]).reshape(inputs.shape[0], -1)
    return torch.cat([outer, output_grads], 1) if bias else outer


class CoLMSelector:
    """Choose a mini-batch coreset of a super-batch by gradient matching (CoLM).

    Parameters
    ----------
    filter_ratio : float
        Fraction of the super-batch left out: ``b = round((1 - filter_ratio) * N)``
        (0.75: a batch of 64 from 256, the paper's 4x).
    small_sources : "auto" | sequence of int | None
        Sources kept in full. ``"auto"``: a source is small when its count in the
        super-batch is below ``small_fraction`` times the mean count per present source;
        a sequence names them; None: no source is small.
    small_fraction : float
        The "auto" threshold (0.5).
    dims : int, optional
        Keep only the ``dims`` feature coordinates with the largest mean magnitude over the
        super-batch (after normalisation). None: all.
    eps, beta2 : float
        Adam's ``eps`` and ``beta2`` for the normalisation ``g / (sqrt(v / (1 - beta2^t)) + eps)``.
    seed : int
        With the step counter, fixes the random parts.

    Example
    -------
    See the module docstring.
    """

    def __init__(
        self,
        filter_ratio: float = 0.75,
        *,
        small_sources: str | Sequence[int] | None = "auto",
        small_fraction: float = 0.5,
        dims: int | None = None,
        eps: float = 1e-8,
        beta2: float = 0.999,
        seed: int = 0,
    ) -> None:
        if isinstance(filter_ratio, bool) or not isinstance(filter_ratio, (int, float)) or not 0 <= filter_ratio < 1:
            raise BatchlabInputError(
                f"filter_ratio must be a number in [0, 1) (the fraction of the super-batch left out), got {filter_ratio!r}"
            )
        self.filter_ratio = float(filter_ratio)
        if isinstance(small_sources, str):
            check_choice("small_sources", small_sources, ("auto",))
        elif small_sources is not None:
            # source ids as sources= gives them (integers); 1.7 is not truncated to source 1
            small_sources = [_check_index("each of small_sources", s) for s in small_sources]
        self.small_sources = small_sources
        if not 0 <= check_real("small_fraction", small_fraction) <= 1:
            raise BatchlabInputError(f"small_fraction must be in [0, 1], got {small_fraction!r}")
        self.small_fraction = float(small_fraction)
        self.dims = None if dims is None else check_positive_int("dims", dims)
        if not (check_real("eps", eps) > 0 and 0 < check_real("beta2", beta2) < 1):
            raise BatchlabInputError(f"eps must be > 0 and beta2 in (0, 1), got eps={eps!r}, beta2={beta2!r}")
        self.eps, self.beta2 = float(eps), float(beta2)
        self.seed = _check_index("seed", seed)
        self.step = 0

    # ------------------------------------------------------------------ public API

    #: a training loop built for JEST passes ``reference=None`` to this selector
    needs_reference = False

    # The selector bookkeeping is JEST's, so the two are interchangeable in a training loop:
    # b = round((1 - filter_ratio) * N); state_dict() = {"selector", "seed", "step", "settings"};
    # load_state_dict resumes, and refuses a JEST state or one saved with other settings.
    STATE_SETTINGS = ("filter_ratio", "small_sources", "small_fraction", "dims", "eps", "beta2")
    batch_size = JointExampleSelector.batch_size
    state_dict = JointExampleSelector.state_dict
    load_state_dict = JointExampleSelector.load_state_dict

    def select(
        self,
        gradients: torch.Tensor | None = None,
        *,
        last_layer: tuple[torch.Tensor, torch.Tensor] | None = None,
        learner: Sequence | None = None,
        reference=None,
        sources: torch.Tensor | None = None,
        adam_state: torch.Tensor | dict | None = None,
        batch_size: int | None = None,
        step: int | None = None,
        group=None,
        return_local: bool = False,
        return_weights: bool = False,
    ):
        """Choose the coreset of a super-batch of N examples.

        Give the per-example gradients one of three ways:

        gradients : Tensor (N, D)
            Any per-example gradients (flattened).
        last_layer : (inputs (N, d_in), output_grads (N, d_out))
            The last projection layer's inputs and the loss's gradient at its outputs; the
            features are :func:`last_layer_gradients` (outer products).
        learner : (q, k, logit_scale)
            JEST's call (so the selector drops into the same training loop): the
            features are each example's gradient of the super-batch's symmetric InfoNCE
            at its two embeddings, ``[dL/dq_i, dL/dk_i]`` (N, 2d) -- the last layer's
            output gradients, without its inputs. ``reference`` must be None (accepted
            only because JEST's loop passes it).

        sources : LongTensor (N,), optional
            Each example's source (data mixture component); default: one source.
        adam_state : Tensor or dict, optional
            Adam's ``exp_avg_sq`` for the parameter the gradients belong to (shape of the
            parameter, D elements), or that parameter's optimizer state
            (``optimizer.state[param]``, with ``exp_avg_sq`` and ``step``).
        batch_size : int, optional
            Override ``round((1 - filter_ratio) * N)``.
        step : int, optional
            Random step; default: the internal counter, which then advances by one.
        group : ProcessGroup, optional
            As :meth:`JointExampleSelector.select`: the inputs are this rank's shard (global
            index = the rank's offset + local index); the features and sources are
            all-gathered, every rank runs the same selection and rank 0's is broadcast.
        return_local : bool
            With ``group``: this rank's contiguous slice of the sorted global indices.
        return_weights : bool
            Return a :class:`CoLMSelection` (indices, weights, small) instead of indices.

        Returns
        -------
        LongTensor (b,) of super-batch indices, or :class:`CoLMSelection`.
        """
        if reference is not None:
            raise BatchlabInputError("CoLMSelector needs no reference model; pass reference=None")
        feats = self._features(gradients, last_layer, learner)
        src = self._sources(sources, feats.shape[0], feats.device)
        if group is not None:
            feats = _all_gather_rows(feats, group)
            src = _all_gather_rows(src[:, None].double(), group)[:, 0].long()
        n = feats.shape[0]
        b = self.batch_size(n) if batch_size is None else check_positive_int("batch_size", batch_size)
        if b > n or b < 1:
            raise BatchlabInputError(f"cannot choose {b} examples from a super-batch of {n}; load a larger super-batch")
        feats = self._normalise(feats, adam_state)
        if self.dims is not None and self.dims < feats.shape[1]:
            keep = feats.abs().mean(0).topk(self.dims).indices
            feats = feats[:, keep]
        if step is None:
            step = self.step
            self.step += 1
        else:  # 1.5 or "3" picked another step's noise, -1 failed inside numpy
            step = _check_index("step", step)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, int(step)]).generate_state(1)[0]))
        indices, weights, small = self._choose(feats, src, b, gen)
        weights = weights * (b / n)  # weights sum to N; scaled to average 1 over the coreset
        if group is not None:
            # every rank chose from the same data with the same noise; rank 0's choice is broadcast
            # anyway so that last-bit float differences can never split the ranks
            order = JointExampleSelector._agree(torch.cat([indices.double(), weights.double(), small.double()]), group)
            indices, weights, small = order[:b].long(), order[b:2 * b].to(weights.dtype), order[2 * b:].bool()
            if return_local:
                mine = JointExampleSelector._local_slice(torch.arange(b, device=indices.device), group)
                ranked = indices.argsort()[mine]
                indices, weights, small = indices[ranked], weights[ranked], small[ranked]
        if return_weights:
            return CoLMSelection(indices, weights, small)
        return indices

    # ------------------------------------------------------------------ the algorithm

    def _choose(self, feats, src, b: int, gen):
        device = feats.device
        values, counts = src.unique(return_counts=True)
        small_ids = self._small(values, counts)
        is_small = torch.isin(src, small_ids)
        small_idx = is_small.nonzero().flatten()
        if small_idx.numel() >= b:  # the small sources alone fill the batch: a uniform sample of them
            pick = torch.randperm(small_idx.numel(), generator=gen)[:b].to(device)
            weights = torch.full((b,), src.numel() / b, dtype=feats.dtype, device=device)  # uniform
            return small_idx[pick], weights, torch.ones(b, dtype=torch.bool, device=device)
        budget = b - small_idx.numel()
        small_set = set(small_ids.tolist())
        large = [(v, c) for v, c in zip(values.tolist(), counts.tolist()) if v not in small_set]
        shares = _largest_remainder([c for _, c in large], budget)
        parts, weights = [small_idx], [torch.ones(small_idx.numel(), dtype=feats.dtype, device=device)]
        for (value, _), share in zip(large, shares):
            members = (src == value).nonzero().flatten()
            if share == 0:
                continue
            medoids, sizes = facility_location(feats[members], share, gen)
            parts.append(members[medoids])
            weights.append(sizes.to(feats.dtype))
        # every large source's weights sum to its count; a source left without a medoid
        # (budget too small) is spread over the others so that the weights still sum to N
        total = sum(float(w.sum()) for w in weights)
        chosen, w = torch.cat(parts), torch.cat(weights)
        w[small_idx.numel():] *= (src.numel() - small_idx.numel()) / max(total - small_idx.numel(), 1e-12)
        small = torch.zeros(b, dtype=torch.bool, device=device)
        small[: small_idx.numel()] = True
        return chosen, w, small

    def _small(self, values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.small_sources is None:
            return values[:0]
        if self.small_sources == "auto":
            mean = counts.double().mean()
            return values[counts.double() < self.small_fraction * mean]
        return torch.tensor(self.small_sources, dtype=values.dtype, device=values.device)

    # ------------------------------------------------------------------ inputs

    def _features(self, gradients, last_layer, learner) -> torch.Tensor:
        given = [x is not None for x in (gradients, last_layer, learner)]
        if sum(given) != 1:
            raise BatchlabInputError("pass exactly one of gradients=, last_layer=(inputs, output_grads) or learner=(q, k, logit_scale)")
        if gradients is not None:
            check_embeddings("gradients", gradients)
            return gradients.detach().float()
        if last_layer is not None:
            if not isinstance(last_layer, (tuple, list)) or len(last_layer) != 2:
                raise BatchlabInputError("last_layer must be a pair (inputs (N, d_in), output_grads (N, d_out))")
            return last_layer_gradients(last_layer[0].detach().float(), last_layer[1].detach().float())
        if not isinstance(learner, (tuple, list)) or len(learner) != 3:
            raise BatchlabInputError("learner must be a tuple (q, k, logit_scale), as JointExampleSelector takes")
        from batchlab.losses import info_nce

        q, k, scale = learner
        scale = float(scale.detach()) if isinstance(scale, torch.Tensor) else float(scale)
        with torch.enable_grad():
            q = q.detach().float().requires_grad_(True)
            k = k.detach().float().requires_grad_(True)
            dq, dk = torch.autograd.grad(info_nce(q, k, scale, reduction="sum"), [q, k])
        return torch.cat([dq, dk], 1)

    def _normalise(self, feats: torch.Tensor, adam_state) -> torch.Tensor:
        if adam_state is None:
            return feats
        step = None
        if isinstance(adam_state, dict):
            if "exp_avg_sq" not in adam_state:
                raise BatchlabInputError("adam_state must hold 'exp_avg_sq' (optimizer.state[param] of Adam/AdamW)")
            step = adam_state.get("step")
            adam_state = adam_state["exp_avg_sq"]
        if not isinstance(adam_state, torch.Tensor) or adam_state.numel() != feats.shape[1]:
            raise BatchlabInputError(
                f"adam_state's exp_avg_sq must have one entry per gradient coordinate ({feats.shape[1]}), got "
                f"{tuple(getattr(adam_state, 'shape', ()))}"
            )
        v = adam_state.detach().reshape(-1).float().to(feats.device)
        if step is not None and float(step) > 0:
            v = v / (1 - self.beta2 ** float(step))
        return feats / (v.sqrt() + self.eps)

    @staticmethod
    def _sources(sources, n: int, device) -> torch.Tensor:
        if sources is None:
            return torch.zeros(n, dtype=torch.long, device=device)
        if not isinstance(sources, torch.Tensor) or sources.dtype not in (torch.int64, torch.int32) or tuple(sources.shape) != (n,):
            raise BatchlabInputError(f"sources must be an integer tensor of shape ({n},), one source id per example")
        return sources.to(device, torch.long)


def facility_location(feats: torch.Tensor, k: int, gen: torch.Generator | None = None):
    """Greedy facility location (L1 distances): ``k`` medoid positions and their cluster sizes.

    Maximises ``sum_i max_{j in S} (d_max - ||f_i - f_j||_1)`` one medoid at a time (the
    greedy is within ``1 - 1/e`` of the optimum); ties are broken by a seeded jitter far
    below any distance. ``O(k n^2)`` on an (n, n) distance matrix.
    """
    n = feats.shape[0]
    dist = torch.cdist(feats[None], feats[None], p=1)[0]
    sim = dist.max() - dist
    jitter = torch.rand(n, generator=gen).to(feats.device) * 1e-9 * float(sim.max().clamp(min=1e-30))
    best = torch.zeros(n, dtype=sim.dtype, device=feats.device)
    taken = torch.zeros(n, dtype=torch.bool, device=feats.device)
    medoids = []
    for _ in range(min(k, n)):
        gain = (sim - best[:, None]).clamp(min=0).sum(0) + jitter
        gain = gain.masked_fill(taken, float("-inf"))
        j = int(gain.argmax())
        medoids.append(j)
        taken[j] = True
        best = torch.maximum(best, sim[:, j])
    medoids_t = torch.tensor(medoids, dtype=torch.long, device=feats.device)
    nearest = dist[:, medoids_t].argmin(1)
    sizes = torch.bincount(nearest, minlength=len(medoids))
    return medoids_t, sizes


def _largest_remainder(counts: list[int], budget: int) -> list[int]:
    """Split ``budget`` in proportion to ``counts`` (integers, each at most its count)."""
    total = sum(counts)
    if total == 0 or budget <= 0:
        return [0] * len(counts)
    exact = [budget * c / total for c in counts]
    shares = [min(int(e), c) for e, c in zip(exact, counts)]
    order = sorted(range(len(counts)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in order * 2:
        if sum(shares) >= budget:
            break
        if shares[i] < counts[i]:
            shares[i] += 1
    return shares
