"""The offline datasets: codesearch (always) and fashion_mnist (when the Debian package is installed)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from batchlab.datasets import (
    DatasetNotInstalledError,
    fashion_mnist_available,
    load_codesearch,
    load_fashion_mnist,
)
from batchlab.datasets.codesearch import harvest_file, is_test_module, summary_of
from batchlab.datasets.fashion_mnist import CLASSES, caption_for, read_idx
from batchlab.errors import BatchlabInputError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("codesearch-cache")


@pytest.fixture(scope="module")
def splits(cache):
    return load_codesearch("train", cache_dir=cache, progress=False), load_codesearch("test", cache_dir=cache, progress=False)


def test_codesearch_size_and_no_empty_texts(splits):
    train, test = splits
    # about 7,000 pairs from the standard library; the exact count depends on the Python version
    assert 4000 < len(train) + len(test) < 12000
    assert 0.05 < len(test) / (len(train) + len(test)) < 0.4
    for split in splits:
        for query, document in (split[i] for i in range(len(split))):
            assert len(query) >= 20 and len(query.split()) >= 4
            assert document.strip() and document.startswith(("def ", "async def ", "class "))


def test_codesearch_split_is_by_module_and_disjoint(splits):
    train, test = splits
    assert not set(train.modules) & set(test.modules)
    assert all(is_test_module(m, 0.2) for m in test.modules)
    # no query or document is shared between the splits (duplicates are dropped globally)
    assert not set(train.queries) & set(test.queries)
    assert not set(train.documents) & set(test.documents)
    # no test-suite modules were harvested
    assert not any(".test." in f".{m}." or ".tests." in f".{m}." for m in train.modules + test.modules)


def test_codesearch_is_deterministic_and_cached(splits, cache, tmp_path):
    train, _ = splits
    files = list(cache.glob("codesearch-*.json"))
    assert len(files) == 1 and train.source_hash in files[0].name
    # the cache is what gets loaded: a doctored cache file shows up...
    doctored = tmp_path / files[0].name
    payload = json.loads(files[0].read_text())
    payload["pairs"] = payload["pairs"][:10]
    doctored.write_text(json.dumps(payload))
    assert len(load_codesearch("all", cache_dir=tmp_path)) == 10
    # ...until refresh=True harvests again, which gives the very same pairs (deterministic)
    fresh = load_codesearch("train", cache_dir=tmp_path, refresh=True, progress=False)
    assert fresh.queries == train.queries and fresh.documents == train.documents
    assert fresh.modules == train.modules and fresh.source_hash == train.source_hash


def test_codesearch_settings_change_the_hash_and_documents():
    from batchlab.datasets.codesearch import _source_hash, source_files

    files = source_files()[:20]
    assert _source_hash(files, {"body_lines": 1}) != _source_hash(files, {"body_lines": 5})
    assert _source_hash(files, {"body_lines": 5}) == _source_hash(files, {"body_lines": 5})
    for path, module in files:
        for pair in harvest_file(path, module, body_lines=1):
            assert len(pair.document.splitlines()) <= 2


def test_harvest_rules(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        '"""Module docstring is not a pair."""\n'
        "class Parser(Base):\n"
        '    """Parse the configuration files of the tool."""\n'
        "    def read(self, path: str) -> dict:\n"
        '        """Read one configuration file and return a dict.\n\n        Details here."""\n'
        "        with open(path) as f:\n"
        "            return parse(f)\n"
        "    def test_something(self):\n"
        '        """A test method should never become a pair."""\n'
        "def tiny():\n"
        '    """Too short."""\n'
    )
    pairs = harvest_file(source, "pkg.mod")
    assert [p.name for p in pairs] == ["Parser", "Parser.read"]
    read = pairs[1]
    assert read.query == "Read one configuration file and return a dict."
    assert read.document.splitlines()[0] == "def read(self, path: str) -> dict:"
    assert "Details here" not in read.document and "with open(path)" in read.document
    assert pairs[0].document.startswith("class Parser(Base):")
    assert summary_of("Only three words.") is None


def test_codesearch_harvests_installed_packages_on_request(tmp_path, monkeypatch):
    from batchlab.datasets.codesearch import source_files

    package = tmp_path / "toypkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "geometry.py").write_text('def area(r):\n    """Return the area of a circle of radius r."""\n    return 3.14159 * r * r\n')
    (package / "tests").mkdir()
    (package / "tests" / "test_geometry.py").write_text('def helper():\n    """A helper inside a test suite is skipped."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    stdlib = source_files()
    files = source_files(["toypkg"])
    extra = files[len(stdlib):]
    assert sorted(module for _, module in extra) == ["toypkg", "toypkg.sub.geometry"]
    pairs = [p for path, module in extra for p in harvest_file(path, module)]
    assert [(p.module, p.name, p.query) for p in pairs] == [("toypkg.sub.geometry", "area", "Return the area of a circle of radius r.")]


def test_codesearch_bad_input(cache):
    with pytest.raises(BatchlabInputError, match="split"):
        load_codesearch("validation", cache_dir=cache)
    with pytest.raises(BatchlabInputError, match="test_fraction"):
        load_codesearch("train", cache_dir=cache, test_fraction=1.5)
    with pytest.raises(BatchlabInputError, match="not installed"):
        load_codesearch("train", cache_dir=cache, packages=("no_such_package_xyz",))


# -- fashion_mnist -------------------------------------------------------------
def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path):
    """A 6-image stand-in with the Debian file names, so the loader is tested without the package."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_fashion_mnist_loader_on_tiny_files(tiny_fashion):
    assert fashion_mnist_available(tiny_fashion)
    train = load_fashion_mnist("train", path=tiny_fashion)
    assert len(train) == 6 and len(load_fashion_mnist("test", path=tiny_fashion)) == 4
    image, caption, label = train[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert label == 3 and caption == caption_for(3, 3) and caption
    assert read_idx(tiny_fashion / "train-labels-idx1-ubyte.gz").tolist() == [0, 1, 2, 3, 4, 5]


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    assert not fashion_mnist_available(tmp_path)
    with pytest.raises(DatasetNotInstalledError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", path=tmp_path)
    with pytest.raises(BatchlabInputError, match="split"):
        load_fashion_mnist("validation", path=tmp_path)


def test_captions_name_the_class():
    for label, name in enumerate(CLASSES):
        captions = {caption_for(label, i) for i in range(30)}
        assert len(captions) > 5  # templates and synonyms vary
        assert all(c.strip() for c in captions)
    assert "boot" in caption_for(9, 0) and "trousers" in caption_for(1, 0)


@pytest.mark.skipif(not fashion_mnist_available(), reason="optional: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_real_files():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert len(train) == 60000 and len(test) == 10000
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
