"""Write the example's synthetic data: ``data/train.csv`` (40 devices) and ``data/test.csv``.

Each device's inputs are shifted by its own offset (covariate shift: a non-IID population)
and every target follows one linear law plus noise, so a federated linear regression can learn
it. Deterministic: ``python make_data.py`` reproduces the shipped files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FEATURES, DEVICES = 8, 40
rng = np.random.default_rng(7)
TRUE_W = rng.normal(0.0, 1.0, FEATURES)
TRUE_B = 0.5


def rows(n_per_device: list[int], shift_scale: float) -> np.ndarray:
    out = []
    for device, n in enumerate(n_per_device):
        shift = rng.normal(0.0, shift_scale, FEATURES)
        x = rng.normal(0.0, 1.0, (n, FEATURES)) + shift
        y = x @ TRUE_W + TRUE_B + rng.normal(0.0, 0.3, n)
        out.append(np.column_stack([np.full(n, device), x, y]))
    return np.concatenate(out)


def write(path: Path, table: np.ndarray) -> None:
    header = ",".join(["device", *(f"f{i}" for i in range(FEATURES)), "target"])
    fmt = ["%d"] + ["%.5f"] * (FEATURES + 1)
    np.savetxt(path, table, delimiter=",", header=header, comments="", fmt=fmt)


if __name__ == "__main__":
    here = Path(__file__).parent / "data"
    here.mkdir(exist_ok=True)
    write(here / "train.csv", rows([int(k) for k in rng.integers(20, 60, DEVICES)], 1.0))
    write(here / "test.csv", rows([50] * 8, 1.0))
