"""Device-reported metrics: hostile input refused, example-weighted means across aggregators."""

from __future__ import annotations

import json

import pytest

from fedfleet.core.metrics import MAX_METRICS, MetricsRejected, MetricSums, parse_metrics

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[1, 2]", "JSON object"),
        ("{not json", "not JSON"),
        ('{"Loss": 1}', "snake_case"),
        ('{"loss": "1"}', "not a number"),
        ('{"loss": true}', "not a number"),
        ('{"loss": NaN}', "finite"),
        ('{"loss": 1e300}', "finite"),
        (json.dumps({f"m{i}": 1 for i in range(MAX_METRICS + 1)}), "at most"),
        ('{"a": "' + "x" * 5000 + '"}', "exceed"),
    ],
)
def test_hostile_metrics_are_refused(text: str, match: str) -> None:
    with pytest.raises(MetricsRejected, match=match):
        parse_metrics(text)


def test_means_are_weighted_by_examples_and_merge_across_aggregators() -> None:
    a, b = MetricSums(), MetricSums()
    a.add(parse_metrics('{"train_loss": 1.0, "federated_accuracy": 0.5}'), 10)
    a.add({"train_loss": 3.0}, 30)
    b.add({"train_loss": 2.0, "federated_accuracy": 1.0}, 60)
    merged = MetricSums.from_bytes(a.to_bytes())
    merged.merge(MetricSums.from_bytes(b.to_bytes()))
    means = merged.means()
    assert means["train_loss"] == pytest.approx((10 * 1 + 30 * 3 + 60 * 2) / 100)
    assert means["federated_accuracy"] == pytest.approx((10 * 0.5 + 60 * 1.0) / 70)
    # another aggregator's garbage is dropped name by name, never fails the commit
    junk = MetricSums.from_bytes(b'{"ok": [2.0, 1.0], "Bad": [1, 1], "x": "y"}')
    assert junk.means() == {"ok": 2.0}
    assert MetricSums.from_bytes(b"\xff").means() == {}
