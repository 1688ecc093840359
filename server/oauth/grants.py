"""The token endpoint's grants: what goes in, what decides, what comes out and is recorded.

- RFC 7523 JWT bearer: a workload's JWT-SVID in, an access token for one configured resource
  out, `sub` = the workload's SPIFFE ID.
- RFC 8693 token exchange: a *task* JWT-SVID in; the task layer decides (Cedar, the task's
  intent as context) what the task may do on the resource; out comes an access token whose
  `sub` is the principal the task works for, `act` the task's chain of SPIFFE IDs, `scope` the
  granted actions and tools (those the request's `scope` names, each granted: scope.py); or,
  with the Txn-Token requested_token_type, a Transaction Token
  (draft-ietf-oauth-transaction-tokens) for calls inside the trust domain.
- RFC 8693 delegation: the workload serving a resource (configured) presents an access token
  it received (`subject_token`, naming it in `may_act`) and its own JWT-SVID (`actor_token`);
  the task layer decides afresh for the other resource (less the actions the subject token
  was kept from: `_carried`), and the token out keeps the principal and the task, with the
  workload added as the current actor (`act`).

Every token is a credential on the ledger (of its task, so ending the task revokes it; a
workload's, of the agent its JWT-SVID was minted through, so removing that agent revokes it; a
delegated one, of the task's agent and of the acting workload's, so removing either revokes
it, and derived from the token acted for, so removing an agent holding that one, or any it
was derived from in turn, revokes it too) with an audit event naming the decision, committed
before the token leaves; every refusal is an event. A derived token expires with the token it
was derived from at the latest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from server.audit.errors import AuditError, LedgerError
from server.audit.event import EventDraft
from server.ca.errors import CaUnavailableError
from server.ca.signer import IssuedJwt, JwtSigner
from server.datastore.base import JtiClaim
from server.datastore.errors import (
    AgentRemovedError,
    JtiHeldError,
    StorageError,
    TaskEndedMeanwhileError,
)
from server.datastore.records import REVOKED_JWT_ID, Credential
from server.errors import PermissionDeniedError
from server.errors import RateLimitedError as DecisionBudgetError
from server.issuance import TaskJwtGrant
from server.oauth.assertions import AssertionChecker, CheckedAssertion, replayed
from server.oauth.errors import (
    InvalidClientError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    InvalidTargetError,
    OAuthError,
    RateLimitedError,
    UnavailableError,
)
from server.oauth.replay import ReplayGuard
from server.oauth.scope import narrowed, requested_scope
from server.refusal_budget import RefusalBudget
from server.status import outage_lines_due
from server.tasks.model import TASK_PATH, Task, is_task_id
from svid._clock import Clock
from svid._errors import JwtSvidError, VerificationError
from svid._jwt import split_typed_token
from svid._task_claims import _MAX_ACT_DEPTH, INVOKE_TOOL, TOOL_SCOPE_PREFIX
from svid._verify_access import AccessTokenVerifier, VerifiedAccessToken

_log = logging.getLogger("svid.server.oauth")

# RFC 8693 §3 token type URIs, and the Txn-Token's JWT typ: names, not secrets.
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
TXN_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:txn_token"  # noqa: S105
TXN_TOKEN_TYP = "txntoken+jwt"  # noqa: S105
# On an access token a workload may act for (may_act): the task's actions its chain was kept
# from (asked for less with `scope`, at its exchange or any delegation before), which no
# delegation acting for it hands on. Its own scope cannot say: an action it lacks may be one
# its resource's policy does not grant, and a resource reached by tools alone carries none.
WITHHELD_CLAIM = "withheld"
# Audit event kinds: one per grant type, decision "allow" or "deny" (and why).
EVENT_JWT_BEARER = "oauth_jwt_bearer"
EVENT_EXCHANGE = "oauth_token_exchange"
# A shared commit failed by a neighbour's replayed assertion is tried again this many times.
RECORD_ATTEMPTS = 4
# What a client hears for a token of a task that ended while it was issued (never sent).
_TASK_ENDED = "task decision: the task ended while its token was issued"
# And for one recorded under an agent evicted or banned while it was issued, or derived from
# a token such an agent holds (never sent).
_AGENT_GONE = (
    "an agent the token was to be recorded under, or one holding the token it derives from, "
    "was evicted or banned meanwhile: nothing was issued"
)


class TaskExchanges(Protocol):
    """The task layer's side of an exchange (server.tasks.service.TaskService)."""

    def exchange_grant(
        self, spiffe_id: str, resource: str, *, actor: str = ""
    ) -> tuple[Task, TaskJwtGrant]:
        """PermissionDeniedError (audited) or server.errors.RateLimitedError (the task's agent
        over its decision budget: nothing decided, nothing written). `actor`: a delegation by
        that workload, on a budget of its own for the task's agent, charged even when decided
        from policy's cache (nothing else bounds delegations)."""
        ...

    def ended(self, spiffe_id: str) -> bool: ...

    def active_task(self, spiffe_id: str) -> Task | None:
        """The active task with this SPIFFE ID, from memory (None when none is)."""
        ...

    def scope_ceiling(self, spiffe_id: str, resource: str) -> frozenset[str] | None:
        """The most the active task could be granted for `resource`, with no decision made;
        None when it is not active."""
        ...


@dataclass(frozen=True, slots=True)
class ResourceWorkload:
    """The workload serving a resource: it alone may act for the tokens issued for it, which
    ``verifier`` checks (this issuer's access tokens for that resource)."""

    spiffe_id: str
    verifier: AccessTokenVerifier


@dataclass(frozen=True, slots=True)
class _Call:
    """One token request: when it began (its events' latency) and its client's budget key
    (RefusalBudget: which of its refusals are written)."""

    started: float
    client: str

    def latency_us(self) -> float:
        return (time.perf_counter() - self.started) * 1e6


@dataclass(frozen=True, slots=True)
class _Whose:
    """Whose request a refusal answered, as far as it is known when refused: named in the
    fields a granting event names them by (the task's runtime as ``agent_id``, its agent as
    ``node_id``, its ``task_id`` and principal; the acting workload of a delegation as
    ``extra["actor"]``), so an operator reading the ledger can tell whose it was. Nothing
    before a token was verified: a malformed one names no one. IDs only, never a token."""

    agent_id: str | None = None
    node_id: str | None = None
    task_id: str | None = None
    on_behalf_of: str | None = None
    actor: str | None = None

    @classmethod
    def of_task(cls, task: Task, actor: str | None = None) -> _Whose:
        return cls(task.runtime_id, task.agent_id, task.task_id, task.on_behalf_of or None, actor)


_NOBODY = _Whose()


@dataclass(frozen=True, slots=True)
class _Decision:
    """The task decision a refusal came after (what was then asked for more than it, or what
    the subject token could not carry): on the refusal's event as a grant's event names it,
    its resource, policy set and scope, so the ledger says what policy decided, not only that
    the request was refused."""

    resource: str
    grant: TaskJwtGrant


@dataclass(frozen=True, slots=True)
class _Issue:
    """A task token to mint: for whom, where, with what, asked as which type, audited as."""

    sub: str
    resource: str
    claims: dict[str, Any]
    requested: str
    kind: str
    # Delegation: the agent the acting workload's JWT-SVID was minted through ("" when none),
    # and the token acted for (its jti and exp): the new token is derived from it.
    actor_agent: str = ""
    subject_jti: str | None = None
    subject_expires_at: int | None = None


class Recorder(Protocol):
    def record(
        self,
        credentials: Sequence[Credential],
        events: Sequence[EventDraft],
        jtis: Sequence[JtiClaim] = (),
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """What the token endpoint answers (RFC 6749 §5.1, RFC 8693 §2.2.1)."""

    access_token: str
    issued_token_type: str
    expires_in: int
    scope: str

    def __repr__(self) -> str:
        return f"TokenResponse(type={self.issued_token_type!r}, expires_in={self.expires_in})"

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "access_token": self.access_token,
            "issued_token_type": self.issued_token_type,
            # A Txn-Token is not a bearer token for clients to present to an AS (draft §7.3).
            "token_type": "N_A" if self.issued_token_type == TXN_TOKEN_TYPE else "Bearer",
            "expires_in": self.expires_in,
        }
        if self.scope:
            out["scope"] = self.scope
        return out


def _single_resource(params: Mapping[str, list[str]], resources: frozenset[str]) -> str:
    """The one RFC 8707 `resource` (or RFC 8693 `audience`) asked for, if configured."""
    asked = params.get("resource", []) + params.get("audience", [])
    if len(asked) != 1:
        raise InvalidTargetError(
            f"exactly one resource (or audience) is required, got {len(asked)}"
        )
    resource = asked[0]
    if resource not in resources:
        raise InvalidTargetError(f"resource {resource[:200]!r} is not served by this server")
    return resource


class Grants:
    def __init__(
        self,
        *,
        checker: AssertionChecker,
        signer: Callable[[], JwtSigner],
        recorder: Recorder,
        replay: ReplayGuard,
        tasks: TaskExchanges,
        resources: frozenset[str],
        trust_domain: str,
        access_token_ttl: int,
        clock: Clock,
        workloads: Mapping[str, ResourceWorkload] | None = None,
        revoked: Callable[[str], bool] = lambda jti: False,
        minted_through: Callable[[str, int, str], str] = lambda jti, exp, sub: "",
        budget: RefusalBudget | None = None,
    ) -> None:
        """``workloads``: resource -> the workload that may act for its tokens (delegation);
        ``revoked``: whether a JWT's ``jti`` is revoked on this server; ``minted_through``: the
        agent a workload JWT-SVID of this trust domain was minted through, by its ``jti``,
        ``exp`` and ``sub`` ("" when none is on record; StorageError when the record cannot be
        read); ``budget``: which refusals of a client are written (None: all of them)."""
        self._checker = checker
        self._signer = signer
        self._recorder = recorder
        self._replay = replay
        self._tasks = tasks
        self._resources = resources
        self._trust_domain = trust_domain
        self._ttl = access_token_ttl
        self._clock = clock
        self._workloads = dict(workloads or {})
        self._revoked = revoked
        self._minted_through = minted_through
        self._budget = budget or RefusalBudget("oauth", rate=0, burst=1, clock=clock)

    # -- RFC 7523 ----------------------------------------------------------------------------

    def jwt_bearer(self, params: Mapping[str, list[str]], client: str = "") -> TokenResponse:
        call = _Call(time.perf_counter(), client)
        verified: CheckedAssertion | None = None  # whose the request is, once known
        try:
            assertion = self._checker.authenticate(_one(params, "assertion"), "assertion")
            verified = assertion
            sub = str(assertion.verified.spiffe_id)
            asked = requested_scope(params)
            if asked is not None and not is_task_id(sub):
                # Refused before the assertion is claimed: the same one serves without a scope.
                raise InvalidScopeError(
                    "a workload's own JWT-SVID is granted no scope: ask without one"
                )
            # A task's JWT-SVID buys an access token once per resource, under the claim its
            # exchange for one makes (token_exchange): the two grants share the allowance.
            once_per = ""
            if is_task_id(sub):
                resource = _single_resource(params, self._resources)
                self._within_task(sub, resource, asked)
                once_per = f"{resource} access"
            assertion = self._claim(assertion, "assertion", once_per, asked)
        except OAuthError as exc:
            self._refused(EVENT_JWT_BEARER, exc, call, whose=self._presented(verified))
            raise
        try:
            resource = _single_resource(params, self._resources)
            _check_client_id(params, sub)
        except OAuthError as exc:
            whose = self._presented(assertion)
            self._refused(EVENT_JWT_BEARER, exc, call, assertion.claim, whose)
            raise
        if is_task_id(sub):
            # A task's JWT-SVID as the assertion: the same task decision as an exchange, so a
            # client that only speaks RFC 7523 (the MCP SDK's) gets a task-scoped token too.
            return self._task_token(
                assertion, resource, ACCESS_TOKEN_TYPE, EVENT_JWT_BEARER, call, asked=asked
            )
        agent_id = self._agent_of(assertion)
        claims = {"client_id": sub}
        issued = self._mint(sub, resource, self._ttl, claims, assertion.claim)
        event = EventDraft(
            kind=EVENT_JWT_BEARER,
            agent_id=sub,
            node_id=agent_id or None,
            resource=resource,
            action="token",
            decision="allow",
            reason="JWT-SVID from a trusted issuer",
            credential_id=issued.jti,
            ttl=issued.expires_at - issued.issued_at,
            latency_us=call.latency_us(),
            extra={
                "assertion_jti": str(assertion.verified.claims.get("jti")),
                "iss": assertion.issuer,
            },
        )
        # Of the agent the assertion came through: evicting or banning it revokes the token
        # with the JWT-SVID it was traded for (server.tasks.service revoke_agent).
        credential = Credential(REVOKED_JWT_ID, issued.jti, agent_id, sub, "", issued.expires_at)
        whose = _Whose(sub, agent_id or None)
        self._record([credential], [event], assertion.claim, EVENT_JWT_BEARER, call, whose=whose)
        return TokenResponse(
            issued.token, ACCESS_TOKEN_TYPE, issued.expires_at - issued.issued_at, ""
        )

    # -- RFC 8693 ----------------------------------------------------------------------------

    def token_exchange(self, params: Mapping[str, list[str]], client: str = "") -> TokenResponse:
        call = _Call(time.perf_counter(), client)
        if "actor_token" in params or "actor_token_type" in params:
            return self._delegation(params, call)
        verified: CheckedAssertion | None = None  # whose the request is, once known
        try:
            token_type = _one(params, "subject_token_type")
            if token_type != JWT_TOKEN_TYPE:
                raise InvalidRequestError(
                    f"subject_token_type must be {JWT_TOKEN_TYPE} (or {ACCESS_TOKEN_TYPE} "
                    "with an actor_token)"
                )
            requested = params.get("requested_token_type", [ACCESS_TOKEN_TYPE])
            if requested not in ([ACCESS_TOKEN_TYPE], [TXN_TOKEN_TYPE], [JWT_TOKEN_TYPE]):
                raise InvalidRequestError(
                    f"requested_token_type {requested[0][:200]!r} is not supported"
                    if len(requested) == 1
                    else "requested_token_type: at most one value is allowed"
                )
            resource = _single_resource(params, self._resources)
            asked = requested_scope(params)
            # Once per resource and kind of token: a runtime's cached task JWT-SVID serves for
            # each resource it reaches, and the same exchange again is a replay.
            kind = "txn" if requested == [TXN_TOKEN_TYPE] else "access"
            subject = self._checker.authenticate(_one(params, "subject_token"), "subject_token")
            verified = subject
            sub = str(subject.verified.spiffe_id)
            if is_task_id(sub):
                self._within_task(sub, resource, asked)
            subject = self._claim(subject, "subject_token", f"{resource} {kind}", asked)
        except OAuthError as exc:
            self._refused(EVENT_EXCHANGE, exc, call, whose=self._presented(verified))
            raise
        return self._task_token(subject, resource, requested[0], EVENT_EXCHANGE, call, asked=asked)

    def _delegation(self, params: Mapping[str, list[str]], call: _Call) -> TokenResponse:
        """RFC 8693 §2.1 with an actor: the workload a task's access token was issued to, acting
        for that task towards another resource. Raises OAuthError (audited)."""
        try:
            if _one(params, "subject_token_type") != ACCESS_TOKEN_TYPE:
                raise InvalidRequestError(
                    f"with an actor_token, subject_token_type must be {ACCESS_TOKEN_TYPE}"
                )
            if _one(params, "actor_token_type") != JWT_TOKEN_TYPE:
                raise InvalidRequestError(f"actor_token_type must be {JWT_TOKEN_TYPE}")
            requested = params.get("requested_token_type", [ACCESS_TOKEN_TYPE])
            if requested not in ([ACCESS_TOKEN_TYPE], [JWT_TOKEN_TYPE], [TXN_TOKEN_TYPE]):
                raise InvalidRequestError(
                    "with an actor_token, an access token or a Txn-Token is issued"
                )
            subject_token = _one(params, "subject_token")
            asked = requested_scope(params)
            # It proves who acts, as the JWT-SVID its agent caches: not used up (what it may
            # get is bounded by the subject token, which names it in may_act).
            actor = self._checker.authenticate(_one(params, "actor_token"), "actor_token")
        except OAuthError as exc:
            self._refused(EVENT_EXCHANGE, exc, call)
            raise
        actor_id = str(actor.verified.spiffe_id)
        whose = _Whose(actor=actor_id)  # and the task's, once the subject token names it
        decision: _Decision | None = None  # once the task layer decided
        try:
            resource = _single_resource(params, self._resources)
            subject, held_at = self._acted_for(subject_token, actor_id)
            task_id = subject.task_id
            if task_id is None:
                raise InvalidGrantError("subject_token was not issued for a task")
            # The task is in the chain the subject token names: its SPIFFE ID ends in its txn.
            task_sid = next(
                (a for a in subject.act_chain if is_task_id(a) and a.endswith(TASK_PATH + task_id)),
                None,
            )
            if task_sid is None:
                raise InvalidGrantError("subject_token names no task in its act chain")
            whose = self._task_named(task_sid, task_id, actor_id)
            if len(subject.act_chain) >= _MAX_ACT_DEPTH:
                raise InvalidGrantError(f"delegation deeper than {_MAX_ACT_DEPTH} actors")
            if subject.expires_at <= int(self._clock.now()):
                # Accepted within the verifier's leeway: nothing is left for a token from it.
                raise InvalidGrantError("subject_token has expired")
            # The acting workload holds the token too: its agent's removal is to revoke it.
            actor_agent = self._agent_of(actor, claimed=False)
            task, decided = self._exchange_grant(task_sid, resource, actor=actor_id)
            whose = _Whose.of_task(task, actor_id)
            decision = _Decision(resource, decided)
            carried, withheld = self._carried(
                decided, subject, held_at, task, resource=resource, actor=actor_id
            )
            grant = _narrowed(carried, asked, resource)
        except (UnavailableError, RateLimitedError):
            # The ledger cannot be read, or the task's agent spent its decision budget: not
            # the request's fault, and past the budget nothing is written per request.
            raise
        except OAuthError as exc:
            self._refused(EVENT_EXCHANGE, exc, call, whose=whose, decision=decision)
            raise
        act = {"sub": actor_id, "act": subject.claims["act"]}
        issued_type = TXN_TOKEN_TYPE if requested == [TXN_TOKEN_TYPE] else ACCESS_TOKEN_TYPE
        # A Txn-Token here is the draft's own case: a workload that received an access token
        # calls on inside the trust domain for the same transaction, as the requester.
        claims = self._task_claims(
            task,
            grant,
            resource,
            act,
            txn=issued_type == TXN_TOKEN_TYPE,
            client=actor_id,
            requester=actor_id,
            withheld=withheld | _actions_kept(carried, grant),
        )
        return self._issue_for_task(
            task,
            grant,
            _Issue(
                subject.subject,
                resource,
                claims,
                issued_type,
                EVENT_EXCHANGE,
                actor_agent,
                subject.jti,
                subject.expires_at,
            ),
            None,
            call,
            whose=whose,
            reason=f"task decision allowed {actor_id[:200]} to act for the task",
            extra={
                "subject_jti": subject.jti,
                "actor": actor_id,
                "actor_jti": str(actor.verified.claims.get("jti")),
                "actor_node": actor_agent,
                # Narrowed by the subject token or the request: the decision kept beside it.
                **_granted(decided, grant),
            },
        )

    def _acted_for(self, token: str, actor_id: str) -> tuple[VerifiedAccessToken, str]:
        """The access token ``actor_id`` acts for, and the resource it was verified for: one
        this issuer made for a resource that workload serves, naming it in ``may_act``, not
        revoked."""
        served = {r: w for r, w in self._workloads.items() if w.spiffe_id == actor_id}
        if not served:
            raise InvalidGrantError(f"actor {actor_id[:200]} serves no resource: it may not act")
        # Only the checks of the resources the token names are run: one signature check, not
        # one per resource the actor serves. (What is read unverified only picks the check.)
        named = _audiences_named(token)
        candidates = [(r, w) for r, w in served.items() if r in named]
        reasons = [] if candidates else ["it names none of them"]
        for served_at, workload in candidates:
            try:
                subject, held_at = workload.verifier.verify(token), served_at
                break
            except VerificationError as exc:
                reasons.append(str(exc))
        else:
            raise InvalidGrantError(
                f"subject_token refused: not an access token for a resource of the actor "
                f"({'; '.join(reasons)[:300]})"
            )
        may_act = subject.claims.get("may_act")
        if not isinstance(may_act, dict) or may_act.get("sub") != actor_id:
            raise InvalidGrantError(f"subject_token does not let {actor_id[:200]} act (may_act)")
        if self._revoked(subject.jti):
            raise InvalidGrantError("subject_token is revoked")
        return subject, held_at

    def _carried(
        self,
        decided: TaskJwtGrant,
        subject: VerifiedAccessToken,
        held_at: str,
        task: Task,
        *,
        resource: str,
        actor: str,
    ) -> tuple[TaskJwtGrant, frozenset[str]]:
        """The task's decision for ``resource`` less the actions the subject token's chain was
        kept from, and those actions (what the token issued hands on no further either): a
        token narrowed by its request's ``scope`` (scope.py) hands on no more of the task's
        actions to the workload acting for it. Its ``withheld`` claim names them, as they were
        when it was issued (WITHHELD_CLAIM). A token without one (another server's, of before
        it) is read as before: one policy kept an action from is not narrowed (its resource's
        decision grants the action no more than the token does, and that says nothing of the
        task's grant elsewhere), and a resource the task reaches by its tools alone never
        carries an action; unless the token was itself delegated, which then hands on only the
        actions it holds. Tools are of one resource each (``_tools_withheld``). Raises
        InvalidGrantError when nothing is left."""
        decided_tokens = decided.scope.split()
        withheld = _withheld_claim(subject)
        if withheld is None:
            withheld = self._withheld_unclaimed(decided_tokens, subject, held_at, task, actor)
        removed = set(withheld) | self._tools_withheld(decided_tokens, subject, held_at, resource)
        kept = [t for t in decided_tokens if t not in removed]
        if len(kept) == len(decided_tokens):
            return decided, withheld
        if not kept:
            raise InvalidGrantError(
                f"subject_token carries none of the task's grant for {resource[:200]}: it "
                f"lacks {' '.join(sorted(removed.intersection(decided_tokens)))[:300]}"
            )
        return _with_scope(decided, " ".join(kept)), withheld

    def _withheld_unclaimed(
        self,
        decided_tokens: Sequence[str],
        subject: VerifiedAccessToken,
        held_at: str,
        task: Task,
        actor: str,
    ) -> frozenset[str]:
        """The actions a subject token without a ``withheld`` claim is taken to have been kept
        from (``_carried``), as the token issued of it names them (WITHHELD_CLAIM)."""
        held = subject.scopes
        task_sid = task.spiffe_id
        if subject.act_chain[:1] != (task_sid,):
            # Delegated (the task's own token is the first of its chain: its actor is the
            # task): any action of the task it lacks, it may have been kept from. Not only
            # those of the decision here: the token issued names them all, or one this
            # resource's policy does not grant (withheld from nothing here) came back a hop on.
            every = (*decided_tokens, *task.actions)
            return frozenset(t for t in every if _is_action(t) and t not in held)
        ceiling = self._tasks.scope_ceiling(task_sid, held_at)
        # An active task's ceiling says which actions the token could have carried; one that
        # ended meanwhile (refused once recorded) carries only what the token does.
        could: Iterable[str] = decided_tokens if ceiling is None else ceiling
        if ceiling is not None and any(
            t in ceiling and t not in held and _is_action(t) for t in decided_tokens
        ):
            # The token lacks an action granted here: narrowed by its client, or by policy?
            could = self._decided_at(held_at, task_sid, actor, ceiling)
        return frozenset(t for t in could if _is_action(t) and t not in held)

    def _tools_withheld(
        self,
        decided_tokens: Sequence[str],
        subject: VerifiedAccessToken,
        held_at: str,
        resource: str,
    ) -> set[str]:
        """The tools of the decision for ``resource`` the subject token may not hand on. Tools
        are of one resource each, so a token for another resource limits none of them, unless
        the chain comes back: towards the resource the token is for (its own workload acting
        for it there), it hands on only the tools it holds (by name or ``invoke_tool``), and
        towards one an earlier actor of its chain serves, where the token held there is not
        shown, none. Else a token its client narrowed to ``read`` got the tools it was kept from
        back from its own server, in one hop or through a neighbour."""
        tools = [t for t in decided_tokens if t.startswith(TOOL_SCOPE_PREFIX)]
        if resource == held_at:
            held = subject.scopes
            return set() if INVOKE_TOOL in held else {t for t in tools if t not in held}
        workload = self._workloads.get(resource)
        if workload is not None and workload.spiffe_id in subject.act_chain:
            return set(tools)
        return set()

    def _decided_at(
        self, held_at: str, task_sid: str, actor: str, ceiling: frozenset[str]
    ) -> Iterable[str]:
        """What the task's decision at ``held_at`` grants now: the actions a token for it could
        have carried. Decided as the delegation's own decision is, on the actor's budget; a
        refusal there (policy grants the task nothing at ``held_at`` now, audited by the task
        layer) leaves the ``ceiling``: every action the token lacks withheld."""
        try:
            _, there = self._exchange_grant(task_sid, held_at, actor=actor)
        except InvalidGrantError:
            return ceiling
        return there.scope.split()

    def _task_claims(
        self,
        task: Task,
        grant: TaskJwtGrant,
        resource: str,
        act: dict[str, Any],
        *,
        txn: bool,
        client: str,
        requester: str,
        withheld: frozenset[str],
    ) -> dict[str, Any]:
        """The claims of a token issued for ``task``: a Txn-Token's (``req_wl`` the
        ``requester``; ``client``, the workload that authenticated with its JWT-SVID, in
        ``rctx``), or an access token's (``client_id``; ``may_act`` for the resource's
        workload, RFC 8693 §4.4, with the task's actions its chain was kept from, ``withheld``,
        which a delegation acting for it hands on no more)."""
        if txn:
            return {
                "txn": task.task_id,
                "scope": grant.scope,
                "tctx": {**grant.claims["tctx"], "resource": resource},
                "req_wl": requester,
                "rctx": {"authn": "spiffe-jwt-svid", "req_wl": client},
                "act": act,
            }
        claims = {"client_id": client, "scope": grant.scope, "act": act, "txn": task.task_id}
        workload = self._workloads.get(resource)
        if workload is not None:
            claims["may_act"] = {"sub": workload.spiffe_id}
            claims[WITHHELD_CLAIM] = sorted(withheld)
        return claims

    def _task_token(
        self,
        subject: CheckedAssertion,
        resource: str,
        requested: str,
        kind: str,
        call: _Call,
        *,
        asked: tuple[str, ...] | None,
    ) -> TokenResponse:
        try:
            task, grant = self._decide(subject, resource)
        except RateLimitedError:
            # Nothing decided, nothing written: the subject token may be presented again once
            # the budget refills (it is not used up by a refusal that says to retry).
            self._replay.release(subject.claim)
            raise
        except OAuthError as exc:
            self._refused(kind, exc, call, subject.claim, self._presented(subject))
            raise
        decided = grant
        whose = _Whose.of_task(task)
        try:
            grant = _narrowed(grant, asked, resource)
        except InvalidScopeError as exc:
            # Refused with the claim left out of the refusal's commit, and released here: the
            # same JWT-SVID may ask again for a scope its task can get (the MCP SDK's client
            # asks again after insufficient_scope). Safe: no token was issued for it and its
            # jti reached no ledger, so it is as unspent as before the request, and its one
            # token per resource still holds. A holder asking again and again gets only
            # refusals, each decided as any exchange is (policy's cache, or the decision
            # budget of the task's agent) and written within its client's refusal budget.
            self._refused(kind, exc, call, whose=whose, decision=_Decision(resource, decided))
            self._replay.release(subject.claim)
            raise
        principal = task.on_behalf_of or task.runtime_id
        act = task.act if task.act.get("sub") == task.spiffe_id else {"sub": task.spiffe_id}
        claims = self._task_claims(
            task,
            grant,
            resource,
            act,
            txn=requested == TXN_TOKEN_TYPE,
            client=task.runtime_id,
            requester=task.spiffe_id,
            withheld=_actions_kept(decided, grant),
        )
        return self._issue_for_task(
            task,
            grant,
            _Issue(principal, resource, claims, requested, kind),
            subject.claim,
            call,
            whose=whose,
            reason="task decision allowed the exchange",
            extra={
                "subject_jti": str(subject.verified.claims.get("jti")),
                **_granted(decided, grant),
            },
        )

    def _issue_for_task(
        self,
        task: Task,
        grant: TaskJwtGrant,
        issue: _Issue,
        claim: JtiClaim | None,
        call: _Call,
        *,
        whose: _Whose,
        reason: str,
        extra: dict[str, Any],
    ) -> TokenResponse:
        """Mint a token of ``task``, record it as the task's credential with its event (and the
        presented token's ``claim``), and answer with it; a refusal names ``whose`` it was."""
        txn = issue.requested == TXN_TOKEN_TYPE
        ttl = min(self._ttl, grant.ttl)
        if issue.subject_expires_at is not None:
            # A token derived from another expires with it at the latest: its revocation
            # follows the link to that one (AGENT_CREDENTIALS), which the ledger keeps only
            # while a verifier may still accept it.
            ttl = min(ttl, issue.subject_expires_at - int(self._clock.now()))
        issued = self._mint(issue.sub, issue.resource, ttl, issue.claims, claim, txn=txn)
        event = EventDraft(
            kind=issue.kind,
            agent_id=task.runtime_id,
            node_id=task.agent_id,
            on_behalf_of=task.on_behalf_of or None,
            resource=issue.resource,
            action=grant.scope or "token",
            decision="allow",
            reason=reason,
            task_id=task.task_id,
            credential_id=issued.jti,
            policy_set_hash=grant.policy_set_hash,
            ttl=issued.expires_at - issued.issued_at,
            latency_us=call.latency_us(),
            extra={**extra, "token_type": issue.requested},
        )
        # A delegated token is the acting workload's too: recorded with its agent as well,
        # unless that is the task's own (one agent, read once: AGENT_CREDENTIALS).
        actor_agent = issue.actor_agent if issue.actor_agent != task.agent_id else ""
        credential = Credential(
            REVOKED_JWT_ID,
            issued.jti,
            task.agent_id,
            task.spiffe_id,
            task.task_id,
            issued.expires_at,
            actor_agent_id=actor_agent or None,
            derived_from=issue.subject_jti,
        )
        self._record([credential], [event], claim, issue.kind, call, whose=whose)
        if self._tasks.ended(task.spiffe_id):
            # On record, never sent: this server's end of the task revokes what it reads on
            # record, this token among them (the ledger refuses one recorded after the end
            # was claimed, on any server: _record).
            exc = InvalidGrantError(_TASK_ENDED)
            self._refused(issue.kind, exc, call, whose=whose)
            raise exc
        return TokenResponse(
            issued.token,
            TXN_TOKEN_TYPE if txn else ACCESS_TOKEN_TYPE,
            issued.expires_at - issued.issued_at,
            grant.scope,
        )

    def _decide(self, subject: CheckedAssertion, resource: str) -> tuple[Task, TaskJwtGrant]:
        sub = str(subject.verified.spiffe_id)
        if "txn" not in subject.verified.claims or not is_task_id(sub):
            raise InvalidGrantError("subject_token must be a task JWT-SVID")
        if subject.verified.spiffe_id.trust_domain.name != self._trust_domain:
            raise InvalidGrantError("only tasks of this trust domain can be exchanged")
        return self._exchange_grant(sub, resource)

    def _claim(
        self, checked: CheckedAssertion, what: str, once_per: str, asked: tuple[str, ...] | None
    ) -> CheckedAssertion:
        """``checked`` claimed once per ``once_per``; a replay refused, saying, when the request
        ``asked`` for a scope, how to get more of the task's grant: the MCP SDK's step-up after
        insufficient_scope presents the task JWT-SVID it traded already, and was told only that
        it was replayed."""
        try:
            return self._checker.claim(checked, what, once_per)
        except InvalidGrantError as exc:
            if asked is None:
                raise
            raise InvalidGrantError(
                f"{exc.description}: a task JWT-SVID is traded for one token per resource; for "
                "a scope its token did not get, ask with a JWT-SVID the task has not traded for "
                "it: one its agent mints anew (svid's task.jwt(audience, fresh=True), which "
                "svid.mcp.oauth_auth asks for), or the next one it is handed"
            ) from None

    def _within_task(self, spiffe_id: str, resource: str, asked: tuple[str, ...] | None) -> None:
        """Refuse a scope the task could never be granted for `resource` (InvalidScopeError),
        before its token is spent: the MCP SDK's client, answered 403 insufficient_scope by a
        tool server, asks again for the tool with the task JWT-SVID it already traded for that
        resource (its agent hands out the same one), and is told the task was not granted it
        rather than that its token was replayed. No decision is made here: what passes is
        decided, and narrowed, after the claim as any exchange is."""
        if asked is None:
            return
        ceiling = self._tasks.scope_ceiling(spiffe_id, resource)
        # An inactive task, or a resource it has nothing on (outside its intent: lateral
        # movement, which the decision flags and counts against its runtime): the decision
        # refuses them after the claim, as without a scope. Refused here, a runtime probing
        # other resources would go unflagged by adding a scope.
        if ceiling:
            narrowed(" ".join(sorted(ceiling)), asked, resource)

    def _exchange_grant(
        self, spiffe_id: str, resource: str, *, actor: str = ""
    ) -> tuple[Task, TaskJwtGrant]:
        """The task layer's decision, charged to the budget of the task's agent as its task
        JWT mints are (a delegation, to that of its `actor` for that agent): past it,
        RateLimitedError, nothing decided and nothing recorded."""
        try:
            return self._tasks.exchange_grant(spiffe_id, resource, actor=actor)
        except PermissionDeniedError as exc:  # the task layer audited its own denial
            raise InvalidGrantError(f"task decision: {exc}") from None
        except DecisionBudgetError:
            # Which agent, and its rate, are the node's business, not the exchanger's.
            raise RateLimitedError(
                "task decision: the task's agent is over its budget of task decisions; retry later"
            ) from None

    def _agent_of(self, assertion: CheckedAssertion, *, claimed: bool = True) -> str:
        """The agent a workload's assertion (or actor token) was minted through ("" for one
        of a trusted foreign issuer, or none on record): one indexed read. A record that
        cannot be read refuses the grant (the assertion, its claim released when this grant
        ``claimed`` it, may be presented again): a token recorded with no agent would outlive
        that agent's eviction."""
        if assertion.verified.spiffe_id.trust_domain.name != self._trust_domain:
            return ""  # signed by another domain's keys: no credential of ours
        try:
            verified = assertion.verified
            return self._minted_through(
                str(verified.claims["jti"]), verified.expires_at, str(verified.spiffe_id)
            )
        except StorageError as exc:
            if claimed:  # an actor token is not claimed: its jti may be another grant's
                self._replay.release(assertion.claim)
            _log.warning(
                "OAuth token refused: its assertion's record could not be read",
                extra={"error": str(exc)},
            )
            raise UnavailableError("the credential ledger cannot be read") from None

    def _presented(self, checked: CheckedAssertion | None) -> _Whose:
        """Whose a verified JWT-SVID (an assertion or subject token) is, for a refusal's event:
        a task's (``txn``) as ``_task_named``, else the workload's own; no one before one was
        verified."""
        if checked is None:
            return _NOBODY
        sub = str(checked.verified.spiffe_id)
        txn = checked.verified.claims.get("txn")
        if is_task_id(sub) and isinstance(txn, str) and txn:
            return self._task_named(sub, txn)
        return _Whose(sub)

    def _task_named(self, spiffe_id: str, task_id: str, actor: str | None = None) -> _Whose:
        """The task a verified token names, by its SPIFFE ID and ID: as its granting events
        name it when this server holds it active (memory: no read for a refusal); else (it
        ended, or is another server's or trust domain's) its runtime and ID as the SPIFFE ID
        says them, `<runtime>/task/<id>`, without its agent. A ``task_id`` the SPIFFE ID does
        not end in names no task: a trusted partner's ``txn`` is its own text (a JWT's shape
        failed the event, a NUL the PostgreSQL ledger, another task's ID put the refusal on that
        task's record), where the SPIFFE ID's path was checked when it was verified."""
        task = self._tasks.active_task(spiffe_id)
        if task is not None and task.task_id == task_id:
            return _Whose.of_task(task, actor)
        suffix = TASK_PATH + task_id
        if not spiffe_id.endswith(suffix):
            return _Whose(spiffe_id, actor=actor)
        return _Whose(spiffe_id[: -len(suffix)], None, task_id, None, actor)

    # -- shared -------------------------------------------------------------------------------

    def _mint(
        self,
        sub: str,
        resource: str,
        ttl: int,
        claims: dict[str, Any],
        assertion: JtiClaim | None,
        *,
        txn: bool = False,
    ) -> IssuedJwt:
        now = int(self._clock.now())
        try:
            signer = self._signer()
            if txn:
                # draft-ietf-oauth-transaction-tokens §4: aud is the trust domain.
                return signer.mint_access_token(
                    sub, self._trust_domain, ttl, now, claims, typ=TXN_TOKEN_TYP
                )
            return signer.mint_access_token(sub, resource, ttl, now, claims)
        except CaUnavailableError as exc:
            # Nothing was issued: the assertion may be presented again once the CA is back.
            if assertion is not None:
                self._replay.release(assertion)
            raise UnavailableError(str(exc)) from None

    def _record(
        self,
        credentials: list[Credential],
        events: list[EventDraft],
        assertion: JtiClaim | None,
        kind: str,
        call: _Call,
        *,
        whose: _Whose,
    ) -> None:
        """The token's record and its event, with the claim of the assertion it was issued
        for, in one commit; only then may the token leave. A refusal names ``whose`` it was."""
        try:
            self._commit(credentials, events, assertion)
        except JtiHeldError:
            # Another server accepted this assertion first: the token is not sent.
            assert assertion is not None  # nothing else is claimed
            exc = InvalidGrantError(replayed("assertion", assertion.jti))
            self._refused(kind, exc, call, whose=whose)
            raise exc from None
        except LedgerError as failed:
            gone = failed.__cause__
            if isinstance(gone, AgentRemovedError | TaskEndedMeanwhileError):
                # The agent evicted or banned since the grant checked it, or its task's end
                # claimed (through any server, memory here may not know yet) before this
                # commit: that removal or end may have read what to revoke already. The token
                # is not sent (a task's refused as one known ended), and the assertion is spent.
                exc = InvalidGrantError(
                    _TASK_ENDED if isinstance(gone, TaskEndedMeanwhileError) else _AGENT_GONE
                )
                self._refused(kind, exc, call, assertion, whose)
                raise exc from None
            if assertion is not None:
                self._replay.release(assertion)
            # Each request refused alike while the ledger is down: its traceback once an
            # interval (the ledger's own line says the outage), not one a request.
            if times := outage_lines_due(failed, "oauth token"):
                _log.error(
                    "OAuth token not recorded: refused", exc_info=True, extra={"times": times}
                )
            raise UnavailableError("the audit log cannot be written") from None

    def _commit(
        self, credentials: list[Credential], events: list[EventDraft], claim: JtiClaim | None
    ) -> None:
        """Record (sharing a commit with concurrent requests). JtiHeldError when `claim` is
        held already; LedgerError when the ledger failed otherwise. A commit that failed only
        because a neighbour in it replayed an assertion kept nothing of ours: record again."""
        jtis = () if claim is None else (claim,)
        for attempt in range(1, RECORD_ATTEMPTS + 1):
            try:
                self._recorder.record(credentials, events, jtis)
                return
            except LedgerError as exc:
                held = exc.__cause__
                if not isinstance(held, JtiHeldError) or attempt == RECORD_ATTEMPTS:
                    raise
                if claim is not None and (claim.issuer, claim.jti) in held.held:
                    raise held from None

    def _refused(
        self,
        kind: str,
        exc: OAuthError,
        call: _Call,
        assertion: JtiClaim | None = None,
        whose: _Whose = _NOBODY,
        *,
        decision: _Decision | None = None,
    ) -> None:
        """Audit a refusal, naming ``whose`` request it was as far as known, and the task
        ``decision`` it came after, if any, while its client has budget for refusals on record
        (past it, only counted: a write per bad request is what the budget bounds). An assertion
        that was checked is used up by it either way: its claim goes into the same commit, as it
        would with a token."""
        events = []
        if self._budget.on_record(call.client):
            extra: dict[str, str] = {"actor": whose.actor} if whose.actor else {}
            if decision is not None:
                extra["granted"] = decision.grant.scope
            events.append(
                EventDraft(
                    kind=kind,
                    agent_id=whose.agent_id,
                    node_id=whose.node_id,
                    on_behalf_of=whose.on_behalf_of,
                    resource=decision.resource if decision is not None else None,
                    action="token",
                    decision="deny",
                    reason=f"{exc.error}: {exc.description}"[:500],
                    task_id=whose.task_id,
                    policy_set_hash=decision.grant.policy_set_hash if decision else None,
                    latency_us=call.latency_us(),
                    extra=extra,
                )
            )
        elif assertion is None:
            return
        try:
            try:
                self._commit([], events, assertion)
            except JtiHeldError:  # used up already, elsewhere: the refusal is still recorded
                if events:
                    self._commit([], events, None)
        except (
            AuditError,
            LedgerError,
        ) as failed:  # AuditError: the reason looked like a credential
            if times := outage_lines_due(failed, "oauth refusal"):
                _log.error(
                    "an OAuth refusal could not be audited", exc_info=True, extra={"times": times}
                )


def _narrowed(grant: TaskJwtGrant, asked: tuple[str, ...] | None, resource: str) -> TaskJwtGrant:
    """The grant as issued for a request that ``asked`` for a scope (None: all of it); raises
    InvalidScopeError when it asked for more."""
    if asked is None:
        return grant
    return _with_scope(grant, narrowed(grant.scope, asked, resource))


def _with_scope(grant: TaskJwtGrant, scope: str) -> TaskJwtGrant:
    """The grant as issued with ``scope``, a part of its own."""
    return replace(grant, scope=scope, claims={**grant.claims, "scope": scope})


def _is_action(token: str) -> bool:
    return not token.startswith(TOOL_SCOPE_PREFIX)


def _actions_kept(decided: TaskJwtGrant, issued: TaskJwtGrant) -> frozenset[str]:
    """The actions of ``decided`` that the token ``issued`` of it does not hold: kept from it
    by its request's scope (or, in a delegation, by its subject token)."""
    held = set(issued.scope.split())
    return frozenset(t for t in decided.scope.split() if _is_action(t) and t not in held)


def _withheld_claim(token: VerifiedAccessToken) -> frozenset[str] | None:
    """A token's WITHHELD_CLAIM; None when it has none (another server's, or of before it)."""
    claim = token.claims.get(WITHHELD_CLAIM)
    if not isinstance(claim, list) or not all(isinstance(t, str) and t for t in claim):
        return None
    return frozenset(claim)


def _granted(decided: TaskJwtGrant, issued: TaskJwtGrant) -> dict[str, str]:
    """For the event of a token ``issued`` narrower than the task decision (a scope asked, or
    what a delegation's subject token carries): what the decision granted (the event's action
    is then what was issued, and policy's answer would be lost)."""
    return {} if issued is decided else {"granted": decided.scope}


def _audiences_named(token: str) -> tuple[str, ...]:
    """The ``aud`` an access token claims, unverified; () for anything else."""
    try:
        _, split = split_typed_token(token)
    except JwtSvidError:
        return ()
    aud = split.claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    return tuple(a for a in aud if isinstance(a, str)) if isinstance(aud, list) else ()


def _check_client_id(params: Mapping[str, list[str]], sub: str) -> None:
    """The assertion authenticates the client (RFC 7523 §3.1); a `client_id` sent along (the
    MCP SDK sends one, and a secret svidd ignores) must name the same workload: the
    assertion's subject, or for a task, the runtime it belongs to."""
    given = params.get("client_id")
    if given is None:
        return
    if len(given) != 1 or not (
        given[0] == sub or (is_task_id(sub) and sub.startswith(given[0] + TASK_PATH))
    ):
        raise InvalidClientError("client_id does not name the assertion's workload")


def _one(params: Mapping[str, list[str]], name: str) -> str:
    values = params.get(name, [])
    if len(values) != 1 or not values[0]:
        raise InvalidRequestError(f"{name}: exactly one value is required")
    return values[0]
