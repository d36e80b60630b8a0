"""Trainer-ready batch samplers: every example once per epoch, alone and under accelerate on 2 gloo ranks."""

import pytest
import torch
from datasets import Dataset

from batchlab.errors import BatchlabInputError
from batchlab.integrations.sentence_transformers import BatchlabBatchSampler, batch_sampler
from tests.gloo import run_on_ranks

N = 48
KIND_OPTIONS = [
    ("random", {}),
    ("community", {"group_size": 4, "rank_window": (2, 10)}),
    ("hard_negatives", {"num_negatives": 3, "range_min": 1}),
    ("cluster", {"cluster_size": 4}),
    ("tas", {"n_clusters": 4}),
    ("community", {"group_size": 4, "rank_window": (2, 10), "mix_random": 0.5}),
]


def pairs_dataset(n=N):
    return Dataset.from_dict({"anchor": [f"query {i}" for i in range(n)], "positive": [f"doc {i}" for i in range(n)]})


def teacher_embeddings(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1)
    return q, torch.nn.functional.normalize(q + 0.3 * torch.randn(n, 8, generator=g), dim=1)


def trainer_call(factory, dataset, batch_size=8, drop_last=False, seed=0):
    """How the SentenceTransformerTrainer calls ``args.batch_sampler``."""
    return factory(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=["label", "score"],
                   generator=torch.Generator().manual_seed(seed), seed=seed)


@pytest.mark.parametrize("kind,options", KIND_OPTIONS)
def test_every_example_once_per_epoch(kind, options):
    sampler = trainer_call(batch_sampler(kind, embeddings=teacher_embeddings(), **options), pairs_dataset())
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(N))
    assert sampler.state_dict()["epoch"] == 1


def test_teacher_model_and_refresh(tiny_dir):
    from tests.integrations.conftest import load

    model = load(tiny_dir)
    sampler = trainer_call(batch_sampler("cluster", teacher=model, cluster_size=4, refresh_every=1),
                           pairs_dataset(16), batch_size=4)
    first = sampler.inner
    sampler.set_epoch(1)
    assert sampler.inner is not first  # re-encoded with the (trained) model
    assert sorted(i for b in sampler for i in b) == list(range(16))


def test_bad_options():
    with pytest.raises(BatchlabInputError, match="kind"):
        batch_sampler("b3")
    with pytest.raises(BatchlabInputError, match="does not take"):
        trainer_call(batch_sampler("cluster", embeddings=teacher_embeddings()[0], clusters=4), pairs_dataset())
    with pytest.raises(BatchlabInputError, match="teacher"):
        trainer_call(batch_sampler("community"), pairs_dataset())
    with pytest.raises(BatchlabInputError, match="no column"):
        trainer_call(batch_sampler("tas", teacher=object(), columns=["query"]), pairs_dataset())


ACCELERATE_CASES = [
    ("random", {}, 5, False),  # 48 = 4 global batches of 10 + one of 8
    ("community", {"group_size": 4, "rank_window": (2, 10)}, 4, False),
    ("hard_negatives", {"num_negatives": 3}, 5, True),
    ("cluster", {"cluster_size": 4, "mix_random": 0.25}, 4, False),
]


def _trainer_epochs(rank, world, tiny_dir, out_dir, epochs=2):
    """A real SentenceTransformerTrainer run under accelerate (DDP on gloo): the labels each rank's loss saw."""
    import os

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from batchlab.integrations.sentence_transformers import MultipleNegativesRankingLoss

    # accelerate reads the launcher's variables; the process group itself is already up
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    model = SentenceTransformer(tiny_dir, device="cpu")
    train = pairs_dataset(24).add_column("label", list(range(24)))  # the collator passes labels: the indices
    seen = []

    class Recording(MultipleNegativesRankingLoss):
        def forward(self, features, labels):
            seen.append(labels.tolist())
            return super().forward(features, labels)

    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(out_dir, f"run{rank}"), num_train_epochs=epochs, per_device_train_batch_size=4,
        batch_sampler=batch_sampler("cluster", teacher=model, cluster_size=4), report_to="none",
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                               loss=Recording(model, gather_across_devices=True)).train()
    return seen


def _accelerate_body(rank, world, tiny_dir, out_dir):
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    results = []
    for kind, options, batch_size, drop_last in ACCELERATE_CASES:
        # each rank passes different embeddings: the sampler must plan with rank 0's everywhere
        sampler = trainer_call(batch_sampler(kind, embeddings=teacher_embeddings(seed=rank), **options),
                               pairs_dataset(), batch_size=batch_size, drop_last=drop_last)
        loader = DataLoader(list(range(N)), batch_sampler=sampler, collate_fn=list)
        # what the SentenceTransformerTrainer does: accelerator.prepare with even_batches=False
        loader = prepare_data_loader(loader, num_processes=world, process_index=rank, even_batches=False)
        seen = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            seen.append([list(b) for b in loader])
        results.append({"seen": seen, "len": len(loader), "global": sampler.inner.global_batches()})
    return {"loaders": results, "trainer": _trainer_epochs(rank, world, tiny_dir, out_dir)}


@pytest.mark.distributed
def test_accelerate_two_processes_no_double_sharding(tiny_dir, tmp_path):
    ranks = run_on_ranks(_accelerate_body, str(tiny_dir), str(tmp_path), world=2)
    # the trainer: 24 examples, 2 ranks x 4 per device, 2 epochs -> 3 steps per epoch per rank
    trainer = [r["trainer"] for r in ranks]
    assert len(trainer[0]) == len(trainer[1]) == 6
    for epoch in range(2):
        labels = sorted(i for steps in trainer for batch in steps[3 * epoch:3 * epoch + 3] for i in batch)
        assert labels == list(range(24))  # each example exactly once per epoch, across the ranks
    out = [r["loaders"] for r in ranks]
    for case, (kind, _, batch_size, drop_last) in enumerate(ACCELERATE_CASES):
        r0, r1 = out[0][case], out[1][case]
        assert r0["global"] == r1["global"], kind  # one plan on both ranks
        for epoch in range(2):
            assert len(r0["seen"][epoch]) == len(r1["seen"][epoch]) == r0["len"], kind
            seen = sorted(i for r in (r0, r1) for b in r["seen"][epoch] for i in b)
            expected = N - (N % (2 * batch_size) if drop_last else 0)
            assert len(seen) == expected and len(set(seen)) == expected, kind  # each example exactly once
        # rank r's k-th batch is slice r of global batch k: the loss gathers the batch the sampler built
        for k, batch in enumerate(r0["global"]):
            assert r0["seen"][1][k] + r1["seen"][1][k] == batch, kind


def test_resume_from_the_batches_the_loop_received():
    """state_dict(consumed=k) resumes after the k-th batch even when more were prefetched."""
    make = lambda: trainer_call(batch_sampler("random"), pairs_dataset())  # noqa: E731
    sampler = make()
    sampler.set_epoch(0)
    full = list(sampler)
    it = iter(sampler)
    received = [next(it) for _ in range(3)]
    next(it)  # prefetched, never received by the loop
    state = sampler.state_dict(consumed=len(received))
    resumed = make()
    resumed.load_state_dict(state)
    assert received + list(resumed) == full
