"""Reading a manifest's YAML text with limits, so that a hostile document costs nothing.

PyYAML's ``safe_load`` is safe against code execution, not against size: a "billion laughs"
document (aliases of aliases) expands to gigabytes once anything walks it, deep nesting ends
in a ``RecursionError`` inside the composer, and a repeated key silently keeps the last value
(a second ``spec:`` replaced the first). Kubernetes refuses duplicate keys, so ``fedfleet
validate`` must too. :func:`load_yaml` composes the document with a loader that bounds the
text's size, the nesting depth, the number of aliases and the size of the document *as
expanded* (counting each alias as the whole subtree it stands for), and refuses duplicate
keys; every refusal is a :class:`YamlRefused` naming where in the document it happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

__all__ = ["YamlLimits", "YamlRefused", "load_yaml"]


@dataclass(frozen=True, slots=True)
class YamlLimits:
    """Bounds of a manifest document (an FLJob is a few dozen lines)."""

    max_bytes: int = 1 << 20
    """Longest text accepted (1 MiB; the API server's own limit on a request is 3 MiB)."""
    max_depth: int = 32
    """Deepest nesting of mappings and sequences (an FLJob nests 4 levels)."""
    max_aliases: int = 64
    """Most alias uses (``*name``) in one document."""
    max_nodes: int = 100_000
    """Most nodes in the document with every alias expanded."""


class YamlRefused(ValueError):
    """The text is not a YAML document within :class:`YamlLimits`, or repeats a key."""


def _where(node: Node) -> str:
    mark = node.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}"


_MERGE = "tag:yaml.org,2002:merge"


class _BoundedLoader(yaml.SafeLoader):
    limits = YamlLimits()

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._expanded = 0
        self._sizes: dict[int, int] = {}

    def _line(self) -> int:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        return int(event.start_mark.line) + 1

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > self.limits.max_aliases:
                raise YamlRefused(
                    f"more than {self.limits.max_aliases} aliases (line {self._line()})"
                )
            node = super().compose_node(parent, index)
            if node is not None:
                self._count(self._sizes.get(id(node), 1), node)
            return node
        self._depth += 1
        if self._depth > self.limits.max_depth:
            raise YamlRefused(
                f"nested deeper than {self.limits.max_depth} levels (line {self._line()})"
            )
        before = self._expanded
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is None:
            return None
        self._count(1, node)
        # Everything counted since this node began is its expanded size: an alias to it
        # costs that much again.
        self._sizes[id(node)] = self._expanded - before
        return node

    def _count(self, n: int, node: Node) -> None:
        self._expanded += n
        if self._expanded > self.limits.max_nodes:
            raise YamlRefused(
                f"the document expands to more than {self.limits.max_nodes} nodes "
                f"({_where(node)}): aliases of aliases are refused"
            )

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag != _MERGE:  # `<<: *base`
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise YamlRefused(f"duplicate key {str(key)[:64]!r} ({_where(key_node)})")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, limits: YamlLimits | None = None) -> Any:
    """Parse one YAML document within ``limits``; raise :class:`YamlRefused` otherwise
    (``yaml.YAMLError`` for text that is not YAML at all)."""
    limits = limits or YamlLimits()
    size = len(text.encode("utf-8", errors="replace"))
    if size > limits.max_bytes:
        raise YamlRefused(f"the document has {size} bytes, more than {limits.max_bytes}")
    loader_class = type("Loader", (_BoundedLoader,), {"limits": limits})
    loader = loader_class(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
