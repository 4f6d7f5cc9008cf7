"""The user's own data for the fleet simulator: files read into named fields, and partitioners.

``spec.fleet.data`` names a file (``.npz``, ``.csv``; ``.parquet`` with pyarrow installed) that
is split over the simulated devices, or a directory holding one such file per device. A table
becomes two fields, ``x`` (the feature columns, float32) and ``y`` (the label column: int64 when
every value is integral, else float32); an ``.npz`` file gives every array under its own name.

The partitioners deal example indices out to devices; every example goes to exactly one device:

- ``iid``: shuffle, cut into near-equal parts;
- ``dirichlet``: per label, proportions drawn from Dirichlet(alpha) over devices (Hsu et al.,
  2019), the standard tunable non-IID split;
- ``shards``: McMahan et al.'s label-sorted shards (:func:`fedfleet.device.datasets.partition`);
- ``natural``: one device per distinct value of an id column (a user's own examples).

Problems are :class:`DataError` with the manifest field first, so the CLI prints one line.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.spec import DataSpec

__all__ = [
    "DataError",
    "Fields",
    "dirichlet_partition",
    "iid_partition",
    "label_key",
    "natural_partition",
    "read_directory",
    "read_file",
    "take",
]

Fields = dict[str, NDArray[Any]]
"""Named arrays of equal length: one row per example."""

SUFFIXES = (".npz", ".csv", ".parquet")
_MAX_ROWS = 50_000_000


class DataError(ValueError):
    """Data the simulator cannot use; the message starts with the manifest field."""


def label_key(fields: Fields, spec: DataSpec) -> str:
    """The field holding the labels: ``spec.label`` in an ``.npz`` file, ``y`` in a table."""
    return spec.label if spec.label in fields else "y"


def take(fields: Fields, idx: NDArray[np.int64]) -> Fields:
    """The rows ``idx`` of every field."""
    return {k: v[idx] for k, v in fields.items()}


def _read_table(path: Path, where: str) -> tuple[list[str], NDArray[np.float64]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"{where}: reading {path.name} needs pyarrow (pip install 'fedfleet[parquet]')"
            ) from None
        table = pq.read_table(path)
        columns = [str(c) for c in table.column_names]
        try:
            values = np.column_stack(
                [np.asarray(table.column(c).to_numpy(), dtype=np.float64) for c in columns]
            )
        except (ValueError, TypeError) as exc:
            raise DataError(f"{where}: {path.name}: columns must be numeric: {exc}") from None
        return columns, values
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{where}: {path.name} is empty") from None
        rows: list[list[float]] = []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{where}: {path.name} line {line} has {len(row)} values, "
                    f"the header {len(header)}"
                )
            try:
                rows.append([float(v) for v in row])
            except ValueError:
                raise DataError(
                    f"{where}: {path.name} line {line}: values must be numbers"
                ) from None
            if len(rows) > _MAX_ROWS:
                raise DataError(f"{where}: {path.name} has more than {_MAX_ROWS} rows")
    values = np.array(rows, dtype=np.float64).reshape(len(rows), len(header))
    return [h.strip() for h in header], values


def _labels(values: NDArray[np.float64]) -> NDArray[Any]:
    if values.size and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        return values.astype(np.int64)
    return values.astype(np.float32)


def read_file(path: Path, spec: DataSpec, where: str) -> Fields:
    """Read one data file into fields (see the module docs for the layout)."""
    if path.suffix not in SUFFIXES:
        raise DataError(f"{where}: {path.name}: unknown format, use one of {', '.join(SUFFIXES)}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                fields: Fields = {k: z[k] for k in z.files}
        else:
            columns, values = _read_table(path, where)
            fields = _table_fields(columns, values, spec, path, where)
    except OSError as exc:
        raise DataError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{where}: cannot read {path}: {exc}") from None
    if not fields:
        raise DataError(f"{where}: {path.name} holds no arrays")
    lengths = {k: len(v) if v.ndim else -1 for k, v in fields.items()}
    if len(set(lengths.values())) != 1 or -1 in lengths.values():
        raise DataError(f"{where}: {path.name}: fields differ in length: {lengths}")
    if path.suffix == ".npz" and spec.label not in fields:
        raise DataError(
            f"{where}: {path.name} has no label field {spec.label!r} (fields: "
            f"{', '.join(fields)}; set spec.fleet.data.label)"
        )
    return fields


def _table_fields(
    columns: list[str], values: NDArray[np.float64], spec: DataSpec, path: Path, where: str
) -> Fields:
    index = {c: i for i, c in enumerate(columns)}
    for name in [spec.label, *spec.features, *([spec.id_column] if spec.id_column else [])]:
        if name not in index:
            raise DataError(f"{where}: {path.name} has no column {name!r}")
    skip = {spec.label, spec.id_column}
    features = spec.features or [c for c in columns if c not in skip]
    if not features:
        raise DataError(f"{where}: {path.name} has no feature columns")
    fields: Fields = {
        "x": np.ascontiguousarray(values[:, [index[c] for c in features]], dtype=np.float32),
        "y": _labels(values[:, index[spec.label]]),
    }
    if spec.id_column:
        fields[spec.id_column] = values[:, index[spec.id_column]]
    return fields


def read_directory(path: Path, spec: DataSpec, where: str) -> list[Fields]:
    """One device's fields per data file in ``path`` (sorted by name)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"{where}: directory {path} holds no {'/'.join(SUFFIXES)} files")
    out = [read_file(p, spec, where) for p in files]
    schema = {k: (v.shape[1:], v.dtype) for k, v in out[0].items()}
    for p, fields in zip(files, out, strict=True):
        if {k: (v.shape[1:], v.dtype) for k, v in fields.items()} != schema:
            raise DataError(f"{where}: {p.name} has other fields than {files[0].name}")
    return out


def iid_partition(n: int, devices: int, rng: np.random.Generator) -> list[NDArray[np.int64]]:
    parts = np.array_split(rng.permutation(n).astype(np.int64), devices)
    return [np.asarray(p, dtype=np.int64) for p in parts]


def dirichlet_partition(
    labels: NDArray[Any], devices: int, alpha: float, rng: np.random.Generator
) -> list[NDArray[np.int64]]:
    """Per label, split its examples over devices in Dirichlet(alpha) proportions.

    A device left without examples gets one from the device holding the most, so every device
    has data when there are at least as many examples as devices.
    """
    owners: list[list[int]] = [[] for _ in range(devices)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for d, part in enumerate(np.split(idx, cuts)):
            owners[d].extend(int(i) for i in part)
    for d in range(devices):
        if not owners[d]:
            richest = max(range(devices), key=lambda k: len(owners[k]))
            if len(owners[richest]) > 1:
                owners[d].append(owners[richest].pop())
    return [np.array(sorted(o), dtype=np.int64) for o in owners]


def natural_partition(ids: NDArray[Any], devices: int, where: str) -> list[NDArray[np.int64]]:
    """One device per distinct id, in sorted id order."""
    values = np.unique(ids)
    if len(values) != devices:
        raise DataError(
            f"{where}: the id column has {len(values)} distinct values; spec.fleet.devices is "
            f"{devices} and must match"
        )
    return [np.flatnonzero(ids == v).astype(np.int64) for v in values]
