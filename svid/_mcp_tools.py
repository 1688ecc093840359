"""Which tools a JSON-RPC request body calls (MCP ``tools/call``), read as strictly as the SDK
reads it, so that what is checked is what runs: a body this cannot read is refused, never
passed on unchecked."""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import from_json

TOOLS_CALL = "tools/call"


class _RepeatedKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two "name" keys could be read one way here and the other way by the server.
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _RepeatedKeyError("JSON object with a repeated key")
    return dict(pairs)


def _could_repeat_a_key(body: bytes) -> bool:
    # A repeated key needs one of the keys read here spelled twice, or spelled with an escape.
    # (find, not `in`: bytes' `in` first tries its operand as an int; a lone byte is found at
    # memchr's speed, and most bodies have no backslash at all.)
    return (
        (body.find(b"\\") >= 0 and body.find(b"\\u") >= 0)
        or body.count(b'"method"') > 1
        or body.count(b'"params"') > 1
        or body.count(b'"name"') > 1
    )


def called_tools(body: bytes) -> tuple[str, ...]:
    """The tool names of every ``tools/call`` in a JSON-RPC message or batch; ValueError when
    the body is not readable JSON-RPC or a call names no tool."""
    try:
        if _could_repeat_a_key(body):  # only such bodies pay for the strict (slower) read
            doc = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
        else:  # the SDK's own parser (pydantic_core): what is checked is what the server reads
            doc = from_json(body)
    except _RepeatedKeyError:
        raise
    except UnicodeDecodeError:
        raise ValueError("request body is not UTF-8 JSON") from None
    except ValueError:  # json's or pydantic_core's: neither says more that a client needs
        raise ValueError("request body is not JSON") from None
    if type(doc) is dict:  # one message: the common case, without a list around it
        return _tool_of(doc)
    names: list[str] = []
    for message in doc if type(doc) is list else ():
        names += _tool_of(message)
    return tuple(names)


def _tool_of(message: Any) -> tuple[str, ...]:
    if type(message) is not dict or message.get("method") != TOOLS_CALL:
        return ()
    params = message.get("params")
    name = params.get("name") if type(params) is dict else None
    if type(name) is not str or not name:
        raise ValueError("tools/call without a tool name")
    return (name,)
