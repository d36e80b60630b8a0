"""EmbeddingCache gives the parameter gradients of one big backward.

The reference encodes the same chunks in the same order WITH autograd (so dropout
consumes the generator exactly as the cache's first pass does), computes the loss on
the concatenated embeddings and runs one backward. Tolerance: rtol = 1e-5, atol = 1e-6
(fp32; the only difference is the order in which per-chunk parameter gradients are
summed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchlab.errors import BatchlabInputError
from batchlab.losses import EmbeddingCache, info_nce
from batchlab.losses.embedding_cache import cached_step


def _tower(d_in: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 16), nn.Dropout(0.1))


def _params_grads(modules) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters()]


def _setup(gen):
    img, txt = _tower(10, 0), _tower(7, 1)
    logit_scale = nn.Parameter(torch.tensor(2.5))
    x_img = torch.randn(37, 10, generator=gen)
    x_txt = torch.randn(37, 7, generator=gen)

    def loss_fn(a, b):
        return info_nce(F.normalize(a, dim=1), F.normalize(b, dim=1), logit_scale.exp(), impl="tiled", tile_size=8)

    return img, txt, logit_scale, x_img, x_txt, loss_fn


def _zero(*things):
    for t in things:
        for p in t.parameters() if isinstance(t, nn.Module) else [t]:
            p.grad = None


def _reference(img, txt, x_img, x_txt, loss_fn, chunk):
    parts_a = [img(x_img[i : i + chunk]) for i in range(0, len(x_img), chunk)]
    parts_b = [txt(x_txt[i : i + chunk]) for i in range(0, len(x_txt), chunk)]
    loss = loss_fn(torch.cat(parts_a), torch.cat(parts_b))
    loss.backward()
    return loss.detach()


def _reference_grads(gen):
    """The towers, inputs and loss, the reference's parameter gradients (chunks of 8, seed 42), then
    the gradients cleared and the seed set again for the cached run."""
    img, txt, logit_scale, x_img, x_txt, loss_fn = _setup(gen)
    torch.manual_seed(42)
    _reference(img, txt, x_img, x_txt, loss_fn, 8)
    ref_grads = _params_grads([img, txt])
    _zero(img, txt, logit_scale)
    torch.manual_seed(42)
    return img, txt, x_img, x_txt, loss_fn, ref_grads


def test_same_gradients_as_one_backward_with_dropout(gen):
    img, txt, logit_scale, x_img, x_txt, loss_fn = _setup(gen)
    torch.manual_seed(42)
    ref_loss = _reference(img, txt, x_img, x_txt, loss_fn, 8)
    ref_grads, ref_scale = _params_grads([img, txt]), logit_scale.grad.clone()
    ref_rng_after = torch.get_rng_state()

    _zero(img, txt, logit_scale)
    torch.manual_seed(42)
    loss = EmbeddingCache([img, txt], chunk_size=8).step(x_img, x_txt, loss_fn=loss_fn)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(_params_grads([img, txt]), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logit_scale.grad, ref_scale, rtol=1e-5, atol=1e-6)
    # the re-encode replays the RNG without consuming it: training continues as after a normal step
    assert torch.equal(torch.get_rng_state(), ref_rng_after)


def test_without_rng_restore_dropout_differs(gen):
    """The RNG replay matters: without it the re-encoded dropout masks differ (this test can fail)."""
    img, txt, x_img, x_txt, loss_fn, ref_grads = _reference_grads(gen)
    cached_step([img, txt], [x_img, x_txt], loss_fn, chunk_size=8, restore_rng=False)
    assert any(not torch.allclose(g, r, rtol=1e-3, atol=1e-5) for g, r in zip(_params_grads([img, txt]), ref_grads))


def test_phases_per_tower_chunk_sizes_and_dict_inputs(gen):
    """encode / loss.backward / backward, different chunk sizes per tower, dict and tuple inputs."""
    img, txt, logit_scale, x_img, x_txt, loss_fn = _setup(gen)
    img.eval(), txt.eval()  # no dropout: the reference is the plain full-batch backward
    loss_fn(img(x_img), txt(x_txt)).backward()
    ref_grads, ref_scale = _params_grads([img, txt]), logit_scale.grad.clone()
    _zero(img, txt, logit_scale)

    cache = EmbeddingCache([lambda input: img(input), lambda a, b: txt(a + b)], chunk_size=[5, 16])
    emb_img, emb_txt = cache.encode({"input": x_img}, (x_txt, torch.zeros_like(x_txt)))
    assert emb_img.shape == (37, 16) and emb_img.requires_grad and emb_img.grad_fn is None
    loss_fn(emb_img, emb_txt).backward()
    cache.backward()
    for got, want in zip(_params_grads([img, txt]), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logit_scale.grad, ref_scale, rtol=1e-5, atol=1e-6)


def test_open_clip_tiny_model(gen):
    """open_clip's two towers as bound methods, logit_scale a model parameter."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=128,
        vision_cfg=dict(image_size=32, patch_size=4, width=128, layers=2, head_width=32),
        text_cfg=dict(context_length=32, vocab_size=1000, width=128, heads=4, layers=2),
    )
    images = torch.randn(12, 3, 32, 32, generator=gen)
    texts = torch.randint(0, 1000, (12, 32), generator=gen)

    def loss_fn(img, txt):
        return info_nce(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), model.logit_scale.exp())

    loss_fn(model.encode_image(images), model.encode_text(texts)).backward()
    ref = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    EmbeddingCache([model.encode_image, model.encode_text], chunk_size=5).step(images, texts, loss_fn=loss_fn)
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys() and "logit_scale" in got
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_bad_input(gen):
    enc = nn.Linear(4, 3)
    with pytest.raises(BatchlabInputError, match="chunk_size"):
        EmbeddingCache(enc, chunk_size=0)
    with pytest.raises(BatchlabInputError, match="chunk sizes"):
        EmbeddingCache([enc, enc], chunk_size=[2])
    with pytest.raises(BatchlabInputError, match="callable"):
        EmbeddingCache([], chunk_size=2)
    cache = EmbeddingCache([enc, enc], chunk_size=2)
    with pytest.raises(BatchlabInputError, match="towers"):
        cache.encode(torch.randn(5, 4))
    with pytest.raises(BatchlabInputError, match="first .batch. dimension"):
        EmbeddingCache(lambda a, b: enc(a), chunk_size=2).encode((torch.randn(5, 4), torch.randn(6, 4)))
    with pytest.raises(BatchlabInputError, match="before backward"):
        EmbeddingCache(enc, chunk_size=2).backward()
    with pytest.raises(BatchlabInputError, match="one embedding tensor"):
        EmbeddingCache(lambda x: {"f": enc(x)}, chunk_size=2).encode(torch.randn(5, 4))
    with pytest.raises(BatchlabInputError, match="scalar"):
        EmbeddingCache(enc, chunk_size=2).step(torch.randn(5, 4), loss_fn=lambda e: e.sum(1))


def test_frozen_tower_is_skipped(gen):
    """LiT: a locked image tower gets no gradient; the text tower's gradients still match."""
    img, txt, logit_scale, x_img, x_txt, loss_fn = _setup(gen)
    img.eval(), txt.eval()
    img.requires_grad_(False)
    loss_fn(img(x_img), txt(x_txt)).backward()
    ref_grads = _params_grads([txt])
    _zero(txt, logit_scale)
    EmbeddingCache([img, txt], chunk_size=8).step(x_img, x_txt, loss_fn=loss_fn)
    assert all(p.grad is None for p in img.parameters())
    for got, want in zip(_params_grads([txt]), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offload", [False, True])
def test_keep_gradients_frees_the_embeddings_and_scale(gen, offload):
    """keep_gradients(): the embeddings can be freed before the re-encode; backward(scale=) scales the pushes.

    With ``offload`` the gradients wait in host memory (on the CPU: a copy) and come back chunk by chunk.
    """
    import gc
    import weakref

    img, txt, x_img, x_txt, loss_fn, ref_grads = _reference_grads(gen)
    cache = EmbeddingCache([img, txt], chunk_size=8)
    embeddings = cache.encode(x_img, x_txt)
    loss_fn(*embeddings).backward()
    grads = [e.grad for e in embeddings]
    for bad in ("host", 1):  # 1 == True: an int is refused too
        with pytest.raises(BatchlabInputError, match="True or False"):
            cache.keep_gradients(offload=bad)
    cache.keep_gradients(offload=offload)
    alive = [weakref.ref(g) for g in grads] + [weakref.ref(e) for e in embeddings]
    del embeddings, grads
    gc.collect()
    assert all(ref() is None for ref in alive[2:])  # nothing but the caller held the embeddings
    assert all((ref() is None) == offload for ref in alive[:2])  # ... and, offloaded, their gradients
    cache.backward(scale=torch.tensor(0.5))
    for got, want in zip(_params_grads([img, txt]), ref_grads):
        torch.testing.assert_close(got, 0.5 * want, rtol=1e-5, atol=1e-6)
    with pytest.raises(BatchlabInputError, match="keep_gradients"):
        cache.keep_gradients()  # the step is over
