"""The policy engine: a warm, parsed Cedar policy set, swapped atomically on reload."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cedarpy

from server.policy import cedar_request, loader
from server.policy.decision import Decision, DecisionRequest, Outcome, PairResult
from server.policy.errors import PolicyError, Problem
from server.policy.intent import INVOKE_TOOL, Intent
from server.policy.loader import LoadedSet
from server.policy.schema import SchemaInfo
from server.policy.tool_probes import ToolProbes
from svid._clock import Clock
from svid._limits import cut_text
from svid._log_throttle import LogThrottle

_log = logging.getLogger("svid.server.policy")

DEFAULT_HIGH_RISK_TTL_CAP = 60
# Pairs a decision's reason names in each of its clauses, the rest counted.
LISTED_PAIRS = 5
# A decision's reason at most: a gRPC status message of a few KB at most (percent-encoded, a
# trailer: refused past 16 KiB, the caller then hears RESOURCE_EXHAUSTED, not the denial).
MAX_REASON_BYTES = 2048
_ENTITY_CACHE_SIZE = 4096
# An evaluation error as a pair's reason at most: Cedar's message may quote request values.
MAX_ERROR_BYTES = 256
# One log line per failing policy per interval: every request it meets fails the same way.
EVALUATION_ERROR_LOG_INTERVAL = 60.0
_THROTTLED_POLICIES = 1024
# Cedar names the policy it could not evaluate: "error while evaluating policy `<id>`: ...".
_ERROR_POLICY = re.compile(r"policy `([^`]+)`")
# The decisions of the current second kept at most, counted in pairs (a pair's result and reason
# weigh ~250 B, so ~16 MB): a decision of an intent at the size limits holds 512 of them.
_DECISION_CACHE_PAIRS = 65536
_EntityKey = tuple[str, str, int, Intent, tuple[str, ...]]


@dataclass(frozen=True)
class PolicySetInfo:
    """What is serving: for `policy reload` output and the policy_reload audit event."""

    hash: str
    source: str
    files: tuple[str, ...]
    policy_ids: tuple[str, ...]
    actions: tuple[str, ...]
    high_risk_actions: tuple[str, ...]
    loaded_at: float


class PolicyEngine:
    """Decides task requests with Cedar.

    Policies come from `*.cedar` files in `policy_dir` (the shipped default.cedar when there are
    none) and an optional `*.cedarschema.json` (else the shipped schema). Construction loads and
    raises PolicyError when the set is invalid. `trust_domain` is the server's own; policies see
    it as `context.trust_domain`.
    """

    def __init__(
        self,
        policy_dir: Path | None,
        clock: Clock,
        *,
        trust_domain: str,
        high_risk_ttl_cap: int = DEFAULT_HIGH_RISK_TTL_CAP,
    ) -> None:
        self._dir = policy_dir
        self._clock = clock
        self._trust_domain = trust_domain
        self._high_risk_ttl_cap = high_risk_ttl_cap
        self._reload_lock = threading.Lock()
        self._error_lock = threading.Lock()
        self._error_logs: dict[str, LogThrottle] = {}  # by policy id
        # Parsed entities of the serving schema, by (agent, node, risk, intent, extra tools):
        # see _agent_entities().
        self._entities: tuple[SchemaInfo | None, dict[_EntityKey, cedarpy.Entities]] = (None, {})
        self._state = self._load(policy_dir)
        self._announce()
        # Decisions of the serving set in the current whole second, by request: see decide().
        self._decisions = _SecondsDecisions(None, -1)

    @property
    def _loaded(self) -> LoadedSet:
        return self._state[0]

    @property
    def policy_set_hash(self) -> str:
        return self._state[0].hash

    @property
    def info(self) -> PolicySetInfo:
        return self._state[1]

    @property
    def warnings(self) -> tuple[Problem, ...]:
        """What an operator should know of the serving set though it is valid."""
        return _undecided_warnings(self._loaded)

    @property
    def actions(self) -> frozenset[str]:
        return self._state[0].schema.actions

    @property
    def high_risk_actions(self) -> frozenset[str]:
        return self._state[0].schema.high_risk

    def reload(
        self, record: Callable[[PolicySetInfo, PolicySetInfo], None] | None = None
    ) -> PolicySetInfo:
        """Load the directory again and swap it in; on any error the old set keeps serving.
        `record`: called with the serving set and the new one before the swap (its audit
        event), in the reload's turn, so that of concurrent reloads each names the set it
        replaced; when it raises, the old set keeps serving too, so no decision is made under
        a set the audit log never saw loaded."""
        with self._reload_lock:
            state = self._load(self._dir)
            if record is not None:
                record(self._state[1], state[1])
            # One attribute holds both, so a concurrent decide() sees the old or the new set whole.
            self._state = state
            self._announce()
            return state[1]

    def _announce(self) -> None:
        # The server's operator may never run `policy validate`: the first refused task would
        # be the first they hear of such a forbid.
        for warning in self.warnings:
            _log.warning("policy: %s", warning)

    def validate(self, path: Path | None = None) -> list[Problem]:
        """Problems of the policy directory at `path` (default: the engine's), without swapping."""
        try:
            self._load(self._dir if path is None else path)
        except PolicyError as e:
            return list(e.problems)
        return []

    def _load(self, policy_dir: Path | None) -> tuple[LoadedSet, PolicySetInfo]:
        loaded = loader.load(policy_dir)
        self._probe(loaded)
        info = PolicySetInfo(
            hash=loaded.hash,
            source=loaded.source,
            files=loaded.files,
            policy_ids=tuple(sorted(loaded.meta)),
            actions=tuple(sorted(loaded.schema.actions)),
            high_risk_actions=tuple(sorted(loaded.schema.high_risk)),
            loaded_at=self._clock.now(),
        )
        return loaded, info

    def _probe(self, loaded: LoadedSet) -> None:
        """Check that the requests svidd builds fit the schema, so decide() can skip re-checking."""
        action = min(loaded.schema.actions)
        req = DecisionRequest(
            agent_id=f"spiffe://{self._trust_domain}/probe",
            node_id=f"spiffe://{self._trust_domain}/probe-node",
            intent=Intent(actions=frozenset({action}), resources=frozenset({"probe"})),
            requested_ttl=60,
        )
        try:
            entities = cedarpy.Entities.from_json_str(
                cedar_request.entities_json(req.agent_id, req.node_id, 0, req.intent),
                loaded.schema.handle,
            )
            ctx = cedar_request.context_json(req, self._trust_domain, self._clock.now())
            (result,) = cedarpy.is_authorized_batch(
                cedar_request.cedar_requests(req, [(action, "probe")], ctx),
                loaded.policy_set,
                entities,
                schema=loaded.schema.handle,
            )
        except ValueError as e:
            raise PolicyError(
                [Problem(loaded.schema.name, f"schema rejects svidd's entity: {e}")]
            ) from e
        bad = [e for e in result.diagnostics.errors if "failed to build request" in e]
        if bad:
            raise PolicyError(
                [Problem(loaded.schema.name, f"schema rejects svidd's request: {bad[0]}")]
            )

    def _agent_entities(
        self, schema: SchemaInfo, request: DecisionRequest, tools: tuple[str, ...] = ()
    ) -> cedarpy.Entities:
        # One parsed handle per (agent, intent, tools asked about beyond the intent's): a task's
        # mints all reuse the same one. It adds to the schema's action entities, so it is only
        # good for the schema it was made with.
        held, handles = self._entities
        if held is not schema:
            handles = {}
            self._entities = (schema, handles)
        key = (request.agent_id, request.node_id, request.risk, request.intent, tools)
        handle = handles.get(key)
        if handle is None:
            if len(handles) >= _ENTITY_CACHE_SIZE:
                handles.clear()
            handle = schema.action_entities.with_added_json_str(
                cedar_request.entities_json(
                    request.agent_id, request.node_id, request.risk, request.intent, tools
                )
            )
            handles[key] = handle
        return handle

    def decide(self, request: DecisionRequest) -> Decision:
        """Evaluate each (action, resource) pair of the request; a policy outcome never raises."""
        # perf_counter measures our own latency; it is never a decision input, so no Clock here.
        started = time.perf_counter_ns()
        loaded = self._loaded
        # Cedar is a pure function of the policy set, the entities (made from the request) and
        # the context (the request and the whole second `now`): the same question within the
        # same second gets the answer already computed, as a burst of one task's exchanges asks.
        # A decision of an earlier second is never asked for again, so the cache holds one
        # second's: kept past it, they only pile up (~120 KB a decision at the intent limits).
        now = self._clock.now()
        second = int(now)
        cache = self._decisions
        if cache.loaded is not loaded or cache.second != second:
            cache = _SecondsDecisions(loaded, second)
            # One attribute: a concurrent decide() keeps filling the one it read, then drops it.
            self._decisions = cache
        known_decision = cache.decisions.get(request)
        if known_decision is not None:
            return known_decision
        decision = self._decide(loaded, request, now, started)
        cache.keep(request, decision)
        return decision

    def known(self, request: DecisionRequest) -> Decision | None:
        """The decision `decide` would answer from its cache now, without deciding (None: it
        would ask Cedar): what a budget of policy work charges nothing for."""
        cache = self._decisions
        if cache.loaded is not self._loaded or cache.second != int(self._clock.now()):
            return None
        return cache.decisions.get(request)

    def _decide(
        self, loaded: LoadedSet, request: DecisionRequest, now: float, started: int
    ) -> Decision:
        schema = loaded.schema
        pairs = request.intent.pairs() if request.pairs is None else sorted(set(request.pairs))
        known = [p for p in pairs if p[0] in schema.actions]
        results: list[PairResult] = [
            PairResult(a, r, False, (), f"{a} is not an action of the policy schema")
            for a, r in pairs
            if a not in schema.actions
        ]
        if not known:
            return self._combine(loaded, request, results, started)
        # A grant of a server's every tool is asked about the server; Cedar never sees its
        # tools, so a forbid on one of them is asked about here too, in the same batch.
        tools = request.intent.tools
        servers = {
            s: loaded.tool_probes.for_server(s)
            for a, s in known
            if a == INVOKE_TOOL and s not in tools
        }
        in_batch = {r for a, r in known if a == INVOKE_TOOL and r in tools}
        probes = sorted({r for refs in servers.values() for r in refs} - in_batch)
        ctx = cedar_request.context_json(request, self._trust_domain, now)
        answers = cedarpy.is_authorized_batch(
            cedar_request.cedar_requests(request, known, ctx)
            + cedar_request.cedar_requests(
                request, [(INVOKE_TOOL, r) for r in probes], ctx, tools=frozenset(probes)
            ),
            loaded.policy_set,
            self._agent_entities(schema, request, tuple(r for r in probes if r not in tools)),
        )
        asked = [
            self._pair(loaded, a, r, ans)
            for (a, r), ans in zip(known, answers[: len(known)], strict=True)
        ]
        results.extend(asked)
        if servers:
            as_tools = {
                p.resource: p for p in asked if p.action == INVOKE_TOOL and p.resource in in_batch
            }
            as_tools.update(
                (r, self._pair(loaded, INVOKE_TOOL, r, ans))
                for r, ans in zip(probes, answers[len(known) :], strict=True)
            )
            results = [
                _whole_server(p, servers[p.resource], as_tools, loaded.tool_probes)
                if p.allowed and p.action == INVOKE_TOOL and p.resource in servers
                else p
                for p in results
            ]
        return self._combine(loaded, request, results, started)

    def _pair(
        self, loaded: LoadedSet, action: str, resource: str, answer: cedarpy.AuthzResult
    ) -> PairResult:
        if answer.diagnostics.errors:
            return self._failed(loaded, action, resource, answer.diagnostics.errors)
        ids = tuple(sorted(answer.diagnostics.reasons))
        if answer.allowed:
            if action not in loaded.schema.high_risk:
                return PairResult(action, resource, True, ids, "permitted")
            explicit = tuple(i for i in ids if action in loaded.meta[i].named_actions)
            if explicit:
                return PairResult(action, resource, True, explicit, "permitted explicitly")
            return PairResult(
                action,
                resource,
                False,
                (),
                f"{action} is high-risk and no permit names it explicitly "
                f"(broad permit {', '.join(ids)} does not count)",
            )
        if ids:
            why = [r for i in ids if (r := loaded.meta[i].reason)]
            text = f"forbidden by {', '.join(ids)}" + (f" ({'; '.join(why)})" if why else "")
            return PairResult(action, resource, False, ids, text)
        text = f"no policy permits {action} on {resource} (default deny)"
        return PairResult(action, resource, False, (), text)

    def _failed(
        self, loaded: LoadedSet, action: str, resource: str, errors: list[str]
    ) -> PairResult:
        """A pair some policy failed to evaluate on (an overflow, say): denied. Cedar skips
        such a policy, and a skipped forbid would leave the permits it overrides granting."""
        ids = tuple(sorted({pid for e in errors if (pid := _error_policy(loaded, e))}))
        first = cut_text(errors[0], MAX_ERROR_BYTES)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        for pid in ids or ("unknown",):
            self._log_failure(pid, first)
        return PairResult(
            action,
            resource,
            False,
            ids,
            f"denied as a policy failed to evaluate: {first}{more}",
            evaluation_error=True,
        )

    def _log_failure(self, policy_id: str, error: str) -> None:
        with self._error_lock:
            throttle = self._error_logs.get(policy_id)
            if throttle is None:
                if len(self._error_logs) >= _THROTTLED_POLICIES:
                    self._error_logs.clear()  # ids of sets no longer serving, mostly
                throttle = LogThrottle(EVALUATION_ERROR_LOG_INTERVAL, self._clock)
                self._error_logs[policy_id] = throttle
            times = throttle.due()
        if times:
            _log.warning(
                "a policy failed to evaluate; the requests it met are denied",
                extra={"policy_id": policy_id, "error": error, "times": times},
            )

    def _combine(
        self,
        loaded: LoadedSet,
        request: DecisionRequest,
        results: list[PairResult],
        started: int,
    ) -> Decision:
        results.sort(key=lambda p: (p.action, p.resource))
        granted = [p for p in results if p.allowed]
        denied = [p for p in results if not p.allowed]
        policy_ids = tuple(sorted({i for p in results for i in p.policy_ids}))
        ttl = request.requested_ttl
        capped_by: list[str] = []
        for p in granted:
            for pid in p.policy_ids:
                cap = loaded.meta[pid].ttl_cap
                if cap is not None and cap < ttl:
                    ttl, capped_by = cap, [pid]
        if any(p.action in loaded.schema.high_risk for p in granted) and (
            self._high_risk_ttl_cap < ttl
        ):
            ttl, capped_by = self._high_risk_ttl_cap, ["high-risk default cap"]
        if not granted:
            outcome, ttl = Outcome.DENY, 0
            reason = "denied: " + _summarize(denied)
        elif denied or ttl < request.requested_ttl:
            outcome = Outcome.ALLOW_CONSTRAINED
            parts = [f"granted {_scope(granted)}"]
            if denied:
                parts.append("refused " + _summarize(denied))
            if ttl < request.requested_ttl:
                parts.append(f"TTL capped to {ttl}s by {capped_by[0]}")
            reason = "allowed constrained: " + "; ".join(parts)
        else:
            outcome = Outcome.ALLOW
            reason = f"allowed by {', '.join(policy_ids)}"
        return Decision(
            outcome=outcome,
            # Names of 256 bytes each could still make a few listed pairs long.
            reason=cut_text(reason, MAX_REASON_BYTES),
            policy_ids=policy_ids,
            policy_set_hash=loaded.hash,
            granted_actions=tuple(sorted({p.action for p in granted})),
            granted_resources=tuple(sorted({p.resource for p in granted})),
            ttl=ttl,
            requested_ttl=request.requested_ttl,
            latency_us=(time.perf_counter_ns() - started) / 1000,
            pairs=tuple(results),
        )


class _SecondsDecisions:
    """The decisions of one policy set within one whole second, by request, bounded in pairs."""

    def __init__(self, loaded: LoadedSet | None, second: int) -> None:
        self.loaded = loaded
        self.second = second
        self.decisions: dict[DecisionRequest, Decision] = {}
        self._pairs = 0

    def keep(self, request: DecisionRequest, decision: Decision) -> None:
        # Counted in pairs, not decisions: an intent at the size limits weighs 512 one-pair ones.
        # Threads racing here may miscount by a decision or two; the bound stays a bound.
        weight = max(1, len(decision.pairs))
        if self._pairs + weight > _DECISION_CACHE_PAIRS:
            self.decisions.clear()
            self._pairs = 0
        self.decisions[request] = decision
        self._pairs += weight


def _whole_server(
    grant: PairResult,
    refs: tuple[str, ...],
    answers: Mapping[str, PairResult],
    probes: ToolProbes,
) -> PairResult:
    """`grant` (every tool of a server), refused when a forbid the probes `refs` cannot decide
    could reach a tool of it, when a forbid keeps one of `refs` out (a denial that names
    policies is a forbid's: a missing permit names none), or when a policy failed to evaluate
    on one (it may be a forbid that would)."""
    undecided = probes.undecided_for(grant.resource)
    if undecided is not None:
        return PairResult(
            INVOKE_TOOL,
            grant.resource,
            False,
            (undecided.policy_id,),
            f"every tool of {grant.resource}: forbid {undecided.policy_id} may keep some of "
            f"them out, and svidd cannot tell which ({undecided.why}); name the tools the task "
            "needs in intent.tools",
        )
    for ref in refs:
        tool = answers[ref]
        if not tool.allowed and (tool.policy_ids or tool.evaluation_error):
            return PairResult(
                INVOKE_TOOL,
                grant.resource,
                False,
                tool.policy_ids,
                f"every tool of {grant.resource}: {ref} is {tool.reason}; name the tools the "
                "task needs in intent.tools",
            )
    return grant


def _error_policy(loaded: LoadedSet, error: str) -> str | None:
    """The id of the policy a Cedar evaluation error names, if it is one of the set's."""
    found = _ERROR_POLICY.search(error)
    if found is not None and found.group(1) in loaded.meta:
        return found.group(1)
    # An id holding a backquote: look for each of the set's (only on this rare path).
    return next((pid for pid in loaded.meta if f"`{pid}`" in error), None)


def _scope(pairs: list[PairResult], limit: int = LISTED_PAIRS) -> str:
    """The first `limit` pairs by name, then how many more: a reason goes into the task's
    record, its audit event, a log line and, for a denial, the gRPC status (a trailer)."""
    named = ", ".join(f"{p.action} on {p.resource}" for p in pairs[:limit])
    if len(pairs) > limit:
        named += f" and {len(pairs) - limit} more"
    return named


def _summarize(denied: list[PairResult], limit: int = 3) -> str:
    """One clause per distinct reason, naming the pairs it refused; long lists are cut."""
    by_reason: dict[str, list[PairResult]] = {}
    for p in denied:
        by_reason.setdefault(p.reason, []).append(p)
    clauses = [f"{_scope(ps)}: {why}" for why, ps in list(by_reason.items())[:limit]]
    if len(by_reason) > limit:
        clauses.append(f"and {len(by_reason) - limit} more")
    return "; ".join(clauses)


@dataclass(frozen=True)
class PolicyCheck:
    """A policy directory checked: problems refuse it; warnings do not, yet change its grants."""

    problems: tuple[Problem, ...]
    warnings: tuple[Problem, ...] = ()


def validate_policy_dir(policy_dir: Path, *, trust_domain: str, clock: Clock) -> PolicyCheck:
    """A policy directory checked with no engine running (`svid-server policy validate`)."""
    try:
        engine = PolicyEngine(policy_dir, clock, trust_domain=trust_domain)
    except PolicyError as e:
        return PolicyCheck(e.problems)
    return PolicyCheck((), engine.warnings)


def _undecided_warnings(loaded: LoadedSet) -> tuple[Problem, ...]:
    """One per forbid the tool probes cannot decide: a valid set, but every whole-server grant
    such a forbid could reach is refused (see _whole_server), which surprises unannounced."""
    return tuple(
        Problem(
            loaded.meta[u.policy_id].file,
            f"a grant of every tool of {u.server or 'any server'} is refused while this forbid "
            f"could reach it, as svidd cannot tell which tools it keeps out ({u.why}); tasks "
            "must name the tools they need in intent.tools",
            policy_id=u.policy_id,
        )
        for u in loaded.tool_probes.undecided
    )
