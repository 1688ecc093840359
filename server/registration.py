"""Validation of registration entries before they reach the datastore.

Pure functions: an entry (as the admin API received it) and the current index in, a clean
record or an InvalidRequestError naming the field and the rule out.
"""

from __future__ import annotations

import re

from server.datastore.records import Entry, Selector
from server.entitlement import EntryIndex
from server.errors import InvalidRequestError
from server.ids import SERVER_DNS_NAME, ServerIds
from svid._errors import SpiffeIdError
from svid._spiffe_id import SpiffeId

MAX_TTL = 2**31 - 1
MAX_HINT_BYTES = 1024
MAX_SELECTORS = 64
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _parse_id(field_name: str, text: str) -> SpiffeId:
    if not text:
        raise InvalidRequestError(f"{field_name}: required")
    try:
        return SpiffeId.parse(text)
    except SpiffeIdError as exc:
        raise InvalidRequestError(f"{field_name}: {exc}") from None


def _check_dns(name: str) -> str:
    lowered = name.lower()
    labels = lowered[2:].split(".") if lowered.startswith("*.") else lowered.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise InvalidRequestError(f"dns_names: {name!r} is not a valid DNS name")
    if lowered == SERVER_DNS_NAME:
        raise InvalidRequestError(f"dns_names: {name!r} is reserved for the server's certificate")
    return lowered


def _check_selector(selector: Selector) -> Selector:
    if not selector.type or not selector.value:
        raise InvalidRequestError(
            f"selectors: {selector.type}:{selector.value!r} needs a type and a value "
            "(e.g. unix:uid:1000)"
        )
    if ":" in selector.type:
        raise InvalidRequestError(f"selectors: type {selector.type!r} may not contain ':'")
    return selector


def validate_entry(entry: Entry, ids: ServerIds, index: EntryIndex) -> Entry:
    """A checked copy of `entry` (DNS names lowercased, selectors sorted and deduplicated)."""
    spiffe_id = _parse_id("spiffe_id", entry.spiffe_id)
    parent_id = _parse_id("parent_id", entry.parent_id)
    if spiffe_id.trust_domain != ids.trust_domain:
        raise InvalidRequestError(
            f"spiffe_id: {spiffe_id} is not in trust domain {ids.trust_domain}"
        )
    if not spiffe_id.path:
        raise InvalidRequestError(f"spiffe_id: {spiffe_id} has no path (a workload ID needs one)")
    if ids.is_reserved(spiffe_id):
        raise InvalidRequestError(
            f"spiffe_id: {spiffe_id} is reserved (/svid/server and /svid/agent/... belong to "
            "the server and its agents)"
        )
    if parent_id.trust_domain != ids.trust_domain:
        raise InvalidRequestError(
            f"parent_id: {parent_id} is not in trust domain {ids.trust_domain}"
        )
    if not (
        parent_id == ids.server or ids.is_agent(parent_id) or str(parent_id) in index.spiffe_ids()
    ):
        raise InvalidRequestError(
            f"parent_id: unknown parent {parent_id}: it must be the server "
            f"({ids.server}), an agent ID ({ids.trust_domain.id}/svid/agent/...) or the "
            "SPIFFE ID of an existing node entry"
        )
    if parent_id == spiffe_id:
        raise InvalidRequestError("parent_id: an entry cannot be its own parent")
    if not entry.selectors:
        raise InvalidRequestError("selectors: at least one selector is required")
    if len(entry.selectors) > MAX_SELECTORS:
        raise InvalidRequestError(f"selectors: at most {MAX_SELECTORS} allowed")
    selectors = tuple(sorted({_check_selector(s) for s in entry.selectors}, key=str))
    for name, ttl in (("x509_svid_ttl", entry.x509_svid_ttl), ("jwt_svid_ttl", entry.jwt_svid_ttl)):
        if not 0 <= ttl <= MAX_TTL:
            raise InvalidRequestError(f"{name}: must be between 0 (server default) and {MAX_TTL}")
    if entry.expires_at < 0:
        raise InvalidRequestError("expires_at: must be 0 (never) or a unix time")
    if len(entry.hint.encode()) > MAX_HINT_BYTES:
        raise InvalidRequestError(f"hint: at most {MAX_HINT_BYTES} bytes")
    dns_names = tuple(dict.fromkeys(_check_dns(n) for n in entry.dns_names))
    return Entry(
        id=entry.id,
        spiffe_id=str(spiffe_id),
        parent_id=str(parent_id),
        selectors=selectors,
        x509_svid_ttl=entry.x509_svid_ttl,
        jwt_svid_ttl=entry.jwt_svid_ttl,
        dns_names=dns_names,
        hint=entry.hint,
        admin=entry.admin,
        expires_at=entry.expires_at,
        revision=entry.revision,
        created_at=entry.created_at,
    )
