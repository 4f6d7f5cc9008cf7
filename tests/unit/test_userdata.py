"""The user's data in the simulator: files into fields, the partitioners, and the split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from fedfleet.core.spec import DataSpec, EvaluationSpec, FleetSpec
from fedfleet.device.datasets import prepare
from fedfleet.device.userdata import (
    DataError,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    read_file,
)

pytestmark = pytest.mark.unit


def _cover(parts: list[NDArray[np.int64]], n: int) -> None:
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def _csv(path: Path, n: int = 120, devices: int = 6) -> Path:
    rng = np.random.default_rng(1)
    lines = ["owner,a,b,c,label"]
    for i in range(n):
        a, b, c = rng.random(3)
        lines.append(f"{i % devices},{a:.4f},{b:.4f},{c:.4f},{i % 4}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_becomes_x_and_y_and_npz_keeps_its_arrays(tmp_path: Path) -> None:
    spec = DataSpec(path="unused", label="label", id_column="owner")
    fields = read_file(_csv(tmp_path / "d.csv"), spec, "spec.fleet.data.path")
    assert fields["x"].shape == (120, 3) and fields["x"].dtype == np.float32
    assert fields["y"].dtype == np.int64 and set(fields["y"]) == {0, 1, 2, 3}
    assert set(fields) == {"x", "y", "owner"}
    only_b = read_file(tmp_path / "d.csv", DataSpec(path="u", label="label", features=["b"]), "w")
    assert only_b["x"].shape == (120, 1)
    np.savez(tmp_path / "d.npz", image=np.zeros((5, 2, 2), np.uint8), y=np.arange(5))
    fields = read_file(tmp_path / "d.npz", DataSpec(path="u"), "w")
    assert fields["image"].shape == (5, 2, 2) and fields["image"].dtype == np.uint8


@pytest.mark.parametrize(
    ("content", "spec", "match"),
    [
        ("a,label\n1,2\n3\n", DataSpec(path="u", label="label"), r"line 3 has 1 values"),
        ("a,label\n1,x\n", DataSpec(path="u", label="label"), r"line 2: values must be numbers"),
        ("a,b\n1,2\n", DataSpec(path="u", label="label"), r"no column 'label'"),
        ("", DataSpec(path="u"), r"is empty"),
    ],
)
def test_bad_tables_are_refused_naming_the_field(
    tmp_path: Path, content: str, spec: DataSpec, match: str
) -> None:
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=r"^spec\.fleet\.data\.path: .*" + match):
        read_file(path, spec, "spec.fleet.data.path")


def test_iid_and_natural_partitions_cover_every_example() -> None:
    rng = np.random.default_rng(0)
    parts = iid_partition(103, 10, rng)
    _cover(parts, 103)
    assert {len(p) for p in parts} <= {10, 11}
    ids = np.array([7, 3, 7, 9, 3, 3])
    parts = natural_partition(ids, 3, "w")
    assert [list(p) for p in parts] == [[1, 4, 5], [0, 2], [3]]
    with pytest.raises(DataError, match=r"3 distinct values; spec\.fleet\.devices is 4"):
        natural_partition(ids, 4, "w")


def test_dirichlet_small_alpha_skews_labels_and_large_alpha_does_not() -> None:
    labels = np.repeat(np.arange(10), 200)

    def mean_labels_per_device(alpha: float) -> float:
        parts = dirichlet_partition(labels, 20, alpha, np.random.default_rng(3))
        _cover(parts, len(labels))
        assert all(len(p) > 0 for p in parts)
        # labels holding at least 5% of a device's examples
        return float(
            np.mean([np.sum(np.bincount(labels[p], minlength=10) >= 0.05 * len(p)) for p in parts])
        )

    assert mean_labels_per_device(0.1) < 4 < 9 <= mean_labels_per_device(100.0)


def test_prepare_splits_a_users_file_and_a_directory_of_device_files(tmp_path: Path) -> None:
    csv = _csv(tmp_path / "all.csv")
    fleet = FleetSpec(
        devices=6,
        test_fraction=0.25,
        data=DataSpec(path=str(csv), label="label", id_column="owner", partition="natural"),
    )
    split = prepare(fleet)
    assert split.test is not None and len(split.test["y"]) == 30
    assert len(split.shards) == 6
    for i, shard in enumerate(split.shards):
        assert set(split.train["owner"][shard]) == {split.train["owner"][shard][0]}
        assert len(split.device_examples(i)["x"]) == len(shard)
    # a named held-out file: nothing of the fleet's file is held out
    named = prepare(fleet, EvaluationSpec(data=str(csv)))
    assert named.test is not None and len(named.test["y"]) == 120
    assert sum(len(s) for s in named.shards) == 120
    shards = prepare(
        FleetSpec(
            devices=4,
            shards_per_device=1,
            data=DataSpec(path=str(csv), label="label", partition="shards"),
        )
    )
    assert all(len(set(shards.train["y"][s])) == 1 for s in shards.shards)
    folder = tmp_path / "per-device"
    folder.mkdir()
    for k in range(3):
        np.savez(folder / f"d{k}.npz", x=np.full((k + 2, 4), k, np.float32), y=np.full(k + 2, k))
    per_device = prepare(FleetSpec(devices=3, data=DataSpec(path=str(folder))))
    assert per_device.test is None
    for k in range(3):
        assert set(per_device.device_examples(k)["y"]) == {k}
        assert len(per_device.device_examples(k)["x"]) == k + 2
    with pytest.raises(DataError, match=r"^spec\.fleet\.devices: 5 devices, .* 3 files"):
        prepare(FleetSpec(devices=5, data=DataSpec(path=str(folder))))
    with pytest.raises(DataError, match=r"^spec\.fleet\.data\.partition: dirichlet needs integer"):
        np.savez(tmp_path / "reg.npz", x=np.zeros((10, 2)), y=np.linspace(0, 1, 10))
        prepare(
            FleetSpec(
                devices=2, data=DataSpec(path=str(tmp_path / "reg.npz"), partition="dirichlet")
            )
        )
