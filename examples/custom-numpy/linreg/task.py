"""Federated linear regression: a task written against ``fedfleet.tasks`` with numpy only.

The model is ``y = x @ w + b``, trained with minibatch SGD on the mean squared error (plus an
optional L2 penalty on ``w``). The manifest names it as
``spec.task.ref: linreg.task:LinearRegression``
and passes ``spec.task.config`` to the constructor, which checks it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedfleet.tasks import DataMismatch, Examples, FLTask, TrainResult
from fedfleet.tasks.api import PlanSpec, TrainingAborted, Weights


class LinearRegression(FLTask):
    def __init__(self, config: Mapping[str, Any]) -> None:
        unknown = set(config) - {"features", "l2"}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        features = config.get("features")
        if not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive integer, got {features!r}")
        l2 = config.get("l2", 0.0)
        if not isinstance(l2, int | float) or l2 < 0:
            raise ValueError(f"l2 must be a non-negative number, got {l2!r}")
        self.features = features
        self.l2 = float(l2)

    def initial_weights(self) -> dict[str, NDArray[np.float32]]:
        return {
            "weight": np.zeros(self.features, dtype=np.float32),
            "bias": np.zeros(1, dtype=np.float32),
        }

    def decode(self, records: Examples) -> Examples:
        # The Example Store keeps what the app wrote; the model wants float32 targets.
        return {
            "x": np.asarray(records["x"], np.float32),
            "y": np.asarray(records["y"], np.float32),
        }

    def check_data(self, examples: Examples) -> None:
        x, y = examples["x"], examples["y"]
        if x.ndim != 2 or x.shape[1] != self.features:
            raise DataMismatch(
                "x", f"examples have shape {x.shape[1:]}, the model takes ({self.features},)"
            )
        if y.shape != (len(x),):
            raise DataMismatch("y", f"targets must be one number per example, got {y.shape[1:]}")

    def train(
        self,
        weights: Weights,
        examples: Examples,
        plan: PlanSpec,
        rng: np.random.Generator,
        should_continue: Callable[[int], bool],
    ) -> TrainResult:
        x, y = examples["x"], examples["y"]
        w, b = weights[0].copy(), weights[1].copy()
        lr = np.float32(plan.learning_rate)
        n = len(y)
        for epoch in range(plan.local_epochs):
            if not should_continue(epoch):
                raise TrainingAborted(f"stopped before epoch {epoch + 1}")
            order = rng.permutation(n)
            for start in range(0, n, plan.batch_size):
                idx = order[start : start + plan.batch_size]
                err = x[idx] @ w + b - y[idx]
                grad_w = 2 * x[idx].T @ err / len(idx) + 2 * self.l2 * w
                grad_b = 2 * err.mean(keepdims=True)
                w -= lr * grad_w.astype(np.float32)
                b -= lr * grad_b.astype(np.float32)
        metrics = self._metrics(w, b, x, y)
        return TrainResult(update=[w - weights[0], b - weights[1]], num_examples=n, metrics=metrics)

    def evaluate(self, weights: Weights, examples: Examples) -> dict[str, float]:
        return self._metrics(weights[0], weights[1], examples["x"], examples["y"])

    @staticmethod
    def _metrics(
        w: NDArray[np.float32], b: NDArray[np.float32], x: NDArray[Any], y: NDArray[Any]
    ) -> dict[str, float]:
        err = x @ w + b - y
        mse = float(np.mean(err.astype(np.float64) ** 2))
        var = float(np.var(y.astype(np.float64)))
        return {"loss": mse, "r2": 1.0 - mse / var if var > 0 else 0.0}
