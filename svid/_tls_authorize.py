"""Which verified TLS peers a service accepts: an exact SPIFFE ID, one of several, any member of a
trust domain, anyone the verifier accepts, or a callable of the caller's own."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from svid._spiffe_id import SpiffeId, TrustDomain
from svid._verify_x509 import VerifiedX509

Authorizer = Callable[[VerifiedX509], bool]
"""Called with a peer that passed verification; True admits it, and nothing else does. May
raise to refuse."""


def _id(value: SpiffeId | str) -> SpiffeId:
    sid = value if isinstance(value, SpiffeId) else SpiffeId.parse(value)
    if not sid.path:
        raise ValueError(
            f"{sid} is a trust domain, which no X.509-SVID has as its ID: use "
            f"authorize_member_of({sid.trust_domain.name!r})"
        )
    return sid


@dataclass(frozen=True, slots=True)
class _OneOf:
    ids: frozenset[SpiffeId]

    def __call__(self, peer: VerifiedX509) -> bool:
        return peer.spiffe_id in self.ids

    def __str__(self) -> str:
        return " or ".join(sorted(str(i) for i in self.ids))


@dataclass(frozen=True, slots=True)
class _MemberOf:
    trust_domain: TrustDomain

    def __call__(self, peer: VerifiedX509) -> bool:
        return peer.spiffe_id.trust_domain == self.trust_domain

    def __str__(self) -> str:
        return f"any member of {self.trust_domain}"


@dataclass(frozen=True, slots=True)
class _Any:
    def __call__(self, peer: VerifiedX509) -> bool:
        return True

    def __str__(self) -> str:
        return "any verified peer"


def authorize_id(spiffe_id: SpiffeId | str) -> Authorizer:
    """Admit exactly ``spiffe_id``."""
    return _OneOf(frozenset({_id(spiffe_id)}))


def authorize_one_of(*spiffe_ids: SpiffeId | str) -> Authorizer:
    """Admit any of ``spiffe_ids``."""
    if not spiffe_ids:
        raise ValueError("authorize_one_of needs at least one SPIFFE ID")
    return _OneOf(frozenset(_id(s) for s in spiffe_ids))


def authorize_member_of(trust_domain: TrustDomain | str) -> Authorizer:
    """Admit any workload of ``trust_domain`` (its bundle must be among the source's)."""
    td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
    return _MemberOf(td)


def authorize_any() -> Authorizer:
    """Admit every peer that verifies against the source's bundles, from any trust domain."""
    return _Any()


def as_authorizer(value: Authorizer | SpiffeId | TrustDomain | str) -> Authorizer:
    """An Authorizer from the shorthands the TLS helpers accept: a SPIFFE ID (as text or
    SpiffeId) admits exactly it, a TrustDomain admits its members, a callable is used as is."""
    if isinstance(value, str | SpiffeId):
        return authorize_id(value)
    if isinstance(value, TrustDomain):
        return authorize_member_of(value)
    if callable(value):
        return value
    raise TypeError(
        f"authorize must be a SPIFFE ID, a TrustDomain or a callable, not {type(value).__name__}"
    )


def describe(authorizer: Callable[[Any], object]) -> str:
    """What an authorizer admits, for refusal messages."""
    if isinstance(authorizer, _OneOf | _MemberOf | _Any):
        return str(authorizer)
    return getattr(authorizer, "__qualname__", None) or repr(authorizer)


def refusal(authorizer: Callable[[Any], object], peer: Any) -> str | None:
    """Why ``authorizer`` refuses ``peer`` (a VerifiedX509, or svid.asgi's Caller), to follow its
    SPIFFE ID in a message; None when it admits it. Only True admits: a truthy answer of
    another kind refuses, above all the coroutine of an ``async def`` authorizer, which no
    caller awaits and which admitted everyone. What the authorizer raises goes on up."""
    allowed = authorizer(peer)
    if allowed is True:
        return None
    if allowed is False or allowed is None:
        return f"is not authorised (allowed: {describe(authorizer)})"
    hint = ""
    if inspect.isawaitable(allowed):
        hint = " (an authorizer is called, never awaited: make it a plain function)"
        close = getattr(allowed, "close", None)
        if close is not None:
            close()  # no "never awaited" warning on top of this refusal
    return (
        f"is refused: its authorizer {describe(authorizer)} returned a "
        f"{type(allowed).__name__}, not True{hint}"
    )
