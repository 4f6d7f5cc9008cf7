"""A task description whose checkpoint URL leaves the selector is refused by the device.

The checkpoint download carries the device's credential, so ``checkpoint_url`` must be a path
on the selector that answered; an absolute or scheme-relative URL would hand the credential to
another host.
"""

from __future__ import annotations

from typing import Any

import pytest

from fedfleet.device.http_transport import ProtocolError, SelectorClient


def _body(url: Any) -> dict[str, Any]:
    return {
        "round_key": "a1",
        "model_version": 3,
        "checkpoint_url": url,
        "task": {"ref": "fedfleet.tasks.builtin:softmax", "config": {"inputs": 4, "classes": 2}},
        "plan": {"localEpochs": 1, "batchSize": 4, "learningRate": 0.1},
        "aggregator": "aggregator-0",
    }


def test_a_path_on_the_selector_is_accepted() -> None:
    info = SelectorClient._task_info(_body("/v1/checkpoints/3"))
    assert info.checkpoint_url == "/v1/checkpoints/3" and info.model_version == 3


@pytest.mark.parametrize(
    "url", ["https://evil.example/steal", "//evil.example/v1/checkpoints/3", "v1/x", 7, None]
)
def test_a_url_off_the_selector_is_a_protocol_error(url: Any) -> None:
    with pytest.raises(ProtocolError, match="checkpoint_url"):
        SelectorClient._task_info(_body(url))
