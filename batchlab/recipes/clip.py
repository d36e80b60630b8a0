"""Recipe: image-text CLIP (a tiny open_clip ViT plus text tower, from scratch).

Made for :func:`~batchlab.datasets.load_fashion_mnist` (images with caption templates)
but works with any dataset giving ``(image (C, H, W) float, caption str, label int)``.
Images are padded/resized to the config's size and repeated to 3 channels. Retrieval is
scored by class: an image's retrieved caption is right when it names the image's class.

Example
-------
>>> from batchlab.datasets import load_fashion_mnist
>>> from batchlab.recipes import train_clip
>>> result = train_clip(load_fashion_mnist("train", limit=5000), load_fashion_mnist("test", limit=1000),
...                     sampler="cluster", teacher="pixels", epochs=1)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from batchlab.errors import BatchlabInputError
from batchlab.recipes._loop import ContrastiveHead, TrainResult, train_loop
from batchlab.recipes.dual_encoder import teacher_name, tokenize
from batchlab.recipes.evaluate import retrieval_metrics
from batchlab.recipes.models import TINY_CLIP, clip_model, model_config
from batchlab.recipes.runs import load_checkpoint
from batchlab.recipes.samplers import ModelTeacher, SamplerSchedule, resolved_options
from batchlab.recipes.teachers import TeacherViews


def _tensors(data: Any, what: str) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """``(images (N, C, H, W) float, captions, labels (N,))`` from a dataset."""
    if hasattr(data, "images") and hasattr(data, "labels") and hasattr(data, "caption"):
        images = data.images.float().div(255.0) if data.images.dtype == torch.uint8 else data.images.float()
        if images.dim() == 3:
            images = images.unsqueeze(1)
        return images, [data.caption(i) for i in range(len(data))], torch.as_tensor(data.labels)
    try:
        items = [data[i] for i in range(len(data))]
        images = torch.stack([torch.as_tensor(x[0]).float() for x in items])
        return images, [x[1] for x in items], torch.tensor([int(x[2]) for x in items])
    except (TypeError, IndexError, ValueError):
        raise BatchlabInputError(f"{what} must give (image, caption, label) items, e.g. load_fashion_mnist(...)") from None


def _prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    """Pad (or resize) to ``size`` x ``size``, 3 channels, standardised per dataset."""
    if images.shape[-1] != size:
        pad = size - images.shape[-1]
        if pad > 0 and pad % 2 == 0 and images.shape[-2] == images.shape[-1]:
            images = torch.nn.functional.pad(images, (pad // 2,) * 4)
        else:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images - images.mean()) / images.std().clamp_min(1e-6)


def pixel_views(images: torch.Tensor, dim: int = 64, seed: int = 0) -> TeacherViews:
    """An offline image teacher: PCA of the pixels (``dim`` components), L2-normalised."""
    flat = images.reshape(len(images), -1).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(flat, q=min(dim, min(flat.shape) - 1), center=True)
    emb = torch.nn.functional.normalize((flat - flat.mean(0)) @ v, dim=1)
    return TeacherViews(emb)


def train_clip(
    train: Any,
    test: Any,
    *,
    sampler: str | Callable | Any = "random",
    batch_size: int = 64,
    epochs: int = 1,
    lr: float = 1e-3,
    loss: str | Callable = "info_nce",
    impl: str = "auto",
    teacher: Any = "model",
    refresh_every: int = 1,
    sampler_options: dict[str, Any] | None = None,
    jest=None,
    embedding_cache: int | None = None,
    config: str = TINY_CLIP,
    device: str | torch.device = "cpu",
    seed: int = 0,
    data_seed: int | None = None,
    eval_every: int = 1,
    out: str | os.PathLike | None = None,
    name: str = "clip",
    progress: bool | Callable[[dict], None] = True,
    resume: str | os.PathLike | dict | None = None,
) -> TrainResult:
    """Train a tiny CLIP on (image, caption, label) data; evaluate image -> caption retrieval by class.

    The arguments mean what they mean in :func:`~batchlab.recipes.train_dual_encoder`,
    except the teacher: ``"model"`` (the model's own image+text embeddings, refreshed
    every ``refresh_every`` epochs; random batches in the first epoch), ``"pixels"``
    (PCA of the pixels: an offline teacher that needs no model), a tensor ``(N, d)``,
    :class:`~batchlab.recipes.teachers.TeacherViews`, or None. With ``jest`` and no
    teacher views the reference model is the pixel teacher on both sides.
    ``embedding_cache`` (a chunk size) encodes each batch in chunks with
    :class:`~batchlab.losses.EmbeddingCache`.

    ``seed`` sets the initial weights, ``data_seed`` (default: ``seed``) the batch order;
    ``resume`` continues an interrupted run from its checkpoint (same settings).

    Returns a :class:`~batchlab.recipes.TrainResult` whose metrics are image -> caption
    recall@1, recall@10 and MRR, where any caption of the image's class counts.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if epochs < 1:
        raise BatchlabInputError(f"epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    data_seed = seed if data_seed is None else int(data_seed)
    record = {
        "recipe": "clip", "sampler": sampler if isinstance(sampler, str) else type(sampler).__name__,
        "batch_size": batch_size, "epochs": epochs, "lr": lr, "loss": loss if isinstance(loss, str) else repr(loss),
        "impl": impl, "teacher": teacher_name(teacher), "refresh_every": refresh_every,
        "sampler_options": resolved_options(sampler, sampler_options),
        "jest": None if jest is None else {"filter_ratio": jest.filter_ratio, "seed": getattr(jest, "seed", None)},
        "embedding_cache": embedding_cache, "config": config, "device": str(device), "seed": seed, "data_seed": data_seed,
        "eval_every": eval_every, "train_examples": len(train), "test_examples": len(test),
    }
    state = load_checkpoint(resume, record) if resume is not None else None
    size = model_config(config)["vision_cfg"]["image_size"]
    train_images, train_captions, _ = _tensors(train, "train")
    test_images, test_captions, test_labels = _tensors(test, "test")
    images = _prepare(train_images, size).to(device)
    eval_images = _prepare(test_images, size).to(device)
    tokens, eval_tokens = tokenize(train_captions, config).to(device), tokenize(test_captions, config).to(device)
    model = clip_model(config, seed=seed).to(device)
    head = ContrastiveHead(loss, impl=impl).to(device)
    torch.manual_seed(seed)
    normalize = torch.nn.functional.normalize

    def encode(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(model.encode_image(images[indices]), dim=-1), normalize(model.encode_text(tokens[indices]), dim=-1)

    def embed_all(fn, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        return torch.cat([normalize(fn(x[i : i + chunk]), dim=-1) for i in range(0, len(x), chunk)]).cpu()

    def evaluate() -> dict[str, float]:
        return retrieval_metrics(
            embed_all(model.encode_image, eval_images),
            embed_all(model.encode_text, eval_tokens),
            query_labels=test_labels,
            document_labels=test_labels,
        )

    def model_views() -> TeacherViews:
        model.eval()
        with torch.no_grad():
            i, t = embed_all(model.encode_image, images), embed_all(model.encode_text, tokens)
        model.train()
        return TeacherViews(normalize(i + t, dim=1), i, t, device=device)  # ranked on the run's device

    use_model = isinstance(teacher, str) and teacher == "model"
    views = None
    if isinstance(teacher, str) and teacher == "pixels" or jest is not None and (teacher is None or use_model):
        views = pixel_views(train_images, seed=seed)
    elif isinstance(teacher, (torch.Tensor, TeacherViews)):
        views = teacher if isinstance(teacher, TeacherViews) else TeacherViews(teacher)
    elif teacher is not None and not use_model:
        raise BatchlabInputError(f"teacher must be 'model', 'pixels', None, a tensor or TeacherViews, got {teacher!r}")
    sample_size = batch_size if jest is None else int(round(batch_size / (1.0 - jest.filter_ratio)))
    model_teacher = ModelTeacher(model, model_views)  # saves / restores the weights it embedded with
    schedule = SamplerSchedule(
        sampler, views, batch_size=sample_size, num_examples=len(images), seed=data_seed,
        model_views=model_teacher if use_model and (isinstance(sampler, str) or callable(sampler)) else None,
        refresh_every=refresh_every, options=sampler_options,
    )
    model_teacher.resume(state, schedule)
    cache = None
    if embedding_cache is not None:
        from batchlab.losses import EmbeddingCache

        cache = (EmbeddingCache([model.encode_image, model.encode_text], embedding_cache), lambda indices: (images[indices], tokens[indices]))
    reference = None
    if jest is not None:
        ref_q, ref_d = views.queries.to(device), views.documents.to(device)

        def reference(indices: torch.Tensor):
            return ref_q[indices], ref_d[indices], 1 / 0.07

    result = train_loop(
        model=model, head=head, encode=encode, sampler_for_epoch=schedule, evaluate=evaluate, epochs=epochs, lr=lr,
        selector=jest, reference=reference, cache=cache, eval_every=eval_every, out=Path(out) if out is not None else None,
        name=name, progress=progress, record=record, resume=state, checkpoint_state=model_teacher.checkpoint_state,
    )
    result.record = record
    return result
