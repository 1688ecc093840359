"""The tools a server-wide grant is checked against, found in the forbid policies.

`invoke_tool` on a server (a `Resource`) grants every tool of it, but Cedar only ever sees the
server: a forbid that singles out one of its tools is never asked. So the engine also asks, for
such a grant, about tools of that server standing for all the others ("probes").

The probes are sound only for forbids whose condition tells tools apart by a few atoms svidd can
read: the tool's name compared with a string (`==`, `!=`, `["a", "b"].contains(...)`), the tool
named as an entity (`Tool::"<server>#<tool>"`), and at most ONE `like` pattern on the name. Such
a condition is a function of those atoms (and of what does not vary between the tools of one
server: the principal, the context, `resource.server`, `resource in Resource::"<server>"`), so one
probe name per combination of them that a name can take decides it for every tool: each string,
one name the pattern matches that is none of the strings, and one name matching neither. A forbid
whose condition reads the tool any other way (two patterns: no probe need match both; the name
against the context; `resource` in a set of the request) is left undecided, and a server-wide
grant that it could reach is refused: a task can always name the tools it needs.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from cedarpy import pst

from server.policy.intent import INVOKE_TOOL, TOOL_NAME, TOOL_SEPARATOR
from server.policy.schema import TOOL_TYPE

# A valid tool name no operator writes: it stands for the tools no forbid names.
ANY_OTHER_TOOL = "svidd.unnamed-tool"
# Names tried, after ANY_OTHER_TOOL, for a probe a pattern must (not) match: "a" ... "zz".
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_MAX_TOOL_NAME = 128


@dataclass(frozen=True)
class Undecided:
    """A forbid the probes cannot decide: a whole-server grant it could reach is refused."""

    policy_id: str
    why: str
    server: str | None  # the one server its resource scope reaches, or None: any server


@dataclass(frozen=True)
class ToolProbes:
    """What the forbids of a policy set write down about tools."""

    names: frozenset[str] = frozenset()  # probe tool names, for every server
    undecided: tuple[Undecided, ...] = ()

    def for_server(self, server: str) -> tuple[str, ...]:
        """The tool references of `server` to ask about, sorted."""
        return tuple(sorted(f"{server}{TOOL_SEPARATOR}{n}" for n in {*self.names, ANY_OTHER_TOOL}))

    def undecided_for(self, server: str) -> Undecided | None:
        """The first forbid the probes cannot decide that could reach a tool of `server`."""
        return next((u for u in self.undecided if u.server in (None, server)), None)


class _UndecidableError(Exception):  # never leaves this module
    """A forbid reads the tool in a way the probes cannot decide; the message says how."""


def find_tool_probes(policies: Mapping[str, pst.Template]) -> ToolProbes:
    """The probes of the forbid policies among `policies` (by policy id)."""
    names: set[str] = set()
    undecided: list[Undecided] = []
    for pid, policy in sorted(policies.items()):
        if policy.effect != "forbid" or not _may_be_tool_action(policy.action):
            continue
        reach = _ResourceReach()
        server: str | None = None
        try:
            reaches, server = _scope_server(policy.resource, reach)
            if not reaches:
                continue
            for clause in policy.clauses:
                _read(clause.expr, reach)
            names.update(_probe_names(reach))
        except _UndecidableError as e:
            undecided.append(Undecided(pid, str(e), server))
    return ToolProbes(frozenset(names), tuple(undecided))


@dataclass
class _ResourceReach:
    """The atoms one forbid tells tools apart by."""

    strings: set[str] = field(default_factory=set)  # names compared with
    patterns: set[tuple[pst.PatternElem, ...]] = field(default_factory=set)


def _may_be_tool_action(scope: pst.ActionConstraint) -> bool:
    # A tool is always asked with invoke_tool: `action == Action::"read"` never meets one. (An
    # `in` of a group is taken to reach it: the groups are the schema's, not known here.)
    return not isinstance(scope, pst.ActionEq) or scope.entity.id == INVOKE_TOOL


def _scope_server(
    scope: pst.PrincipalOrResourceConstraint, reach: _ResourceReach
) -> tuple[bool, str | None]:
    """Whether the resource scope reaches tools at all, and the one server whose tools it
    reaches (None: any)."""
    if isinstance(scope, pst.ScopeAny):
        return True, None
    if isinstance(scope, pst.ScopeIs):
        return scope.entity_type.basename == TOOL_TYPE, None
    if isinstance(scope, pst.ScopeIsIn) and scope.entity_type.basename != TOOL_TYPE:
        return False, None
    if isinstance(scope, pst.ScopeEq | pst.ScopeIn | pst.ScopeIsIn):
        entity = scope.entity
        if isinstance(entity, pst.Slot):
            raise _UndecidableError("a template slot")  # templates are refused at load
        if entity.type.basename == TOOL_TYPE:
            server, _, name = entity.id.rpartition(TOOL_SEPARATOR)
            reach.strings.add(name)  # a tool has no members: `in` is `==` here
            return True, server
        # A tool's one parent is its server's Resource; an `==` on a Resource is no tool.
        return not isinstance(scope, pst.ScopeEq), entity.id
    raise _UndecidableError(f"a resource scope svidd does not know ({type(scope).__name__})")


def _is_resource(expr: pst.Expr) -> bool:
    return isinstance(expr, pst.Var) and expr.name == "resource"


def _is_name(expr: pst.Expr) -> bool:
    return isinstance(expr, pst.GetAttr) and _is_resource(expr.base) and expr.attr == "name"


def _entities(expr: pst.Expr) -> list[pst.EntityUid] | None:
    """The entities of an entity literal or a set of them; None for anything else."""
    if isinstance(expr, pst.EntityLit):
        return [expr.value]
    if isinstance(expr, pst.Set) and all(isinstance(e, pst.EntityLit) for e in expr.elements):
        return [e.value for e in expr.elements if isinstance(e, pst.EntityLit)]
    return None


def _add_entities(entities: list[pst.EntityUid], reach: _ResourceReach) -> None:
    # A Tool named stands for its name (on another server it is simply a probe more); a
    # Resource is the same for every tool of one server.
    for uid in entities:
        if uid.type.basename == TOOL_TYPE:
            reach.strings.add(uid.id.rpartition(TOOL_SEPARATOR)[2])


def _read(expr: pst.Expr, reach: _ResourceReach) -> None:
    """Collect the atoms of `expr` on the tool; _UndecidableError if it reads the tool otherwise."""
    if isinstance(expr, pst.Like) and _is_name(expr.base):
        reach.patterns.add(expr.pattern)
        if len(reach.patterns) > 1:
            raise _UndecidableError(
                "two `like` patterns on the tool name: no probe need match both"
            )
        return
    if isinstance(expr, pst.BinaryOp):
        left, right = expr.left, expr.right
        if expr.op in ("eq", "not_eq"):
            for a, b in ((left, right), (right, left)):
                if _is_name(a) and isinstance(b, pst.StringLit):
                    reach.strings.add(b.value)
                    return
                found = _entities(b)
                if _is_resource(a) and found is not None:
                    _add_entities(found, reach)
                    return
        if expr.op == "contains" and isinstance(left, pst.Set):
            if _is_name(right) and all(isinstance(e, pst.StringLit) for e in left.elements):
                reach.strings.update(e.value for e in left.elements if isinstance(e, pst.StringLit))
                return
            found = _entities(left)
            if _is_resource(right) and found is not None:
                _add_entities(found, reach)
                return
        if expr.op == "in" and _is_resource(left):
            found = _entities(right)
            if found is not None:
                _add_entities(found, reach)
                return
    if isinstance(expr, pst.HasAttr) and _is_resource(expr.base):
        return  # every tool has the same attributes
    if isinstance(expr, pst.Is) and _is_resource(expr.base):
        if expr.in_expr is None:
            return
        found = _entities(expr.in_expr)
        if found is not None:
            _add_entities(found, reach)
            return
    if isinstance(expr, pst.GetAttr) and _is_resource(expr.base) and expr.attr == "server":
        return  # the same for every tool of one server
    if _is_resource(expr) or _is_name(expr):
        raise _UndecidableError(
            "it reads the tool other than by its name against a string or one `like` pattern, "
            "or a Tool or Resource written in the policy"
        )
    for child in _children(expr):
        _read(child, reach)


def _children(expr: pst.Expr) -> Iterator[pst.Expr]:
    if isinstance(expr, pst.UnaryOp):
        yield expr.arg
    elif isinstance(expr, pst.BinaryOp):
        yield from (expr.left, expr.right)
    elif isinstance(expr, pst.GetAttr | pst.HasAttr | pst.Like):
        yield expr.base
    elif isinstance(expr, pst.Is):
        yield expr.base
        if expr.in_expr is not None:
            yield expr.in_expr
    elif isinstance(expr, pst.IfThenElse):
        yield from (expr.cond, expr.then_expr, expr.else_expr)
    elif isinstance(expr, pst.Set):
        yield from expr.elements
    elif isinstance(expr, pst.Record):
        yield from expr.fields.values()


def _probe_names(reach: _ResourceReach) -> set[str]:
    """One name for each combination of the atoms that a tool name can take."""
    names = {s for s in reach.strings if TOOL_NAME.fullmatch(s)}
    taken = set(reach.strings)
    matches: re.Pattern[str] | None = None
    for pattern in reach.patterns:  # at most one
        matches = _pattern_regex(pattern)
        # Empty when no tool name fits the pattern, or its one name (no wildcard) is compared.
        wildcard = any(isinstance(p, pst.Wildcard) for p in pattern)
        instance = _find(
            (n for n in _instances(pattern) if n not in taken),
            empty_ok=not wildcard or not _can_match_a_tool(pattern),
            what="a tool name matching the `like` pattern and none of the names compared with",
        )
        if instance is not None:
            names.add(instance)
    others = (
        n
        for n in itertools.chain([ANY_OTHER_TOOL], _short_names())
        if n not in taken and (matches is None or not matches.fullmatch(n))
    )
    # A pattern of wildcards only matches every name: no name is left for "neither".
    everything = any(all(isinstance(p, pst.Wildcard) for p in ps) for ps in reach.patterns)
    other = _find(others, empty_ok=everything, what="a tool name no atom of the forbid names")
    if other is not None:
        names.add(other)
    return names


def _find(candidates: Iterator[str], *, empty_ok: bool, what: str) -> str | None:
    """The first candidate; None when there is none and that is known to be right."""
    found = next(candidates, None)
    if found is None and not empty_ok:
        raise _UndecidableError(f"svidd found no probe for {what}")
    return found


def _pattern_regex(pattern: tuple[pst.PatternElem, ...]) -> re.Pattern[str]:
    return re.compile(
        "".join(".*" if isinstance(p, pst.Wildcard) else re.escape(p.value) for p in pattern),
        re.DOTALL,
    )


def _can_match_a_tool(pattern: tuple[pst.PatternElem, ...]) -> bool:
    literal = "".join(p.value for p in pattern if isinstance(p, pst.Char))
    fits = len(literal) <= _MAX_TOOL_NAME and TOOL_NAME.fullmatch(literal or "a") is not None
    return fits and (bool(literal) or any(isinstance(p, pst.Wildcard) for p in pattern))


def _instances(pattern: tuple[pst.PatternElem, ...]) -> Iterator[str]:
    """Distinct valid tool names the pattern matches: its first wildcard filled with "", "a",
    ... "zz", any others left empty (a pattern without one has its one name)."""
    if not _can_match_a_tool(pattern):
        return
    cut = next((i for i, p in enumerate(pattern) if isinstance(p, pst.Wildcard)), None)
    head = "".join(p.value for p in pattern[:cut] if isinstance(p, pst.Char))
    if cut is None:
        yield head
        return
    tail = "".join(p.value for p in pattern[cut:] if isinstance(p, pst.Char))
    for fill in itertools.chain([""], _short_names()):
        name = head + fill + tail
        if 0 < len(name) <= _MAX_TOOL_NAME:
            yield name


def _short_names() -> Iterator[str]:
    yield from _LETTERS
    yield from ("".join(p) for p in itertools.product(_LETTERS, repeat=2))
