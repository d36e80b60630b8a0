"""gather_across_devices on 2 gloo ranks: batchlab's losses against sentence-transformers' own, per rank.

Each rank holds its own rows; both sides gather the other rank's candidates with gradient
(sentence-transformers through torch.distributed.nn.all_gather, batchlab through its
gather-with-gradient or info_nce(distributed=...)). Per rank, the returned loss and every
parameter gradient must agree within 1e-5 relative (fp32), as in test_losses.py.
"""

import pytest

from tests.gloo import run_on_ranks

CASES = [
    ("MultipleNegativesRankingLoss", 2, {}),
    ("MultipleNegativesRankingLoss", 2, {"distributed": "ring"}),
    ("MultipleNegativesRankingLoss", 3, {}),
    ("MultipleNegativesRankingLoss", 3, {"directions": ("query_to_doc", "query_to_query", "doc_to_query",
                                                        "doc_to_doc")}),
    ("MultipleNegativesSymmetricRankingLoss", 2, {}),
    ("MultipleNegativesSymmetricRankingLoss", 3, {"distributed": "ring"}),
    ("GISTEmbedLoss", 3, {"margin": 0.05}),
    ("CachedMultipleNegativesRankingLoss", 3, {"mini_batch_size": 2}),
    ("CachedGISTEmbedLoss", 2, {"mini_batch_size": 2}),
]


def _body(rank, world, tiny_dir, guide_dir):
    import warnings

    from sentence_transformers.sentence_transformer import losses as st_losses

    import batchlab.integrations.sentence_transformers as ours
    from tests.integrations.conftest import columns, load
    from tests.integrations.helpers import assert_same, value_and_grads

    warnings.simplefilter("ignore", DeprecationWarning)
    model, guide = load(tiny_dir), load(guide_dir)
    failures = []
    for name, n_columns, options in CASES:
        features = columns(model, 3, n_columns, shift=5 * rank)  # different rows on each rank
        extra = (guide,) if "GIST" in name else ()
        st_options = {k: v for k, v in options.items() if k != "distributed"}
        theirs = value_and_grads(getattr(st_losses, name)(model, *extra, gather_across_devices=True, **st_options),
                                 model, features)
        mine = value_and_grads(getattr(ours, name)(model, *extra, gather_across_devices=True, **options),
                               model, features)
        try:
            assert_same(mine, theirs)
        except AssertionError as exc:
            failures.append(f"{name} {n_columns} {options}: {exc}")
    failures += _ddp_cached(rank, model)
    return failures


def _ddp_cached(rank, model):
    """Cached losses on a DDP-wrapped model (as the trainer hands it to the loss): the synchronised
    gradients must equal sentence-transformers' (DDP all-reduces once per step in both)."""
    from sentence_transformers.sentence_transformer import losses as st_losses
    from torch.nn.parallel import DistributedDataParallel

    import batchlab.integrations.sentence_transformers as ours
    from tests.integrations.conftest import columns
    from tests.integrations.helpers import assert_same, value_and_grads

    ddp = DistributedDataParallel(model, find_unused_parameters=True)  # BERT's pooler is unused
    features = columns(model, 5, 2, shift=3 * rank)
    failures = []
    # gathered; and local rows on the row-block pass (impl="rows", the CUDA default), DDP syncing the gradients
    for gather, options in ((True, {}), (False, {"impl": "rows"})):
        results = []
        for make, extra in ((st_losses.CachedMultipleNegativesRankingLoss, {}),
                            (ours.CachedMultipleNegativesRankingLoss, options)):
            loss = make(model, mini_batch_size=2, gather_across_devices=gather, **extra)
            loss.model = ddp  # what SentenceTransformerTrainer.override_model_in_loss does
            results.append(value_and_grads(loss, model, features))
        try:
            assert_same(results[1], results[0])
        except AssertionError as exc:
            failures.append(f"DDP cached, gather={gather} {options}: {exc}")
    return failures


@pytest.mark.distributed
def test_gather_across_devices_matches_sentence_transformers(tiny_dir, guide_dir):
    out = run_on_ranks(_body, str(tiny_dir), str(guide_dir), world=2)
    assert out == [[], []]
