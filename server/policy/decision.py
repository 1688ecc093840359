"""Values going into and coming out of a policy decision."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from server.policy.errors import RequestError
from server.policy.intent import Intent


class Outcome(StrEnum):
    DENY = "deny"
    ALLOW = "allow"
    # Some of the requested scope or TTL was cut back, the rest granted.
    ALLOW_CONSTRAINED = "allow_constrained"


@dataclass(frozen=True)
class DecisionRequest:
    """One question to policy: may `agent_id` (on node `node_id`) act with `intent`?

    Every (action, resource) pair of the intent is evaluated separately; `risk` is the agent's risk
    score and `violations` its recent count of refused out-of-intent requests through `node_id`.
    """

    agent_id: str
    node_id: str
    intent: Intent
    requested_ttl: int
    risk: int = 0
    violations: int = 0
    # Evaluate only these (action, resource) pairs, with the whole intent still as context: the
    # per-request re-check of a task mint. None means every pair of the intent.
    pairs: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self) -> None:
        if self.pairs is not None and not self.pairs:
            raise RequestError("pairs: an empty tuple asks nothing; pass None for the whole intent")
        if self.requested_ttl <= 0:
            raise RequestError(f"requested_ttl: {self.requested_ttl} is not a positive number")
        if self.risk < 0 or self.violations < 0:
            raise RequestError(f"risk {self.risk} / violations {self.violations} is negative")


@dataclass(frozen=True)
class PairResult:
    """Policy's answer for one (action, resource) pair of a request."""

    action: str
    resource: str
    allowed: bool
    policy_ids: tuple[str, ...]
    reason: str
    # A policy failed to evaluate: denied, as its forbid could have been (Cedar skips it).
    evaluation_error: bool = False


@dataclass(frozen=True)
class Decision:
    """A decision on record: what was granted, why, by which policies of which policy set.

    `ttl` is the granted lifetime in seconds: the requested TTL cut to the smallest `@ttl_cap` of
    the determining permit policies (and the high-risk default cap). It is 0 when denied.
    """

    outcome: Outcome
    reason: str
    policy_ids: tuple[str, ...]
    policy_set_hash: str
    granted_actions: tuple[str, ...]
    granted_resources: tuple[str, ...]
    ttl: int
    requested_ttl: int
    latency_us: float
    pairs: tuple[PairResult, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.outcome is not Outcome.DENY

    def audit_fields(self) -> dict[str, object]:
        """The fields an audit event takes from a decision (server.audit EventDraft names)."""
        return {
            "decision": self.outcome.value,
            "reason": self.reason,
            "policy_ids": self.policy_ids,
            "policy_set_hash": self.policy_set_hash,
            "ttl": self.ttl,
            "latency_us": self.latency_us,
        }

    @property
    def granted(self) -> tuple[tuple[str, str], ...]:
        """The exact (action, resource) pairs granted; narrower than the product of the two sets."""
        return tuple((p.action, p.resource) for p in self.pairs if p.allowed)
