"""The language-neutral test vectors in ``docs/vectors`` agree with the Python implementation.

Other clients (``clients/typescript``) are tested against the same files, so these tests are
what keeps every client and the server on one wire format: each valid message must be exactly
what :func:`encode_arrays` produces for its arrays and decode back to them, each invalid one
must be refused, and the device API example must be what the selector's models accept and the
built-in task computes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from numpy.typing import NDArray

from fedfleet.core.metrics import parse_metrics
from fedfleet.core.models import delta
from fedfleet.core.serde import SerdeError, decode_arrays, encode_arrays
from fedfleet.core.spec import ModelSpec, PlanSpec, TaskSpec
from fedfleet.selector.app import AbortRequest, CheckInRequest, CheckInResponse, TaskResponse
from fedfleet.selector.doors import ID, ROUND
from fedfleet.tasks.builtin import train_local, weight_shapes

VECTORS = Path(__file__).resolve().parents[2] / "docs" / "vectors"
WIRE = json.loads((VECTORS / "wire-format.json").read_text())
API = json.loads((VECTORS / "device-api.json").read_text())


def _array(doc: dict[str, Any]) -> NDArray[Any]:
    return np.array(doc["data"], dtype=np.dtype(doc["dtype"]).newbyteorder("<")).reshape(
        doc["shape"]
    )


def _same(got: list[NDArray[Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for a, doc in zip(got, want, strict=True):
        assert a.dtype == np.dtype(doc["dtype"])
        assert list(a.shape) == doc["shape"]
        # Bit for bit (-0.0 and the smallest subnormal included).
        assert a.tobytes() == _array(doc).tobytes()


def test_the_files_cover_every_dtype_and_the_refusals() -> None:
    dtypes = {a["dtype"] for case in WIRE["valid"] for a in case["arrays"]}
    assert dtypes == {"float32", "float64", "int64", "int32", "uint8"}
    assert {len(a["shape"]) for case in WIRE["valid"] for a in case["arrays"]} >= {0, 1, 2, 8}
    assert len(WIRE["invalid"]) >= 8


@pytest.mark.parametrize("case", WIRE["valid"], ids=lambda c: c["name"])
def test_encoding_gives_the_vector_bytes(case: dict[str, Any]) -> None:
    assert encode_arrays([_array(a) for a in case["arrays"]]).hex() == case["hex"]


@pytest.mark.parametrize("case", WIRE["valid"], ids=lambda c: c["name"])
def test_decoding_gives_the_vector_arrays(case: dict[str, Any]) -> None:
    _same(decode_arrays(bytes.fromhex(case["hex"])), case["arrays"])


@pytest.mark.parametrize("case", WIRE["invalid"], ids=lambda c: c["name"])
def test_invalid_messages_are_refused(case: dict[str, Any]) -> None:
    with pytest.raises(SerdeError):
        decode_arrays(bytes.fromhex(case["hex"]))


def test_every_array_starts_on_a_16_byte_boundary() -> None:
    for case in WIRE["valid"]:
        data = bytes.fromhex(case["hex"])
        offset = 8
        for a in case["arrays"]:
            offset += 2 + 8 * len(a["shape"])
            offset += -offset % 16
            assert offset % 16 == 0
            offset += int(np.prod(a["shape"], dtype=np.int64)) * np.dtype(a["dtype"]).itemsize
        assert offset == len(data), case["name"]


# -- the device API example ---------------------------------------------------------------------


def test_the_checkin_example_is_what_the_selector_takes_and_answers() -> None:
    req = API["checkin"]["request"]
    body = CheckInRequest.model_validate(req["body"])
    assert req["headers"]["x-fedfleet-device"] == body.device_id
    scheme, _, token = req["headers"]["authorization"].partition(" ")
    assert scheme == "Bearer" and token
    for answer in ("reconnect", "selected"):
        doc = API["checkin"][answer]["body"]
        assert CheckInResponse.model_validate(doc).model_dump(exclude_none=True) == doc
    selected = API["checkin"]["selected"]["body"]
    assert selected["ticket"].isalnum() and len(selected["ticket"]) <= 128


def test_the_task_example_is_a_valid_task_description() -> None:
    req = API["task"]["request"]
    url = urlparse(req["path"])
    round_key = url.path.rsplit("/", 1)[1]
    assert re.match(ROUND, round_key)
    assert re.match(ID, parse_qs(url.query)["device_id"][0])
    doc = API["task"]["configured"]["body"]
    task = TaskResponse.model_validate(doc)
    assert task.model_dump(mode="json", by_alias=True, exclude_none=True) == doc
    TaskSpec.model_validate(doc["task"])
    PlanSpec.model_validate(doc["plan"])
    assert CheckInResponse.model_validate(API["task"]["released"]["body"]).outcome == "reconnect"
    AbortRequest.model_validate(API["abort"]["request"]["body"])


def test_checkpoint_training_and_report_fit_together() -> None:
    task = API["task"]["configured"]["body"]
    spec = ModelSpec.model_validate(task["task"]["config"])
    plan = PlanSpec.model_validate(task["plan"])
    shapes = weight_shapes(spec)
    checkpoint = API["checkpoint"]["response"]
    weights = decode_arrays(bytes.fromhex(checkpoint["hex"]), expected_shapes=shapes)
    _same(weights, checkpoint["arrays"])
    training = API["training"]
    x, y = _array(training["x"]), _array(training["y"])
    assert plan.batch_size >= len(x) and plan.local_epochs == 1  # shuffling cannot matter
    result = train_local(spec, plan, weights, x, y, np.random.default_rng(12345))
    update = delta(result.weights, weights)
    for got, want in zip(update, training["update"], strict=True):
        np.testing.assert_allclose(got, _array(want), rtol=0, atol=1e-6)
    assert result.loss == pytest.approx(training["train_loss"], abs=1e-6)
    report = API["report"]["request"]
    sent = decode_arrays(
        bytes.fromhex(report["hex"]), expected_shapes=shapes, expected_dtype=np.float32
    )
    _same(sent, training["update"])
    headers = report["headers"]
    assert int(headers["x-fedfleet-examples"]) == len(x)
    assert set(parse_metrics(headers["x-fedfleet-metrics"])) == {"train_loss", "train_accuracy"}
    assert headers["x-fedfleet-aggregator"] == task["aggregator"]
    assert report["path"] == f"/v1/reports/{task['round_key']}"


def test_the_documented_secure_aggregation_messages_are_the_real_ones() -> None:
    """Every message of a real session (with one device dropping before the masked input)
    fits the OpenAPI document's schema of its step, and the schemas refuse extra fields."""
    from fedfleet.selector import contract
    from tests.unit.test_secagg import Group

    g = Group.make(4, m=8, min_group_size=2)
    g.advertise()
    g.share()
    inbox = g.server.inbox(g.clients[1].device_id)
    g.collect(skip=1)
    g.unmask()
    assert g.roster is not None and g.survivors is not None and g.survivors.dropped
    pairs: list[tuple[type[Any], list[Any]]] = [
        (contract.SecAggKeyAdvert, g.adverts),
        (contract.SecAggRoster, [g.roster]),
        (contract.SecAggShareKeys, g.shares),
        (contract.SecAggInbox, [inbox]),
        (contract.SecAggSurvivors, [g.survivors]),
        (contract.SecAggUnmaskShares, g.unmasks),
    ]
    for model, messages in pairs:
        assert messages
        for msg in messages:
            doc = json.loads(json.dumps(msg.to_dict()))
            model.model_validate(doc)
            with pytest.raises(ValueError):
                model.model_validate({**doc, "extra": 1})
    # The masked input travels raw: vector_length ring elements.
    assert {len(m.data) for m in g.masked} == {8 * 4}
