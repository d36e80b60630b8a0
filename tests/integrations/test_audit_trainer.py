"""Audit: batchlab's batch samplers inside a real SentenceTransformerTrainer (sentence-transformers 6.3).

The loss records the ``label`` column (each row's index), so every test compares the
batches the loss received with the plan a fresh sampler builds for the same
``(seed, epoch)``: nothing reshuffled, duplicated or dropped by the trainer, its
collator, a multi-worker DataLoader or a resume from a checkpoint.
"""

import pytest
import torch
from datasets import Dataset, DatasetDict

from batchlab.integrations.sentence_transformers import MultipleNegativesRankingLoss, batch_sampler
from tests.integrations.test_samplers import teacher_embeddings, trainer_call

N = 22  # not a multiple of the batch size: a short last batch
BATCH = 4


def pairs(n=N, prefix=""):
    return Dataset.from_dict({"anchor": [f"read {prefix}{i}" for i in range(n)],
                              "positive": [f"file {prefix}{i}" for i in range(n)],
                              "label": list(range(n))})


def factory(n=N, kind="cluster"):
    options = {"cluster": {"cluster_size": 4}, "random": {}}[kind]
    return batch_sampler(kind, embeddings=teacher_embeddings(n)[0], **options)


def plan(make, dataset, epochs, drop_last=False, seed=0):
    """The batches a fresh sampler plans for each epoch (what the loss must receive)."""
    sampler = trainer_call(make, dataset, batch_size=BATCH, drop_last=drop_last, seed=seed)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out += [list(b) for b in sampler]
    return out


class Recording(MultipleNegativesRankingLoss):
    def __init__(self, model, seen, **kw):
        super().__init__(model, **kw)
        self.seen = seen

    def forward(self, features, labels):
        self.seen.append(labels.tolist())
        return super().forward(features, labels)


def train(model_dir, out_dir, dataset, make, *, resume=None, eval_dataset=None, **args):
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = SentenceTransformer(str(model_dir), device="cpu")
    if not hasattr(make, "func"):  # a function of the model being trained (teacher=model)
        make = make(model)
    options = dict(output_dir=str(out_dir), num_train_epochs=2, per_device_train_batch_size=BATCH,
                   batch_sampler=make, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                   disable_tqdm=True, learning_rate=1e-3)
    options.update(args)
    seen = []
    trainer = SentenceTransformerTrainer(model=model, args=SentenceTransformerTrainingArguments(**options),
                                         train_dataset=dataset, eval_dataset=eval_dataset, loss=Recording(model, seen))
    trainer.train(resume_from_checkpoint=resume)
    return seen


@pytest.mark.parametrize("drop_last", [False, True])
def test_the_loss_receives_the_planned_batches(tiny_dir, tmp_path, drop_last):
    """Two epochs: batch k of epoch e is the sampler's batch k for (seed, e); each example once per epoch."""
    make = factory()
    seen = train(tiny_dir, tmp_path, pairs(), make, dataloader_drop_last=drop_last)
    expected = plan(make, pairs(), 2, drop_last=drop_last)
    assert seen == expected
    per_epoch = len(expected) // 2
    for e in range(2):
        ids = sorted(i for b in seen[e * per_epoch:(e + 1) * per_epoch] for i in b)
        assert len(set(ids)) == len(ids) == (N if not drop_last else N - N % BATCH)
    assert seen[:per_epoch] != seen[per_epoch:]  # a new plan each epoch (set_epoch reached the sampler)


def test_two_dataloader_workers_give_the_same_batches(tiny_dir, tmp_path):
    make = factory(kind="random")
    seen = train(tiny_dir, tmp_path, pairs(), make, num_train_epochs=1, dataloader_num_workers=2)
    assert seen == plan(make, pairs(), 1)


def test_resume_from_a_checkpoint_continues_the_uninterrupted_batches(tiny_dir, tmp_path):
    """A run resumed from checkpoint-k (mid epoch 0 and mid epoch 1) gets batches k.. of the run that never stopped."""
    make = factory()
    full = train(tiny_dir, tmp_path / "a", pairs(), make, save_strategy="steps", save_steps=4)
    assert len(full) == 12
    for step in (4, 8):
        checkpoint = tmp_path / "a" / f"checkpoint-{step}"
        assert checkpoint.is_dir()
        resumed = train(tiny_dir, tmp_path / f"b{step}", pairs(), make, resume=str(checkpoint))
        assert resumed == full[step:], step


def test_resume_with_the_trained_model_as_teacher(tiny_dir, tmp_path):
    """teacher=model: the resumed trainer builds its sampler after loading the checkpoint's weights, so it
    must plan with the saved encodings (embeddings_dir), also for a refresh (every 2 epochs) it resumes past."""
    emb = tmp_path / "a" / "teacher"
    make = lambda model: batch_sampler("cluster", teacher=model, cluster_size=2, refresh_every=2,  # noqa: E731
                                       embeddings_dir=emb)
    full = train(tiny_dir, tmp_path / "a", pairs(), make, num_train_epochs=4, save_strategy="steps", save_steps=4,
                 learning_rate=5e-2)
    assert len(full) == 24 and len(list(emb.glob("*.npz"))) == 2  # the encodings of epochs 0 and 2
    for step in (4, 20):  # mid epoch 0; mid epoch 3, after the refresh at epoch 2
        resumed = train(tiny_dir, tmp_path / f"b{step}", pairs(), make, num_train_epochs=4, learning_rate=5e-2,
                        resume=str(tmp_path / "a" / f"checkpoint-{step}"))
        assert resumed == full[step:], step


def test_dataset_dict_with_prompts_and_router_mapping(tiny_dir, tmp_path):
    """Two datasets (round robin), per-dataset prompts and a column router_mapping, the teacher encoding
    each dataset: each sub-sampler's batches reach the loss in round-robin order, none changed."""
    from sentence_transformers.base.sampler import MultiDatasetBatchSamplers

    from tests.integrations.conftest import load

    data = DatasetDict({"a": pairs(12, "a"), "b": pairs(8, "b")})
    make = batch_sampler("cluster", teacher=load(tiny_dir), cluster_size=2)
    seen = train(tiny_dir, tmp_path, data, make, num_train_epochs=1,
                 multi_dataset_batch_sampler=MultiDatasetBatchSamplers.ROUND_ROBIN,
                 prompts={"a": "query: ", "b": {"anchor": "q: ", "positive": "d: "}},
                 router_mapping={"anchor": "query", "positive": "document"})
    # labels are per-dataset row indices; round robin stops when b (2 batches) runs out
    a, b = plan(make, data["a"], 1), plan(make, data["b"], 1)
    assert seen == [a[0], b[0], a[1], b[1]]


def test_precomputed_embeddings_of_another_size_are_refused(tiny_dir, tmp_path):
    """One batch_sampler=(embeddings=...) for a DatasetDict: the trainer builds a sampler per dataset, and
    the 12-row embeddings would plan indices 8..11 for the 8-row dataset (rows of the next dataset)."""
    from batchlab.errors import BatchlabInputError

    data = DatasetDict({"a": pairs(12, "a"), "b": pairs(8, "b")})
    with pytest.raises(BatchlabInputError, match="12 rows but the dataset has 8.*teacher="):
        train(tiny_dir, tmp_path, data, factory(12), num_train_epochs=1)
    # the eval_dataset gets a sampler from the same batch_sampler= too
    with pytest.raises(BatchlabInputError, match="22 rows but the dataset has 8.*eval_dataset"):
        train(tiny_dir, tmp_path, pairs(), factory(), num_train_epochs=1, eval_dataset=pairs(8, "e"),
              eval_strategy="steps", eval_steps=2)
    with pytest.raises(BatchlabInputError, match="22 rows but the dataset has 20"):
        trainer_call(batch_sampler("community", embeddings=teacher_embeddings(N), group_size=4), pairs(20))


def test_saved_teacher_embeddings_are_checked(tiny_dir, tmp_path):
    """A saved encoding is read back as written; a changed one is refused, not planned with."""
    import numpy as np

    from batchlab.errors import StaleArtifactError
    from tests.integrations.conftest import load

    make = batch_sampler("cluster", teacher=load(tiny_dir), cluster_size=2, embeddings_dir=tmp_path)
    first = trainer_call(make, pairs(), batch_size=BATCH)
    (path,) = tmp_path.glob("teacher-*-epoch0.npz")
    again = trainer_call(make, pairs(), batch_size=BATCH)
    assert again.inner.global_batches() == first.inner.global_batches()
    saved = dict(np.load(path))
    saved["column0"] = saved["column0"][::-1].copy()
    np.savez(path, **saved)
    with pytest.raises(StaleArtifactError, match="column0"):
        trainer_call(make, pairs(), batch_size=BATCH)
