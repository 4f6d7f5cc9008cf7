"""A multi-layer perceptron on scikit-learn's 8x8 digits, trained by fedfleet through the Keras 3
adapter (any backend; the ``keras`` extra installs JAX).

The manifest names ``digits_mlp.task:task``; fedfleet calls it with ``spec.task.config`` and gets
a :class:`fedfleet.tasks.keras.KerasTask`. The fleet's examples are digits rows of 64 pixels in
[0, 1] with integer labels 0..9, which the model takes as they are.
"""

from __future__ import annotations

from typing import Any

import keras

from fedfleet.core.spec import PlanSpec
from fedfleet.tasks.keras import KerasTask


def make_model(hidden: int = 64) -> keras.Model:
    """The network, also what a user builds to load the trained weights for inference."""
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(10),  # logits
        ],
        name="digits_mlp",
    )


def task(config: dict[str, Any]) -> KerasTask:
    hidden = config.get("hidden", 64)
    if not isinstance(hidden, int) or not 1 <= hidden <= 4096:
        raise ValueError(f"hidden must be an integer in 1..4096, got {hidden!r}")
    momentum = float(config.get("momentum", 0.0))
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")

    def optimizer(plan: PlanSpec) -> keras.optimizers.Optimizer:
        return keras.optimizers.SGD(learning_rate=plan.learning_rate, momentum=momentum)

    return KerasTask(
        lambda: make_model(hidden),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer,
        seed=int(config.get("seed", 0)),
    )
