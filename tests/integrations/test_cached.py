"""Gradient-cached losses (batchlab's EmbeddingCache) against sentence-transformers' cached and plain losses.

Tolerance 1e-5 relative in fp32, as in test_losses.py. The tiny model has no dropout, so
every forward of a mini-batch gives the same embeddings on both sides.
"""

import pytest
import torch
from sentence_transformers.sentence_transformer import losses as st_losses

from batchlab.errors import BatchlabInputError
from batchlab.integrations.sentence_transformers import CachedGISTEmbedLoss, CachedMultipleNegativesRankingLoss
from batchlab.integrations.sentence_transformers import RowBlocks
from batchlab.integrations.sentence_transformers import cached as cached_module
from tests.integrations.conftest import columns, load
from tests.integrations.helpers import assert_same, rel_err, value_and_grads


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load(tiny_dir)


@pytest.fixture(scope="module")
def guide(guide_dir):
    return load(guide_dir)


@pytest.mark.parametrize("n_columns,mini_batch_size,options", [
    (2, 2, {}),
    (4, 3, {}),
    (3, 1, {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}),
    (3, 4, {"directions": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")}),
    (2, 8, {"scale": 5.0}),
])
def test_cached_mnrl_matches(model, n_columns, mini_batch_size, options):
    features = columns(model, 5, n_columns)
    ours = value_and_grads(CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, **options),
                           model, features)
    st_cached = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, **options)
    assert_same(ours, value_and_grads(st_cached, model, features))
    assert_same(ours, value_and_grads(st_losses.MultipleNegativesRankingLoss(model, **options), model, features))


@pytest.mark.parametrize("n_columns,options", [(2, {}), (3, {"margin": 0.05}), (3, {"contrast_anchors": False}),
                                                (2, {"margin_strategy": "relative", "margin": 0.1})])
def test_cached_gist_matches(model, guide, n_columns, options):
    features = columns(model, 6, n_columns, shift=1)
    ours = value_and_grads(CachedGISTEmbedLoss(model, guide, mini_batch_size=4, **options), model, features)
    theirs = value_and_grads(st_losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=4, **options), model, features)
    assert_same(ours, theirs)


def test_row_blocks_is_exported_with_the_losses():
    """The docs import RowBlocks beside the losses; it is batchlab.losses' own class."""
    import batchlab.integrations.sentence_transformers as st_integration
    from batchlab.losses import RowBlocks as loss_row_blocks

    assert RowBlocks is loss_row_blocks and "RowBlocks" in st_integration.__all__


@pytest.fixture
def row_calls(monkeypatch):
    """How many times the cached loss took the row-block pass."""
    calls = []
    original = cached_module.row_block_info_nce

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cached_module, "row_block_info_nce", spy)
    return calls


ROW_BLOCKS = {"torch": RowBlocks(fused=False), "blocks-of-2-split-5": RowBlocks(block_bytes=2 * 4 * 5, split=5),
              "3xtf32": RowBlocks(block_bytes=2 * 4 * 20, fused=False, products="3xtf32")}


@pytest.mark.parametrize("blocks", list(ROW_BLOCKS))
@pytest.mark.parametrize("n_rows,n_columns,mini_batch_size,options", [
    (5, 2, 2, {}), (5, 4, 3, {}), (5, 2, 8, {"scale": 5.0}), (1, 3, 1, {}), (1, 2, 1, {}),
])
def test_row_blocks_match(model, row_calls, blocks, n_rows, n_columns, mini_batch_size, options):
    """impl="rows" (the CUDA default of "auto" for query_to_doc) against sentence-transformers' cached loss."""
    features = columns(model, n_rows, n_columns)
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, impl="rows",
                                              row_blocks=ROW_BLOCKS[blocks], **options)
    ours = value_and_grads(loss, model, features)
    assert row_calls  # the row-block pass ran
    st_cached = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, **options)
    theirs = value_and_grads(st_cached, model, features)
    if n_rows == 1 and n_columns == 2:  # one pair: the loss is 0 and no parameter gets a gradient on either side
        assert float(ours[0]) == float(theirs[0]) == 0.0
        assert all(float(g.abs().max()) == 0 for g in ours[1].values())
    else:
        assert_same(ours, theirs)


def test_row_blocks_only_for_query_to_doc(model, row_calls):
    """Other directions fall back to info_nce (and still match), as does "auto" on the CPU."""
    features = columns(model, 5, 3)
    options = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
    ours = value_and_grads(CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, impl="rows", **options),
                           model, features)
    theirs = value_and_grads(st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, **options),
                             model, features)
    assert_same(ours, theirs)
    value_and_grads(CachedMultipleNegativesRankingLoss(model, mini_batch_size=2), model, features)
    assert not row_calls


def test_bf16_loss_dtype(model):
    """The opt-in bf16 loss phase: close to fp32, not equal (bf16 unit embeddings: 2^-9 relative per entry)."""
    features = columns(model, 6, 3)
    ours = value_and_grads(CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, loss_dtype=torch.bfloat16),
                           model, features)
    theirs = value_and_grads(st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4), model, features)
    flat = [torch.cat([g[k].flatten() for k in sorted(g)]) for g in (ours[1], theirs[1])]
    assert rel_err(ours[0], theirs[0]) <= 1e-2 and rel_err(flat[0], flat[1]) <= 5e-2
    assert rel_err(flat[0], flat[1]) > 1e-6  # really computed in bf16


def test_embeddings_freed_before_the_re_encode(model, monkeypatch):
    """As in sentence-transformers, only the embeddings' gradients stay alive until the trainer's backward."""
    import gc
    import weakref

    from batchlab.losses import EmbeddingCache

    alive = []
    encode = EmbeddingCache.encode

    def recording(self, *inputs):
        out = encode(self, *inputs)
        alive.extend(weakref.ref(e) for e in out)
        return out

    monkeypatch.setattr(EmbeddingCache, "encode", recording)
    features = columns(model, 5, 3)
    model.zero_grad(set_to_none=True)
    value = CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, impl="rows")([dict(f) for f in features], None)
    gc.collect()
    assert len(alive) == 3 and all(ref() is None for ref in alive)
    value.backward()  # the re-encode from the gradients alone
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    theirs = value_and_grads(st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2), model, features)
    assert_same((value.detach(), grads), theirs)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("impl", ["auto", "rows"])
def test_offloaded_gradients_match(model, guide, impl):
    """offload_gradients=True (the CUDA default; on the CPU a host copy): the same re-encode, chunk by chunk."""
    features = columns(model, 5, 3)
    ours = value_and_grads(CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, impl=impl,
                                                              offload_gradients=True), model, features)
    theirs = value_and_grads(st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2), model, features)
    assert_same(ours, theirs)
    features = columns(model, 6, 2, shift=1)
    ours = value_and_grads(CachedGISTEmbedLoss(model, guide, mini_batch_size=4, offload_gradients=True), model,
                           features)
    assert_same(ours, value_and_grads(st_losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=4), model, features))


@pytest.mark.parametrize("impl", ["auto", "rows"])
def test_backward_scaled_by_upstream_gradient(model, impl):
    """Gradient accumulation and loss scaling reach the re-encoded mini-batches (offloaded ones too)."""
    features = columns(model, 4, 2)
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, impl=impl, offload_gradients=impl == "rows")
    _, full = value_and_grads(loss, model, features)
    model.zero_grad(set_to_none=True)
    (loss([dict(f) for f in features], None) * 0.25).backward()
    scaled = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.grad is not None])
    assert rel_err(scaled, 0.25 * torch.cat([full[k].flatten() for k in sorted(full)])) <= 1e-6
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("impl", ["auto", "rows"])
def test_no_grad_gives_the_value(model, impl):
    features = columns(model, 4, 2)
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, impl=impl)
    with torch.no_grad():
        value = loss([dict(f) for f in features], None)
    expected, _ = value_and_grads(st_losses.MultipleNegativesRankingLoss(model), model, features)
    assert rel_err(value, expected) <= 1e-5


def test_refused(model):
    with pytest.raises(BatchlabInputError, match="mini_batch_num_tokens"):
        CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=64)
    with pytest.raises(BatchlabInputError, match="at least 2"):
        CachedMultipleNegativesRankingLoss(model)(columns(model, 3, 1), None)
    with pytest.raises(BatchlabInputError, match="loss_dtype"):
        CachedMultipleNegativesRankingLoss(model, loss_dtype=torch.int64)
    with pytest.raises(BatchlabInputError, match="row_blocks"):
        CachedMultipleNegativesRankingLoss(model, row_blocks={"split": 2})
    with pytest.raises(BatchlabInputError, match="impl"):
        CachedMultipleNegativesRankingLoss(model, impl="rowz")
    for bad in ("cpu", 1, 0):  # 1 == True: an int is refused too
        with pytest.raises(BatchlabInputError, match="offload_gradients"):
            CachedMultipleNegativesRankingLoss(model, offload_gradients=bad)
