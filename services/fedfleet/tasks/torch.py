"""PyTorch adapter: a user's ``nn.Module`` as a fedfleet task (``pip install fedfleet[torch]``).

The user gives a model factory, a loss and (optionally) an optimizer factory; this module does
the rest of :class:`~fedfleet.tasks.FLTask`. Weights are the module's ``state_dict`` — parameters
and buffers, in the module's registration order (deterministic), as float32 numpy arrays named
by their ``state_dict`` keys — so the server sees named arrays only and never imports torch.
Training runs on the CPU, one thread per process by default (a simulated fleet trains many small
models one after another; intra-op threads would only contend). :func:`to_state_dict` turns a
saved weights file back into a ``state_dict`` for ``model.load_state_dict``.

    from fedfleet.tasks.torch import TorchTask

    def task(config):
        return TorchTask(lambda: Net(config["hidden"]), torch.nn.CrossEntropyLoss(),
                         input_shape=(1, 28, 28))
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from fedfleet.core.models import TrainingAborted, Weights
from fedfleet.core.spec import PlanSpec
from fedfleet.tasks.api import DataMismatch, Examples, FLTask, TrainResult

__all__ = ["TorchTask", "to_state_dict"]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter], PlanSpec], torch.optim.Optimizer]
"""Builds the local optimizer from the model's parameters and the plan (learning rate...)."""

_EVAL_BATCH = 256
"""Examples per forward pass in :meth:`TorchTask.evaluate`. Batches of 256 keep a small CNN's
activations in cache: evaluating 1,000 MNIST images on one thread takes 75 ms against 125 ms
in batches of 1,024 (the master evaluates every committed model)."""


def _sgd(params: Iterable[torch.nn.Parameter], plan: PlanSpec) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=plan.learning_rate)


def to_state_dict(weights: Mapping[str, NDArray[Any]]) -> OrderedDict[str, torch.Tensor]:
    """Named arrays (a weights file, or a task's weights by name) as a ``state_dict``;
    ``model.load_state_dict`` casts each to its tensor's dtype."""
    return OrderedDict((name, torch.from_numpy(np.array(w))) for name, w in weights.items())


class TorchTask(FLTask):
    """An ``nn.Module`` trained with a loss and an optimizer, evaluated by loss (and accuracy
    when ``classification``).

    ``model`` builds a fresh module (called once; the initial weights come from it after
    ``torch.manual_seed(seed)``). ``loss`` maps (outputs, labels) to a scalar mean loss.
    ``optimizer`` builds the local optimizer (default: SGD at ``plan.learning_rate``).
    Examples are the fields ``inputs`` (reshaped to ``(n, *input_shape)`` as float32 when
    ``input_shape`` is given) and ``labels`` (int64 when ``classification``, else float32).
    """

    parallel_training = True  # torch's kernels release the GIL

    def __init__(
        self,
        model: Callable[[], torch.nn.Module],
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: OptimizerFactory | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        inputs: str = "x",
        labels: str = "y",
        classification: bool = True,
        seed: int = 0,
        threads: int | None = 1,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.module = model()
        self._local = threading.local()
        self.loss = loss
        self.optimizer = optimizer or _sgd
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.inputs, self.labels = inputs, labels
        self.classification = classification
        self._names = list(self.module.state_dict().keys())

    def initial_weights(self) -> dict[str, NDArray[np.float32]]:
        return {
            name: t.detach().cpu().numpy().astype(np.float32)
            for name, t in self.module.state_dict().items()
        }

    # -- data ------------------------------------------------------------------------------------
    def decode(self, records: Examples) -> Examples:
        # Copies: the simulator's shards are read-only views, and torch wants writable arrays.
        x = np.array(records[self.inputs], dtype=np.float32)
        if self.input_shape is not None:
            x = x.reshape((len(x), *self.input_shape))
        dtype = np.int64 if self.classification else np.float32
        return {"inputs": x, "labels": np.array(records[self.labels], dtype=dtype)}

    def check_data(self, examples: Examples) -> None:
        x, y = examples["inputs"], examples["labels"]
        if len(x) == 0:
            raise DataMismatch(self.inputs, "no examples")
        with torch.no_grad():
            module = copy.deepcopy(self.module).eval()
            try:
                out = module(torch.from_numpy(np.ascontiguousarray(x[:2])))
            except RuntimeError as exc:
                raise DataMismatch(
                    self.inputs, f"examples of shape {x.shape[1:]} do not fit the model: {exc}"
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
    def _load(self, weights: Weights) -> torch.nn.Module:
        """This thread's copy of the module, holding ``weights`` (devices of a simulated fleet
        train in a thread pool, and a module is state)."""
        module: torch.nn.Module | None = getattr(self._local, "module", None)
        if module is None:
            module = self._local.module = copy.deepcopy(self.module)
        # load_state_dict copies the values; only read-only arrays (version 0, cached
        # checkpoints) need a writable copy for torch.from_numpy.
        arrays = [np.asarray(w) for w in weights]
        state = OrderedDict(
            (name, torch.from_numpy(a if a.flags.writeable else a.copy()))
            for name, a in zip(self._names, arrays, strict=True)
        )
        module.load_state_dict(state)
        return module

    @staticmethod
    def _weights(module: torch.nn.Module) -> Weights:
        return [
            t.detach().cpu().numpy().astype(np.float32, copy=True)
            for t in module.state_dict().values()
        ]

    # -- FLTask ----------------------------------------------------------------------------------
    def train(
        self,
        weights: Weights,
        examples: Examples,
        plan: PlanSpec,
        rng: np.random.Generator,
        should_continue: Callable[[int], bool],
    ) -> TrainResult:
        module = self._load(weights)
        x = torch.from_numpy(np.ascontiguousarray(examples["inputs"]))
        y = torch.from_numpy(np.ascontiguousarray(examples["labels"]))
        n = len(y)
        module.train()
        optimizer = self.optimizer(module.parameters(), plan)
        anchor = [p.detach().clone() for p in module.parameters()] if plan.proximal_mu else []
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        loss_sum, correct = 0.0, 0
        for epoch in range(plan.local_epochs):
            if not should_continue(epoch):
                raise TrainingAborted(f"training stopped before epoch {epoch + 1}")
            last = epoch == plan.local_epochs - 1
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, plan.batch_size):
                idx = order[start : start + plan.batch_size]
                optimizer.zero_grad()
                out = module(x[idx])
                loss = self.loss(out, y[idx])
                if last:
                    loss_sum += float(loss.detach()) * len(idx)
                    if self.classification:
                        correct += int((out.detach().argmax(dim=-1) == y[idx]).sum())
                if anchor:
                    prox = sum(
                        ((p - a) ** 2).sum()
                        for p, a in zip(module.parameters(), anchor, strict=True)
                    )
                    loss = loss + plan.proximal_mu / 2 * prox
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
        new = self._weights(module)
        metrics = {"loss": loss_sum / n}
        if self.classification:
            metrics["accuracy"] = correct / n
        update = [np.subtract(a, b, dtype=np.float32) for a, b in zip(new, weights, strict=True)]
        return TrainResult(update=update, num_examples=n, metrics=metrics)

    def evaluate(self, weights: Weights, examples: Examples) -> dict[str, float]:
        module = self._load(weights)
        module.eval()
        x, y = examples["inputs"], examples["labels"]
        n = len(y)
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, n, _EVAL_BATCH):
                xb = torch.from_numpy(np.ascontiguousarray(x[start : start + _EVAL_BATCH]))
                yb = torch.from_numpy(np.ascontiguousarray(y[start : start + _EVAL_BATCH]))
                out = module(xb)
                loss_sum += float(self.loss(out, yb)) * len(yb)
                if self.classification:
                    correct += int((out.argmax(dim=-1) == yb).sum())
        metrics = {"loss": loss_sum / n}
        if self.classification:
            metrics["accuracy"] = correct / n
        return metrics
