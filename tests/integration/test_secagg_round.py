"""A Secure Aggregation round through the real actors: coordinator, selector and aggregator over
the in-memory store, with devices running the real protocol client (no HTTP, no simulator).

Each test drives one round by hand, so it can decide exactly which device drops out after
which message, forge messages, and compare the committed model with the plaintext average it
must equal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from fedfleet.aggregator.actor import Aggregator
from fedfleet.coordinator.actor import Coordinator
from fedfleet.core.checkpoint import unpack_checkpoint
from fedfleet.core.privacy import secagg_params, secagg_vector
from fedfleet.core.protocol import CheckIn, Reconnect, ReportEnvelope, ReportRejected, Task
from fedfleet.core.secagg import SecAggClient
from fedfleet.core.serde import encode_arrays
from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.device.runtime import SecureContribution
from fedfleet.device.secure import SecureSession
from fedfleet.selector.actor import Selector
from fedfleet.store.history import checkpoint_bytes
from fedfleet.store.memory import MemoryStore
from fedfleet.tasks import task_of

pytestmark = pytest.mark.integration

SECRET = b"k" * 32
GOAL = 6


def _job(*, inputs: int = 5, **aggregation: Any) -> FLJob:
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "sa"},
            "spec": {
                "population": "p",
                "model": {"kind": "softmax", "inputs": inputs, "classes": 3},
                "rounds": {
                    "total": 3,
                    "goalCount": GOAL,
                    "overSelection": 1.0,
                    "minReportFraction": 0.5,
                    "selectionTimeoutSeconds": 30,
                    "reportingTimeoutSeconds": 30,
                },
                "aggregation": {
                    "exampleWeightCap": 10,
                    "secureAggregation": {
                        "enabled": True,
                        "minGroupSize": 3,
                        "phaseTimeoutSeconds": 5,
                    },
                    **aggregation,
                },
                "fleet": {"devices": 50},
                "actors": {"selectors": 1, "devicesPerAggregator": 100},
            },
        }
    )


class _Link:
    def __init__(self) -> None:
        self.task: Task | None = None

    def configure(self, task: Task) -> None:
        self.task = task

    def release(self, reconnect: Reconnect) -> None:
        pass


@dataclass
class _Device:
    device_id: str
    task: Task
    examples: int
    delta: list[np.ndarray]
    stop_after: int = 99
    metrics: dict[str, float] = field(default_factory=dict)
    session: SecureSession | None = None
    sent: list[str] = field(default_factory=list)
    active: bool = True


class World:
    def __init__(self, job: FLJob) -> None:
        self.job = job
        self.now = 0.0
        self.store = MemoryStore(clock=lambda: self.now)
        self.agg = Aggregator(job, self.store, actor_id="aggregator-0", secret=SECRET)
        self.sel = Selector(
            job,
            self.store,
            actor_id="selector-0",
            secret=SECRET,
            forward=lambda _a, env: self.agg.accept(env),
            forward_secagg=lambda _a, *rest: self.agg.secagg(*rest),
        )
        self.coord = Coordinator(job, self.store, actor_id="coordinator-0")

    def tick(self, dt: float = 0.5) -> None:
        self.now += dt
        self.agg.tick(self.now)
        self.coord.tick(self.now)
        self.sel.tick(self.now)

    def configured(self, n: int, rng: np.random.Generator) -> list[_Device]:
        """Check ``n`` devices in and tick until each holds its task."""
        links = {f"dev-{i:02d}": _Link() for i in range(n)}
        for _ in range(20):
            self.tick()
        for device_id, link in links.items():
            answer = self.sel.check_in(CheckIn(device_id, "p", True, True, True, 7), self.now, link)
            assert not isinstance(answer, Reconnect), answer
        for _ in range(40):
            if all(link.task is not None for link in links.values()):
                break
            self.tick()
        shapes = task_of(self.job).shapes
        devices = []
        for i, (device_id, link) in enumerate(links.items()):
            assert link.task is not None and link.task.privacy is not None
            delta = [rng.uniform(-0.5, 0.5, s).astype(np.float32) for s in shapes]
            devices.append(_Device(device_id, link.task, 3 + i, delta))
        return devices

    def call(self, dev: _Device, step: str, body: bytes = b"") -> dict[str, Any] | None:
        a = dev.task.assignment
        return self.sel.secagg(a.aggregator, a.round_key, dev.device_id, a.ticket, step, body)

    def session(self, dev: _Device) -> SecureSession:
        """The device's protocol session over its delta, as its runtime would build it."""
        plan = dev.task.privacy
        assert plan is not None
        a = dev.task.assignment
        contribution = SecureContribution(
            dev.device_id,
            a.round_key,
            a.aggregator,
            a.ticket,
            secagg_params(plan, task_of(self.job).shapes),
            secagg_vector(plan, dev.delta, dev.examples, dev.metrics),
            dict(dev.metrics),
        )
        return SecureSession(contribution)

    def run_protocol(self, devices: list[_Device], *, max_ticks: int = 200) -> None:
        """Every device walks its session (stopping where told) until the round ends."""
        for dev in devices:
            if dev.session is not None:
                continue  # already walking its session
            dev.session = self.session(dev)
            self._send(dev, *dev.session.start())
        key = devices[0].task.assignment.round_key
        for _ in range(max_ticks):
            self.tick()
            for dev in devices:
                if not dev.active:
                    continue
                assert dev.session is not None and dev.session.poll is not None
                try:
                    published = self.call(dev, dev.session.poll)
                except ReportRejected as exc:
                    assert exc.status == 410, exc
                    dev.active = False
                    continue
                if published is not None:
                    self._send(dev, *dev.session.answer(published))
            state = next((r for r in self.store.rounds(self.job.key) if r.key == key), None)
            if state is None or not state.active:
                return
        raise AssertionError("the round did not end")

    def _send(self, dev: _Device, step: str, body: bytes) -> None:
        assert dev.session is not None
        self.call(dev, step, body)
        dev.session.sent(step)
        dev.sent.append(step)
        if dev.session.done or len(dev.sent) >= dev.stop_after:
            dev.active = False

    def model(self) -> list[np.ndarray]:
        ckpt = self.store.checkpoint(self.job.key)
        assert ckpt is not None
        weights, _ = unpack_checkpoint(checkpoint_bytes(self.store, ckpt), task_of(self.job).shapes)
        return weights


def _expected(devices: list[_Device], cap: int) -> list[np.ndarray]:
    """The plaintext FedAvg of the devices' deltas with capped weights min(n / cap, 1)."""
    w = np.array([min(d.examples / cap, 1.0) for d in devices])
    return [
        np.einsum("k,k...->...", w, np.array([d.delta[i] for d in devices], dtype=np.float64))
        / w.sum()
        for i in range(len(devices[0].delta))
    ]


def test_committed_model_is_the_plaintext_average_despite_dropouts() -> None:
    world = World(_job())
    devices = world.configured(GOAL, np.random.default_rng(1))
    start = [w.copy() for w in devices[0].task.weights]
    devices[1].stop_after = 2  # after its shares: its pairwise masks must be recovered
    devices[2].stop_after = 3  # after its masked input: in the sum, silent at unmasking
    world.run_protocol(devices)

    assert world.store.model_version(world.job.key) == 1, world.agg.last_commit_error
    survivors = [d for d in devices if "masked" in d.sent]
    assert len(survivors) == GOAL - 1
    expected = _expected(survivors, cap=10)
    for got, base, want in zip(world.model(), start, expected, strict=True):
        np.testing.assert_allclose(got - base, want, atol=2e-6)
    metrics = world.store.metrics(world.job.key)[-1]
    assert metrics["reports"] == GOAL - 1
    assert "examples" not in metrics  # the master never learns example counts


def test_device_metrics_are_summed_inside_the_masked_vector_and_only_the_mean_is_recorded() -> None:
    secure = {"enabled": True, "minGroupSize": 3, "phaseTimeoutSeconds": 5}
    world = World(
        _job(secureAggregation={**secure, "metrics": ["train_loss", "federated_accuracy"]})
    )
    devices = world.configured(GOAL, np.random.default_rng(3))
    for i, dev in enumerate(devices):
        # Losses above the fixed-point range (1.0) survive the encoding; an unlisted metric
        # never leaves the device; one device reports no federated_accuracy.
        dev.metrics = {"train_loss": 2.0 + 0.5 * i, "train_secret": 100.0 + i}
        if i != 0:
            dev.metrics["federated_accuracy"] = 0.1 * i
    devices[1].stop_after = 2  # not in the sum: neither its update nor its metrics count
    devices[2].stop_after = 3  # in the sum, silent at unmasking
    world.run_protocol(devices)

    assert world.store.model_version(world.job.key) == 1, world.agg.last_commit_error
    survivors = [d for d in devices if "masked" in d.sent]
    w = {d.device_id: min(d.examples / 10, 1.0) for d in survivors}

    def mean(name: str) -> float:
        having = [d for d in survivors if name in d.metrics]
        return sum(w[d.device_id] * d.metrics[name] for d in having) / sum(
            w[d.device_id] for d in having
        )

    metrics = world.store.metrics(world.job.key)[-1]
    assert metrics["train_loss"] == pytest.approx(mean("train_loss"), abs=1e-3)
    assert metrics["federated_accuracy"] == pytest.approx(mean("federated_accuracy"), abs=1e-3)
    assert "train_secret" not in metrics


def test_a_group_below_its_threshold_commits_nothing_and_the_round_is_abandoned() -> None:
    world = World(_job())
    devices = world.configured(GOAL, np.random.default_rng(2))
    for dev in devices[:3]:
        dev.stop_after = 1  # advertise keys, then vanish: 3 of 6 share keys, threshold is 4
    world.run_protocol(devices)

    assert world.store.model_version(world.job.key) == 0
    assert "secure aggregation group failed" in world.agg.last_commit_error
    assert "threshold 4" in world.agg.last_commit_error
    attempts = world.store.attempts(world.job.key)
    assert attempts and attempts[-1]["abandoned"]
    assert attempts[-1]["reason"] == "secagg-group-failed"  # at once, not at the deadline
    # The failed group told its remaining members to stop instead of leaving them polling.
    assert all(not d.active for d in devices)


def test_plain_reports_are_refused_when_secure_aggregation_is_on() -> None:
    world = World(_job())
    devices = world.configured(GOAL, np.random.default_rng(3))
    dev = devices[0]
    a = dev.task.assignment
    env = ReportEnvelope(dev.device_id, a.round_key, a.ticket, 7, encode_arrays(dev.delta))
    with pytest.raises(ReportRejected) as exc:
        world.agg.accept(env)
    assert exc.value.status == 409
    assert "secure aggregation" in exc.value.reason
    assert world.agg.partial(a.round_key) is None  # nothing was folded in


def test_forged_and_replayed_advertisements_are_refused_and_the_round_still_commits() -> None:
    world = World(_job())
    devices = world.configured(GOAL, np.random.default_rng(4))
    honest, other, replayer = devices[0], devices[1], devices[2]
    a = replayer.task.assignment
    shapes = task_of(world.job).shapes
    assert replayer.task.privacy is not None
    params = secagg_params(replayer.task.privacy, shapes)

    # A wrong ticket never reaches the aggregator.
    with pytest.raises(ReportRejected) as bad_ticket:
        world.sel.secagg(a.aggregator, a.round_key, replayer.device_id, "0" * 64, "advertise", b"")
    assert bad_ticket.value.status == 403
    # An advertisement naming another device than its sender.
    advert_of_other = SecAggClient(params, other.device_id).advertise()
    with pytest.raises(ReportRejected) as forged:
        world.call(replayer, "advertise", json.dumps(advert_of_other.to_dict()).encode())
    assert forged.value.status == 403
    # Malformed JSON.
    with pytest.raises(ReportRejected) as garbage:
        world.call(replayer, "advertise", b"{not json")
    assert garbage.value.status == 422

    # The honest device advertises first; the replayer copies its public keys.
    honest_session = world.session(honest)
    step, body = honest_session.start()
    world.call(honest, step, body)
    honest_session.sent(step)
    replay = json.loads(body)
    replay["device_id"] = replayer.device_id
    with pytest.raises(ReportRejected) as replayed:
        world.call(replayer, "advertise", json.dumps(replay).encode())
    assert replayed.value.status == 422
    assert "key" in replayed.value.reason

    # The rest of the round runs normally: the honest device continues its own session.
    honest.session = honest_session
    honest.sent.append("advertise")
    rest = [d for d in devices if d is not honest and d is not replayer]
    world.run_protocol([honest, *rest])

    assert world.store.model_version(world.job.key) == 1, world.agg.last_commit_error
    expected = _expected([honest, *rest], cap=10)
    for got, base, want in zip(world.model(), devices[0].task.weights, expected, strict=True):
        np.testing.assert_allclose(got - base, want, atol=2e-6)


def test_master_noise_has_the_calibrated_standard_deviation() -> None:
    """DP + Secure Aggregation end to end: devices send zero updates, so the committed change
    is the master's noise divided by the fixed denominator (the goal count); its spread must
    be z x S / K (3,003 coordinates: the sample deviation is within 1.3% at one sigma)."""
    z, clip = 2.0, 0.5
    world = World(
        _job(
            inputs=1000,
            differentialPrivacy={
                "enabled": True,
                "clipNorm": clip,
                "noiseMultiplier": z,
                "delta": 1e-3,
            },
        )
    )
    devices = world.configured(GOAL, np.random.default_rng(5))
    for dev in devices:
        dev.delta = [np.zeros_like(d) for d in dev.delta]
    start = [w.copy() for w in devices[0].task.weights]
    world.run_protocol(devices)

    assert world.store.model_version(world.job.key) == 1, world.agg.last_commit_error
    change = np.concatenate(
        [(got - base).ravel() for got, base in zip(world.model(), start, strict=True)]
    )
    expected = z * clip / GOAL
    assert change.size == 3003
    assert abs(change.mean()) < 5 * expected / np.sqrt(change.size)
    assert change.std() == pytest.approx(expected, rel=0.07)  # about 5 sigma
    assert world.store.metrics(world.job.key)[-1]["epsilon"] > 0
