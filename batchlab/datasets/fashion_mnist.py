"""``fashion_mnist``: 70,000 images from Debian's ``dataset-fashion-mnist``, with captions.

The images are read from the IDX files that ``apt-get install dataset-fashion-mnist``
puts in ``/usr/share/datasets/fashion-mnist/`` (or a directory you give, holding the
same four ``*-idx?-ubyte[.gz]`` files). Nothing is downloaded. Each image gets a caption
from a few templates per class, chosen deterministically from its index, so that
image-text training has text to match; retrieval is then scored by class.

Example
-------
>>> train = load_fashion_mnist("train")  # doctest: +SKIP
>>> image, caption, label = train[0]  # doctest: +SKIP
>>> image.shape, caption  # doctest: +SKIP
(torch.Size([1, 28, 28]), 'a photo of an ankle boot')
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from batchlab.errors import BatchlabInputError

DEFAULT_PATH = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = ("install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point to a directory "
                "holding the IDX files: --data-path DIR on the command line, path=DIR in Python")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# What people call each class in a caption (several names per class, so captions vary).
CLASS_WORDS = (
    ("t-shirt", "top", "tee"),
    ("pair of trousers", "pair of pants", "pair of slacks"),
    ("pullover", "sweater", "jumper"),
    ("dress", "frock", "gown"),
    ("coat", "jacket", "overcoat"),
    ("sandal", "summer sandal", "open shoe"),
    ("shirt", "button-up shirt", "blouse"),
    ("sneaker", "trainer", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "short boot"),
)
TEMPLATES = (
    "a photo of {a} {w}",
    "a grayscale picture of {a} {w}",
    "{a} {w} on a plain background",
    "a small image of {a} {w}",
    "a product shot of {a} {w}",
)


class DatasetNotInstalledError(FileNotFoundError):
    """An optional offline dataset is not on this machine; the message says how to install it."""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(label: int, index: int) -> str:
    """The caption of image ``index`` with class ``label`` (deterministic).

    >>> caption_for(9, 0)
    'a photo of an ankle boot'
    """
    words = CLASS_WORDS[label]
    word = words[index % len(words)]
    template = TEMPLATES[(index // len(words)) % len(TEMPLATES)]
    return template.format(a=_article(word), w=word)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (directory / name).exists():
            return directory / name
    raise DatasetNotInstalledError(f"fashion_mnist: {directory / (stem + '.gz')} not found; {INSTALL_HINT}")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape.

    Why not torchvision's reader: ``torchvision.datasets.FashionMNIST`` only accepts
    ``<root>/FashionMNIST/raw/`` holding the unpacked files its download step writes, and
    its ``read_sn3_pascalvincent_tensor`` opens files without gzip (torchvision 0.29),
    while Debian's ``dataset-fashion-mnist`` ships the gzipped IDX files in
    ``/usr/share/datasets/fashion-mnist``; reading them takes these 12 lines.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise BatchlabInputError(f"fashion_mnist: {path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise BatchlabInputError(f"fashion_mnist: {path} is truncated ({array.size} bytes for shape {shape})")
    return array.reshape(shape)


def fashion_mnist_available(path: str | os.PathLike | None = None) -> bool:
    """Whether the IDX files are present (at ``path`` or the Debian location)."""
    try:
        for stems in FILES.values():
            for stem in stems:
                _find(Path(path) if path else DEFAULT_PATH, stem)
    except DatasetNotInstalledError:
        return False
    return True


class FashionMNISTCaptions(Dataset):
    """``dataset[i] -> (image, caption, label)``: image ``(1, 28, 28)`` float in [0, 1].

    ``images`` is the uint8 tensor ``(N, 28, 28)`` and ``labels`` the int64 tensor ``(N,)``.
    """

    classes = CLASSES

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, split: str) -> None:
        self.images, self.labels, self.split = images, labels, split

    def __len__(self) -> int:
        return len(self.labels)

    def caption(self, index: int) -> str:
        return caption_for(int(self.labels[index]), index)

    @property
    def captions(self) -> list[str]:
        return [self.caption(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        image = self.images[index].unsqueeze(0).float() / 255.0
        return image, self.caption(index), int(self.labels[index])

    def __repr__(self) -> str:
        return f"FashionMNISTCaptions(split={self.split!r}, images={len(self)})"


def load_fashion_mnist(split: str = "train", *, path: str | os.PathLike | None = None, limit: int | None = None) -> FashionMNISTCaptions:
    """Load the ``"train"`` (60,000) or ``"test"`` (10,000) split.

    Raises :class:`DatasetNotInstalledError` (a ``FileNotFoundError``) saying how to
    install the Debian package when the files are missing. ``limit`` keeps the first
    ``limit`` images (for quick runs).
    """
    if split not in FILES:
        raise BatchlabInputError(f"fashion_mnist: split must be 'train' or 'test', got {split!r}")
    directory = Path(path) if path else DEFAULT_PATH
    image_stem, label_stem = FILES[split]
    images = torch.from_numpy(read_idx(_find(directory, image_stem)).copy())
    labels = torch.from_numpy(read_idx(_find(directory, label_stem)).astype(np.int64))
    if images.ndim != 3 or len(images) != len(labels):
        raise BatchlabInputError(f"fashion_mnist: images {tuple(images.shape)} do not match labels {tuple(labels.shape)}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return FashionMNISTCaptions(images, labels, split)
