"""Devices with valid credentials try to poison or wedge a job (issue 12 §1, issue 10 §5).

Two levels. Hand-driven rounds through the real coordinator, selector and aggregator over the
in-memory store decide exactly who reports what, so the committed model can be compared bit
for bit. Whole embedded digits jobs (the README's, 0.91 accuracy) run the issue's two attacks
from one of the fleet's own devices: each attack is first shown to poison the job with the
bounds switched off, then shown harmless with the defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedfleet.aggregator.actor import Aggregator
from fedfleet.coordinator.actor import COMMIT_FAILURES, Coordinator
from fedfleet.core.checkpoint import unpack_checkpoint
from fedfleet.core.protocol import CheckIn, Reconnect, ReportEnvelope, Task
from fedfleet.core.roles import JobPhase
from fedfleet.core.serde import encode_arrays
from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.embedded import EmbeddedOptions, run_job
from fedfleet.report import summary_rows
from fedfleet.selector.actor import Selector
from fedfleet.store.history import checkpoint_bytes as stored_bytes
from fedfleet.store.memory import MemoryStore
from fedfleet.tasks import task_of
from fedfleet.tasks.builtin import weight_shapes
from tests.hostile.attacks import HUGE, Attacker, digits_job

pytestmark = pytest.mark.hostile

SECRET = b"h" * 32
GOAL = 6
OFF = {"weightCapMultiple": 0, "adaptiveNormMultiple": 0, "maxModelNormRatio": 0}
"""Every bound switched off: what fedfleet did before (the attacks' baseline)."""


def _job(*, max_commit_failures: int = 5, **robustness: Any) -> FLJob:
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "hostile"},
            "spec": {
                "population": "p",
                "model": {"kind": "softmax", "inputs": 5, "classes": 3},
                "rounds": {
                    "total": 50,
                    "goalCount": GOAL,
                    "overSelection": 1.0,
                    "minReportFraction": 1.0,
                    "selectionTimeoutSeconds": 30,
                    "reportingTimeoutSeconds": 30,
                    "maxCommitFailures": max_commit_failures,
                },
                "aggregation": {"robustness": robustness},
                "fleet": {"devices": 50},
                "actors": {"selectors": 1},
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


class World:
    """One coordinator, selector and aggregator over the memory store, ticked by hand."""

    def __init__(
        self, job: FLJob, evaluator: Callable[[list[np.ndarray]], dict[str, float]] | None = None
    ) -> None:
        self.job = job
        self.now = 0.0
        self.store = MemoryStore(clock=lambda: self.now)
        self.agg = Aggregator(
            job, self.store, actor_id="aggregator-0", secret=SECRET, evaluator=evaluator
        )
        self.sel = Selector(
            job,
            self.store,
            actor_id="selector-0",
            secret=SECRET,
            forward=lambda _a, env: self.agg.accept(env),
        )
        self.coord = Coordinator(job, self.store, actor_id="coordinator-0")
        self.rng = np.random.default_rng(7)
        self.shapes = weight_shapes(job.spec.model)
        self.round_no = 0

    def tick(self, dt: float = 0.5) -> None:
        self.now += dt
        self.agg.tick(self.now)
        self.coord.tick(self.now)
        self.sel.tick(self.now)

    def tasks(self) -> list[tuple[str, Task]]:
        """Check GOAL fresh devices in and tick until each holds its task."""
        self.round_no += 1
        links = {f"dev-{self.round_no}-{i}": _Link() for i in range(GOAL)}
        for _ in range(10):
            self.tick()
        for device_id, link in links.items():
            answer = self.sel.check_in(CheckIn(device_id, "p", True, True, True, 7), self.now, link)
            assert not isinstance(answer, Reconnect), answer
        for _ in range(60):
            if all(link.task is not None for link in links.values()):
                break
            self.tick()
        tasks = [(device_id, link.task) for device_id, link in links.items()]
        assert all(t is not None for _, t in tasks)
        return [(d, t) for d, t in tasks if t is not None]

    def honest(self) -> list[np.ndarray]:
        return [self.rng.uniform(-0.1, 0.1, s).astype(np.float32) for s in self.shapes]

    def report(self, device: tuple[str, Task], update: list[np.ndarray], examples: int = 7) -> None:
        device_id, task = device
        a = task.assignment
        env = ReportEnvelope(device_id, a.round_key, a.ticket, examples, encode_arrays(update), {})
        self.sel.report(env, a.aggregator)

    def round(self, hostile: list[np.ndarray] | None = None, examples: int = 7) -> str:
        """Run one attempt: GOAL - 1 honest reports and one more (``hostile`` if given);
        return how it ended ('' when it committed, else the reason it was abandoned)."""
        tasks = self.tasks()
        key = tasks[0][1].assignment.round_key
        for task in tasks[:-1]:
            self.report(task, self.honest())
        self.report(tasks[-1], self.honest() if hostile is None else hostile, examples)
        for _ in range(200):
            self.tick()
            done = [a for a in self.store.attempts(self.job.key) if f"a{a['attempt']}" == key]
            if done:
                return str(done[-1]["reason"])
        raise AssertionError("the attempt did not end")

    def model(self) -> list[np.ndarray]:
        ckpt = self.store.checkpoint(self.job.key)
        assert ckpt is not None
        return unpack_checkpoint(stored_bytes(self.store, ckpt), task_of(self.job).shapes)[0]

    def checkpoint_bytes(self) -> bytes:
        ckpt = self.store.checkpoint(self.job.key)
        assert ckpt is not None
        return stored_bytes(self.store, ckpt)


def _huge(shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    return [np.full(s, HUGE, dtype=np.float32) for s in shapes]


# -- one round, by hand --------------------------------------------------------------------------


def test_huge_finite_update_poisons_a_job_without_bounds() -> None:
    """The baseline: with every bound off, one report of values near 3e38 is committed."""
    world = World(_job(**OFF))
    assert world.round() == ""
    assert world.round(_huge(world.shapes)) == ""
    assert max(float(np.abs(a).max()) for a in world.model()) > 1e36


def test_huge_finite_update_is_bounded_and_the_job_goes_on() -> None:
    world = World(_job())
    assert world.round() == ""
    before = world.model()
    assert world.round(_huge(world.shapes), examples=1_000_000) == ""
    after = world.model()
    assert all(np.isfinite(a).all() for a in after)
    # One of GOAL reports, its weight capped at 2 x the median count and its norm at 2 x the
    # median norm, moved the model by far less than a single honest update's norm x GOAL.
    moved = float(np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before, strict=True))))
    honest_norm = float(np.sqrt(sum((a**2).sum() for a in world.honest())))
    assert moved < 2 * honest_norm
    assert world.round() == "", "honest reports must still commit after the attack"
    assert world.store.model_version(world.job.key) == 3


def test_pre_commit_check_refuses_the_model_and_keeps_the_old_one_bit_for_bit() -> None:
    world = World(_job(weightCapMultiple=0, adaptiveNormMultiple=0))
    assert world.round() == ""
    committed = world.checkpoint_bytes()
    reason = world.round(_huge(world.shapes), examples=1_000_000)
    assert reason.startswith("commit-refused: pre-commit check refused the model")
    assert "maxModelNormRatio" in reason
    assert world.checkpoint_bytes() == committed
    assert world.store.model_version(world.job.key) == 1
    assert world.store.job_state(world.job.key)["phase"] == JobPhase.running.value
    assert world.round() == ""  # the previous model stays, and honest rounds commit again
    assert world.store.model_version(world.job.key) == 2


def test_a_job_whose_commits_keep_failing_ends_failed_with_the_last_error() -> None:
    world = World(_job(max_commit_failures=2, weightCapMultiple=0, adaptiveNormMultiple=0))
    assert world.round() == ""
    committed = world.checkpoint_bytes()
    assert world.round(_huge(world.shapes)).startswith("commit-refused")
    assert world.round() == ""  # a commit resets the count
    assert world.round(_huge(world.shapes)).startswith("commit-refused")
    assert world.store.job_state(world.job.key)["phase"] == JobPhase.running.value
    committed = world.checkpoint_bytes()
    assert world.round(_huge(world.shapes)).startswith("commit-refused")
    state = world.store.job_state(world.job.key)
    assert state["phase"] == JobPhase.failed.value
    assert state["reason"] == COMMIT_FAILURES
    assert state["commit_failures"] == 2
    assert "maxModelNormRatio" in state["last_error"]
    assert world.checkpoint_bytes() == committed
    for _ in range(20):
        world.tick()
    assert world.store.job_state(world.job.key)["phase"] == JobPhase.failed.value
    assert not [r for r in world.store.rounds(world.job.key) if r.active]


def test_a_master_that_cannot_evaluate_fails_the_job_instead_of_running_forever() -> None:
    def broken(_weights: list[np.ndarray]) -> dict[str, float]:
        raise ValueError("x must have shape (n, 20), got (359, 64)")

    world = World(_job(max_commit_failures=3), evaluator=broken)
    reasons = [world.round() for _ in range(3)]
    assert all(r.startswith("commit-refused: ValueError: x must have shape") for r in reasons)
    state = world.store.job_state(world.job.key)
    assert state["phase"] == JobPhase.failed.value and state["reason"] == COMMIT_FAILURES
    assert "(359, 64)" in state["last_error"]
    assert world.store.checkpoint(world.job.key) is None


# -- whole jobs ------------------------------------------------------------------------------------


def _run(kind: str, robustness: dict[str, Any], **attacker: Any) -> tuple[Attacker, Any]:
    spy = Attacker(kind, **attacker)
    result = run_job(
        digits_job(f"poison-{kind}", **robustness),
        progress=spy,
        options=EmbeddedOptions(adversary=spy),
    )
    return spy, result


def test_million_example_claim_poisons_a_job_without_bounds() -> None:
    spy, _ = _run("examples", OFF)
    assert spy.sent >= 1
    assert min(spy.accuracies[20:]) < 0.3


def test_million_example_claim_no_longer_poisons_the_job() -> None:
    spy, result = _run("examples", {})
    assert spy.sent >= 1
    assert result.succeeded and result.model_version == 50
    assert min(spy.accuracies[20:]) >= 0.75
    assert result.final_accuracy is not None and result.final_accuracy >= 0.85


def test_huge_finite_values_no_longer_poison_the_job() -> None:
    spy, result = _run("huge", {})
    assert spy.sent >= 1
    assert result.succeeded and result.model_version == 50
    assert min(spy.accuracies[20:]) >= 0.75
    assert result.final_accuracy is not None and result.final_accuracy >= 0.85


def test_several_liars_are_bounded_too() -> None:
    """Five percent of the fleet lies about its examples every time it is selected."""
    spy, result = _run("examples", {}, devices=10)
    assert spy.sent >= 10
    assert result.succeeded and result.model_version == 50
    # Unbounded, such claims drive the model below 0.3 (above). Bounded, one round's accuracy
    # still moves by several points with which devices (liars included) it drew, so the last
    # ten rounds are judged together, and every round after the twentieth on its own.
    assert sum(spy.accuracies[-10:]) / 10 >= 0.8
    assert min(spy.accuracies[20:]) >= 0.7


def test_an_embedded_job_that_cannot_commit_ends_failed_and_says_why() -> None:
    _, result = _run(
        "huge",
        {"weightCapMultiple": 0, "adaptiveNormMultiple": 0},
        devices=200,
        after=0,
    )
    assert not result.succeeded
    assert result.reason == COMMIT_FAILURES
    assert "maxModelNormRatio" in result.error
    assert result.model_version == 0
    totals = result.to_report()["totals"]
    assert totals["reason"] == COMMIT_FAILURES and totals["error"] == result.error
    outcome = dict(summary_rows(result))["Outcome"]
    assert outcome.startswith("failed (commit-failures: ") and "maxModelNormRatio" in outcome
