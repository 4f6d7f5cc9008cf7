"""The Flower client of ``bench/flower_torch_cnn.py``, in a module of its own so that Ray's
worker processes import it by name (a function or class of ``__main__`` travels by value, and
``functools.cache`` cannot): the network, the data split (read once per worker process) and the
client that trains like fedfleet's PyTorch adapter. When the server's fit config names a
``device`` and a ``seed`` (replaying fedfleet's run), the client trains that device's shard with
that batch-order seed, exactly as ``TorchTask.train`` did in fedfleet.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import Client, NumPyClient
from flwr.common import NDArrays, Scalar
from torch import nn


class Net(nn.Module):
    """examples/pytorch-cnn/mnist_cnn/task.py's Net, unchanged."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * channels * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@functools.cache
def _data() -> dict[str, Any]:
    """The split, once per process (Ray keeps its worker processes)."""
    with np.load(os.environ["FEDFLEET_BENCH_DATA"], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _config() -> dict[str, Any]:
    out: dict[str, Any] = json.loads(os.environ["FEDFLEET_BENCH_CONFIG"])
    return out


def _images(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.reshape(-1, 1, 28, 28), dtype=np.float32))


def _load(model: nn.Module, parameters: NDArrays) -> None:
    names = list(model.state_dict())
    model.load_state_dict(
        {n: torch.from_numpy(np.array(p)) for n, p in zip(names, parameters, strict=True)}
    )


def _weights(model: nn.Module) -> NDArrays:
    return [t.detach().cpu().numpy().astype(np.float32) for t in model.state_dict().values()]


class CnnClient(NumPyClient):
    """One simulated device: local SGD on its shard, no client-side evaluation."""

    def __init__(self, device: int) -> None:
        self.device = device

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        t0 = time.perf_counter()
        torch.set_num_threads(1)
        cfg, data = _config(), _data()
        # Replaying fedfleet's run, the server names the device (whose shard this simulated
        # client trains on) and the seed of its batch order; otherwise this node's partition.
        device = int(config.get("device", self.device))
        seed = int(config.get("seed", int(config["round"]) * 100_003 + device))
        idx = data["shards"][data["offsets"][device] : data["offsets"][device + 1]]
        x, y = (
            _images(data["x_train"][idx]),
            torch.from_numpy(data["y_train"][idx].astype(np.int64)),
        )
        model = Net(cfg["channels"])
        _load(model, parameters)
        model.train()
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg["learning_rate"], momentum=cfg["momentum"]
        )
        loss_fn = nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(seed)
        n = len(y)
        for _ in range(cfg["local_epochs"]):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, cfg["batch_size"]):
                b = order[start : start + cfg["batch_size"]]
                optimizer.zero_grad()
                loss_fn(model(x[b]), y[b]).backward()
                optimizer.step()
        return _weights(model), n, {"train_seconds": time.perf_counter() - t0}


def client_fn(context: Context) -> Client:
    return CnnClient(int(context.node_config["partition-id"])).to_client()
