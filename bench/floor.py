"""The floor: FedAvg on the shared workload as a bare numpy loop, with no system around it.

No processes, no messages, no store, no serialization: select 10 of 100 clients with a numpy
Generator, train each in turn, average, evaluate. Whatever fedfleet or Flower take beyond this
is the cost of the system. The model code (:func:`local_train`, :func:`accuracy`,
:func:`fedavg`) is also what the Flower benchmark's clients and server run, so the two differ
only in the machinery around it.

Run alone: ``python bench/floor.py [--rounds N]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

import workload as w

__all__ = ["FloorResult", "Params", "accuracy", "fedavg", "local_train", "run", "zeros"]

Params = tuple[NDArray[np.float32], NDArray[np.float32]]
"""Softmax regression weights (features x classes) and biases (classes)."""


class FloorResult(NamedTuple):
    wall_seconds: float
    final_accuracy: float
    accuracies: list[float]
    """Test accuracy after each round."""


def zeros() -> Params:
    return np.zeros((w.FEATURES, w.CLASSES), np.float32), np.zeros(w.CLASSES, np.float32)


def local_train(
    params: Params, x: NDArray[np.float32], y: NDArray[np.int64], rng: np.random.Generator
) -> Params:
    """E epochs of minibatch SGD on softmax cross-entropy, reshuffling every epoch."""
    weights, bias = params[0].copy(), params[1].copy()
    n = len(y)
    for _ in range(w.LOCAL_EPOCHS):
        order = rng.permutation(n)
        for start in range(0, n, w.BATCH_SIZE):
            idx = order[start : start + w.BATCH_SIZE]
            xb = x[idx]
            logits = xb @ weights + bias
            logits -= logits.max(axis=1, keepdims=True)
            grad = np.exp(logits)
            grad /= grad.sum(axis=1, keepdims=True)
            grad[np.arange(len(idx)), y[idx]] -= 1.0
            grad /= np.float32(len(idx))
            weights -= np.float32(w.LEARNING_RATE) * (xb.T @ grad)
            bias -= np.float32(w.LEARNING_RATE) * grad.sum(axis=0)
    return weights, bias


def accuracy(params: Params, x: NDArray[np.float32], y: NDArray[np.int64]) -> float:
    return float(np.mean(np.argmax(x @ params[0] + params[1], axis=1) == y))


def fedavg(updates: list[tuple[Params, int]]) -> Params:
    """Example-weighted mean of the clients' parameters (McMahan et al.'s FedAvg)."""
    total = sum(n for _, n in updates)
    weights = sum(p[0] * np.float32(n / total) for p, n in updates)
    bias = sum(p[1] * np.float32(n / total) for p, n in updates)
    return np.asarray(weights, np.float32), np.asarray(bias, np.float32)


def client_rng(round_: int, device: int) -> np.random.Generator:
    """The shuffling stream of one device in one round (shared with the Flower clients)."""
    return np.random.default_rng([w.SEED, round_, device])


def run(rounds: int = w.ROUNDS, sampling_seed: int = w.SEED) -> FloorResult:
    """Train the shared workload; wall time covers data loading (cached after the first call).
    ``sampling_seed`` seeds the choice of each round's devices (the floor's own: ``SEED``)."""
    start = time.perf_counter()
    data = w.load()
    select = np.random.default_rng(sampling_seed)
    params = zeros()
    accuracies: list[float] = []
    for round_ in range(1, rounds + 1):
        chosen = select.choice(w.DEVICES, size=w.DEVICES_PER_ROUND, replace=False)
        updates = []
        for device in chosen:
            x, y = data.device(int(device))
            updates.append((local_train(params, x, y, client_rng(round_, int(device))), len(y)))
        params = fedavg(updates)
        accuracies.append(accuracy(params, data.x_test, data.y_test))
    return FloorResult(time.perf_counter() - start, accuracies[-1], accuracies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=w.ROUNDS)
    result = run(parser.parse_args().rounds)
    print(
        json.dumps({"wall_seconds": result.wall_seconds, "final_accuracy": result.final_accuracy})
    )


if __name__ == "__main__":
    main()
