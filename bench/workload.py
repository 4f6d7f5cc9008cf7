"""The one workload every implementation in bench/ runs, defined once.

Three implementations are compared on exactly the same work: fedfleet's embedded runner, Flower's
simulation engine and a bare numpy loop (the floor). So that the figures differ only by the
system around the training, this module fixes the data, the partition, the model and the round
policy, and renders them as an FLJob manifest for fedfleet.

It imports only numpy and scikit-learn (fedfleet is imported lazily in :func:`fljob`) because
the Flower benchmark loads it inside a separate virtualenv that has no fedfleet installed.

Workload: scikit-learn ``load_digits`` (1,797 8x8 images), features divided by 16, an 80/20
train/test split from a seed-0 numpy permutation, 100 devices holding 2 label-sorted shards
each (McMahan et al. 2017's pathological non-IID), softmax regression 64->10 from zeros,
10 devices per round, 50 rounds, E=5 local epochs, B=10, plain SGD at lr=0.1, FedAvg
(example-weighted mean of the clients' weights), no drop-outs, server-side test accuracy after
every round.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from fedfleet.core.spec import FLJob

__all__ = [
    "BATCH_SIZE",
    "CLASSES",
    "DEVICES",
    "DEVICES_PER_ROUND",
    "FEATURES",
    "LEARNING_RATE",
    "LOCAL_EPOCHS",
    "ROUNDS",
    "SEED",
    "SHARDS_PER_DEVICE",
    "TEST_FRACTION",
    "Data",
    "fljob",
    "load",
    "manifest",
]

FEATURES = 64
"""Inputs of the model: the 8x8 digit image, flattened."""
CLASSES = 10
"""Outputs of the model: digits 0-9."""
DEVICES = 100
"""Simulated devices in the population."""
SHARDS_PER_DEVICE = 2
"""Label-sorted shards per device: most devices see only two digits."""
DEVICES_PER_ROUND = 10
"""Devices trained and aggregated per round (goal count; no over-selection, no drop-outs)."""
ROUNDS = 50
"""Rounds per run (``--rounds`` in the driver overrides it for a quick look)."""
LOCAL_EPOCHS = 5
"""Local passes over a device's examples per round (E)."""
BATCH_SIZE = 10
"""Local minibatch size (B)."""
LEARNING_RATE = 0.1
"""Step size of plain local SGD."""
TEST_FRACTION = 0.2
"""Held out for server-side evaluation."""
SEED = 0
"""Seed of the split, the partition and (in the floor) the client sampling."""


@dataclass(frozen=True, eq=False)
class Data:
    """The split and the partition: test set for the server, one index array per device."""

    x_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.int64]
    shards: tuple[NDArray[np.int64], ...]
    """Per device, indices into the training arrays (disjoint, covering every row)."""

    def device(self, i: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """The training examples held by device ``i`` (0-based)."""
        idx = self.shards[i]
        return self.x_train[idx], self.y_train[idx]


@functools.cache
def load() -> Data:
    """Load digits, split 80/20 and deal the training set out as label-sorted shards.

    1,438 training examples do not divide into 200 equal shards, so the shards are near-equal
    (7 or 8 examples, ``numpy.array_split``) rather than dropping the remainder. Cached per
    process: Flower's actors call it once each, not once per client.
    """
    from sklearn.datasets import load_digits

    x_raw, y_raw = load_digits(return_X_y=True)
    x = (np.asarray(x_raw, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    y = np.asarray(y_raw, dtype=np.int64)
    n = len(y)
    n_test = round(n * TEST_FRACTION)
    order = np.random.default_rng(SEED).permutation(n)
    test, train = order[:n_test], order[n_test:]
    x_train, y_train = x[train], y[train]

    rng = np.random.default_rng(SEED)
    by_label = np.argsort(y_train, kind="stable").astype(np.int64)
    shards = np.array_split(by_label, DEVICES * SHARDS_PER_DEVICE)
    owners = rng.permutation(len(shards)).reshape(DEVICES, SHARDS_PER_DEVICE)
    per_device = tuple(np.concatenate([shards[s] for s in row]) for row in owners)
    return Data(x_train, y_train, x[test], y[test], per_device)


def manifest(rounds: int = ROUNDS) -> dict[str, Any]:
    """The workload as an FLJob manifest for fedfleet's embedded runner.

    Every setting that fedfleet would otherwise default differently from the shared workload
    is pinned: no over-selection, every report needed, no drop-outs, every device always
    available and eligible.
    """
    return {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": "bench-digits"},
        "spec": {
            "population": "bench",
            "model": {"kind": "softmax", "inputs": FEATURES, "classes": CLASSES},
            "plan": {
                "localEpochs": LOCAL_EPOCHS,
                "batchSize": BATCH_SIZE,
                "learningRate": LEARNING_RATE,
            },
            "rounds": {
                "total": rounds,
                "goalCount": DEVICES_PER_ROUND,
                "overSelection": 1.0,
                "minReportFraction": 1.0,
            },
            "aggregation": {"algorithm": "fedavg"},
            "fleet": {
                "devices": DEVICES,
                "dataset": "digits",
                "shardsPerDevice": SHARDS_PER_DEVICE,
                "dropoutRate": 0.0,
                "seed": SEED,
                "availability": {"peak": 1.0, "trough": 1.0},
            },
            "eligibility": {
                "requireCharging": False,
                "requireUnmetered": False,
                "requireIdle": False,
            },
        },
    }


def fljob(rounds: int = ROUNDS) -> FLJob:
    """:func:`manifest` validated by fedfleet's own parser (needs fedfleet installed)."""
    from fedfleet.core.spec import parse_manifest

    return parse_manifest(manifest(rounds))
