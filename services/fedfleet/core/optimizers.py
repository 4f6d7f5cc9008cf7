"""Server optimizers: how the coordinator turns a round's mean update into the next model.

Reddi et al. (2021), "Adaptive Federated Optimization", treat the averaged device update
``delta = mean(local - global)`` as a pseudo-gradient and apply a server optimizer to it:
FedAvg (plain step), FedAvgM (heavy-ball momentum), FedAdam and FedYogi (adaptive, no bias
correction, ``v`` starting at ``tau**2`` as in their Algorithm 2). The optimizer's moments are
part of the job's progress, so :meth:`ServerOptimizer.state` exports them (with the step count)
as named arrays for :func:`fedfleet.core.serde.encode_state`, and a restarted coordinator that
calls :meth:`ServerOptimizer.load_state` continues bit for bit. Moments are kept in float64:
they are O(model) on one server, and float64 keeps long runs reproducible across restarts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.models import Weights
from fedfleet.core.spec import AggregationSpec, Algorithm

__all__ = [
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "ServerOptimizer",
    "make_server_optimizer",
]

_STEP_KEY = "step"


class ServerOptimizer:
    """Base class: plain FedAvg, ``w + lr * delta``; subclasses add moment buffers.

    :meth:`step` is pure in its arguments (it returns new float32 arrays and never writes to
    ``weights`` or ``mean_delta``) and advances only the optimizer's own state.
    """

    algorithm: Algorithm = Algorithm.fedavg
    _buffers: tuple[str, ...] = ()

    def __init__(self, shapes: Sequence[tuple[int, ...]], learning_rate: float) -> None:
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning rate must be finite and positive, got {learning_rate}")
        self.shapes = [tuple(int(d) for d in shape) for shape in shapes]
        self.learning_rate = float(learning_rate)
        self.steps = 0
        self._state: dict[str, list[NDArray[np.float64]]] = {
            name: [np.full(shape, self._initial(name)) for shape in self.shapes]
            for name in self._buffers
        }

    def _initial(self, name: str) -> float:
        return 0.0

    def _check(self, label: str, arrays: Sequence[NDArray[Any]]) -> None:
        if len(arrays) != len(self.shapes):
            raise ValueError(f"{label} holds {len(arrays)} arrays, model has {len(self.shapes)}")
        for i, (arr, shape) in enumerate(zip(arrays, self.shapes, strict=True)):
            if arr.shape != shape:
                raise ValueError(f"{label} array {i} has shape {arr.shape}, expected {shape}")
            if not np.isfinite(arr).all():
                raise ValueError(f"{label} array {i} holds NaN or infinity")

    def step(
        self, weights: Sequence[NDArray[np.float32]], mean_delta: Sequence[NDArray[Any]]
    ) -> Weights:
        """Apply one round's mean update; return the new global weights (float32)."""
        self._check("weights", weights)
        self._check("mean_delta", mean_delta)
        out: Weights = []
        for i, (w, d) in enumerate(zip(weights, mean_delta, strict=True)):
            # A fresh float64 copy: _direction may work in it, mean_delta stays untouched.
            direction = self._direction(i, np.array(d, dtype=np.float64, copy=True))
            direction *= self.learning_rate
            direction += w
            out.append(direction.astype(np.float32))
        self.steps += 1
        return out

    def _direction(self, i: int, d: NDArray[np.float64]) -> NDArray[np.float64]:
        """The unscaled step for array ``i`` (``d`` is a scratch copy it may overwrite); updates
        the moment buffers. Returns an array the caller may scale in place."""
        return d

    def state(self) -> dict[str, NDArray[Any]]:
        """The optimizer's state as named arrays (copies), for a checkpoint."""
        out: dict[str, NDArray[Any]] = {_STEP_KEY: np.array(self.steps, dtype=np.int64)}
        for name, arrays in self._state.items():
            for i, arr in enumerate(arrays):
                out[f"{name}/{i}"] = arr.copy()
        return out

    def load_state(self, state: Mapping[str, NDArray[Any]]) -> None:
        """Restore :meth:`state` output; ``ValueError`` (and no change) if it does not fit."""
        expected = {_STEP_KEY} | {
            f"{name}/{i}" for name in self._buffers for i in range(len(self.shapes))
        }
        if set(state) != expected:
            missing = sorted(expected - set(state))
            extra = sorted(set(state) - expected)
            raise ValueError(
                f"{self.algorithm} state does not fit: missing {missing}, unexpected {extra}"
            )
        step = np.asarray(state[_STEP_KEY])
        if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
            raise ValueError("state 'step' must be a non-negative integer scalar")
        loaded: dict[str, list[NDArray[np.float64]]] = {}
        for name in self._buffers:
            arrays = [np.asarray(state[f"{name}/{i}"]) for i in range(len(self.shapes))]
            if any(arr.dtype != np.float64 for arr in arrays):
                raise ValueError(f"state '{name}' arrays must be float64")
            self._check(f"state '{name}'", arrays)
            loaded[name] = [np.array(arr, dtype=np.float64, copy=True) for arr in arrays]
        self._validate_loaded(loaded)
        self._state = loaded
        self.steps = int(step)

    def _validate_loaded(self, loaded: Mapping[str, list[NDArray[np.float64]]]) -> None:
        return None


class FedAvg(ServerOptimizer):
    """``w + lr * delta``; with ``lr = 1`` this is McMahan et al.'s FedAvg."""


class FedAvgM(ServerOptimizer):
    """Server momentum: ``m = momentum * m + delta``; ``w + lr * m``."""

    algorithm = Algorithm.fedavgm
    _buffers = ("m",)

    def __init__(
        self, shapes: Sequence[tuple[int, ...]], learning_rate: float, momentum: float
    ) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        super().__init__(shapes, learning_rate)
        self.momentum = float(momentum)

    def _direction(self, i: int, d: NDArray[np.float64]) -> NDArray[np.float64]:
        m = self._state["m"][i]
        m *= self.momentum
        m += d
        return m.copy()


class FedAdam(ServerOptimizer):
    """``m = b1 m + (1-b1) delta``; ``v = b2 v + (1-b2) delta**2``;
    ``w + lr * m / (sqrt(v) + tau)``."""

    algorithm = Algorithm.fedadam
    _buffers = ("m", "v")

    def __init__(
        self,
        shapes: Sequence[tuple[int, ...]],
        learning_rate: float,
        *,
        beta1: float,
        beta2: float,
        tau: float,
    ) -> None:
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {beta1}, {beta2}")
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be finite and positive, got {tau}")
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.tau = float(tau)
        super().__init__(shapes, learning_rate)

    def _initial(self, name: str) -> float:
        return self.tau**2 if name == "v" else 0.0

    def _second_moment(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> None:
        v *= self.beta2
        d2 *= 1.0 - self.beta2
        v += d2

    def _direction(self, i: int, d: NDArray[np.float64]) -> NDArray[np.float64]:
        m = self._state["m"][i]
        v = self._state["v"][i]
        m *= self.beta1
        m += (1.0 - self.beta1) * d
        np.square(d, out=d)
        self._second_moment(v, d)
        denom = np.sqrt(v)
        denom += self.tau
        return np.divide(m, denom, out=denom)

    def _validate_loaded(self, loaded: Mapping[str, list[NDArray[np.float64]]]) -> None:
        if any((v < 0).any() for v in loaded["v"]):
            raise ValueError("state 'v' must be non-negative")


class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second moment: ``v = v - (1-b2) delta**2 sign(v -
    delta**2)``, which grows ``v`` no faster than the squared update."""

    algorithm = Algorithm.fedyogi

    def _second_moment(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> None:
        sign = np.sign(v - d2)
        d2 *= 1.0 - self.beta2
        d2 *= sign
        v -= d2


def make_server_optimizer(
    spec: AggregationSpec, shapes: Sequence[tuple[int, ...]]
) -> ServerOptimizer:
    """The optimizer ``spec.algorithm`` names, with its hyperparameters, in its initial state."""
    lr = spec.server_lr
    if spec.algorithm is Algorithm.fedavg:
        return FedAvg(shapes, lr)
    if spec.algorithm is Algorithm.fedavgm:
        return FedAvgM(shapes, lr, spec.momentum)
    if spec.algorithm is Algorithm.fedadam:
        return FedAdam(shapes, lr, beta1=spec.beta1, beta2=spec.beta2, tau=spec.tau)
    if spec.algorithm is Algorithm.fedyogi:
        return FedYogi(shapes, lr, beta1=spec.beta1, beta2=spec.beta2, tau=spec.tau)
    raise ValueError(f"unknown algorithm {spec.algorithm!r}")
