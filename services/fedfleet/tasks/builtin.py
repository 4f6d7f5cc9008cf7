"""The built-in task: softmax regression and ReLU MLPs in plain numpy.

``spec.model`` is shorthand for this task (``fedfleet.tasks.builtin:task`` configured with the
model's fields). It ships inside the wheel, starts in milliseconds and is deterministic given a
``numpy.random.Generator``. Weights are ``[W1, b1, W2, b2, ...]`` (named ``dense_<i>.weight`` /
``dense_<i>.bias``). Backpropagation is written out by hand: the models are small, and one
function (:func:`loss_and_grads`) serves both local training and the gradient check. Examples
are the fields ``x`` (float features, ``(n, inputs)``) and ``y`` (integer labels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.models import TrainingAborted, Weights, delta
from fedfleet.core.spec import ModelKind, ModelSpec, PlanSpec
from fedfleet.tasks.api import DataMismatch, Examples, FLTask
from fedfleet.tasks.api import TrainResult as TaskResult

__all__ = [
    "BuiltinTask",
    "TrainResult",
    "evaluate",
    "init_weights",
    "loss_and_grads",
    "task",
    "train_local",
    "weight_shapes",
]

_F = TypeVar("_F", np.float32, np.float64)

# Rows per forward pass in evaluate(): bounds peak memory on large held-out sets.
_EVAL_CHUNK = 8192


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a device reports after local training."""

    weights: Weights
    """The locally trained weights (new arrays; the global weights are untouched)."""
    num_examples: int
    """Local examples trained on: the update's weight in FedAvg."""
    loss: float
    """Mean cross-entropy over the minibatches of the last local epoch (before each step)."""
    accuracy: float
    """Fraction of examples classified correctly during the last local epoch."""


def _layer_sizes(spec: ModelSpec) -> list[int]:
    hidden = spec.hidden if spec.kind is ModelKind.mlp else []
    return [spec.inputs, *hidden, spec.classes]


def weight_shapes(spec: ModelSpec) -> list[tuple[int, ...]]:
    """Shapes of the arrays :func:`init_weights` returns, in order."""
    sizes = _layer_sizes(spec)
    shapes: list[tuple[int, ...]] = []
    for fan_in, fan_out in pairwise(sizes):
        shapes += [(fan_in, fan_out), (fan_out,)]
    return shapes


def init_weights(spec: ModelSpec) -> Weights:
    """The initial global model, a pure function of ``spec`` (``init_seed`` included).

    Softmax regression starts at zero (its loss is convex, so nothing needs breaking). An MLP's
    hidden layers use He-normal weights (suited to ReLU) and its output layer Glorot-uniform;
    every bias starts at zero.
    """
    shapes = weight_shapes(spec)
    if spec.kind is ModelKind.softmax:
        return [np.zeros(shape, dtype=np.float32) for shape in shapes]
    rng = np.random.default_rng(spec.init_seed)
    weights: Weights = []
    n_layers = len(shapes) // 2
    for i in range(n_layers):
        fan_in, fan_out = shapes[2 * i]
        if i < n_layers - 1:
            w = rng.standard_normal((fan_in, fan_out)) * math.sqrt(2.0 / fan_in)
        else:
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            w = rng.uniform(-limit, limit, size=(fan_in, fan_out))
        weights += [w.astype(np.float32), np.zeros(fan_out, dtype=np.float32)]
    return weights


def _check_weights(spec: ModelSpec, weights: Sequence[NDArray[Any]]) -> None:
    shapes = weight_shapes(spec)
    if len(weights) != len(shapes):
        raise ValueError(f"model expects {len(shapes)} weight arrays, got {len(weights)}")
    for i, (w, shape) in enumerate(zip(weights, shapes, strict=True)):
        if w.shape != shape:
            raise ValueError(f"weight array {i} has shape {w.shape}, model expects {shape}")


def _check_data(
    spec: ModelSpec, x: NDArray[Any], y: NDArray[Any]
) -> tuple[NDArray[Any], NDArray[np.intp]]:
    if x.ndim != 2 or x.shape[1] != spec.inputs:
        raise ValueError(f"x must have shape (n, {spec.inputs}), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {y.shape}")
    if x.shape[0] == 0:
        raise ValueError("no examples")
    labels = y.astype(np.intp, copy=False)
    if labels.min() < 0 or labels.max() >= spec.classes:
        raise ValueError(f"labels must lie in [0, {spec.classes})")
    return x, labels


def _backprop(
    layers: Sequence[NDArray[_F]],
    xb: NDArray[_F],
    yb: NDArray[np.intp],
    rows: NDArray[np.intp],
    track: bool,
) -> tuple[float, int, list[NDArray[_F]]]:
    """Gradients of the *mean* cross-entropy over ``xb`` and, if ``track``, the summed loss and
    the count of correct predictions (else zeros: local training skips them until its last
    epoch, since they cost as much as the backward pass on small models).

    ``layers`` alternates weights and biases; the arithmetic stays in their dtype. ``rows`` is
    ``arange(len(xb))``, passed in so the training loop builds it once.
    """
    n = xb.shape[0]
    acts = [xb]
    h = xb
    for i in range(0, len(layers) - 2, 2):
        h = h @ layers[i]
        h += layers[i + 1]
        np.maximum(h, 0, out=h)
        acts.append(h)
    z = h @ layers[-2]
    z += layers[-1]
    z -= np.maximum.reduce(z, axis=1, keepdims=True)
    loss_sum = 0.0
    correct = 0
    if track:
        correct = int(np.count_nonzero(z.argmax(axis=1) == yb))
        loss_sum = -float(np.add.reduce(z[rows, yb], dtype=np.float64))
    np.exp(z, out=z)
    denom = np.add.reduce(z, axis=1, keepdims=True)
    if track:
        loss_sum += float(np.add.reduce(np.log(denom), axis=None, dtype=np.float64))
    z /= denom  # z now holds the softmax probabilities
    z[rows, yb] -= 1
    z *= 1.0 / n
    dz = z
    grads: list[NDArray[_F]] = [dz] * len(layers)
    for i in range(len(layers) - 2, -1, -2):
        a = acts[i // 2]
        grads[i] = a.T @ dz
        grads[i + 1] = np.add.reduce(dz, axis=0)
        if i:
            dz = dz @ layers[i].T
            dz *= a > 0
    return loss_sum, correct, grads


def loss_and_grads(
    spec: ModelSpec, weights: Sequence[NDArray[_F]], x: NDArray[_F], y: NDArray[np.integer[Any]]
) -> tuple[float, list[NDArray[_F]]]:
    """Mean cross-entropy over ``(x, y)`` and its gradient with respect to each weight array.

    Works in the dtype of the inputs, so a float64 gradient check exercises the same code that
    trains in float32.
    """
    _check_weights(spec, weights)
    x, labels = _check_data(spec, x, y)
    n = x.shape[0]
    loss_sum, _, grads = _backprop(weights, x, labels, np.arange(n), True)
    return loss_sum / n, grads


def evaluate(
    spec: ModelSpec, weights: Sequence[NDArray[np.float32]], x: NDArray[Any], y: NDArray[Any]
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``weights`` on ``(x, y)``."""
    _check_weights(spec, weights)
    x, labels = _check_data(spec, x, y)
    n = x.shape[0]
    loss_sum = 0.0
    correct = 0
    for start in range(0, n, _EVAL_CHUNK):
        h = np.asarray(x[start : start + _EVAL_CHUNK], dtype=np.float32)
        yb = labels[start : start + _EVAL_CHUNK]
        for i in range(0, len(weights) - 2, 2):
            h = h @ weights[i]
            h += weights[i + 1]
            np.maximum(h, 0, out=h)
        z = h @ weights[-2]
        z += weights[-1]
        correct += int(np.count_nonzero(z.argmax(axis=1) == yb))
        z -= z.max(axis=1, keepdims=True)
        log_denom = np.log(np.exp(z).sum(axis=1))
        loss_sum += float(log_denom.sum(dtype=np.float64) - z[np.arange(len(yb)), yb].sum())
    return loss_sum / n, correct / n


def train_local(
    spec: ModelSpec,
    plan: PlanSpec,
    weights: Sequence[NDArray[np.float32]],
    x: NDArray[Any],
    y: NDArray[Any],
    rng: np.random.Generator,
    *,
    should_continue: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Minibatch SGD from ``weights`` for ``plan.local_epochs`` epochs (FedAvg's ClientUpdate).

    The examples are reshuffled with ``rng`` every epoch; the last minibatch of an epoch may be
    short. With ``plan.proximal_mu > 0`` the FedProx term ``mu * (w - w_global)`` is added to
    every gradient. ``weights`` is never modified. A device with no examples has nothing to
    contribute and is refused with ``ValueError``. ``should_continue(epoch)`` is asked before
    every epoch; when it answers False, :class:`TrainingAborted` is raised (the device lost
    eligibility mid-task).
    """
    _check_weights(spec, weights)
    x, labels = _check_data(spec, x, y)
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    batch = plan.batch_size
    lr = np.float32(plan.learning_rate)
    mu = np.float32(plan.proximal_mu)
    layers = [np.array(w, dtype=np.float32, copy=True) for w in weights]
    all_rows = np.arange(min(n, batch))
    loss_sum = 0.0
    correct = 0
    for epoch in range(plan.local_epochs):
        if should_continue is not None and not should_continue(epoch):
            raise TrainingAborted(f"training stopped before epoch {epoch + 1}")
        last = epoch == plan.local_epochs - 1
        order = rng.permutation(n)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            rows = all_rows[: len(idx)]
            batch_loss, batch_correct, grads = _backprop(layers, x[idx], labels[idx], rows, last)
            loss_sum += batch_loss
            correct += batch_correct
            for w, g, w_global in zip(layers, grads, weights, strict=True):
                if mu:
                    g += mu * (w - w_global)
                g *= lr
                w -= g
    return TrainResult(weights=layers, num_examples=n, loss=loss_sum / n, accuracy=correct / n)


class BuiltinTask(FLTask):
    """The numpy softmax/MLP as an :class:`FLTask`, configured by a :class:`ModelSpec`."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def initial_weights(self) -> dict[str, NDArray[np.float32]]:
        weights = init_weights(self.spec)
        names = []
        for i in range(len(weights) // 2):
            names += [f"dense_{i}.weight", f"dense_{i}.bias"]
        return dict(zip(names, weights, strict=True))

    def train(
        self,
        weights: Weights,
        examples: Examples,
        plan: PlanSpec,
        rng: np.random.Generator,
        should_continue: Callable[[int], bool],
    ) -> TaskResult:
        result = train_local(
            self.spec,
            plan,
            weights,
            examples["x"],
            examples["y"],
            rng,
            should_continue=should_continue,
        )
        return TaskResult(
            update=delta(result.weights, weights),
            num_examples=result.num_examples,
            metrics={"loss": result.loss, "accuracy": result.accuracy},
        )

    def evaluate(self, weights: Weights, examples: Examples) -> dict[str, float]:
        loss, acc = evaluate(self.spec, weights, examples["x"], examples["y"])
        return {"loss": loss, "accuracy": acc}

    def check_data(self, examples: Examples) -> None:
        for name in ("x", "y"):
            if name not in examples:
                have = ", ".join(sorted(examples)) or "none"
                raise DataMismatch(name, f"the built-in model needs field {name!r} (have {have})")
        x, y = np.asarray(examples["x"]), np.asarray(examples["y"])
        if x.ndim != 2 or x.shape[1] != self.spec.inputs:
            raise DataMismatch(
                "x",
                f"examples have shape {x.shape[1:]}, the model takes ({self.spec.inputs},) "
                "(model.inputs)",
            )
        if y.shape != (x.shape[0],) or (y.size and not np.issubdtype(y.dtype, np.integer)):
            raise DataMismatch(
                "y", f"labels must be {x.shape[0]} integers, got shape {y.shape} {y.dtype}"
            )
        if y.size and (int(y.min()) < 0 or int(y.max()) >= self.spec.classes):
            raise DataMismatch(
                "y",
                f"labels span {int(y.min())}..{int(y.max())}, the model has "
                f"{self.spec.classes} classes (model.classes)",
            )


def task(config: dict[str, Any]) -> BuiltinTask:
    """The factory ``spec.task.ref`` names: ``config`` holds :class:`ModelSpec`'s fields."""
    return BuiltinTask(ModelSpec.model_validate(config))
