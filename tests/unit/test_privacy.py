"""Unit tests of a job's privacy settings, from the manifest down to the vectors devices send.

The spec (``SecureAggregationSpec``, ``DifferentialPrivacySpec`` and their cross-field rules in
``FLJobSpec``) must refuse every bad value naming the field, and accept the boundary case just
inside each rule. ``PrivacyPlan`` carries the settings to a device and must refuse, not skip,
a plan it does not understand. ``fedfleet.core.privacy`` turns a delta into the
secure-aggregation vector ``[w * clip(delta), w]`` and a summed vector back into a
``StreamingSum``; its results are checked against weighted means computed here with numpy.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from fedfleet.core.aggregation import StreamingSum, UpdateRejected
from fedfleet.core.dp import PrivacyAccountant
from fedfleet.core.privacy import (
    metrics_from_secagg,
    private_delta,
    secagg_params,
    secagg_vector,
    sum_from_secagg,
    vector_length,
)
from fedfleet.core.protocol import PrivacyPlan, secagg_group_id
from fedfleet.core.spec import AggregationSpec, FLJob, ManifestError, parse_manifest

pytestmark = pytest.mark.unit

MANIFEST: dict[str, Any] = {
    "apiVersion": "fedfleet.dev/v1alpha1",
    "kind": "FLJob",
    "metadata": {"name": "t"},
    "spec": {"population": "p", "rounds": {"goalCount": 10}, "fleet": {"devices": 200}},
}

SHAPES: list[tuple[int, ...]] = [(3, 4), (4,), (), (0, 2)]

SA_ON = {"secureAggregation": {"enabled": True}}
DP_ON = {"differentialPrivacy": {"enabled": True}}


def _doc(aggregation: dict[str, Any] | None = None, **spec: dict[str, Any]) -> dict[str, Any]:
    """The minimal manifest with ``aggregation`` and the other spec sections merged in."""
    doc = copy.deepcopy(MANIFEST)
    for section, values in spec.items():
        doc["spec"].setdefault(section, {}).update(values)
    if aggregation is not None:
        doc["spec"]["aggregation"] = copy.deepcopy(aggregation)
    return doc


def _refused(doc: dict[str, Any]) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        parse_manifest(doc)
    return info.value


def _aggregation(aggregation: dict[str, Any] | None = None, **spec: dict[str, Any]) -> Any:
    return parse_manifest(_doc(aggregation, **spec)).spec.aggregation


def _delta(rng: np.random.Generator, scale: float = 1.0) -> list[np.ndarray]:
    return [np.asarray(scale * rng.standard_normal(s), dtype=np.float32) for s in SHAPES]


def _clip64(delta: Sequence[np.ndarray], clip_norm: float | None) -> list[np.ndarray]:
    """Independent float64 L2 clipping of a whole update."""
    arrays = [a.astype(np.float64) for a in delta]
    if clip_norm is None:
        return arrays
    norm = math.sqrt(sum(float(np.sum(a * a)) for a in arrays))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [a * scale for a in arrays]


# ----------------------------------------------------------------------------- spec: fields


def test_privacy_is_off_by_default() -> None:
    agg = _aggregation()
    sa, dp = agg.secure_aggregation, agg.differential_privacy
    assert not sa.enabled and not dp.enabled
    assert agg.private is False
    assert agg.example_weight_cap == 100
    assert (sa.min_group_size, sa.threshold_fraction, sa.clip_range, sa.ring_bits) == (
        5,
        0.5,
        1.0,
        32,
    )
    assert sa.phase_timeout_seconds == 30.0
    assert (dp.clip_norm, dp.noise_multiplier, dp.delta) == (1.0, 1.0, 1e-5)
    assert dp.epsilon_budget is None and dp.population_size is None
    assert dp.accountant == "rdp"
    assert AggregationSpec().private is False


@pytest.mark.parametrize(
    ("aggregation", "sa", "dp"),
    [(SA_ON, True, False), (DP_ON, False, True), ({**SA_ON, **DP_ON}, True, True)],
    ids=["secure-aggregation", "differential-privacy", "both"],
)
def test_either_feature_makes_the_job_private(
    aggregation: dict[str, Any], sa: bool, dp: bool
) -> None:
    agg = _aggregation(aggregation)
    assert agg.secure_aggregation.enabled is sa
    assert agg.differential_privacy.enabled is dp
    assert agg.private is True


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("secureAggregation", "ringBits", 16),
        ("secureAggregation", "ringBits", 128),
        ("secureAggregation", "thresholdFraction", 0.4),
        ("secureAggregation", "thresholdFraction", 1.0),
        ("secureAggregation", "minGroupSize", 1),
        ("secureAggregation", "clipRange", 0),
        ("secureAggregation", "phaseTimeoutSeconds", 0),
        ("secureAggregation", "bogus", 1),
        ("differentialPrivacy", "clipNorm", 0),
        ("differentialPrivacy", "clipNorm", -1.0),
        ("differentialPrivacy", "noiseMultiplier", 0),
        ("differentialPrivacy", "noiseMultiplier", -0.5),
        ("differentialPrivacy", "delta", 0),
        ("differentialPrivacy", "delta", 1),
        ("differentialPrivacy", "accountant", "gdp"),
        ("differentialPrivacy", "epsilonBudget", 0),
        ("differentialPrivacy", "populationSize", 0),
        ("differentialPrivacy", "bogus", True),
        (None, "exampleWeightCap", 0),
    ],
)
def test_bad_value_is_refused_naming_the_field(section: str | None, field: str, value: Any) -> None:
    # The features stay disabled: a bad value is an error even where it would not be used.
    aggregation: dict[str, Any] = {field: value} if section is None else {section: {field: value}}
    err = _refused(_doc(aggregation))
    path = ".".join(p for p in ("spec.aggregation", section, field) if p)
    assert len(err.problems) == 1, err.problems
    assert err.problems[0].startswith(f"{path}: "), err.problems
    assert path in str(err)


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("secureAggregation", "ringBits", 64),
        ("secureAggregation", "thresholdFraction", 0.5),
        ("secureAggregation", "thresholdFraction", 0.99),
        ("secureAggregation", "minGroupSize", 2),
        ("differentialPrivacy", "delta", 1e-9),
        ("differentialPrivacy", "accountant", "pld"),
        (None, "exampleWeightCap", 1),
    ],
)
def test_edge_values_are_accepted(section: str | None, field: str, value: Any) -> None:
    aggregation: dict[str, Any] = {field: value} if section is None else {section: {field: value}}
    dumped = parse_manifest(_doc(aggregation)).spec.aggregation.model_dump(by_alias=True)
    got = dumped[field] if section is None else dumped[section][field]
    assert got == value


def test_camel_case_round_trip() -> None:
    aggregation = {
        "exampleWeightCap": 20,
        "secureAggregation": {
            "enabled": True,
            "minGroupSize": 3,
            "thresholdFraction": 0.6,
            "clipRange": 2.5,
            "ringBits": 64,
            "phaseTimeoutSeconds": 12.0,
        },
        "differentialPrivacy": {
            "enabled": True,
            "clipNorm": 0.7,
            "noiseMultiplier": 1.3,
            "delta": 1e-6,
            "epsilonBudget": 50.0,
            "populationSize": 5000,
            "accountant": "rdp",
        },
    }
    job = parse_manifest(_doc(aggregation))
    agg = job.spec.aggregation
    assert agg.example_weight_cap == 20
    assert agg.secure_aggregation.threshold_fraction == 0.6
    assert agg.differential_privacy.population_size == 5000
    for mode in ("python", "json"):
        dumped = job.model_dump(by_alias=True, mode=mode)
        wire = dumped["spec"]["aggregation"]
        assert wire["exampleWeightCap"] == 20
        assert wire["secureAggregation"] == {
            **aggregation["secureAggregation"],
            "metrics": ["train_loss", "train_accuracy", "federated_loss", "federated_accuracy"],
            "metricRange": 1000.0,
        }
        assert wire["differentialPrivacy"] == aggregation["differentialPrivacy"]
        again = parse_manifest(json.loads(json.dumps(dumped)) if mode == "json" else dumped)
        assert isinstance(again, FLJob)
        assert again == job
        assert again.spec.aggregation == agg


# ----------------------------------------------------------------- spec: secure aggregation


@pytest.mark.parametrize(
    ("goal", "per_aggregator", "groups", "per_group"),
    [(10, 500, 1, 8), (15, 10, 2, 6), (30, 10, 4, 6)],
)
def test_min_group_size_against_each_groups_share(
    goal: int, per_aggregator: int, groups: int, per_group: int
) -> None:
    """Each group must reach minGroupSize even in a round that proceeds with only its
    minimum report count (goalCount x minReportFraction, 0.8 by default)."""
    spec = {"rounds": {"goalCount": goal}, "actors": {"devicesPerAggregator": per_aggregator}}
    # Just inside the rule: every group gets exactly minGroupSize devices.
    inside = {"secureAggregation": {"enabled": True, "minGroupSize": per_group}}
    job = parse_manifest(_doc(inside, **spec))
    assert job.spec.actors.aggregator_count(job.spec.rounds) == groups
    assert job.spec.rounds.minimum_count // groups == per_group
    # One more than each group gets is refused, with both numbers in the message.
    outside = {"secureAggregation": {"enabled": True, "minGroupSize": per_group + 1}}
    err = _refused(_doc(outside, **spec))
    assert len(err.problems) == 1
    message = err.problems[0]
    assert "aggregation.secureAggregation.minGroupSize" in message
    assert f"({per_group + 1})" in message
    assert f"{groups} aggregator group(s)" in message
    assert f"minimum report count ({job.spec.rounds.minimum_count} = goalCount" in message
    assert message.endswith(f": {per_group}")
    # The rule only binds when secure aggregation is on.
    off = {"secureAggregation": {"enabled": False, "minGroupSize": per_group + 1}}
    assert parse_manifest(_doc(off, **spec)).spec.aggregation.private is False


def test_default_min_group_size_refuses_too_many_small_groups() -> None:
    # goalCount 10 (minimum 8), over-selection 1.3: 13 selected, 3 aggregators, 8 // 3 < 5.
    err = _refused(_doc(SA_ON, actors={"devicesPerAggregator": 5}))
    assert "minGroupSize (5)" in str(err)
    assert "3 aggregator group(s)" in str(err)
    # maxAggregators caps the group count: 2 groups of 8 // 2 = 4 are still too small ...
    err = _refused(_doc(SA_ON, actors={"devicesPerAggregator": 5, "maxAggregators": 2}))
    assert "2 aggregator group(s)" in str(err)
    # ... one group of 8 is enough.
    job = parse_manifest(_doc(SA_ON, actors={"devicesPerAggregator": 5, "maxAggregators": 1}))
    assert job.spec.aggregation.secure_aggregation.enabled


# --------------------------------------------------------------- spec: differential privacy


def test_goal_count_must_not_exceed_the_dp_population() -> None:
    too_small = {"differentialPrivacy": {"enabled": True, "populationSize": 9}}
    err = _refused(_doc(too_small))
    assert len(err.problems) == 1
    assert "rounds.goalCount (10) exceeds" in err.problems[0]
    assert "aggregation.differentialPrivacy.populationSize (9)" in err.problems[0]
    exact = {"differentialPrivacy": {"enabled": True, "populationSize": 10}}
    job = parse_manifest(_doc(exact))
    assert job.spec.dp_population == 10
    assert job.spec.dp_sampling_probability == 1.0
    # Without DP a population size below the goal count is not checked.
    off = {"differentialPrivacy": {"populationSize": 9}}
    assert parse_manifest(_doc(off)).spec.dp_sampling_probability == 1.0


@pytest.mark.parametrize(
    ("population", "devices", "refused", "accepted"),
    [(1000, 200, 1e-3, 9.99e-4), (None, 200, 5e-3, 4.99e-3), (None, 10, 0.1, 0.0999)],
)
def test_delta_must_be_below_one_over_the_population(
    population: int | None, devices: int, refused: float, accepted: float
) -> None:
    def dp(delta: float) -> dict[str, Any]:
        settings: dict[str, Any] = {"enabled": True, "delta": delta}
        if population is not None:
            settings["populationSize"] = population
        return {"differentialPrivacy": settings}

    fleet = {"devices": devices}
    err = _refused(_doc(dp(refused), fleet=fleet))
    assert len(err.problems) == 1
    message = err.problems[0]
    assert f"aggregation.differentialPrivacy.delta ({refused:g}) must be below" in message
    assert "1 / populationSize" in message
    job = parse_manifest(_doc(dp(accepted), fleet=fleet))
    assert job.spec.aggregation.differential_privacy.delta == accepted
    assert job.spec.dp_population == (population or devices)
    # With DP off the same delta is no error.
    off = {"differentialPrivacy": {"delta": refused}}
    assert not parse_manifest(_doc(off, fleet=fleet)).spec.aggregation.private


def test_epsilon_budget_spent_before_the_first_round_is_refused() -> None:
    accountant = PrivacyAccountant(noise_multiplier=1.0, sampling_probability=0.05, delta=1e-5)
    first = accountant.epsilon(1)
    assert 0.1 < first < 10  # q = 10 / 200, z = 1: one round costs a little over 1.5

    def dp(budget: float) -> dict[str, Any]:
        return {"differentialPrivacy": {"enabled": True, "epsilonBudget": budget}}

    err = _refused(_doc(dp(first * 0.99)))
    assert len(err.problems) == 1
    message = err.problems[0]
    assert "aggregation.differentialPrivacy.epsilonBudget" in message
    assert "spent before the first round" in message
    assert f"epsilon {first:.3g}" in message
    job = parse_manifest(_doc(dp(first * 1.01)))
    assert job.spec.aggregation.differential_privacy.epsilon_budget == pytest.approx(first * 1.01)
    # More noise makes the same budget last.
    noisier = dp(first * 0.99)
    noisier["differentialPrivacy"]["noiseMultiplier"] = 3.0
    assert parse_manifest(_doc(noisier)).spec.aggregation.differential_privacy.enabled


@pytest.mark.parametrize(
    ("goal", "devices", "population", "expected_population", "q"),
    [
        (10, 200, None, 200, 0.05),
        (10, 200, 1000, 1000, 0.01),
        (25, 100, None, 100, 0.25),
        (10, 10, None, 10, 1.0),
        (7, 200, 7, 7, 1.0),
    ],
)
def test_dp_sampling_probability(
    goal: int, devices: int, population: int | None, expected_population: int, q: float
) -> None:
    settings: dict[str, Any] = {"enabled": True}
    if population is not None:
        settings["populationSize"] = population
    job = parse_manifest(
        _doc(
            {"differentialPrivacy": settings},
            rounds={"goalCount": goal},
            fleet={"devices": devices},
        )
    )
    assert job.spec.dp_population == expected_population
    assert job.spec.dp_sampling_probability == pytest.approx(q, rel=1e-15)
    assert job.spec.dp_sampling_probability == pytest.approx(goal / expected_population)


# ------------------------------------------------------------------------ protocol: the plan


def test_no_plan_when_nothing_is_private() -> None:
    assert PrivacyPlan.for_group(_aggregation(), "job/a1/aggregator-0") is None


def test_plan_with_secure_aggregation_only() -> None:
    sa = {
        "enabled": True,
        "minGroupSize": 4,
        "thresholdFraction": 0.7,
        "clipRange": 3.0,
        "ringBits": 64,
    }
    agg = _aggregation({"exampleWeightCap": 40, "secureAggregation": sa})
    plan = PrivacyPlan.for_group(agg, "job/a1/aggregator-0")
    assert plan == PrivacyPlan(
        weight_cap=40,
        clip_norm=None,
        secure_aggregation=True,
        group_id="job/a1/aggregator-0",
        min_group_size=4,
        threshold_fraction=0.7,
        clip_range=3.0,
        ring_bits=64,
        metric_names=("train_loss", "train_accuracy", "federated_loss", "federated_accuracy"),
        metric_range=1000.0,
    )


def test_plan_with_differential_privacy_only() -> None:
    agg = _aggregation(
        {"exampleWeightCap": 7, "differentialPrivacy": {"enabled": True, "clipNorm": 0.3}}
    )
    plan = PrivacyPlan.for_group(agg, "job/a1/aggregator-0")
    assert plan is not None
    assert plan.weight_cap == 7
    assert plan.clip_norm == 0.3
    assert plan.secure_aggregation is False
    assert plan.group_id == ""


def test_plan_with_both() -> None:
    agg = _aggregation(
        {
            "secureAggregation": {"enabled": True, "minGroupSize": 6},
            "differentialPrivacy": {"enabled": True, "clipNorm": 2.0},
        }
    )
    plan = PrivacyPlan.for_group(agg, "g")
    assert plan is not None
    assert (plan.weight_cap, plan.clip_norm, plan.secure_aggregation) == (100, 2.0, True)
    assert (plan.group_id, plan.min_group_size, plan.ring_bits) == ("g", 6, 32)


@pytest.mark.parametrize(
    "plan",
    [
        PrivacyPlan(weight_cap=1),
        PrivacyPlan(weight_cap=100, clip_norm=0.5),
        PrivacyPlan(
            weight_cap=3,
            clip_norm=2.0,
            secure_aggregation=True,
            group_id="ns/job/a9/aggregator-2",
            min_group_size=8,
            threshold_fraction=0.75,
            clip_range=4.0,
            ring_bits=64,
            metric_names=("train_loss", "federated_r2"),
            metric_range=50.0,
        ),
    ],
)
def test_plan_dict_round_trip(plan: PrivacyPlan) -> None:
    d = plan.to_dict()
    assert set(d) == set(PrivacyPlan.__dataclass_fields__)
    assert d["clip_norm"] == plan.clip_norm
    assert PrivacyPlan.from_dict(d) == plan
    assert PrivacyPlan.from_dict(json.loads(json.dumps(d))) == plan


def test_from_dict_fills_defaults() -> None:
    assert PrivacyPlan.from_dict({"weight_cap": 5}) == PrivacyPlan(weight_cap=5)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"noise": 1.0}, "unknown privacy plan fields: \\['noise'\\]"),
        ({"ring_bits": 16}, "ring_bits must be an integer in \\[32, 64\\], got 16"),
        ({"ring_bits": 48}, "ring_bits must be 32 or 64, got 48"),
        ({"ring_bits": 32.7}, "ring_bits must be an integer"),
        ({"weight_cap": 0}, "weight_cap must be an integer in \\[1, "),
        ({"weight_cap": -5}, "weight_cap must be an integer"),
        ({"weight_cap": 1.9}, "weight_cap must be an integer"),
        ({"weight_cap": True}, "weight_cap must be an integer"),
        ({"clip_norm": 0.0}, "clip_norm must be a number in \\(0.0, "),
        ({"clip_norm": -1.0}, "clip_norm must be a number"),
        ({"clip_norm": math.nan}, "clip_norm must be a number"),
        ({"clip_norm": math.inf}, "clip_norm must be a number"),
        ({"clip_norm": "1"}, "clip_norm must be a number"),
        ({"secure_aggregation": "false"}, "secure_aggregation must be a boolean"),
        ({"min_group_size": -1}, "min_group_size must be an integer"),
        ({"threshold_fraction": 5}, "threshold_fraction must be a number"),
        ({"threshold_fraction": 0.4}, "threshold_fraction must be in \\[0.5, 1\\)"),
        ({"clip_range": 0}, "clip_range must be a number"),
        ({"group_id": ""}, "secure aggregation needs a group_id"),
        ({"metric_names": "train_loss"}, "metric_names must be"),
        ({"metric_names": ["Train-Loss"]}, "metric_names must be"),
        ({"metric_names": ["a", "a"]}, "metric_names must be"),
        ({"metric_names": [f"m{i}" for i in range(33)]}, "metric_names must be"),
        ({"metric_range": 0}, "metric_range must be a number"),
    ],
)
def test_from_dict_refuses(changes: dict[str, Any], match: str) -> None:
    good = PrivacyPlan(weight_cap=10, clip_norm=1.0, secure_aggregation=True, group_id="g")
    d = {**good.to_dict(), **changes}
    with pytest.raises(ValueError, match=match):
        PrivacyPlan.from_dict(d)
    assert PrivacyPlan.from_dict(good.to_dict()) == good


def test_secagg_group_id_binds_job_attempt_and_aggregator() -> None:
    assert secagg_group_id("ns/job", "a17", "aggregator-0") == "ns/job/a17/aggregator-0"
    ids = {
        secagg_group_id(job, attempt, agg)
        for job in ("j1", "j2")
        for attempt in ("a1", "a2")
        for agg in ("aggregator-0", "aggregator-1")
    }
    assert len(ids) == 8


# ------------------------------------------------------------- privacy: vectors and sums


@pytest.mark.parametrize(
    ("shapes", "length"),
    [(SHAPES, 12 + 4 + 1 + 0 + 1), ([], 1), ([(0, 3)], 1), ([(5,)], 6), ([(2, 3, 4), (7,)], 32)],
)
def test_vector_length(shapes: list[tuple[int, ...]], length: int) -> None:
    assert vector_length(shapes) == length


@pytest.mark.parametrize(
    ("clip_range", "clip_norm", "expected"),
    [
        (1.0, None, 1.0),
        (4.0, None, 4.0),
        (0.25, None, 1.0),
        (4.0, 2.5, 2.5),
        (2.0, 3.0, 2.0),
        (4.0, 0.5, 1.0),
        (0.5, 0.25, 1.0),
    ],
)
def test_secagg_params(clip_range: float, clip_norm: float | None, expected: float) -> None:
    plan = PrivacyPlan(
        weight_cap=10,
        clip_norm=clip_norm,
        secure_aggregation=True,
        group_id="job/a3/aggregator-1",
        min_group_size=3,
        threshold_fraction=0.6,
        clip_range=clip_range,
        ring_bits=64,
    )
    params = secagg_params(plan, SHAPES)
    assert params.clip_range == expected
    assert params.group_id == "job/a3/aggregator-1"
    assert params.vector_length == vector_length(SHAPES) == 18
    assert params.min_group_size == 3
    assert params.threshold_fraction == 0.6
    assert params.ring_bits == 64


@pytest.mark.parametrize(("num_examples", "weight"), [(1, 0.02), (25, 0.5), (50, 1.0), (900, 1.0)])
def test_private_delta_without_clipping(num_examples: int, weight: float) -> None:
    rng = np.random.default_rng(0)
    delta = _delta(rng, scale=10.0)
    out, w = private_delta(PrivacyPlan(weight_cap=50), delta, num_examples)
    assert w == pytest.approx(weight, rel=1e-15)
    assert len(out) == len(delta)
    for a, b in zip(out, delta, strict=True):
        np.testing.assert_array_equal(a, b)


def test_private_delta_clips_to_the_norm() -> None:
    rng = np.random.default_rng(1)
    delta = _delta(rng, scale=5.0)
    norm = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in delta))
    assert norm > 1.0
    out, w = private_delta(PrivacyPlan(weight_cap=10, clip_norm=1.0), delta, 4)
    assert w == pytest.approx(0.4)
    clipped_norm = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in out))
    assert clipped_norm <= 1.0
    assert clipped_norm == pytest.approx(1.0, rel=1e-6)
    for a, ref in zip(out, _clip64(delta, 1.0), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, ref, rtol=1e-6, atol=1e-9)
    # An update already within the bound is unchanged.
    small = [np.asarray(a / (2 * norm), dtype=np.float32) for a in delta]
    kept, _ = private_delta(PrivacyPlan(weight_cap=10, clip_norm=1.0), small, 4)
    for a, b in zip(kept, small, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("clip_norm", [None, 0.5, 100.0])
@pytest.mark.parametrize("num_examples", [3, 40])
def test_secagg_vector(clip_norm: float | None, num_examples: int) -> None:
    rng = np.random.default_rng(2)
    delta = _delta(rng, scale=2.0)
    plan = PrivacyPlan(weight_cap=20, clip_norm=clip_norm, secure_aggregation=True, group_id="g")
    vec = secagg_vector(plan, delta, num_examples)
    w = min(num_examples / 20, 1.0)
    assert vec.dtype == np.float64
    assert vec.shape == (vector_length(SHAPES),)
    assert vec[-1] == w
    expected = np.concatenate([(w * a).reshape(-1) for a in _clip64(delta, clip_norm)])
    if clip_norm is None:
        np.testing.assert_array_equal(vec[:-1], expected)
    else:
        np.testing.assert_allclose(vec[:-1], expected, rtol=1e-6, atol=1e-9)
        assert float(np.linalg.norm(vec[:-1])) <= w * clip_norm * (1 + 1e-12)
    # Flattened in model order: the first array's entries come first, row by row.
    first = _clip64(delta, clip_norm)[0]
    np.testing.assert_allclose(vec[:12].reshape(3, 4), w * first, rtol=1e-6)


@pytest.mark.parametrize("clip_norm", [None, 0.8])
def test_sum_from_secagg_gives_the_weighted_mean(clip_norm: float | None) -> None:
    rng = np.random.default_rng(3)
    cap = 30
    plan = PrivacyPlan(weight_cap=cap, clip_norm=clip_norm, secure_aggregation=True, group_id="g")
    deltas = [_delta(rng) for _ in range(7)]
    examples = [int(n) for n in rng.integers(1, 80, size=7)]
    total = np.sum(
        [secagg_vector(plan, d, n) for d, n in zip(deltas, examples, strict=True)], axis=0
    )
    result = sum_from_secagg(total, SHAPES, count=7)

    weights = np.array([min(n / cap, 1.0) for n in examples])
    assert weights.min() < 1.0  # both capped and uncapped devices take part
    assert result.count == 7
    assert result.total_weight == pytest.approx(weights.sum(), rel=1e-12)
    assert result.shapes == SHAPES
    clipped = [_clip64(d, clip_norm) for d in deltas]
    tol = 1e-12 if clip_norm is None else 2e-6
    for i, shape in enumerate(SHAPES):
        weighted = sum(w * c[i] for w, c in zip(weights, clipped, strict=True))
        assert result.sums[i].shape == shape
        assert result.sums[i].dtype == np.float64
        # Exact up to float32 rounding of the clipped deltas (about 1e-7 of each term).
        np.testing.assert_allclose(result.sums[i], weighted, rtol=0, atol=tol)
        mean = result.mean()[i]
        assert mean.dtype == np.float32  # one more float32 rounding
        np.testing.assert_allclose(mean, weighted / weights.sum(), rtol=1e-6, atol=tol)
    # The same as streaming each device's clipped delta with its capped weight.
    stream = StreamingSum(SHAPES)
    for d, n in zip(deltas, examples, strict=True):
        out, w = private_delta(plan, d, n)
        stream.add(out, w)
    for a, b in zip(result.sums, stream.sums, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # A partial sum merges with another group's partial sum like any other.
    stream.merge(result)
    assert stream.count == 14
    assert stream.total_weight == pytest.approx(2 * weights.sum())


def test_sum_from_secagg_does_not_alias_the_input() -> None:
    total = np.arange(vector_length(SHAPES), dtype=np.float64)
    result = sum_from_secagg(total, SHAPES, count=3)
    total[:] = -1.0
    assert result.sums[0][0, 0] == 0.0
    assert result.sums[1][0] == 12.0
    assert result.sums[2] == 16.0
    assert result.total_weight == 17.0


@pytest.mark.parametrize(
    "total",
    [
        np.zeros(17),
        np.zeros(19),
        np.zeros(0),
        np.zeros((1, 18)),
        np.zeros((18, 1)),
    ],
    ids=["short", "long", "empty", "row", "column"],
)
def test_sum_from_secagg_refuses_a_wrong_length(total: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expected 18"):
        sum_from_secagg(total, SHAPES, count=2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_sum_from_secagg_refuses_non_finite(bad: float) -> None:
    total = np.ones(vector_length(SHAPES))
    total[3] = bad
    with pytest.raises(ValueError):
        sum_from_secagg(total, SHAPES, count=2)


# ----------------------------------------------------- StreamingSum: partial sums and means


def _sums(value: float = 1.0) -> list[np.ndarray]:
    return [np.full(s, value, dtype=np.float64) for s in SHAPES]


@pytest.mark.parametrize(
    ("sums", "count", "weight", "reason"),
    [
        (_sums()[:-1], 2, 1.0, "shape"),
        ([*_sums(), np.zeros(1)], 2, 1.0, "shape"),
        ([np.zeros((4, 3)), *_sums()[1:]], 2, 1.0, "shape"),
        ([a.astype(np.float32) for a in _sums()], 2, 1.0, "dtype"),
        ([np.full((3, 4), math.nan), *_sums()[1:]], 2, 1.0, "non_finite"),
        ([*_sums()[:1], np.array([1.0, math.inf, 0.0, 0.0]), *_sums()[2:]], 2, 1.0, "non_finite"),
        (_sums(), -1, 1.0, "weight"),
        (_sums(), 2, -0.5, "weight"),
        (_sums(), 2, math.nan, "weight"),
        (_sums(), 2, math.inf, "weight"),
        (_sums(), 0, 5.0, "weight"),
        (_sums(), 3, 0.0, "weight"),
    ],
)
def test_from_sums_refuses(sums: list[np.ndarray], count: int, weight: float, reason: str) -> None:
    with pytest.raises(UpdateRejected) as info:
        StreamingSum.from_sums(SHAPES, sums, count=count, total_weight=weight)
    assert info.value.reason == reason


def test_from_sums_copies_its_input() -> None:
    sums = _sums(3.0)
    partial = StreamingSum.from_sums(SHAPES, sums, count=4, total_weight=2.0)
    sums[0][:] = 0.0
    assert (partial.count, partial.total_weight) == (4, 2.0)
    np.testing.assert_array_equal(partial.sums[0], np.full((3, 4), 3.0))
    np.testing.assert_array_equal(partial.mean()[0], np.full((3, 4), 1.5, dtype=np.float32))


def test_mean_with_a_fixed_denominator() -> None:
    rng = np.random.default_rng(4)
    sums = [rng.standard_normal(s) for s in SHAPES]
    partial = StreamingSum.from_sums(SHAPES, sums, count=5, total_weight=2.5)
    for denominator in (1.0, 10.0, 0.125):
        for got, s in zip(partial.mean(denominator=denominator), sums, strict=True):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, s / denominator, rtol=1e-6, atol=1e-30)
    for got, s in zip(partial.mean(), sums, strict=True):
        np.testing.assert_allclose(got, s / 2.5, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("denominator", [0.0, -1.0, math.nan, math.inf])
def test_mean_refuses_a_bad_denominator(denominator: float) -> None:
    partial = StreamingSum.from_sums(SHAPES, _sums(), count=2, total_weight=1.0)
    with pytest.raises(ValueError, match="denominator must be finite and positive"):
        partial.mean(denominator=denominator)


def test_mean_of_nothing_is_refused_even_with_a_denominator() -> None:
    with pytest.raises(ValueError, match="no updates"):
        StreamingSum(SHAPES).mean(denominator=10.0)


def test_add_noise() -> None:
    partial = StreamingSum.from_sums(SHAPES, _sums(2.0), count=3, total_weight=3.0)
    partial.add_noise(0.0, np.random.default_rng(5))
    for a, b in zip(partial.sums, _sums(2.0), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="stddev"):
        partial.add_noise(-1.0, np.random.default_rng(5))
    for a, b in zip(partial.sums, _sums(2.0), strict=True):
        np.testing.assert_array_equal(a, b)
    partial.add_noise(0.5, np.random.default_rng(5))
    assert (partial.count, partial.total_weight) == (3, 3.0)
    changed = np.concatenate([(a - 2.0).reshape(-1) for a in partial.sums])
    assert changed.size == 17 and np.all(changed != 0.0)
    assert float(np.max(np.abs(changed))) < 0.5 * 6  # six sigma


def test_add_noise_has_the_requested_spread() -> None:
    shapes = [(200, 100)]
    partial = StreamingSum.from_sums(shapes, [np.zeros((200, 100))], count=1, total_weight=1.0)
    partial.add_noise(2.0, np.random.default_rng(6))
    noise = partial.sums[0]
    assert abs(float(noise.mean())) < 0.1
    assert float(noise.std()) == pytest.approx(2.0, rel=0.03)


def test_from_dict_needs_weight_cap() -> None:
    with pytest.raises(ValueError, match="lacks weight_cap"):
        PrivacyPlan.from_dict({})


def test_spec_group_limit_is_the_protocol_limit() -> None:
    from fedfleet.core.secagg import MAX_GROUP_SIZE
    from fedfleet.core.spec import MAX_SECAGG_GROUP

    assert MAX_SECAGG_GROUP == MAX_GROUP_SIZE
    big = {"secureAggregation": {"enabled": True, "minGroupSize": 10}}
    err = _refused(
        _doc(
            big,
            rounds={"goalCount": 4000},
            fleet={"devices": 100_000},
            actors={"devicesPerAggregator": 100_000},
        )
    )
    assert "more than 4096" in err.problems[0]


# ------------------------------------------------- secure aggregation: device metrics inside


def test_device_metrics_ride_inside_the_secagg_vector_and_come_back_as_weighted_sums() -> None:
    plan = PrivacyPlan(
        weight_cap=10,
        secure_aggregation=True,
        group_id="g",
        metric_names=("train_loss", "train_accuracy", "federated_r2"),
        metric_range=100.0,
    )
    shapes = [(2, 3), (3,)]
    delta = [np.full(s, 0.1, np.float32) for s in shapes]
    reports = [
        (5, {"train_loss": 2.5, "train_accuracy": 0.5, "other": 7.0}),  # w = 0.5
        (20, {"train_loss": 0.5, "federated_r2": 0.9}),  # w = 1.0, no accuracy
        (10, {"train_loss": 1e6, "train_accuracy": 1.0}),  # w = 1.0, loss clipped to 100
    ]
    vectors = [secagg_vector(plan, delta, n, m) for n, m in reports]
    params = secagg_params(plan, shapes)
    assert params.vector_length == 6 + 3 + 1 + 2 * 3
    # Every coordinate fits the fixed-point range, whatever the metric's size.
    assert all(np.abs(v).max() <= params.clip_range for v in vectors)
    total = np.sum(vectors, axis=0)
    means = metrics_from_secagg(total, shapes, plan).means()
    assert means == pytest.approx(
        {
            "train_loss": (0.5 * 2.5 + 0.5 + 100.0) / 2.5,
            "train_accuracy": (0.5 * 0.5 + 1.0) / 1.5,
            "federated_r2": 0.9,
        }
    )
    assert "other" not in means
    partial = sum_from_secagg(total, shapes, 3, plan)
    assert partial.total_weight == pytest.approx(2.5)
    with pytest.raises(ValueError, match="expected"):
        sum_from_secagg(total, shapes, 3)  # a vector with metrics needs the plan that made it
