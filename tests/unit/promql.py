"""A small well-formedness check of PromQL expressions, for the chart's alerts and dashboard.

No PromQL parser ships in a Python package, and promtool is not among the cluster binaries, so
this checks what a typo breaks: every token is PromQL (names, numbers, strings, durations,
operators), brackets balance and nest as PromQL allows, a label matcher is
``name op "value"`` with a valid regex for ``=~``/``!~``, a range is a duration, each called
function or aggregation is a real one, ``by``/``without`` take a label list, and binary
operators have operands on both sides. :func:`metric_names` lists the series an expression
reads, so tests can hold them to what the actors expose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PromQLError", "check", "metric_names"]

FUNCTIONS = frozenset(
    """abs absent absent_over_time avg_over_time ceil changes clamp clamp_max clamp_min
    count_over_time day_of_month day_of_week delta deriv exp floor histogram_quantile holt_winters
    idelta increase irate label_join label_replace last_over_time ln log10 log2 max_over_time
    min_over_time predict_linear present_over_time quantile_over_time rate resets round scalar
    sgn sort sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time time timestamp vector
    label_values""".split()
)
AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile".split()
)
KEYWORDS = frozenset("by without on ignoring group_left group_right bool offset".split())
SET_OPS = frozenset({"and", "or", "unless"})

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<duration>(?:[0-9]+(?:ms|s|m|h|d|w|y))+)(?![A-Za-z0-9_])
  | (?P<number>[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<matchop>=~|!~|!=)
  | (?P<cmp>==|>=|<=|>|<)
  | (?P<eq>=)
  | (?P<arith>[-+*/%^])
  | (?P<open>[({\[])
  | (?P<close>[)}\]])
  | (?P<comma>,)
    """,
    re.VERBOSE,
)


class PromQLError(ValueError):
    """The expression is not well-formed PromQL."""


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str


def _tokens(expr: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise PromQLError(f"unexpected {expr[pos : pos + 10]!r} at {pos} in {expr!r}")
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append(_Tok(kind, m.group()))
        pos = m.end()
    return out


def _check_matchers(toks: list[_Tok], expr: str) -> None:
    """Inside ``{...}``: ``name op "string"`` separated by commas (a trailing comma is fine)."""
    i = 0
    while i < len(toks):
        name, op, value = (toks[i : i + 3] + [_Tok("", "")] * 3)[:3]
        if name.kind != "name" or op.kind not in ("eq", "matchop") or value.kind != "string":
            raise PromQLError(f"bad label matcher near {name.text!r} in {expr!r}")
        if op.text in ("=~", "!~"):
            try:
                re.compile(value.text[1:-1].encode().decode("unicode_escape"))
            except re.error as exc:
                raise PromQLError(f"bad regex {value.text} in {expr!r}: {exc}") from None
        i += 3
        if i < len(toks):
            if toks[i].kind != "comma":
                raise PromQLError(f"expected ',' between matchers in {expr!r}")
            i += 1


def check(expr: str) -> None:
    """Raise :class:`PromQLError` unless ``expr`` is well-formed PromQL (see the module doc)."""
    toks = _tokens(expr)
    if not toks:
        raise PromQLError("empty expression")
    stack: list[tuple[str, int]] = []
    pairs = {")": "(", "}": "{", "]": "["}
    binary = {"cmp", "arith"}
    prev: _Tok | None = None
    for i, tok in enumerate(toks):
        if tok.kind == "open":
            if tok.text == "(" and prev is not None and prev.kind == "name":
                word = prev.text
                if word in KEYWORDS:
                    pass  # by (...), on (...): a label list, checked below
                elif word not in FUNCTIONS | AGGREGATIONS:
                    raise PromQLError(f"unknown function {word!r} in {expr!r}")
            stack.append((tok.text, i))
        elif tok.kind == "close":
            if not stack or stack[-1][0] != pairs[tok.text]:
                raise PromQLError(f"unbalanced {tok.text!r} in {expr!r}")
            opener, start = stack.pop()
            inner = toks[start + 1 : i]
            if opener == "{":
                _check_matchers(inner, expr)
            elif opener == "[":
                if len(inner) != 1 or inner[0].kind != "duration":
                    raise PromQLError(f"a range must be one duration in {expr!r}")
            elif start > 0 and toks[start - 1].text in ("by", "without", "on", "ignoring"):
                names = [t for t in inner if t.kind != "comma"]
                if not all(t.kind == "name" for t in names):
                    raise PromQLError(f"{toks[start - 1].text} takes label names in {expr!r}")
        elif tok.kind in binary or (tok.kind == "name" and tok.text in SET_OPS):
            if prev is None or prev.kind in binary | {"open", "comma"}:
                if not (tok.kind == "arith" and tok.text in "+-"):  # unary sign
                    raise PromQLError(f"{tok.text!r} lacks a left operand in {expr!r}")
            if i == len(toks) - 1:
                raise PromQLError(f"{tok.text!r} lacks a right operand in {expr!r}")
        elif tok.kind == "eq" and not stack:
            raise PromQLError(f"'=' outside a label matcher in {expr!r} (use ==)")
        prev = tok
    if stack:
        raise PromQLError(f"unclosed {stack[-1][0]!r} in {expr!r}")


def metric_names(expr: str) -> set[str]:
    """Names of the series ``expr`` selects (not functions, keywords or label names)."""
    toks = _tokens(expr)
    out: set[str] = set()
    depth = 0
    for i, tok in enumerate(toks):
        if tok.kind == "open" and tok.text in "{(":
            depth += tok.text == "{"
        if tok.kind == "close" and tok.text == "}":
            depth -= 1
        if tok.kind != "name" or depth:
            continue
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        before = toks[i - 1] if i else None
        if tok.text in FUNCTIONS | AGGREGATIONS | KEYWORDS | SET_OPS:
            continue
        if nxt is not None and nxt.text == "(":
            continue
        if before is not None and before.text in ("(", ",") and _in_label_list(toks, i):
            continue
        out.add(tok.text)
    return out


def _in_label_list(toks: list[_Tok], i: int) -> bool:
    """Whether the name at ``i`` is inside ``by (...)`` / ``on (...)`` and the like."""
    depth = 0
    for j in range(i - 1, -1, -1):
        if toks[j].text == ")":
            depth += 1
        elif toks[j].text == "(":
            if depth == 0:
                return j > 0 and toks[j - 1].text in ("by", "without", "on", "ignoring")
            depth -= 1
    return False
