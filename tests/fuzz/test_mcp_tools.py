"""Fuzz target: the tool names svid.mcp checks in a JSON-RPC body (svid._mcp_tools).

Property: for bodies built from the keys that matter (spelled plainly or with escapes, repeated
or not, in messages and batches), ``called_tools`` either raises ValueError or returns exactly
the tools a strict reader finds; and whenever a message or its params repeat a key the check
reads, it raises. The fast path (the SDK's own parser, for bodies that cannot repeat a key) is
thereby held to the strict read.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from svid._mcp_tools import called_tools
from tests.fuzz._profile import fuzz_settings

KEYS = ["method", "params", "name", "jsonrpc", "id", "arguments"]
ESCAPED = {"method": "m\\u0065thod", "params": "p\\u0061rams", "name": "n\\u0061me"}
READ = {"method", "params", "name"}
scalars = st.sampled_from(
    ['"tools/call"', '"tools/list"', '"a"', '"b"', '""', "1", "null", '"x y"']
)


def spelled(key: str) -> st.SearchStrategy[str]:
    return st.sampled_from([f'"{key}"', f'"{ESCAPED.get(key, key)}"'])


def objects(depth: int) -> st.SearchStrategy[str]:
    value = scalars if depth == 0 else st.one_of(scalars, objects(depth - 1))
    pair = st.sampled_from(KEYS).flatmap(
        lambda k: st.tuples(spelled(k), value).map(lambda kv: f"{kv[0]}:{kv[1]}")
    )
    return st.lists(pair, max_size=5).map(lambda ps: "{" + ",".join(ps) + "}")


bodies = st.one_of(
    objects(2), st.lists(objects(2), max_size=3).map(lambda ms: "[" + ",".join(ms) + "]")
)


class _RepeatedError(Exception):
    pass


def _strict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys) and {k for k in keys if keys.count(k) > 1} & READ:
        raise _RepeatedError
    return dict(pairs)


def oracle(text: str) -> tuple[str, ...] | None:
    """The tools a strict reader finds; None when the body must be refused."""
    try:
        doc = json.loads(text, object_pairs_hook=_strict)
    except _RepeatedError:
        return None
    names = []
    for m in doc if isinstance(doc, list) else [doc]:
        if isinstance(m, dict) and m.get("method") == "tools/call":
            p = m.get("params")
            n = p.get("name") if isinstance(p, dict) else None
            if not isinstance(n, str) or not n:
                return None
            names.append(n)
    return tuple(names)


@fuzz_settings()
@given(bodies)
def test_the_tools_checked_are_the_tools_a_strict_reader_finds(text: str) -> None:
    expected = oracle(text)
    try:
        got = called_tools(text.encode())
    except ValueError:
        got = None
    if expected is None:
        assert got is None, text
    else:
        # Refused although a strict reader finds the tools: only for a body repeating some
        # other key (the strict read refuses every repeat: fail closed).
        assert got == expected or (got is None and _repeats_a_key(text)), text


def _repeats_a_key(text: str) -> bool:
    repeated = False

    def pairs(ps: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeated
        repeated |= len({k for k, _ in ps}) != len(ps)
        return dict(ps)

    json.loads(text, object_pairs_hook=pairs)
    return repeated
