"""Whole private jobs: Secure Aggregation and DP-FedAvg, embedded and over real HTTP + Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedfleet.device.runtime as runtime_module
from fedfleet.aggregator.actor import Aggregator
from fedfleet.cli import main
from fedfleet.core.dp import PrivacyAccountant, update_norm
from fedfleet.core.protocol import ReportEnvelope
from fedfleet.core.secagg import MaskedInput, SecAggServer
from fedfleet.core.serde import decode_arrays
from fedfleet.core.spec import FLJob, load_manifest, parse_manifest
from fedfleet.embedded import run_job
from tests.integration.deployed import run_deployed, small_job

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def _digits(**aggregation: Any) -> FLJob:
    doc = load_manifest((EXAMPLES / "digits.yaml").read_text()).model_dump(
        by_alias=True, mode="json"
    )
    doc["spec"]["aggregation"].update(aggregation)
    return parse_manifest(doc)


@pytest.mark.slow
def test_digits_private_example_trains_to_080_with_epsilon_in_the_report(tmp_path: Path) -> None:
    """The issue's criterion: `fedfleet run deploy/examples/digits-private.yaml`."""
    args = ["run", str(EXAMPLES / "digits-private.yaml"), "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    report = json.loads((tmp_path / "digits-private.json").read_text())
    totals = report["totals"]
    assert totals["succeeded"] and totals["reason"] == "epsilon-budget"
    assert totals["final_accuracy"] >= 0.80
    job = load_manifest((EXAMPLES / "digits-private.yaml").read_text())
    dp = job.spec.aggregation.differential_privacy
    assert dp.epsilon_budget is not None
    accountant = PrivacyAccountant(
        noise_multiplier=dp.noise_multiplier,
        sampling_probability=job.spec.dp_sampling_probability,
        delta=dp.delta,
    )
    committed = [r for r in report["rounds"] if not r["abandoned"]]
    # Every committed round reports the epsilon spent so far, exactly the accountant's value;
    # the job stopped at the last round the budget allows.
    assert [r["epsilon"] for r in committed] == pytest.approx(
        [accountant.epsilon(i + 1) for i in range(len(committed))]
    )
    assert totals["epsilon"] <= dp.epsilon_budget < accountant.epsilon(len(committed) + 1)
    assert totals["rounds"] == accountant.max_rounds(dp.epsilon_budget, job.spec.rounds.total)
    assert totals["delta"] == dp.delta
    assert all(r["epsilon"] is None for r in report["rounds"] if r["abandoned"])


@pytest.mark.slow
def test_every_dp_update_is_clipped_on_the_device_and_checked_on_receipt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clip = 0.5
    raw: list[float] = []
    received: list[float] = []
    real_clip = runtime_module.clip_update

    def recording_clip(update: Any, clip_norm: float) -> Any:
        raw.append(update_norm(update))
        return real_clip(update, clip_norm)

    real_accept = Aggregator.accept

    def recording_accept(self: Aggregator, env: ReportEnvelope) -> None:
        received.append(update_norm(decode_arrays(env.update)))
        real_accept(self, env)

    monkeypatch.setattr(runtime_module, "clip_update", recording_clip)
    monkeypatch.setattr(Aggregator, "accept", recording_accept)
    job = _digits(
        exampleWeightCap=5,
        differentialPrivacy={
            "enabled": True,
            "clipNorm": clip,
            "noiseMultiplier": 0.8,
            "delta": 1e-3,
        },
    )
    result = run_job(job)
    assert result.succeeded and result.epsilon is not None and result.epsilon > 0
    assert len(received) >= 20 * job.spec.rounds.total
    assert max(raw) > clip  # the bound was binding: most raw updates are larger
    assert max(received) <= clip * (1 + 1e-6)


@pytest.mark.slow
def test_secure_aggregation_job_trains_and_aggregators_only_see_masked_inputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain: list[str] = []
    masked: list[int] = []
    real_accept = Aggregator.accept
    real_receive = SecAggServer.receive_masked

    def recording_accept(self: Aggregator, env: ReportEnvelope) -> None:
        plain.append(env.device_id)
        real_accept(self, env)

    def recording_receive(self: SecAggServer, msg: MaskedInput) -> None:
        masked.append(len(msg.data))
        real_receive(self, msg)

    monkeypatch.setattr(Aggregator, "accept", recording_accept)
    monkeypatch.setattr(SecAggServer, "receive_masked", recording_receive)
    job = _digits(exampleWeightCap=5, secureAggregation={"enabled": True, "minGroupSize": 10})
    result = run_job(job)
    assert result.succeeded and result.model_version == 50
    assert result.final_accuracy is not None and result.final_accuracy >= 0.85
    assert result.epsilon is None  # no DP: no epsilon claimed
    assert plain == []
    assert len(masked) >= 18 * 50
    # uint32 ring elements: weights, the weight, and (sum, weight) of 4 device metrics
    assert set(masked) == {4 * (64 * 10 + 10 + 1 + 2 * 4)}
    # Device metrics still reach the record: summed inside the masked vectors.
    losses = [r.device_metrics.get("train_loss") for r in result.rounds if not r.abandoned]
    assert losses and all(loss is not None and 0 < loss < 5 for loss in losses)
    accuracies = [r.device_metrics["train_accuracy"] for r in result.rounds if not r.abandoned]
    assert all(0 <= a <= 1 for a in accuracies) and accuracies[-1] > accuracies[0]


@pytest.mark.integration
def test_private_job_over_http_and_redis() -> None:
    """The deployed shape: selectors relay every protocol step to the aggregator process."""
    job = small_job(
        "private",
        rounds={"total": 6, "goalCount": 8},
        aggregation={
            "exampleWeightCap": 5,
            "secureAggregation": {"enabled": True, "minGroupSize": 5, "phaseTimeoutSeconds": 3},
            "differentialPrivacy": {
                "enabled": True,
                "clipNorm": 1.0,
                "noiseMultiplier": 0.5,
                "delta": 1e-3,
            },
        },
        actors={"selectors": 2, "devicesPerAggregator": 20},
    )
    out = run_deployed(job, timeout=300)
    assert out.finished
    committed = [a for a in out.attempts if not a["abandoned"]]
    assert [a["model_version"] for a in committed] == list(range(1, 7))
    eps = [a["metrics"]["epsilon"] for a in committed]
    assert eps == sorted(eps) and eps[0] > 0
    assert all("examples" not in a["metrics"] for a in committed)
    assert all("train_loss" in a["metrics"] for a in committed)  # inside the masked sums
    stats = out.fleet_stats
    assert stats.secagg_completed >= 6 * 5  # at least a minimum group per round unmasked
    assert np.isfinite(out.result.final_accuracy or np.nan)
