"""The tools a server-wide grant is checked against, found in the forbid policies.

`invoke_tool` on a server (a `Resource`) grants every tool of it, but Cedar only ever sees the
server: a forbid that singles out one of its tools is never asked. So the engine also asks, for
such a grant, about each tool of that server a forbid could single out. A forbid can only tell
tools apart by what it writes down: a tool's entity (`Tool::"<server>#<tool>"`) or its name (a
string compared with `resource.name`, or a `like` pattern). Those are collected here from the
policy text; a made-up name stands for every tool no forbid names (`resource is Tool`, `unless`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cedarpy

from server.policy.intent import TOOL_NAME, TOOL_SEPARATOR, split_tool
from server.policy.schema import TOOL_TYPE

# A valid tool name no operator writes: it stands for the tools no forbid names.
ANY_OTHER_TOOL = "svidd.unnamed-tool"


@dataclass(frozen=True)
class ToolProbes:
    """What the forbids of a policy set write down about tools."""

    refs: frozenset[str] = frozenset()  # "<server>#<tool>" of each Tool entity named
    names: frozenset[str] = frozenset()  # strings and pattern instances that could be a name

    def for_server(self, server: str) -> tuple[str, ...]:
        """The tool references of `server` to ask about, sorted."""
        refs = {r for r in self.refs if split_tool(r)[0] == server}
        refs.update(f"{server}{TOOL_SEPARATOR}{n}" for n in (*self.names, ANY_OTHER_TOOL))
        return tuple(sorted(refs))


def find_tool_probes(policy_texts: Iterable[str]) -> ToolProbes:
    """The probes of the forbid policies in `policy_texts` (each a file's Cedar text)."""
    refs: set[str] = set()
    names: set[str] = set()
    for text in policy_texts:
        tree = json.loads(cedarpy.policies_to_json_str(text))
        for policy in tree.get("staticPolicies", {}).values():
            if policy.get("effect") == "forbid":
                _collect(policy, refs, names)
    return ToolProbes(frozenset(refs), frozenset(n for n in names if TOOL_NAME.fullmatch(n)))


def _collect(node: object, refs: set[str], names: set[str]) -> None:
    for item in _walk(node):
        if isinstance(item, dict):
            if item.get("type") == TOOL_TYPE and isinstance(item.get("id"), str):
                ref = item["id"]
                server, _, name = ref.rpartition(TOOL_SEPARATOR)
                if server and TOOL_NAME.fullmatch(name):
                    refs.add(ref)
            value = item.get("Value")
            if isinstance(value, str):
                names.add(value)
            pattern = item.get("pattern")
            if isinstance(pattern, list):
                # Wildcards matched by nothing: the shortest name the pattern takes.
                names.add("".join(p.get("Literal", "") for p in pattern if isinstance(p, dict)))


def _walk(node: object) -> Iterator[object]:
    stack = [node]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
