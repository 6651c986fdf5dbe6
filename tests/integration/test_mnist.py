"""MNIST data: the real files, the in-memory tensor path, the DataLoader path, sharding."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import RECIPES, run_cli
from dltrain.data import eval_index_batches, train_index_batches
from dltrain.recipe import load_recipe
from dltrain.workloads import cnn


def recipe_for(data_dir, *overrides):
    return load_recipe(RECIPES / "cnn_mnist.yaml", overrides=[f"data.root={data_dir}", *overrides])


@pytest.fixture(scope="module")
def splits(data_dir):
    return cnn.build_data(recipe_for(data_dir))


def test_counts_shapes_and_normalization(splits):
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54_000, 6_000, 10_000)
    images, labels = splits.test.fetch(torch.arange(10_000))
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # (x/255 - 0.5) / 0.5 maps pixels to [-1, 1]; test pixel mean 33.79/255 -> (0.1325 - 0.5) / 0.5
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert images.mean().item() == pytest.approx((0.1325 - 0.5) / 0.5, abs=1e-3)


def test_validation_split_is_held_out_and_deterministic(data_dir):
    train_ids, val_ids = cnn.split_train_val(60_000, 0.1, seed=0)
    again_train, again_val = cnn.split_train_val(60_000, 0.1, seed=0)
    assert torch.equal(val_ids, again_val) and torch.equal(train_ids, again_train)
    assert len(set(train_ids.tolist()) & set(val_ids.tolist())) == 0
    assert len(train_ids) + len(val_ids) == 60_000
    _, other_val = cnn.split_train_val(60_000, 0.1, seed=1)
    assert not torch.equal(val_ids, other_val)


def test_two_rank_training_shards_are_disjoint_and_cover_the_epoch():
    n, micro = 1_000, 25  # 1000 = 20 global batches of 2 x 25
    shards = [
        torch.cat(list(train_index_batches(n, micro_batch=micro, grad_accum=1, rank=r, world=2, seed=3, epoch=0)))
        for r in (0, 1)
    ]
    assert len(set(shards[0].tolist()) & set(shards[1].tolist())) == 0
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    # reshuffled per epoch, identically on every rank
    next_epoch = torch.cat(
        list(train_index_batches(n, micro_batch=micro, grad_accum=1, rank=0, world=2, seed=3, epoch=1))
    )
    assert not torch.equal(shards[0], next_epoch)


def test_world_and_accumulation_see_the_same_global_batches():
    kw = dict(seed=5, epoch=2)
    one = list(train_index_batches(640, micro_batch=64, grad_accum=1, rank=0, world=1, **kw))
    two = [list(train_index_batches(640, micro_batch=32, grad_accum=1, rank=r, world=2, **kw)) for r in (0, 1)]
    accum = list(train_index_batches(640, micro_batch=32, grad_accum=2, rank=0, world=1, **kw))
    for step, batch in enumerate(one):
        assert sorted(batch.tolist()) == sorted(torch.cat([two[0][step], two[1][step]]).tolist())
        assert sorted(batch.tolist()) == sorted(torch.cat(accum[2 * step : 2 * step + 2]).tolist())


@pytest.mark.parametrize("n, world, batch", [(10_000, 2, 64), (6_001, 2, 64), (5, 2, 4), (872, 3, 16)])
def test_eval_shards_count_each_example_once(n, world, batch):
    counted = []
    lengths = []
    for rank in range(world):
        batches = list(eval_index_batches(n, batch=batch, rank=rank, world=world))
        lengths.append(len(batches))
        for idx, n_real in batches:
            counted.extend(idx[:n_real].tolist())
    assert sorted(counted) == list(range(n))
    assert len(set(lengths)) == 1  # every rank runs the same number of batches


def test_tensor_and_dataloader_paths_give_the_same_batches(data_dir):
    tensor = cnn.build_data(recipe_for(data_dir, "data.loader=tensor", "data.train_subset=512"))
    torch_path = cnn.build_data(recipe_for(data_dir, "data.loader=torch", "data.train_subset=512"))
    index_batches = list(train_index_batches(512, micro_batch=64, grad_accum=1, rank=0, world=1, seed=0, epoch=0))
    for (xa, ya), (xb, yb) in zip(
        tensor.train.batches(index_batches), torch_path.train.batches(index_batches), strict=True
    ):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_notebook_loader_copies_asynchronously_only_from_pinned_memory(device, monkeypatch):
    """non_blocking=True from pageable memory is a synchronous copy in disguise: the loader must pin
    its batches whenever it asks for an asynchronous copy (every batch to a GPU)."""
    seen = {"loader": {}, "copies": []}

    class Batch:  # stands for a CPU tensor; records how it is copied to the device
        def to(self, target, non_blocking=False):
            seen["copies"].append(non_blocking)
            return self

    def loader(dataset, **kwargs):
        seen["loader"] = kwargs
        return [(Batch(), Batch()) for _ in kwargs["batch_sampler"]]

    monkeypatch.setattr(torch.utils.data, "DataLoader", loader)
    split = object.__new__(cnn.TorchLoaderSplit)  # no MNIST files: only the loader's settings matter
    split.dataset, split.num_workers, split.device = None, 0, torch.device(device)
    list(split.batches([torch.arange(4), torch.arange(4, 8)]))
    assert len(seen["copies"]) == 4
    pinned = seen["loader"].get("pin_memory", False)
    assert all(pinned for async_copy in seen["copies"] if async_copy)  # never an asynchronous copy from pageable memory
    assert pinned == (device == "cuda") and all(seen["copies"]) == (device == "cuda")


def test_corrupt_gz_is_reported_with_its_path(tmp_path, data_dir, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for src in (data_dir / "MNIST" / "raw").glob("*.gz"):
        (raw / src.name).write_bytes(src.read_bytes())
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(cnn.DataError, match="train-labels-idx1-ubyte.gz is corrupt"):
        cnn.prepare_mnist(tmp_path)


def test_missing_data_offline_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(cnn.DataError, match=f"MNIST not found in {tmp_path}/MNIST/raw"):
        cnn.prepare_mnist(tmp_path)


def _gz_root(root, data_dir):
    """A data root whose MNIST/raw links to the real .gz files; returns that raw folder."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for src in (data_dir / "MNIST" / "raw").glob("*.gz"):
        (raw / src.name).symlink_to(src)
    return raw


@pytest.fixture
def filled_cache(tmp_path, data_dir, monkeypatch):
    """The user cache's MNIST/raw, holding the copy a run from another, good root unzipped there."""
    monkeypatch.setenv("DLTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    assert cnn.prepare_mnist(_gz_root(tmp_path / "good", data_dir).parent.parent) == tmp_path / "cache" / "data"
    return tmp_path / "cache" / "data" / "MNIST" / "raw"


def test_an_empty_root_uses_the_cache_and_says_so(tmp_path, filled_cache, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert cnn.prepare_mnist(empty) == filled_cache.parent.parent
    assert capsys.readouterr().err.splitlines() == [
        f"dltrain: note: no MNIST files in {empty}/MNIST/raw: using the copy in {filled_cache}"
    ]


def test_a_root_with_files_is_used_and_checked_even_when_the_cache_has_a_copy(tmp_path, data_dir, filled_cache, capsys):
    corrupt = _gz_root(tmp_path / "corrupt", data_dir)
    (corrupt / "train-images-idx3-ubyte.gz").unlink()
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not the MNIST images")
    with pytest.raises(cnn.DataError, match="train-images-idx3-ubyte.gz is corrupt"):
        cnn.prepare_mnist(corrupt.parent.parent)
    partial = _gz_root(tmp_path / "partial", data_dir)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(cnn.DataError, match=r"incomplete: t10k-labels-idx1-ubyte\(\.gz\) is missing"):
        cnn.prepare_mnist(partial.parent.parent)
    cut = tmp_path / "cut" / "MNIST" / "raw"  # unzipped files, cut short: this root is read, and fails
    cut.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (cut / name).write_bytes(bytes(16))
    assert cnn.prepare_mnist(cut.parent.parent) == cut.parent.parent
    with pytest.raises(cnn.DataError, match="cannot be read"):
        cnn.read_mnist(cut.parent.parent, train=True)
    assert "note" not in capsys.readouterr().err  # no root above was swapped for the cache


def test_flops_per_sample_matches_the_layers():
    recipe = load_recipe(RECIPES / "cnn_mnist.yaml")
    conv1, conv2 = 2 * 28 * 28 * 32 * 9, 2 * 14 * 14 * 64 * 32 * 9
    fc = 2 * (64 * 49 * 128 + 128 * 10)
    assert cnn.flops_per_sample(recipe) == 3 * (conv1 + conv2 + fc) - conv1


@pytest.mark.slow
@pytest.mark.long
def test_cnn_cpu_test_profile_reaches_97_percent(tmp_path, data_dir):
    out = tmp_path / "run"
    result = run_cli(
        "train",
        str(RECIPES / "cnn_mnist.yaml"),
        "--profile",
        "cpu_test",
        "--output-dir",
        str(out),
        env={"DLTRAIN_DATA_DIR": str(data_dir)},
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["test/accuracy"] >= 0.97
    assert summary["metrics"]["test/examples"] == 10_000
    assert summary["throughput"]["train_samples_per_s"] > 0
    assert summary["environment"]["world_size"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert train[0]["step"] == 20 and all("train/accuracy" in r for r in train)
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert any("val/accuracy" in r for r in records)
    resolved = load_recipe(out / "recipe.yaml")
    assert resolved.train.epochs == 1
    assert (out / "loss.png").stat().st_size > 0 and (out / "accuracy.png").stat().st_size > 0
    assert (out / "final_model" / "model.safetensors").is_file()
