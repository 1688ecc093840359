"""Which tools a JSON-RPC request body calls (MCP ``tools/call``), read as strictly as the SDK
reads it, so that what is checked is what runs: a body this cannot read is refused, never
passed on unchecked."""

from __future__ import annotations

import json
from typing import Any

TOOLS_CALL = "tools/call"
_KEYS = (b'"method"', b'"params"', b'"name"')


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two "name" keys could be read one way here and the other way by the server.
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("JSON object with a repeated key")
    return dict(pairs)


def called_tools(body: bytes) -> tuple[str, ...]:
    """The tool names of every ``tools/call`` in a JSON-RPC message or batch; ValueError when
    the body is not readable JSON-RPC or a call names no tool."""
    # A repeated key needs one of these spelled twice, or spelled with an escape: only such
    # bodies pay for the strict (slower) read.
    strict = b"\\u" in body or any(body.count(k) > 1 for k in _KEYS)
    try:
        doc = json.loads(body, object_pairs_hook=_no_duplicates) if strict else json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"request body is not JSON: {exc.__class__.__name__}") from None
    messages = doc if isinstance(doc, list) else [doc]
    names: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or message.get("method") != TOOLS_CALL:
            continue
        params = message.get("params")
        name = params.get("name") if isinstance(params, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError("tools/call without a tool name")
        names.append(name)
    return tuple(names)
