"""The index of open requests the adapters end on revocation (svid._open_requests): a key held by
one request, then shared by several, then by one again, always hits exactly the open ones."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from svid import RevocationEvent, SpiffeId, X509Bundle, X509Verifier
from svid._bundle import BundleSet
from svid._caller import Caller
from svid._clock import FakeClock
from svid._der import der_concat
from svid._open_requests import TXN, OpenRequests
from svid._source import MemoryBundleSource
from tests.svid.certs import T0, make_ca, make_leaf

TASK = SpiffeId.parse("spiffe://example.org/agents/bot/task/t1")


def _event(kind: str, value: str, spiffe_id: SpiffeId | None = None) -> RevocationEvent:
    return RevocationEvent(kind, value, 0.0, spiffe_id)


def test_each_open_request_is_ended_once_by_any_of_its_keys() -> None:
    ended: list[str] = []
    requests = OpenRequests()
    stream = requests.open((("jwt_id", "j1"), (TXN, "t1")), lambda: ended.append("stream"))
    call = requests.open((("jwt_id", "j2"), (TXN, "t1")), lambda: ended.append("call"))
    other = requests.open((("jwt_id", "j3"), (TXN, "t2")), lambda: ended.append("other"))
    assert len(requests) == 3
    requests.on_revoked(_event("x509_serial", "ab", TASK))  # another credential of task t1
    assert sorted(ended) == ["call", "stream"]
    assert len(requests) == 1
    requests.close(stream)  # closing what a revocation already removed changes nothing
    requests.on_revoked(_event("jwt_id", "j3"))
    assert sorted(ended) == ["call", "other", "stream"]
    assert len(requests) == 0
    requests.close(other)
    requests.close(call)
    assert len(requests) == 0
    assert not requests._by_key


def test_a_revoked_token_of_a_tasks_id_ends_only_what_it_admitted_not_the_tasks_all() -> None:
    """A token delegated from a task (an exchange acting for another workload) is revoked, the
    task going on, when the acting workload's agent is evicted: it ended every open request
    and session of the task, here and at every other resource server of it."""
    ended: list[str] = []
    requests = OpenRequests()
    requests.open((("jwt_id", "j1"), (TXN, "t1")), lambda: ended.append("stream"))
    requests.open((("jwt_id", "j2"), (TXN, "t1")), lambda: ended.append("delegated"))
    requests.on_revoked(_event("jwt_id", "j2", TASK))
    assert ended == ["delegated"]
    requests.on_revoked(_event("x509_serial", "ab", TASK))  # the task's end
    assert ended == ["delegated", "stream"]


def test_a_tasks_end_ends_every_request_and_session_of_it_whatever_admitted_them() -> None:
    """A token expired before its task's end is not revoked at the end, and a task its agent
    never minted an X.509-SVID for has no serial to revoke: the end itself (KIND_TASK, the
    task's id) is what says the task is over, with or without the agent naming its ID."""
    ended: list[str] = []
    requests = OpenRequests()
    requests.open((("jwt_id", "expired"), (TXN, "t1")), lambda: ended.append("stream"))
    requests.open((("jwt_id", "j2"), (TXN, "t1")), lambda: ended.append("session"))
    requests.open((("jwt_id", "j3"), (TXN, "t2")), lambda: ended.append("other task"))
    requests.open((("jwt_id", "t1"),), lambda: ended.append("a jti that is the task id"))
    requests.on_revoked(_event("task", "t1"))
    assert sorted(ended) == ["session", "stream"]
    requests.on_revoked(_event("task", "t2", SpiffeId.parse("spiffe://example.org/a/task/t2")))
    assert sorted(ended) == ["other task", "session", "stream"]


def test_a_shared_key_goes_back_to_one_request_and_then_to_none() -> None:
    ended: list[str] = []
    requests = OpenRequests()
    first = requests.open((("jwt_id", "j1"),), lambda: ended.append("first"))
    second = requests.open((("jwt_id", "j1"),), lambda: ended.append("second"))
    third = requests.open((("jwt_id", "j1"),), lambda: ended.append("third"))
    requests.close(second)
    requests.close(first)
    requests.on_revoked(_event("jwt_id", "j1"))
    assert ended == ["third"]
    requests.close(third)
    assert len(requests) == 0
    assert not requests._by_key  # nothing kept for a key no open request holds
    requests.on_revoked(_event("jwt_id", "j1"))
    assert ended == ["third"]


def test_a_request_registered_twice_under_a_key_is_held_once() -> None:
    ended: list[str] = []
    requests = OpenRequests()
    twice = requests.open((("jwt_id", "j1"), ("jwt_id", "j1")), lambda: ended.append("twice"))
    assert len(requests) == 1
    requests.on_revoked(_event("jwt_id", "j1"))
    assert ended == ["twice"]
    requests.close(twice)
    assert len(requests) == 0


class _Counted:
    """A request whose keys count how often they are read."""

    def __init__(self, keys: tuple[tuple[str, str], ...], ended: list[str], name: str) -> None:
        self._keys = keys
        self.reads = 0
        self.end = lambda: ended.append(name)

    @property
    def keys(self) -> tuple[tuple[str, str], ...]:
        self.reads += 1
        return self._keys


def test_keys_are_read_only_for_requests_still_open_when_a_revocation_comes() -> None:
    ended: list[str] = []
    requests = OpenRequests()
    quick = _Counted((("jwt_id", "j1"), (TXN, "t1")), ended, "quick")
    stream = _Counted((("jwt_id", "j2"), (TXN, "t1")), ended, "stream")
    bystander = _Counted((("jwt_id", "j3"), (TXN, "t2")), ended, "bystander")
    requests.add(quick)
    requests.add(stream)
    requests.add(bystander)
    requests.close(quick)  # answered before any revocation: its keys never read
    assert quick.reads == 0
    assert len(requests) == 2
    requests.on_revoked(_event("jwt_id", "j9"))  # hits nobody; indexes the two still open
    assert ended == []
    assert (stream.reads, bystander.reads) == (1, 1)
    late = _Counted((("jwt_id", "j4"), (TXN, "t1")), ended, "late")
    requests.add(late)  # admitted after that revocation: indexed by the next one
    requests.on_revoked(_event("x509_serial", "ab", TASK))  # another credential of task t1
    assert sorted(ended) == ["late", "stream"]
    assert bystander.reads == 1  # indexed once, not again
    requests.close(bystander)
    assert len(requests) == 0
    assert not requests._by_key
    assert not requests._unindexed


def test_a_tasks_end_ends_what_an_x509_svid_of_it_since_expired_admitted() -> None:
    """A task's X.509-SVID is cut to its CA's notAfter, so one issued before a CA rotation
    expires before the task does: a stream or MCP session its mTLS peer opened with it has no
    serial revoked at the end (the server revokes only what a verifier may still accept). The
    end (KIND_TASK) must close it as it closes what the task's tokens opened."""
    ca = make_ca()
    old = make_leaf(ca, uris=[str(TASK)])
    other = make_leaf(ca, uris=["spiffe://example.org/agents/bot/task/t2"])
    bundles = BundleSet.of(X509Bundle(TASK.trust_domain, (ca.cert,)))
    source = MemoryBundleSource()
    source.set_x509_bundles(bundles)
    verifier = X509Verifier(source.x509_bundle_for, clock=FakeClock(T0))
    ended: list[str] = []
    requests = OpenRequests()
    for name, leaf in (("t1", old), ("t2", other)):
        peer = verifier.verify_der(der_concat([leaf.cert]))
        requests.admit(Caller(peer.spiffe_id, x509=peer), lambda name=name: ended.append(name))
    requests.on_revoked(_event("task", "t1"))
    assert ended == ["t1"]


def test_a_tasks_end_ends_only_the_requests_of_that_task_identity() -> None:
    """A task's end was matched on its task ID alone: the end of a task of another runtime or
    trust domain that carried the same ID ended this task's requests and MCP sessions. An end
    naming no identity (an older agent's) still ends them, on the ID."""
    ca = make_ca()
    leaf = make_leaf(ca, uris=[str(TASK)])
    bundles = BundleSet.of(X509Bundle(TASK.trust_domain, (ca.cert,)))
    source = MemoryBundleSource()
    source.set_x509_bundles(bundles)
    peer = X509Verifier(source.x509_bundle_for, clock=FakeClock(T0)).verify_der(
        der_concat([leaf.cert])
    )
    ended: list[str] = []
    requests = OpenRequests()
    for name in ("stream", "session"):
        requests.admit(Caller(peer.spiffe_id, x509=peer), lambda name=name: ended.append(name))
    for other in ("spiffe://foreign.org/agents/bot/task/t1", "spiffe://example.org/b/task/t1"):
        requests.on_revoked(_event("task", "t1", SpiffeId.parse(other)))
        requests.on_revoked(_event("x509_serial", "ab", SpiffeId.parse(other)))
    assert ended == []
    requests.on_revoked(_event("task", "t1", TASK))
    assert sorted(ended) == ["session", "stream"]
    ended.clear()
    requests.admit(Caller(peer.spiffe_id, x509=peer), lambda: ended.append("older agent's"))
    requests.on_revoked(_event("task", "t1"))
    assert ended == ["older agent's"]


def test_a_tasks_end_ends_the_requests_its_tokens_admitted_by_the_task_they_name() -> None:
    """A task token names its task in `sub`; a token whose `sub` is the principal (an
    exchange) names it as the current actor (`act.sub`)."""
    upstream = SpiffeId.parse("spiffe://example.org/agents/upstream")
    tokens = {
        "task token": (TASK, {"txn": "t1", "jti": "j1"}),
        "exchanged": (upstream, {"txn": "t1", "jti": "j2", "act": {"sub": str(TASK)}}),
    }
    ended: list[str] = []
    requests = OpenRequests()
    for name, (sub, claims) in tokens.items():
        jwt: Any = SimpleNamespace(claims=claims)
        requests.admit(Caller(sub, jwt=jwt), lambda name=name: ended.append(name))
    requests.on_revoked(_event("task", "t1", SpiffeId.parse("spiffe://example.org/b/task/t1")))
    assert ended == []
    requests.on_revoked(_event("task", "t1", TASK))
    assert sorted(ended) == ["exchanged", "task token"]


def test_a_tasks_end_ends_a_delegated_tokens_requests_whose_actor_has_the_same_task_id() -> None:
    """A token delegated from the task to another actor keeps the task's `txn`; its requests
    were keyed on the current actor alone when that was a task identity with the same ID (a
    task of another trust domain, which picks its IDs, and reads every token's `txn`): the
    end of the task the token was minted for, naming that task, left them open."""
    actor = SpiffeId.parse("spiffe://foreign.org/agents/bot/task/t1")
    claims = {"txn": "t1", "jti": "j3", "act": {"sub": str(actor), "act": {"sub": str(TASK)}}}
    ended: list[str] = []
    requests = OpenRequests()
    jwt: Any = SimpleNamespace(claims=claims)
    requests.admit(Caller(actor, jwt=jwt), lambda: ended.append("delegated"))
    requests.on_revoked(_event("task", "t1", SpiffeId.parse("spiffe://example.org/b/task/t1")))
    assert ended == []
    requests.on_revoked(_event("task", "t1", TASK))
    assert ended == ["delegated"]
