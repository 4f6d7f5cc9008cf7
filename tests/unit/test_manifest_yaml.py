"""Bounded YAML loading (pure): limits hold, ordinary documents and modest anchors pass."""

from __future__ import annotations

import pytest

from fedfleet.core.manifest_yaml import YamlLimits, YamlRefused, load_yaml

pytestmark = pytest.mark.unit


def test_an_ordinary_document_loads() -> None:
    assert load_yaml("a: 1\nb: [x, {c: true}]\n") == {"a": 1, "b": ["x", {"c": True}]}


def test_a_few_anchors_are_fine() -> None:
    doc = load_yaml("base: &b {x: 1, y: 2}\none: *b\ntwo: {<<: *b, y: 3}\n")
    assert doc["one"] == {"x": 1, "y": 2}
    assert doc["two"] == {"x": 1, "y": 3}


def test_the_expanded_size_counts_what_aliases_stand_for() -> None:
    limits = YamlLimits(max_nodes=50)
    text = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\nb: [*a, *a, *a, *a, *a]\n"  # ~ 10 + 5 x 10 nodes
    with pytest.raises(YamlRefused, match="expands to more than 50 nodes"):
        load_yaml(text, limits)
    assert load_yaml(text, YamlLimits(max_nodes=200))["b"][4][8] == 9


def test_alias_count_depth_and_size_are_bounded() -> None:
    with pytest.raises(YamlRefused, match="more than 2 aliases"):
        load_yaml("a: &a 1\nb: [*a, *a, *a]\n", YamlLimits(max_aliases=2))
    with pytest.raises(YamlRefused, match="nested deeper than 3"):
        load_yaml("a: {b: {c: {d: 1}}}\n", YamlLimits(max_depth=3))
    with pytest.raises(YamlRefused, match="more than 10"):
        load_yaml("a: 12345678901\n", YamlLimits(max_bytes=10))


@pytest.mark.parametrize(
    "text", ["a: 1\na: 2\n", "x: {a: 1, a: 1}\n", "- {k: 1}\n- {k: 2, k: 3}\n"]
)
def test_duplicate_keys_are_refused_at_any_depth(text: str) -> None:
    with pytest.raises(YamlRefused, match="duplicate key"):
        load_yaml(text)
