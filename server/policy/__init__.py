"""Policy as code for task identities: Cedar decisions plus the intent rules always enforced."""

from server.policy.decision import Decision, DecisionRequest, Outcome, PairResult
from server.policy.engine import (
    DEFAULT_HIGH_RISK_TTL_CAP,
    PolicyCheck,
    PolicyEngine,
    PolicySetInfo,
    validate_policy_dir,
)
from server.policy.errors import PolicyError, Problem, RequestError
from server.policy.intent import (
    CLASSIFICATIONS,
    DEFAULT_MAX_DELEGATION_DEPTH,
    INVOKE_TOOL,
    Flag,
    Intent,
    Verdict,
    check_audiences,
    check_depth,
    check_elevation,
    check_in_intent,
    narrow,
    split_tool,
)

__all__ = [
    "CLASSIFICATIONS",
    "DEFAULT_HIGH_RISK_TTL_CAP",
    "DEFAULT_MAX_DELEGATION_DEPTH",
    "INVOKE_TOOL",
    "Decision",
    "DecisionRequest",
    "Flag",
    "Intent",
    "Outcome",
    "PairResult",
    "PolicyCheck",
    "PolicyEngine",
    "PolicyError",
    "PolicySetInfo",
    "Problem",
    "RequestError",
    "Verdict",
    "check_audiences",
    "check_depth",
    "check_elevation",
    "check_in_intent",
    "narrow",
    "split_tool",
    "validate_policy_dir",
]
