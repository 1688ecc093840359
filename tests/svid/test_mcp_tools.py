"""svid._mcp_tools.called_tools: the tool names a JSON-RPC body calls, read as the MCP SDK
reads it (pydantic_core), with every body that could be read two ways refused."""

from __future__ import annotations

import json

import pytest

from svid._mcp_tools import called_tools


def call(name: object, **extra: object) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name}, **extra}


def test_one_call_a_batch_and_other_methods() -> None:
    assert called_tools(json.dumps(call("read_ticket")).encode()) == ("read_ticket",)
    batch = [call("a"), {"jsonrpc": "2.0", "method": "ping", "id": 2}, call("b")]
    assert called_tools(json.dumps(batch).encode()) == ("a", "b")
    assert called_tools(b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}') == ()
    assert called_tools(b"7") == ()


def test_an_argument_named_like_a_key_is_read_strictly_and_still_found() -> None:
    body = call("read_ticket")
    body["params"] = {"name": "read_ticket", "arguments": {"name": "x", "method": "y"}}
    assert called_tools(json.dumps(body).encode()) == ("read_ticket",)


@pytest.mark.parametrize(
    "body",
    [
        # the same key twice, however spelled: a reader could take either one
        b'{"method":"tools/call","params":{"name":"a","name":"b"}}',
        b'{"method":"tools/call","params":{"name":"a","n\\u0061me":"b"}}',
        b'{"method":"tools/call","params":{"name":"a"},"params":{"name":"b"}}',
        b'{"method":"tools/list","params":{"name":"a"},"m\\u0065thod":"tools/call"}',
        b'{"method":"tools/list","method":"tools/call","params":{"name":"b"}}',
    ],
)
def test_a_body_with_a_repeated_key_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match="repeated key"):
        called_tools(body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"method":"tools/call","params":{"name":"a"}} x',
        '{"method":"tools/call","params":{"name":"a"}}'.encode("utf-16"),
        b'{"method":"tools/call","params":{"name":"\xff"}}',
        b'{"method":"tools/call","params":{"name":"a"},"x":"\\u"}',
    ],
)
def test_a_body_that_is_not_utf8_json_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match=r"not (UTF-8 )?JSON"):
        called_tools(body)


@pytest.mark.parametrize(
    "message",
    [
        call(""),
        call(None),
        call(7),
        call(["a"]),
        {"method": "tools/call"},
        call("a") | {"params": []},
    ],
)
def test_a_call_that_names_no_tool_is_refused(message: object) -> None:
    with pytest.raises(ValueError, match="without a tool name"):
        called_tools(json.dumps(message).encode())
    with pytest.raises(ValueError, match="without a tool name"):
        called_tools(json.dumps([call("ok"), message]).encode())
