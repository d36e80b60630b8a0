"""The error catalogue of issue 15 (item 7), walked case by case.

Each bad input once raised an internal error (FileNotFoundError, JSONDecodeError,
BadZipFile, IndexError, a faiss RuntimeError, a 7 TiB allocation) or, on the command
line, a traceback with exit code 1 or 3 (or 0). Now the Python API raises
``BatchlabInputError`` / ``StaleArtifactError`` with a message that says what was wrong,
and every ``batchlab`` subcommand exits 2 with a one-line message on stderr.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from batchlab.cli import main
from batchlab.errors import BatchlabInputError, StaleArtifactError
from batchlab.index import EmbeddingIndex
from batchlab.samplers import CommunityBatchSampler, MinedNegatives, MixedBatchSampler, OTPlanSampler
from batchlab.samplers.communities import save_artifacts
from batchlab.samplers.mining import mine_hard_negatives


@pytest.fixture
def rows():
    return torch.nn.functional.normalize(torch.randn(40, 6, generator=torch.Generator().manual_seed(0)), dim=1)


@pytest.fixture
def build(tmp_path, rows):
    """A complete build-batches directory for ``rows`` (groups of 4, window ids)."""
    from batchlab.index import content_hash

    meta = {"n": 40, "d": 6, "group_size": 4, "rank_window": [1, 3], "method": "metis", "teacher_hash": content_hash(rows)}
    window = np.stack([(np.arange(40) + 1) % 40, (np.arange(40) + 2) % 40], axis=1).astype(np.int32)
    return save_artifacts(tmp_path / "b3", groups=np.arange(40) // 4, meta=meta, window_ids=window)


# -- the Python API ---------------------------------------------------------------
def test_from_artifacts_missing_directory_and_missing_or_corrupt_files(tmp_path, build, rows):
    with pytest.raises(BatchlabInputError, match="nothing there"):
        CommunityBatchSampler.from_artifacts(tmp_path / "nowhere", 8)
    assert CommunityBatchSampler.from_artifacts(build, 8, embeddings=rows).num_examples == 40
    (build / "meta.json").write_text("{corrupt")  # was a JSONDecodeError
    with pytest.raises(StaleArtifactError, match="meta.json"):
        CommunityBatchSampler.from_artifacts(build, 8)
    (build / "meta.json").unlink()  # was a FileNotFoundError
    with pytest.raises(StaleArtifactError, match="missing"):
        CommunityBatchSampler.from_artifacts(build, 8)


def test_from_artifacts_of_an_interrupted_build(tmp_path):
    """What an interrupted in-place writer of the old layout left: groups.npy and nothing else."""
    (tmp_path / "b3").mkdir()
    np.save(tmp_path / "b3" / "groups.npy", np.arange(40) // 4)
    with pytest.raises(StaleArtifactError, match="did not finish"):
        CommunityBatchSampler.from_artifacts(tmp_path / "b3", 8)


@pytest.mark.parametrize("damage", ["badzip", "truncated"])
def test_mined_negatives_load_badzip_or_truncated(tmp_path, rows, damage):
    mined = mine_hard_negatives(rows, rows, [[i] for i in range(40)], num_negatives=2, progress=False,
                                index_kwargs={"kind": "torch"})
    path = mined.save(tmp_path / "negatives.npz")
    raw = path.read_bytes()
    path.write_bytes(b"not a zip file at all" if damage == "badzip" else raw[:-40])
    with pytest.raises(StaleArtifactError, match="not a complete"):
        MinedNegatives.load(path)


def test_embedding_index_load_swapped_embeddings_and_corrupt_index(tmp_path, rows):
    EmbeddingIndex(rows, kind="torch", progress=False).save(tmp_path / "torch")
    np.save(tmp_path / "torch" / "embeddings.npy", rows.flip(0).numpy())
    with pytest.raises(StaleArtifactError, match="embeddings.npy"):
        EmbeddingIndex.load(tmp_path / "torch")
    EmbeddingIndex(rows, kind="ivf-gemm", nlist=2, progress=False).save(tmp_path / "ivf")
    (tmp_path / "ivf" / "ivfgemm.npz").write_bytes(b"corrupt")  # was AttributeError: _centroids
    with pytest.raises(StaleArtifactError, match="ivfgemm.npz"):
        EmbeddingIndex.load(tmp_path / "ivf", rows)


def test_mixed_sampler_with_fewer_examples_than_its_base():
    base = CommunityBatchSampler(None, 4, group_size=2, groups=np.arange(100) // 2)
    with pytest.raises(BatchlabInputError, match="100 examples"):  # was an IndexError while iterating
        MixedBatchSampler(base, 50, batch_size=8, mix_random=0.5)


def test_ot_plan_sampler_labels_of_the_wrong_length():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    sampler = OTPlanSampler("exact")
    with pytest.raises(BatchlabInputError, match="y1 must hold one label per row"):  # was an IndexError
        sampler.sample_plan_with_labels(x0, x1, torch.arange(8), torch.arange(5))
    with pytest.raises(BatchlabInputError, match="y0"):
        sampler.sample_plan_with_labels(x0, x1, torch.arange(9), None)
    out = sampler.sample_plan_with_labels(x0, x1, torch.arange(8), torch.arange(8))
    assert out[2].shape == (8,) and out[3].shape == (8,)


def test_embedding_cache_with_zero_rows():
    from batchlab.losses.embedding_cache import EmbeddingCache

    cache = EmbeddingCache([torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)], chunk_size=4)
    with pytest.raises(BatchlabInputError, match="0 rows"):  # was a failure inside torch.cat
        cache.encode(torch.zeros(0, 3), torch.zeros(0, 3))


def test_a_group_id_of_1e12_allocates_nothing():
    groups = np.array([0, 0, 10**12, 10**12, 7, 7], dtype=np.int64)  # was a 7 TiB bincount
    start = time.perf_counter()
    sampler = CommunityBatchSampler(None, 2, group_size=2, groups=groups, seed=0)
    assert time.perf_counter() - start < 5
    assert sampler.groups.tolist() == [0, 0, 2, 2, 1, 1] and sampler.num_groups == 3
    assert sorted(i for b in sampler for i in b) == list(range(6))


def test_neighbour_ids_out_of_range_are_refused():
    ids = np.tile(np.arange(1, 4), (8, 1)) % 8
    ids[2, 1] = 8
    with pytest.raises(BatchlabInputError, match=r"\[0, 8\)"):
        CommunityBatchSampler(None, 4, group_size=2, groups=np.arange(8) // 2, neighbours=(None, ids),
                              rank_window=(0, 3), extra_negatives=1)


def test_meta_device_tensors_in_the_data_checks():
    """Meta tensors (shape inference, torch.compile's fake tensors) have no values to check: no crash."""
    from batchlab._checks import check_finite, check_normalized

    x = torch.empty(4, 3, device="meta")
    for check in (check_finite, check_normalized):
        try:
            check("x", x)
        except BatchlabInputError:
            pass  # a clear error is acceptable too; anything else is not


# -- the command line ---------------------------------------------------------------
def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def assert_bad_input(code, err, match):
    assert code == 2, err
    assert "Traceback" not in err and match in err, err
    assert len([line for line in err.strip().splitlines() if "error" in line]) == 1, err


@pytest.fixture
def files(tmp_path, rows):
    np.save(tmp_path / "good.npy", rows.numpy())
    np.save(tmp_path / "flat.npy", rows.numpy().ravel())
    raw = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "positives.json").write_text('[[0], [1], [2')
    (tmp_path / "a-file").write_text("not a directory")
    return tmp_path


@pytest.mark.parametrize("command", ["build-batches", "mine"])
@pytest.mark.parametrize("case,match", [("flat.npy", "shape (240,)"), ("truncated.npy", "truncated")])
def test_cli_1d_or_truncated_npy(files, capsys, command, case, match):
    argv = (["build-batches", files / case, "--out", files / "o"] if command == "build-batches"
            else ["mine", "--corpus", files / case, "--positives", "diagonal", "--out", files / "o"])
    assert_bad_input(*run_cli(argv, capsys), match)


def test_cli_corrupt_positives_json(files, capsys):
    argv = ["mine", "--corpus", files / "good.npy", "--positives", files / "positives.json", "--out", files / "o"]
    assert_bad_input(*run_cli(argv, capsys), "not valid JSON")


@pytest.mark.parametrize("command", ["build-batches", "mine", "train", "demo"])
def test_cli_device_tpu(files, capsys, command):
    extra = {"build-batches": ["--demo", "50"], "mine": ["--corpus", files / "good.npy", "--positives", "diagonal"]}
    assert_bad_input(*run_cli([command, *extra.get(command, []), "--device", "tpu"], capsys), "unknown device 'tpu'")


def test_cli_cuda_without_a_gpu(capsys):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = "cuda" if count == 0 else f"cuda:{count}"  # a device this machine does not have
    assert_bad_input(*run_cli(["train", "--device", device], capsys), "--device cpu")


@pytest.mark.parametrize("command", ["build-batches", "mine"])
def test_cli_out_pointing_at_a_file(files, capsys, command):
    extra = {"build-batches": ["--demo", "50"], "mine": ["--corpus", files / "good.npy", "--positives", "diagonal"]}
    assert_bad_input(*run_cli([command, *extra[command], "--out", files / "a-file"], capsys), "is a file")


@pytest.mark.parametrize("argv,match", [
    (["train", "--lr", "-5"], "expected a finite number > 0"),
    (["train", "--batch-size", "0"], "expected an integer >= 1"),
    (["bench", "losses", "--sizes", "-5"], "expected an integer >= 1"),
    (["build-batches", "--demo", "50", "--batch-size", "0"], "expected an integer >= 1"),
])
def test_cli_non_positive_sizes_and_rates(capsys, argv, match):
    assert_bad_input(*run_cli(argv, capsys), match)


def test_cli_build_batches_batch_smaller_than_a_group(tmp_path, capsys):
    argv = ["build-batches", "--demo", "50", "--group-size", "8", "--batch-size", "4", "--out", tmp_path / "o"]
    assert_bad_input(*run_cli(argv, capsys), "smaller than --group-size")


def test_cli_build_batches_over_an_interrupted_or_foreign_directory(tmp_path, capsys):
    interrupted = tmp_path / "b3"
    interrupted.mkdir()
    np.save(interrupted / "groups.npy", np.zeros(7, dtype=np.int64))  # an old build killed mid-write
    argv = ["build-batches", "--demo", "60", "--group-size", "4", "--batch-size", "8", "--rank-window", "2", "10",
            "--index-kind", "torch", "--no-progress", "--out", interrupted]
    code, err = run_cli(argv, capsys)
    assert code == 0, err  # replaced whole by a complete build
    sampler = CommunityBatchSampler.from_artifacts(interrupted, 8)
    assert sampler.num_examples == 60 and json.loads((interrupted / "meta.json").read_text())["n"] == 60
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert_bad_input(*run_cli([*argv[:-1], foreign], capsys), "not a b3-batches artifact")
    assert (foreign / "notes.txt").read_text() == "mine"
