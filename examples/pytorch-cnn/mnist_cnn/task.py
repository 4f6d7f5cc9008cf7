"""A small convolutional network on MNIST, trained by fedfleet through the PyTorch adapter.

The manifest names ``mnist_cnn.task:task``; fedfleet calls it with ``spec.task.config`` and gets
a :class:`fedfleet.tasks.torch.TorchTask`. The fleet's examples are MNIST-5k rows of 784 pixels
in [0, 1]: the task reshapes them to 1x28x28 images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedfleet.tasks.torch import TorchTask


class Net(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 5),  # 24x24
            nn.ReLU(),
            nn.MaxPool2d(2),  # 12x12
            nn.Conv2d(channels, 2 * channels, 5),  # 8x8
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
        )
        self.head = nn.Linear(2 * channels * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def task(config: dict[str, Any]) -> TorchTask:
    channels = config.get("channels", 16)
    if not isinstance(channels, int) or not 1 <= channels <= 256:
        raise ValueError(f"channels must be an integer in 1..256, got {channels!r}")
    momentum = float(config.get("momentum", 0.0))

    def optimizer(params: Any, plan: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=plan.learning_rate, momentum=momentum)

    return TorchTask(
        lambda: Net(channels),
        nn.CrossEntropyLoss(),
        optimizer,
        input_shape=(1, 28, 28),
        seed=int(config.get("seed", 0)),
    )
