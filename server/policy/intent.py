"""Declared intent and the pure checks made against it, outside Cedar.

These rules hold whatever the operator's policies say, so they live in plain Python: a sub-task may
only narrow its parent (privilege chaining), delegation depth is capped, and a per-request mint must
stay inside the task's declared intent (lateral movement).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from server.policy.errors import RequestError

# Ordered from least to most sensitive: a sub-task may touch the same or a less sensitive class.
CLASSIFICATIONS: tuple[str, ...] = ("public", "internal", "confidential", "restricted")
DEFAULT_MAX_DELEGATION_DEPTH = 3
# The action a tool is invoked with: a declared tool is the pair (INVOKE_TOOL, "<server>#<tool>").
INVOKE_TOOL = "invoke_tool"
TOOL_SEPARATOR = "#"
# MCP's tool-name alphabet: the name goes into the token's space-separated `scope` as is.
TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,128}")


def split_tool(ref: str) -> tuple[str, str]:
    """("<server>", "<tool>") of a tool reference "<server>#<tool>"; RequestError if malformed."""
    server, sep, name = ref.rpartition(TOOL_SEPARATOR)
    if not sep or not server or any(c.isspace() for c in server):
        raise RequestError(
            f"intent.tools: {ref[:200]!r} is not <server>#<tool> (a server audience without "
            "spaces, then a tool name)"
        )
    if not TOOL_NAME.fullmatch(name):
        raise RequestError(
            f"intent.tools: tool name {name[:200]!r} must be 1-128 of A-Z a-z 0-9 _ - . /"
        )
    return server, name


def tool_servers(tools: Iterable[str]) -> frozenset[str]:
    return frozenset(split_tool(t)[0] for t in tools)


@dataclass(frozen=True)
class Intent:
    """What a task declares it will do. Empty strings mean "none" (Cedar attrs stay required).

    The pairs asked of policy are every action on every resource, plus (invoke_tool, tool) for
    each tool: a task that declares only tools needs no actions or resources (but actions need
    resources and the other way round).
    """

    actions: frozenset[str]
    resources: frozenset[str]
    classification: str = "internal"
    environment: str = ""
    on_behalf_of: str = ""
    delegation_depth: int = 0
    parent_task: str = ""
    tools: frozenset[str] = frozenset()
    # An elevated step: a sub-task decided by policy on its own, not narrowed from its parent.
    elevated: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "actions", frozenset(self.actions))
        object.__setattr__(self, "resources", frozenset(self.resources))
        object.__setattr__(self, "tools", frozenset(self.tools))
        # Actions apply to resources: one without the other asks nothing, so it is refused.
        if not self.tools or self.actions or self.resources:
            if not self.actions:
                raise RequestError("intent.actions: a task must declare at least one action")
            if not self.resources:
                raise RequestError("intent.resources: a task must declare at least one resource")
        for name in (*self.actions, *self.resources, *self.tools):
            if not name or not isinstance(name, str):
                raise RequestError(f"intent: empty or non-string action/resource/tool {name!r}")
        tool_servers(self.tools)  # RequestError when one is malformed
        both = sorted(self.tools & self.resources)
        if both:
            raise RequestError(f"intent: {both[0][:200]!r} is declared as a resource and a tool")
        if self.classification not in CLASSIFICATIONS:
            raise RequestError(
                f"intent.classification: {self.classification!r} is not one of "
                f"{', '.join(CLASSIFICATIONS)}"
            )
        if self.delegation_depth < 0:
            raise RequestError(f"intent.delegation_depth: {self.delegation_depth} is negative")

    def pairs(self) -> list[tuple[str, str]]:
        """Every (action, resource-or-tool) pair this intent asks for, sorted."""
        pairs = {(a, r) for a in self.actions for r in self.resources}
        pairs.update((INVOKE_TOOL, t) for t in self.tools)
        return sorted(pairs)

    def covers_tool(self, tool: str) -> bool:
        """Whether this scope includes `tool`: named, or every tool of its server (invoke_tool on
        the server as a resource)."""
        if tool in self.tools:
            return True
        return INVOKE_TOOL in self.actions and split_tool(tool)[0] in self.resources


class Flag(StrEnum):
    """Why a request was refused before policy: the audit log and risk signal use this."""

    LATERAL_MOVEMENT = "lateral_movement"
    PRIVILEGE_CHAINING = "privilege_chaining"


@dataclass(frozen=True)
class Verdict:
    """Outcome of a pure intent check. `max_ttl` is set when a sub-task's TTL had to be clamped."""

    ok: bool
    reason: str
    flag: Flag | None = None
    max_ttl: int | None = None


_OK = Verdict(ok=True, reason="within intent")


def _deny(flag: Flag, reason: str) -> Verdict:
    return Verdict(ok=False, reason=f"{flag.value.replace('_', ' ')}: {reason}", flag=flag)


def check_depth(depth: int, cap: int = DEFAULT_MAX_DELEGATION_DEPTH) -> Verdict:
    """A delegation chain deeper than `cap` is refused, however narrow each hop is."""
    if depth > cap:
        return _deny(Flag.PRIVILEGE_CHAINING, f"delegation depth {depth} exceeds the cap of {cap}")
    return _OK


def narrow(
    parent: Intent,
    child: Intent,
    *,
    parent_remaining_ttl: int | None = None,
    requested_ttl: int | None = None,
    max_depth: int = DEFAULT_MAX_DELEGATION_DEPTH,
) -> Verdict:
    """Check that `child` (a sub-task's intent) only narrows `parent`; any widening is refused.

    The child's depth must be the parent's plus one. A TTL beyond the parent's remaining lifetime is
    not a widening of authority but of time, so it is clamped (`max_ttl`) rather than refused.
    """
    extra_actions = sorted(child.actions - parent.actions)
    if extra_actions:
        return _deny(
            Flag.PRIVILEGE_CHAINING,
            f"sub-task adds actions {', '.join(extra_actions)} not in its parent's scope",
        )
    extra_resources = sorted(child.resources - parent.resources)
    if extra_resources:
        return _deny(
            Flag.PRIVILEGE_CHAINING,
            f"sub-task adds resources {', '.join(extra_resources)} not in its parent's scope",
        )
    extra_tools = sorted(t for t in child.tools if not parent.covers_tool(t))
    if extra_tools:
        return _deny(
            Flag.PRIVILEGE_CHAINING,
            f"sub-task adds tools {', '.join(extra_tools)} not in its parent's scope",
        )
    if CLASSIFICATIONS.index(child.classification) > CLASSIFICATIONS.index(parent.classification):
        return _deny(
            Flag.PRIVILEGE_CHAINING,
            f"sub-task classification {child.classification!r} is more sensitive than its "
            f"parent's {parent.classification!r}",
        )
    frame = _check_frame(parent, child, "sub-task", "delegation depth", max_depth)
    if frame is not None:
        return frame
    if parent_remaining_ttl is not None:
        if parent_remaining_ttl <= 0:
            return _deny(Flag.PRIVILEGE_CHAINING, "parent task has expired")
        if requested_ttl is None or requested_ttl > parent_remaining_ttl:
            return Verdict(
                ok=True,
                reason=f"within parent scope; TTL clamped to the parent's remaining "
                f"{parent_remaining_ttl}s",
                max_ttl=parent_remaining_ttl,
            )
    return Verdict(ok=True, reason="within parent scope")


def check_elevation(
    parent: Intent,
    step: Intent,
    *,
    parent_remaining_ttl: int,
    requested_ttl: int,
    max_ttl: int,
    max_depth: int = DEFAULT_MAX_DELEGATION_DEPTH,
    elevated_above: str = "",
) -> Verdict:
    """Check an elevated step (`step`) against the task it runs inside.

    Its scope is not narrowed from the parent's: policy decides it on its own, seeing
    `elevated`. What it must keep is the parent's frame: the same principal and environment,
    one level deeper, no elevation inside an elevation, and a lifetime within both the parent's
    remaining one and `max_ttl` (clamped, like a sub-task's, rather than refused).

    `elevated_above`: the ID of an elevated step further up the parent's chain ("" if none).
    A plain sub-task of a step must not open the way to a step of its own: that would be an
    elevation inside an elevation all the same.
    """
    if parent.elevated:
        return _deny(Flag.PRIVILEGE_CHAINING, "an elevated step cannot begin another elevated step")
    if elevated_above:
        return _deny(
            Flag.PRIVILEGE_CHAINING,
            f"an elevated step cannot begin inside another elevated step ({elevated_above}, "
            "above its parent)",
        )
    frame = _check_frame(parent, step, "elevated step", "depth", max_depth)
    if frame is not None:
        return frame
    if parent_remaining_ttl <= 0:
        return _deny(Flag.PRIVILEGE_CHAINING, "parent task has expired")
    cap = min(parent_remaining_ttl, max_ttl)
    if requested_ttl > cap:
        return Verdict(
            ok=True,
            reason=f"elevated step; TTL clamped to {cap}s (the parent's remaining "
            f"{parent_remaining_ttl}s, at most {max_ttl}s)",
            max_ttl=cap,
        )
    return Verdict(ok=True, reason="elevated step within its parent's frame")


def check_in_intent(
    granted_actions: frozenset[str] | set[str],
    granted_resources: frozenset[str] | set[str],
    action: str,
    audience: str | tuple[str, ...] | list[str],
) -> Verdict:
    """A per-request mint must name an audience and an action the task was granted.

    Pass the task's *granted* scope (after policy narrowing), not what it declared.
    """
    audiences = (audience,) if isinstance(audience, str) else tuple(audience)
    if not audiences:
        return _deny(Flag.LATERAL_MOVEMENT, "no audience requested")
    outside = [a for a in audiences if a not in granted_resources]
    if outside:
        return _deny(
            Flag.LATERAL_MOVEMENT,
            f"audience {', '.join(sorted(outside))} is not among the task's resources",
        )
    if action not in granted_actions:
        return _deny(Flag.LATERAL_MOVEMENT, f"action {action!r} is not in the task's scope")
    return _OK


def check_audiences(scope: Intent, audience: str | Sequence[str]) -> Verdict:
    """A per-request mint must name only audiences the task may reach: its resources and the
    servers of its tools. Pass the task's *granted* scope (after policy narrowing)."""
    audiences = (audience,) if isinstance(audience, str) else tuple(audience)
    if not audiences:
        return _deny(Flag.LATERAL_MOVEMENT, "no audience requested")
    reachable = scope.resources | tool_servers(scope.tools)
    outside = [a for a in audiences if a not in reachable]
    if outside:
        return _deny(
            Flag.LATERAL_MOVEMENT,
            f"audience {', '.join(sorted(outside))} is not among the task's resources",
        )
    return _OK


def _check_frame(
    parent: Intent, child: Intent, what: str, depth_word: str, max_depth: int
) -> Verdict | None:
    """What a sub-task and an elevated step alike keep of their parent: its environment and
    principal, one delegation level deeper, within `max_depth`. None when all hold."""
    if child.environment != parent.environment:
        return _deny(
            Flag.PRIVILEGE_CHAINING,
            f"{what} environment {child.environment!r} differs from its parent's "
            f"{parent.environment!r}",
        )
    if child.on_behalf_of != parent.on_behalf_of:
        return _deny(
            Flag.PRIVILEGE_CHAINING,
            f"{what} acts on behalf of {child.on_behalf_of!r}, its parent for "
            f"{parent.on_behalf_of!r}",
        )
    if child.delegation_depth != parent.delegation_depth + 1:
        return _deny(
            Flag.PRIVILEGE_CHAINING,
            f"{what} {depth_word} {child.delegation_depth} is not its parent's "
            f"{parent.delegation_depth} plus one",
        )
    depth = check_depth(child.delegation_depth, max_depth)
    return None if depth.ok else depth
