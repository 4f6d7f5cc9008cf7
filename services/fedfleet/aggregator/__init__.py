"""Aggregators: validate and fold in updates as they arrive; the round's master commits."""

from fedfleet.aggregator.actor import Aggregator, Evaluator

__all__ = ["Aggregator", "Evaluator"]
