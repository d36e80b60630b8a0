r"""Joint example selection (JEST): choose a learnable batch from a super-batch, online.

JEST (Evans, Parthasarathy et al., "Data curation via joint example selection further
accelerates multimodal learning", arXiv 2406.17711) scores a *batch*, not single
examples: the learnability of a batch ``B`` is the learner's contrastive loss on ``B``
minus a reference model's loss on ``B``, both computed **within** ``B`` (the other
members of ``B`` are the negatives). A batch of size ``b`` is drawn from a super-batch
of ``N = b / (1 - filter_ratio)`` in ``n_chunks`` chunks (blocked Gibbs sampling): the
first chunk at random (or by each example's own score), then every later chunk without
replacement with probability proportional to ``exp(conditional score)``, the score of
a candidate given the examples already chosen.

The math
--------
Write ``l_ij = s * q_i . k_j`` (``+ b`` for SigLIP) for one model's logits and ``S`` for
the examples already selected. The batch loss is the **sum** over the batch's pairs or
examples (what ``info_nce(..., reduction="sum")`` / ``siglip(..., reduction="sum")``
return on the sub-batch). The conditional score of a candidate ``i`` is the increment

    Delta(i | S) = Loss(S + {i}) - Loss(S),

taken for the learner (``L``) and the reference (``R``) and combined by ``score``:

* ``"learnability"``: ``Delta_L - Delta_R`` (the paper's default);
* ``"hard_learner"``: ``Delta_L`` (the reference is not needed);
* ``"easy_reference"``: ``-Delta_R`` (the learner is not needed).

**SigLIP** is a sum of independent pair terms ``p_ij = softplus(-y_ij l_ij)`` (``y = +1``
on the diagonal, ``-1`` off it), so the increment is exact and additive:

    Delta(i | S) = p_ii + sum_{s in S} (p_is + p_si).

The selector keeps ``sum_{s in S} (p_is + p_si)`` per candidate and adds one chunk's
columns at a time.

**InfoNCE** (symmetric CLIP, per-pair loss ``(row_i + col_i) / 2``) is not a sum of pair
terms: adding ``i`` changes the log-sum-exp of every selected example too. With the
row and column log-sum-exps over the selected set, kept for every example ``j``,

    r_j = log sum_{s in S} exp(l_js),        c_j = log sum_{s in S} exp(l_sj),

the exact increment is

    Delta(i | S) = 1/2 [softplus(r_i - l_ii) + softplus(c_i - l_ii)]                (i's own loss in S + {i})
                 + 1/2 sum_{s in S} [softplus(l_si - r_s) + softplus(l_is - c_s)]   (the rise of every s's loss)

because ``log(e^r + e^l) - l = softplus(r - l)`` and
``log(e^{r_s} + e^{l_si}) - r_s = softplus(l_si - r_s)``. (For ``symmetric=False`` only
the row terms remain, with weight 1.) ``r`` and ``c`` are running log-sum-exps: each
chunk adds its ``N x chunk`` block of logits, ``O(N * chunk * d)``. The second sum has to
be recomputed at every step because every ``r_s`` grows; it costs ``O(N * |S| * d)`` per
step, so the whole selection costs about ``(n_chunks + 1) / 2`` times the ``N x b``
logits of SigLIP's. ``impl="torch"`` computes it in ``(pairs, |S|, block)`` tiles of at
most ``2**25`` logits (no ``N x N`` matrix); ``impl="triton"`` (the CUDA default) fuses
product, softplus and sum in one kernel that writes only ``(pairs, N)`` sums
(:mod:`batchlab.samplers._jest_triton`).

Implementation: the (model, direction) pairs -- learner rows and columns, reference rows
and columns -- are stacked into ``(P, N, d)`` tensors (each ``x`` pre-multiplied by its
model's scale, zero-padded when the two models' dimensions differ), so every step is a
handful of batched kernels; on an H100 the per-op launch overhead, not the arithmetic,
was what a per-model loop paid for.

A singleton batch has zero InfoNCE loss, so ``Delta(i | {})`` is 0 for every ``i``:
with ``first_chunk="score"`` and InfoNCE the first chunk is drawn by each example's
learnability against the **whole** super-batch (its independent score, one blocked
``N x N`` pass through :func:`batchlab.losses.info_nce`); with SigLIP by the diagonal
term ``p_ii`` as in the paper's algorithm.

Sampling
--------
A chunk of ``c`` is drawn without replacement with probability proportional to
``exp(score)`` by the Gumbel-top-k trick: ``topk(score + Gumbel noise, c)`` over the
candidates not yet chosen (exactly sequential sampling without replacement). The noise
comes from a CPU ``torch.Generator`` seeded with ``(seed, step)``, so a seed gives the
same noise on every device and every rank; the selection can still differ across
*device types* where float scores differ in the last bits. ``step`` counts ``select``
calls (kept in :meth:`JointExampleSelector.state_dict` for resumption) unless passed.

Cost on the GPU: everything stays on the inputs' device, in float32; with
``precision="tf32"`` (the default) the matmuls on CUDA use TF32 (inputs rounded to 10
mantissa bits: logit errors near ``scale * 5e-4``, far below the Gumbel noise's spread
of 1.3), ``"float32"`` keeps full float32 products, ``"bf16"`` gives the Triton kernel
bf16 operands (fp32 sums). The Gumbel noise is one host-to-device copy of
``n_chunks x N`` floats.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from batchlab._checks import (
    check_choice,
    check_embeddings,
    check_normalized,
    check_positive_int,
    check_same_device_dtype,
)
from batchlab.errors import BatchlabInputError
from batchlab.samplers.base import _check_index

logger = logging.getLogger(__name__)

__all__ = ["JointExampleSelector", "JESTSelection"]

SCORES = ("learnability", "hard_learner", "easy_reference")
LOSSES = ("info_nce", "siglip")
FIRST_CHUNK = ("random", "score")

# Elements of one |S| x block logits tile (128 MB in fp32): large enough that a step is a
# handful of big kernels, small enough to stay far below the memory of a training step.
_TILE_ELEMENTS = 1 << 25


class JESTSelection(NamedTuple):
    """What :meth:`JointExampleSelector.select` returns with ``return_scores=True``.

    indices : LongTensor (b,) -- the chosen examples, in selection order (or this rank's slice).
    scores : Tensor (n_chunks, N) -- the conditional score of every candidate at each step
        (row 0: the first chunk's scores, all zero for ``first_chunk="random"``), ``-inf``
        for examples already chosen before that step.
    chunk_sizes : list[int] -- how many examples each step chose.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    chunk_sizes: list[int]


class _Model(NamedTuple):
    q: torch.Tensor  # (N, d) float32
    k: torch.Tensor  # (N, d) float32
    scale: float
    bias: float


class JointExampleSelector:
    """Choose a sub-batch of a super-batch by joint learnability (JEST).

    Parameters
    ----------
    n_chunks : int
        Number of blocked-Gibbs steps; each chooses about ``b / n_chunks`` examples (16).
    filter_ratio : float
        Fraction of the super-batch filtered out: ``b = round((1 - filter_ratio) * N)`` (0.8).
    score : "learnability" | "hard_learner" | "easy_reference"
        ``Delta_learner - Delta_reference``, ``Delta_learner`` or ``-Delta_reference``.
    loss : "info_nce" | "siglip"
        The contrastive loss whose within-batch value defines the scores.
    first_chunk : "random" | "score"
        Draw the first chunk uniformly, or with probability ``exp(own score)``.
    seed : int
        Seed of the Gumbel noise; with the step counter it fixes the selection.
    symmetric : bool
        InfoNCE only: the symmetric (CLIP) loss (default) or the one-way query->key loss.
    block_size : int, optional
        Candidates per tile in the InfoNCE neighbour term; default: as many as fit a
        ``2**25``-element tile.
    precision : "tf32" | "float32" | "bf16"
        Matmul precision on CUDA (CPU is always float32); see the module docstring.
        ``"bf16"`` (bf16 products, fp32 sums) needs ``impl="triton"``.
    impl : "auto" | "torch" | "triton"
        How the InfoNCE neighbour term is computed: cuBLAS tiles + softplus + sum
        (``torch``), or one fused Triton kernel that never writes the tiles
        (``triton``, CUDA; the CPU only under ``TRITON_INTERPRET=1``). ``auto``: Triton on
        CUDA when it imports, else torch.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> g = torch.Generator().manual_seed(0)
    >>> emb = lambda: F.normalize(torch.randn(100, 16, generator=g), dim=1)
    >>> sel = JointExampleSelector(n_chunks=4, filter_ratio=0.8, seed=0)
    >>> idx = sel.select(learner=(emb(), emb(), 10.0), reference=(emb(), emb(), 10.0))
    >>> idx.shape, idx.unique().numel()
    (torch.Size([20]), 20)
    """

    def __init__(
        self,
        n_chunks: int = 16,
        filter_ratio: float = 0.8,
        score: str = "learnability",
        loss: str = "info_nce",
        first_chunk: str = "random",
        seed: int = 0,
        *,
        symmetric: bool = True,
        block_size: int | None = None,
        precision: str = "tf32",
        impl: str = "auto",
    ) -> None:
        self.n_chunks = check_positive_int("n_chunks", n_chunks)
        if isinstance(filter_ratio, bool) or not isinstance(filter_ratio, (int, float)) or not 0 <= filter_ratio < 1:
            raise BatchlabInputError(
                f"filter_ratio must be a number in [0, 1) (the fraction of the super-batch left out), got {filter_ratio!r}"
            )
        self.filter_ratio = float(filter_ratio)
        self.score = check_choice("score", score, SCORES)
        self.loss = check_choice("loss", loss, LOSSES)
        self.first_chunk = check_choice("first_chunk", first_chunk, FIRST_CHUNK)
        self.seed = _check_index("seed", seed)  # numpy ints welcome, as load_state_dict takes them
        self.symmetric = bool(symmetric)
        self.block_size = None if block_size is None else check_positive_int("block_size", block_size)
        self.precision = check_choice("precision", precision, ("tf32", "float32", "bf16"))
        self.impl = check_choice("impl", impl, ("auto", "torch", "triton"))
        self.step = 0

    # ------------------------------------------------------------------ public API

    def batch_size(self, n: int) -> int:
        """Size of the chosen batch for a super-batch of ``n``: ``round((1 - filter_ratio) * n)``."""
        return int(round((1.0 - self.filter_ratio) * n))

    #: Settings that shape which examples a step selects: a state saved with other values is refused.
    #: (block_size, precision and impl change only how the scores are computed.)
    STATE_SETTINGS: tuple[str, ...] = ("n_chunks", "filter_ratio", "score", "loss", "first_chunk", "symmetric")

    def state_dict(self) -> dict:
        """The seed, the step counter (how many selections were made), the class and its selection settings.

        >>> JointExampleSelector(seed=3).state_dict()["step"]
        0
        """
        settings = {key: getattr(self, key) for key in self.STATE_SETTINGS}
        return {"selector": type(self).__name__, "seed": self.seed, "step": self.step, "settings": settings}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next ``select`` draws the noise it would have drawn without the break.

        A state of another selector class or saved with other selection settings is refused (the
        message lists every difference); a state without them (saved before they were recorded) loads
        with a warning.
        """
        if not isinstance(state, dict) or not {"seed", "step"} <= set(state) <= {"seed", "step", "selector", "settings"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise BatchlabInputError(
                f"state must be the dict from state_dict() (keys 'seed', 'step', 'selector', 'settings'), got {got}"
            )
        for key in ("seed", "step"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise BatchlabInputError(
                    f"state[{key!r}] must be a non-negative integer (as state_dict() saves it), got {value!r}"
                )
        if "selector" not in state or "settings" not in state:
            logger.warning("%s: the state records no selector class or settings (saved by an older batchlab); "
                           "resuming without checking them", type(self).__name__)
        else:
            mine = self.state_dict()
            differences = []
            if state["selector"] != mine["selector"]:
                differences.append(f"selector {state['selector']!r} in the state but {mine['selector']!r} here")
            saved = state["settings"] if isinstance(state["settings"], dict) else {}
            for key in sorted(set(saved) | set(mine["settings"])):
                if saved.get(key, "<missing>") != mine["settings"].get(key, "<missing>"):
                    differences.append(f"{key}={saved.get(key, '<missing>')!r} in the state but "
                                       f"{mine['settings'].get(key, '<missing>')!r} here")
            if differences:
                raise BatchlabInputError(
                    "cannot resume: the state was saved by another selector: " + "; ".join(differences)
                    + ". Build the selector with the settings it had when the state was saved"
                )
        self.seed, self.step = int(state["seed"]), int(state["step"])

    @torch.no_grad()
    def select(
        self,
        learner: Sequence | None = None,
        reference: Sequence | None = None,
        *,
        batch_size: int | None = None,
        step: int | None = None,
        group=None,
        return_local: bool = False,
        return_scores: bool = False,
    ):
        """Choose the sub-batch.

        Parameters
        ----------
        learner, reference : (q, k, logit_scale) or (q, k, logit_scale, logit_bias)
            Each model's embeddings of the super-batch: ``q``, ``k`` (N, d) L2-normalised
            (image/text or query/document), the multiplier ``logit_scale`` (float or 0-d
            tensor) and, for SigLIP, ``logit_bias``. ``hard_learner`` needs only the learner,
            ``easy_reference`` only the reference. No gradient flows (embeddings are detached).
        batch_size : int, optional
            Override ``round((1 - filter_ratio) * N)``.
        step : int, optional
            Noise step. Default: the internal counter, which then advances by one; an
            explicit ``step`` leaves the counter alone.
        group : ProcessGroup, optional
            ``None``: the inputs are the whole super-batch. A process group (e.g.
            ``torch.distributed.group.WORLD``): the inputs are this rank's shard, global
            index = offset of the rank's shard (ranks in order) + local index; the shards
            are all-gathered, every rank runs the same selection and rank 0's result is
            broadcast, so all ranks agree exactly.
        return_local : bool
            With ``group``: return this rank's contiguous slice of the *sorted* global
            indices (the union over ranks is the chosen batch; with contiguous shards most
            of a rank's slice is data it already holds). Without ``group`` it is ignored.
        return_scores : bool
            Also return the per-step conditional scores (:class:`JESTSelection`).

        Returns
        -------
        LongTensor (b,) on the inputs' device, global indices in selection order (or this
        rank's slice), or a :class:`JESTSelection` when ``return_scores``.
        """
        learner_m, reference_m, device = self._prepare(learner, reference, group)
        n = (learner_m or reference_m).q.shape[0]
        b = self.batch_size(n) if batch_size is None else check_positive_int("batch_size", batch_size)
        if b > n:
            raise BatchlabInputError(
                f"the super-batch ({n} examples) is smaller than the batch to choose ({b}); "
                "load a larger super-batch or choose fewer examples"
            )
        if b < self.n_chunks:
            raise BatchlabInputError(
                f"cannot choose {b} examples in n_chunks={self.n_chunks} chunks from a super-batch of {n}; "
                f"use a super-batch of at least {int(np.ceil(self.n_chunks / max(1e-9, 1 - self.filter_ratio)))} "
                "examples, or fewer chunks"
            )
        self._impl = self._resolve_impl(device)
        if step is None:
            step = self.step
            self.step += 1
        else:  # 1.5 or "3" picked another step's noise, -1 failed inside numpy
            step = _check_index("step", step)

        sizes = [b // self.n_chunks + (1 if c < b % self.n_chunks else 0) for c in range(self.n_chunks)]
        gumbel = self._gumbel(step, n, device)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            # Scoped, restored below: the caller's global setting is left as it was.
            # bf16 (the Triton kernel's operands) keeps TF32 for the running sums' products
            torch.backends.cuda.matmul.allow_tf32 = self.precision in ("tf32", "bf16")
            indices, scores = self._run(learner_m, reference_m, sizes, gumbel)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32

        if group is not None:
            indices = self._agree(indices, group)
            if return_local:
                indices = self._local_slice(indices, group)
        return JESTSelection(indices, scores, sizes) if return_scores else indices

    # ------------------------------------------------------------------ the algorithm

    def _run(self, learner: _Model | None, reference: _Model | None, sizes: list[int], gumbel: torch.Tensor):
        models = [(m, w) for m, w in ((learner, 1.0), (reference, -1.0)) if m is not None]
        n = models[0][0].q.shape[0]
        device = models[0][0].q.device
        st = self._stack(models)
        chosen = torch.zeros(n, dtype=torch.bool, device=device)
        order = torch.empty(sum(sizes), dtype=torch.long, device=device)
        history = torch.empty(len(sizes), n, device=device)
        count = 0
        for t, size in enumerate(sizes):
            score = self._first_scores(models, n, device) if t == 0 else self._scores(st, order[:count])
            score = score.masked_fill(chosen, float("-inf"))
            history[t] = score
            new = torch.topk(score + gumbel[t], size).indices
            chosen[new] = True
            order[count:count + size] = new
            count += size
            if t + 1 < len(sizes):
                self._add_chunk(st, new)
            if logger.isEnabledFor(logging.DEBUG):  # float() syncs the GPU: only when asked
                logger.debug("JEST step %d: chose %d, mean score %.4g", t, size, float(score[new].mean()))
        return order, history

    def _stack(self, models) -> dict:
        """Stack every (model, direction) pair so that each step is a few batched kernels.

        Pair ``p`` holds ``x_p`` (scaled by its model's logit scale) and ``y_p`` such that
        ``x_p[j] . y_p[s] + bias_p`` is ``l_js`` (row direction: ``x = s q``, ``y = k``) or
        ``l_sj`` (column direction: ``x = s k``, ``y = q``), and the weight ``w_p`` =
        model sign (learner +1, reference -1) x direction weight.
        """
        wr, wc = (0.5, 0.5) if self.symmetric else (1.0, 0.0)
        if self.loss == "siglip":
            wr, wc = 1.0, 1.0  # p_is and p_si both count in full
        xs, ys, bias, w, own_w = [], [], [], [], []
        for m, sign in models:
            for x, y, wdir, row in ((m.q, m.k, wr, True), (m.k, m.q, wc, False)):
                if wdir:
                    xs.append(x * m.scale)
                    ys.append(y)
                    bias.append(m.bias)
                    w.append(sign * wdir)
                    own_w.append(sign if row else 0.0)
        device = xs[0].device
        # learner and reference may embed in different dimensions: zero-padding keeps every dot product
        width = max(x.shape[1] for x in xs)
        xs = [F.pad(x, (0, width - x.shape[1])) for x in xs]
        ys = [F.pad(y, (0, width - y.shape[1])) for y in ys]
        st = {"x": torch.stack(xs), "y": torch.stack(ys),
              "bias": torch.tensor(bias, device=device).view(-1, 1, 1),
              "w": torch.tensor(w, device=device).view(-1, 1)}
        diag = (st["x"] * st["y"]).sum(-1) + st["bias"][:, :, 0]  # (P, N): l_ii (q.k = k.q: same both ways)
        if self.loss == "siglip":
            # own[i] = sum over models of sign * p_ii; pair[p, i] = sum_{s in S} p-direction term
            own_w = torch.tensor(own_w, device=device).view(-1, 1)
            st["own"] = (own_w * F.softplus(-diag)).sum(0)
            st["pair"] = torch.zeros_like(diag)
            return st
        st["diag"] = diag
        st["lse"] = torch.full_like(diag, float("-inf"))  # r_j (row pairs) or c_j (column pairs) over S
        if self._impl == "triton":
            # the kernel's operands: bf16 copies (half the bytes, twice the matrix-unit rate) or fp32
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            st["kx"], st["ky"] = st["x"].to(dtype), st["y"].to(dtype)
        return st

    def _add_chunk(self, st: dict, new: torch.Tensor) -> None:
        """Fold the chunk ``new`` into the running sums: one (P, N, chunk) batched product."""
        logits = torch.baddbmm(st["bias"], st["x"], st["y"][:, new].transpose(1, 2))  # (P, N, c)
        if self.loss == "siglip":
            # negatives' terms softplus(l); the diagonal entries belong to chosen examples (masked)
            st["pair"] += F.softplus(logits).sum(2)
            return
        st["lse"] = torch.logaddexp(st["lse"], torch.logsumexp(logits, 2))

    def _scores(self, st: dict, selected: torch.Tensor) -> torch.Tensor:
        """``sum_p w_p Delta_p(i | S)`` for every example ``i`` (meaningless, and masked, for i in S)."""
        if self.loss == "siglip":
            return st["own"] + (st["w"] * st["pair"]).sum(0)
        lse_s = st["lse"][:, selected]  # (P, |S|): r_s or c_s
        own = F.softplus(st["lse"] - st["diag"])  # i's own loss in S + {i}
        if self._impl == "triton":
            from batchlab.samplers._jest_triton import neighbour_sum

            near = neighbour_sum(st["kx"][:, selected], st["ky"], lse_s, precision=self.precision)
        else:
            near = self._neighbour_term(st, selected, lse_s)
        return (st["w"] * (own + near)).sum(0)

    def _neighbour_term(self, st: dict, selected: torch.Tensor, lse_s: torch.Tensor) -> torch.Tensor:
        """``near[p, i] = sum_{s in S} softplus(x_p[s] . y_p[i] - lse_p[s])`` in candidate blocks (torch)."""
        x_s = st["x"][:, selected]  # (P, |S|, d)
        pairs, size = x_s.shape[:2]
        n = st["y"].shape[1]
        block = self.block_size or max(256, _TILE_ELEMENTS // max(pairs * size, 1))
        out = torch.empty(pairs, n, device=x_s.device)
        neg_lse = -lse_s[:, :, None]
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            # baddbmm puts the "- lse_s" into the matmul epilogue: one (P, |S|, block) tile
            tile = torch.baddbmm(neg_lse, x_s, st["y"][:, lo:hi].transpose(1, 2))
            out[:, lo:hi] = F.softplus(tile).sum(1)
        return out

    def _first_scores(self, models, n: int, device) -> torch.Tensor:
        score = torch.zeros(n, device=device)
        if self.first_chunk == "random":
            return score
        for m, w in models:
            if self.loss == "siglip":
                own = F.softplus(-(m.scale * (m.q * m.k).sum(1) + m.bias))
            else:
                from batchlab.losses import info_nce

                own = info_nce(m.q, m.k, m.scale, symmetric=self.symmetric, reduction="none").float()
            score += w * own
        return score

    # ------------------------------------------------------------------ inputs, noise, ranks

    def _resolve_impl(self, device: torch.device) -> str:
        impl = self.impl
        if impl == "auto":
            impl = "torch"
            if device.type == "cuda" and self.loss == "info_nce":
                try:
                    from batchlab.losses.triton import triton_available

                    impl = "triton" if triton_available(device) else "torch"
                except ImportError:
                    pass
        if impl == "triton" and self.loss == "info_nce":
            from batchlab.losses.triton import triton_available  # ImportError: no Triton here

            if not triton_available(device):
                raise BatchlabInputError(
                    f"impl='triton' needs a CUDA GPU of compute capability 8.0+ (or TRITON_INTERPRET=1 on the CPU), "
                    f"got {device}; use impl='torch'"
                )
        if self.precision == "bf16" and not (impl == "triton" and self.loss == "info_nce"):
            raise BatchlabInputError(
                "precision='bf16' needs impl='triton' and loss='info_nce' (bf16 products with fp32 sums in the fused "
                "kernel); use precision='tf32' or 'float32'"
            )
        return impl

    def _gumbel(self, step: int, n: int, device) -> torch.Tensor:
        # (seed, step) mixed by numpy's SeedSequence: nearby seeds/steps give unrelated streams.
        mixed = int(np.random.SeedSequence([self.seed, int(step)]).generate_state(1, dtype=np.uint64)[0] >> 1)
        gen = torch.Generator().manual_seed(mixed)
        u = torch.rand(self.n_chunks, n, generator=gen).clamp_(min=1e-12)
        return (-torch.log(-torch.log(u))).to(device)

    def _prepare(self, learner, reference, group):
        need_l = self.score in ("learnability", "hard_learner")
        need_r = self.score in ("learnability", "easy_reference")
        if need_l and learner is None:
            raise BatchlabInputError(f"score={self.score!r} needs the learner's (q, k, logit_scale); pass learner=")
        if need_r and reference is None:
            raise BatchlabInputError(f"score={self.score!r} needs the reference's (q, k, logit_scale); pass reference=")
        lm = self._model("learner", learner, group) if need_l else None
        rm = self._model("reference", reference, group) if need_r else None
        if lm is not None and rm is not None:
            if lm.q.shape[0] != rm.q.shape[0]:
                raise BatchlabInputError(
                    f"learner and reference embed different super-batches ({lm.q.shape[0]} vs "
                    f"{rm.q.shape[0]} examples); both must embed the same N examples in the same order"
                )
            if lm.q.device != rm.q.device:
                raise BatchlabInputError(
                    f"learner embeddings are on {lm.q.device} but reference embeddings on {rm.q.device}; "
                    "move both to one device"
                )
        return lm, rm, (lm or rm).q.device

    def _model(self, name: str, spec, group) -> _Model:
        if not isinstance(spec, (tuple, list)) or len(spec) not in (3, 4):
            raise BatchlabInputError(
                f"{name} must be a tuple (q, k, logit_scale) or (q, k, logit_scale, logit_bias), got {type(spec).__name__}"
                + (f" of length {len(spec)}" if isinstance(spec, (tuple, list)) else "")
            )
        q, k, scale = spec[:3]
        bias = spec[3] if len(spec) == 4 else None
        check_embeddings(f"{name} q", q)
        check_embeddings(f"{name} k", k)
        check_same_device_dtype([f"{name} q", f"{name} k"], [q, k])
        check_normalized(f"{name} q", q)
        check_normalized(f"{name} k", k)
        if q.shape != k.shape:
            raise BatchlabInputError(
                f"{name} q and k must have the same shape (one key per query), got {tuple(q.shape)} and {tuple(k.shape)}"
            )
        scale = _scalar(f"{name} logit_scale", scale)
        if self.loss == "siglip":
            if bias is None:
                raise BatchlabInputError(f"loss='siglip' needs {name}=(q, k, logit_scale, logit_bias)")
            bias = _scalar(f"{name} logit_bias", bias)
        else:
            if bias is not None:
                raise BatchlabInputError(
                    f"{name} has a logit_bias but loss='info_nce' has none; pass (q, k, logit_scale) or use loss='siglip'"
                )
            bias = 0.0
        q, k = q.detach().float(), k.detach().float()
        if group is not None:
            q, k = _all_gather_rows(q, group), _all_gather_rows(k, group)
        return _Model(q.contiguous(), k.contiguous(), scale, bias)

    @staticmethod
    def _agree(indices: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        # Every rank computed the same thing from the same data and noise; rank 0's result is
        # broadcast anyway so that last-bit float differences can never split the ranks.
        backend_device = indices.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        buf = indices.to(backend_device)
        dist.broadcast(buf, src=dist.get_global_rank(group, 0) if hasattr(dist, "get_global_rank") else 0, group=group)
        return buf.to(indices.device)

    @staticmethod
    def _local_slice(indices: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ordered = indices.sort().values
        b = ordered.numel()
        lo, hi = rank * b // world, (rank + 1) * b // world
        return ordered[lo:hi]


def _scalar(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise BatchlabInputError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        value = float(value.detach().float().cpu())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise BatchlabInputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's (n_r, d) rows in rank order (shards may differ in length)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise BatchlabInputError("group was given but torch.distributed is not initialised; call init_process_group first")
    world = dist.get_world_size(group)
    comm_device = x.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    local = x.to(comm_device)
    sizes = [torch.zeros(1, dtype=torch.long, device=comm_device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=comm_device), group=group)
    counts = [int(s) for s in sizes]
    top = max(counts)
    padded = torch.zeros(top, x.shape[1], dtype=x.dtype, device=comm_device)
    padded[: local.shape[0]] = local
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return torch.cat([buf[:c] for buf, c in zip(bufs, counts)]).to(x.device)
