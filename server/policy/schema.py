"""Cedar schema, loaded per policy set; the action list and high-risk group come from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import cedarpy

from server.policy.errors import Problem

SCHEMA_SUFFIX = ".cedarschema.json"
BUILTIN_SCHEMA_NAME = "svid" + SCHEMA_SUFFIX
# Actions that are members of this action group are high-risk: denied unless a permit names them.
HIGH_RISK_GROUP = "high_risk"
PRINCIPAL_TYPE = "Agent"
RESOURCE_TYPE = "Resource"
TOOL_TYPE = "Tool"
INTENT_TYPE = "Intent"


@dataclass(frozen=True)
class SchemaInfo:
    name: str
    text: str
    handle: cedarpy.Schema
    actions: frozenset[str]
    high_risk: frozenset[str]
    # The schema's actions and their groups as entities: Cedar reads `action in Action::"g"`
    # from the entities it is handed, never from a schema it is not given at decision time.
    action_entities: cedarpy.Entities


def builtin_schema_text() -> str:
    return resources.files("server.policy").joinpath(BUILTIN_SCHEMA_NAME).read_text("utf-8")


def load_schema(name: str, text: str) -> SchemaInfo | Problem:
    """Parse a Cedar JSON schema (empty namespace) and derive the action list from it."""
    try:
        doc: Any = json.loads(text)
    except ValueError as e:
        return Problem(name, f"not JSON: {e}")
    if not isinstance(doc, dict) or set(doc) != {""}:
        return Problem(name, 'the schema must declare exactly the empty namespace ""')
    try:
        handle = cedarpy.Schema.from_json_str(text)
        action_entities = cedarpy.Entities.from_json_str("[]", handle)
    except ValueError as e:
        return Problem(name, f"invalid Cedar schema: {e}")
    actions: set[str] = set()
    high_risk: set[str] = set()
    decls = doc[""].get("actions") or {}
    for action, decl in decls.items():
        applies = (decl or {}).get("appliesTo") or {}
        if PRINCIPAL_TYPE not in applies.get("principalTypes", ()):
            continue  # an action group such as high_risk: not requestable on its own
        actions.add(action)
        if HIGH_RISK_GROUP in _groups(decls, action):
            high_risk.add(action)
    if not actions:
        return Problem(name, f"no action applies to principal type {PRINCIPAL_TYPE}")
    return SchemaInfo(name, text, handle, frozenset(actions), frozenset(high_risk), action_entities)


def _groups(decls: dict[str, Any], action: str) -> set[str]:
    """Every action group `action` is in, directly or through groups it is in: Cedar's
    `action in Action::"g"` holds for all of them."""
    found: set[str] = set()
    todo = [action]
    while todo:
        for member in (decls.get(todo.pop()) or {}).get("memberOf") or ():
            group = member.get("id")
            if group not in found:
                found.add(group)
                todo.append(group)
    return found
