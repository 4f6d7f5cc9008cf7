"""Keras 3 adapter: a user's ``keras.Model`` as a fedfleet task (``pip install fedfleet[keras]``).

Keras 3 runs on JAX, TensorFlow or PyTorch, so one adapter serves the users of all three who
write Keras. The extra installs Keras with JAX on the CPU (the lightest backend); importing this
module sets ``KERAS_BACKEND=jax`` unless it is already set, so an installed TensorFlow or PyTorch
backend is used only when asked for (set ``KERAS_BACKEND`` before the first ``import keras``).

The user gives a model factory and a loss; this module does the rest of
:class:`~fedfleet.tasks.FLTask` with the model's own ``compile`` and ``train_on_batch`` /
``evaluate``. Weights are ``model.weights`` — trainable and non-trainable (batch-norm moving
statistics), in the model's deterministic order, named by their variable ``path`` — as float32
numpy arrays, so the server sees named arrays only and never imports Keras. :func:`load_into`
puts a saved weights file back into a fresh model (``model.set_weights``).

    from fedfleet.tasks.keras import KerasTask

    def task(config):
        return KerasTask(lambda: make_mlp(config["hidden"]),
                         keras.losses.SparseCategoricalCrossentropy(from_logits=True))
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
from numpy.typing import NDArray

from fedfleet.core.models import TrainingAborted, Weights
from fedfleet.core.spec import PlanSpec
from fedfleet.tasks.api import DataMismatch, Examples, FLTask, TrainResult

__all__ = ["KerasTask", "OptimizerFactory", "load_into"]

OptimizerFactory = Callable[[PlanSpec], Any]
"""Builds the local ``keras.optimizers.Optimizer`` from the plan (learning rate...)."""

_EVAL_BATCH = 1024


def _sgd(plan: PlanSpec) -> Any:
    return keras.optimizers.SGD(learning_rate=plan.learning_rate)


def _values(variables: Sequence[Any]) -> list[NDArray[Any]]:
    """The variables' values as numpy arrays (``Variable.numpy`` warns under numpy 2)."""
    return [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in variables]


def load_into(model: Any, weights: Mapping[str, NDArray[Any]]) -> Any:
    """Set a built ``model``'s weights from named arrays (a weights file fedfleet wrote, in the
    order of ``model.weights``) with ``model.set_weights``; returns the model.

    The arrays are taken in order (a process that built other models first names its layers
    ``dense_2`` where the trainer said ``dense``); their count and shapes must match."""
    arrays = [np.asarray(w) for w in weights.values()]
    shapes = [tuple(v.shape) for v in model.weights]
    if [a.shape for a in arrays] != shapes:
        raise ValueError(
            f"the weights ({len(arrays)} arrays {[a.shape for a in arrays]}) do not fit the "
            f"model ({len(shapes)} arrays {shapes})"
        )
    model.set_weights(arrays)
    return model


class KerasTask(FLTask):
    """A ``keras.Model`` trained with a loss and an optimizer, evaluated by loss (and accuracy
    when ``classification``).

    ``model`` builds a fresh, uncompiled model with known input shape (a ``keras.Input``, or
    pass ``input_shape`` to build it). The task's reference model is built right after
    ``keras.backend.clear_session()`` and ``keras.utils.set_random_seed(seed)``, so every
    process gets the same initial weights and the same layer names. ``loss`` is anything
    ``model.compile`` takes as a loss (for integer labels and logits:
    ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``). ``optimizer`` builds the
    local optimizer from the plan (default: SGD at ``plan.learning_rate``); each round starts it
    afresh. Examples are the fields ``inputs`` (float32, reshaped to ``(n, *input_shape)`` when
    ``input_shape`` is given) and ``labels`` (int32 when ``classification``, else float32).

    Local training shuffles with the round's ``rng`` and calls the model's own
    ``train_on_batch``; FedProx's proximal term (``plan.proximalMu``) is applied as a decoupled
    step after each batch, ``w -= learning_rate * mu * (w - w_global)``. Each thread trains its
    own copy of the model (built once by ``model``), so simulated devices may train at once.
    """

    def __init__(
        self,
        model: Callable[[], Any],
        loss: Any,
        optimizer: OptimizerFactory | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        inputs: str = "x",
        labels: str = "y",
        classification: bool = True,
        seed: int = 0,
    ) -> None:
        self._factory = model
        self.loss = loss
        self.optimizer = optimizer or _sgd
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.inputs, self.labels = inputs, labels
        self.classification = classification
        self._build_lock = threading.Lock()
        self._local = threading.local()
        keras.backend.clear_session(free_memory=False)
        keras.utils.set_random_seed(seed)
        self.model = self._build()
        self._names = [str(v.path) for v in self.model.weights]
        if len(set(self._names)) != len(self._names):
            raise ValueError(f"the model's weight paths are not unique: {self._names}")

    def _build(self) -> Any:
        with self._build_lock:
            model = self._factory()
            if self.input_shape is not None and not model.built:
                model.build((None, *self.input_shape))
        if not model.weights:
            raise ValueError(
                "the model has no weights yet: give it a keras.Input or pass input_shape"
            )
        return model

    def initial_weights(self) -> dict[str, NDArray[np.float32]]:
        return {
            name: np.asarray(w, dtype=np.float32)
            for name, w in zip(self._names, _values(self.model.weights), strict=True)
        }

    # -- data ------------------------------------------------------------------------------------
    def decode(self, records: Examples) -> Examples:
        x = np.asarray(records[self.inputs], dtype=np.float32)
        if self.input_shape is not None:
            x = x.reshape((len(x), *self.input_shape))
        # JAX computes in 32 bits unless told otherwise: int32 labels, not int64.
        dtype = np.int32 if self.classification else np.float32
        return {"inputs": x, "labels": np.asarray(records[self.labels], dtype=dtype)}

    def check_data(self, examples: Examples) -> None:
        x, y = examples["inputs"], examples["labels"]
        if len(x) == 0:
            raise DataMismatch(self.inputs, "no examples")
        try:
            out = np.asarray(self._copy().predict_on_batch(x[:2]))
        except (ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataMismatch(
                self.inputs, f"examples of shape {x.shape[1:]} do not fit the model: {first}"
            ) from None
        if self.classification:
            classes = int(out.shape[-1])
            if int(y.min()) < 0 or int(y.max()) >= classes:
                raise DataMismatch(
                    self.labels,
                    f"labels span {int(y.min())}..{int(y.max())}, the model outputs {classes} "
                    "classes",
                )

    # -- weights ---------------------------------------------------------------------------------
    def _copy(self) -> Any:
        """This thread's compiled copy of the model (devices of a simulated fleet train in a
        thread pool, and a model is state); compiled once, so JAX traces its steps once."""
        model = getattr(self._local, "model", None)
        if model is None:
            model = self._build()
            metrics = ["accuracy"] if self.classification else []
            model.compile(optimizer=keras.optimizers.SGD(), loss=self.loss, metrics=metrics)
            self._local.model = model
        return model

    def _load(self, weights: Weights) -> Any:
        model = self._copy()
        model.set_weights([np.asarray(w) for w in weights])
        return model

    def _fresh_optimizer(self, model: Any, plan: PlanSpec) -> None:
        """A new optimizer for this round, rebuilt only when the plan changes; otherwise its
        state (step count, momentum) goes back to where it started."""
        cached: tuple[PlanSpec, list[NDArray[Any]]] | None = getattr(self._local, "opt", None)
        if cached is None or cached[0] != plan:
            optimizer = self.optimizer(plan)
            model.compile(
                optimizer=optimizer,
                loss=self.loss,
                metrics=["accuracy"] if self.classification else [],
            )
            optimizer.build(model.trainable_variables)
            self._local.opt = (plan, _values(optimizer.variables))
            return
        for v, start in zip(model.optimizer.variables, cached[1], strict=True):
            v.assign(start)

    # -- FLTask ----------------------------------------------------------------------------------
    def train(
        self,
        weights: Weights,
        examples: Examples,
        plan: PlanSpec,
        rng: np.random.Generator,
        should_continue: Callable[[int], bool],
    ) -> TrainResult:
        model = self._load(weights)
        self._fresh_optimizer(model, plan)
        x, y = examples["inputs"], examples["labels"]
        n = len(y)
        trainable = model.trainable_variables
        anchor = _values(trainable) if plan.proximal_mu else []
        step = np.float32(plan.learning_rate * plan.proximal_mu)
        sums: dict[str, float] = {}
        for epoch in range(plan.local_epochs):
            if not should_continue(epoch):
                raise TrainingAborted(f"training stopped before epoch {epoch + 1}")
            last = epoch == plan.local_epochs - 1
            order = rng.permutation(n)
            for start in range(0, n, plan.batch_size):
                idx = order[start : start + plan.batch_size]
                logs = model.train_on_batch(x[idx], y[idx], return_dict=True)
                if last:
                    for k, v in logs.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
                if anchor:
                    for v, a, w in zip(trainable, anchor, _values(trainable), strict=True):
                        v.assign(w - step * (w - a))
        new = _values(model.weights)
        update = [
            np.subtract(np.asarray(a, np.float32), b, dtype=np.float32)
            for a, b in zip(new, weights, strict=True)
        ]
        metrics = {k: v / n for k, v in sums.items() if np.isfinite(v)}
        return TrainResult(update=update, num_examples=n, metrics=metrics)

    def evaluate(self, weights: Weights, examples: Examples) -> dict[str, float]:
        model = self._load(weights)
        logs = model.evaluate(
            examples["inputs"],
            examples["labels"],
            batch_size=_EVAL_BATCH,
            verbose=0,
            return_dict=True,
        )
        return {str(k): float(v) for k, v in logs.items() if np.isfinite(float(v))}
