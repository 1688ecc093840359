"""Validation of registration entries before they reach the datastore.

Pure functions: an entry (as the admin API received it) and the current entries in, a clean
record or an InvalidRequestError naming the field and the rule out. Batches go through the
same rules item by item (`check_creates`, `check_updates`, `check_deletes`), each item seeing
the entries as the items before it in the batch left them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from server.datastore.errors import ConflictError, DataStoreError
from server.datastore.records import Entry, Selector
from server.entitlement import EntryIndex
from server.errors import AlreadyExistsError, InvalidRequestError, NotFoundError, ServerError
from server.ids import SERVER_DNS_NAME, ServerIds
from server.input_text import refuse_nul
from server.tasks.model import is_task_id
from svid._errors import SpiffeIdError
from svid._spiffe_id import SpiffeId, TrustDomain

MAX_TTL = 2**31 - 1
MAX_HINT_BYTES = 1024
MAX_SELECTORS = 64
# Every one goes into each X.509-SVID of the entry: unbounded, one entry's certificate could
# come near gRPC's 4 MiB message limit, and the agent's renewal batch holding it (its other
# workloads' SVIDs with it) and the workload's stream passed it, failing on every retry. 100
# names of up to 253 bytes keep a certificate near 26 KiB.
MAX_DNS_NAMES = 100
# Items per batch call. A batch is one transaction and one new in-memory snapshot; a thousand
# typical entries are about 150 KiB on the wire, far from gRPC's 4 MiB request limit.
MAX_BATCH = 1000
# Matched whole (fullmatch): "$" also matches before a final newline, so "web.example.org\n"
# (a newline ending any label) passed and went into the X.509-SVID's DNS SAN.
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_ENTRY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A new entry's place in a batch view until the datastore assigns its id (never a valid id).
_NEW = "\x00new:"

ItemError = ServerError | DataStoreError


class KnownEntries(Protocol):
    """What validation asks of the stored entries: is this SPIFFE ID some entry's (a node
    entry, so a valid parent), not counting the entry with id `excluding`?"""

    def has_spiffe_id(self, spiffe_id: str, *, excluding: str = "") -> bool: ...


def is_entry_id(text: str) -> bool:
    """Whether `text` has the shape of an entry ID (an operator's, or one the datastore made)."""
    return _ENTRY_ID.fullmatch(text) is not None


def validate_entry_id(text: str) -> str:
    if not text:
        raise InvalidRequestError("id: required")
    if not is_entry_id(text):
        raise InvalidRequestError(f"id: {text[:80]!r} is not an entry ID (1-64 of A-Z a-z 0-9 _ -)")
    return text


def _parse_id(field_name: str, text: str) -> SpiffeId:
    if not text:
        raise InvalidRequestError(f"{field_name}: required")
    try:
        return SpiffeId.parse(text)
    except SpiffeIdError as exc:
        raise InvalidRequestError(f"{field_name}: {exc}") from None


def _is_dns(lowered: str) -> bool:
    labels = lowered[2:].split(".") if lowered.startswith("*.") else lowered.split(".")
    return all(_DNS_LABEL.fullmatch(label) for label in labels)


def _spelling_taken(name: str) -> str:
    """The spelling of `name` a SAN takes where only the spelling was refused ("" if none):
    an FQDN without its final dot, an internationalized name in its IDNA (xn--) form."""
    if len(name) > 253:  # no IDNA encoding of an unbounded text (punycode is quadratic)
        return ""
    written = name.removesuffix(".").lower()
    try:
        taken = written.encode("idna").decode("ascii")
        # Python's codec is IDNA 2003, which maps some names to others ("ß" to "ss"): only
        # a spelling that reads back as the name written is offered.
        same = taken.encode("ascii").decode("idna") == written
    except UnicodeError:
        return ""
    return taken if same and 0 < len(taken) <= 253 and _is_dns(taken) else ""


def _check_dns(name: str) -> str:
    lowered = name.lower()
    if not name or len(name) > 253 or not _is_dns(lowered):
        taken = _spelling_taken(name) if name else ""
        spelled = f" (a certificate takes it as {taken!r})" if taken else ""
        raise InvalidRequestError(f"dns_names: {name!r} is not a valid DNS name{spelled}")
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


def validate_entry(
    entry: Entry, ids: ServerIds, index: KnownEntries, *, replaces: str = ""
) -> Entry:
    """A checked copy of `entry` (DNS names lowercased, selectors sorted and deduplicated).

    `replaces` names the entry an update replaces: its current SPIFFE ID does not count as a
    parent, since it will be gone once the update is written.
    """
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
    if is_task_id(str(spiffe_id)):
        # The issuer serves such an ID only as an active task's (and agents list it as one):
        # an operator's entry with it would be refused every SVID.
        raise InvalidRequestError(
            f"spiffe_id: a /task/ segment is reserved for task identities "
            f"(<runtime ID>/task/<task id>, made by BeginTask): {spiffe_id}"
        )
    if parent_id.trust_domain != ids.trust_domain:
        raise InvalidRequestError(
            f"parent_id: {parent_id} is not in trust domain {ids.trust_domain}"
        )
    if not (
        parent_id == ids.server
        or ids.is_agent(parent_id)
        or index.has_spiffe_id(str(parent_id), excluding=replaces)
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
    refuse_nul("hint", entry.hint)
    if len(entry.dns_names) > MAX_DNS_NAMES:
        raise InvalidRequestError(
            f"dns_names: {len(entry.dns_names)} names; at most {MAX_DNS_NAMES} allowed"
        )
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
        federates_with=_federates_with(entry.federates_with, ids),
    )


def _federates_with(names: Sequence[str], ids: ServerIds) -> tuple[str, ...]:
    """Foreign trust domain names, bare and sorted (``spiffe://other.org`` is accepted)."""
    out = set()
    for text in names:
        try:
            td = TrustDomain.parse(text)
        except SpiffeIdError as exc:
            raise InvalidRequestError(f"federates_with: {text!r}: {exc}") from None
        if td == ids.trust_domain:
            raise InvalidRequestError(
                f"federates_with: {td} is this server's own trust domain, not a foreign one"
            )
        out.add(td.name)
    if len(out) > MAX_SELECTORS:
        raise InvalidRequestError(f"federates_with: at most {MAX_SELECTORS} trust domains")
    return tuple(sorted(out))


class _BatchView:
    """The entries as the items of a batch checked so far would leave them: the snapshot plus
    an overlay, so checking item i costs O(1) instead of a new snapshot per item."""

    def __init__(self, index: EntryIndex) -> None:
        self._index = index
        self._changed: dict[str, Entry | None] = {}
        self._delta: dict[str, int] = {}

    def get(self, entry_id: str) -> Entry | None:
        if entry_id in self._changed:
            return self._changed[entry_id]
        return self._index.by_id.get(entry_id)

    def has_spiffe_id(self, spiffe_id: str, *, excluding: str = "") -> bool:
        count = len(self._index.by_spiffe_id.get(spiffe_id, ())) + self._delta.get(spiffe_id, 0)
        if excluding:
            old = self.get(excluding)
            if old is not None and old.spiffe_id == spiffe_id:
                count -= 1
        return count > 0

    def put(self, key: str, entry: Entry | None) -> None:
        old = self.get(key)
        if old is not None:
            self._delta[old.spiffe_id] = self._delta.get(old.spiffe_id, 0) - 1
        if entry is not None:
            self._delta[entry.spiffe_id] = self._delta.get(entry.spiffe_id, 0) + 1
        self._changed[key] = entry


def check_creates(
    entries: Sequence[Entry], ids: ServerIds, index: EntryIndex
) -> list[Entry | ItemError]:
    """Per item: the clean entry to store, or the error that refuses it. An entry may name as
    its parent a node entry created earlier in the same batch."""
    view = _BatchView(index)
    checked: list[Entry | ItemError] = []
    for position, entry in enumerate(entries):
        try:
            if entry.id:
                validate_entry_id(entry.id)
                if view.get(entry.id) is not None:
                    raise AlreadyExistsError(f"entry id {entry.id} already exists")
            clean = validate_entry(replace(entry, revision=0, created_at=0), ids, view)
        except (InvalidRequestError, AlreadyExistsError) as exc:
            checked.append(exc)
            continue
        view.put(clean.id or f"{_NEW}{position}", clean)
        checked.append(clean)
    return checked


def check_updates(
    entries: Sequence[Entry], ids: ServerIds, index: EntryIndex
) -> list[Entry | ItemError]:
    """Per item: the clean replacement (carrying the revision it must find stored: the
    caller's when given, else the current one), or the error that refuses it."""
    view = _BatchView(index)
    checked: list[Entry | ItemError] = []
    for entry in entries:
        try:
            existing = view.get(validate_entry_id(entry.id))
            if existing is None:
                raise NotFoundError(f"entry {entry.id} not found")
            if entry.revision and entry.revision != existing.revision:
                raise ConflictError(
                    f"entry {entry.id} changed meanwhile: revision {existing.revision}, "
                    f"update was based on {entry.revision}"
                )
            clean = validate_entry(
                replace(entry, revision=existing.revision, created_at=existing.created_at),
                ids,
                view,
                replaces=entry.id,
            )
        except (InvalidRequestError, NotFoundError, ConflictError) as exc:
            checked.append(exc)
            continue
        # Later items of the batch see the revision this write will store.
        view.put(clean.id, replace(clean, revision=clean.revision + 1))
        checked.append(clean)
    return checked


def check_deletes(entry_ids: Sequence[str], index: EntryIndex) -> list[str | ItemError]:
    """Per item: the id to delete, or the error that refuses it (a bad or unknown id, or one
    deleted earlier in the same batch)."""
    view = _BatchView(index)
    checked: list[str | ItemError] = []
    for entry_id in entry_ids:
        try:
            if view.get(validate_entry_id(entry_id)) is None:
                raise NotFoundError(f"entry {entry_id} not found")
        except (InvalidRequestError, NotFoundError) as exc:
            checked.append(exc)
            continue
        view.put(entry_id, None)
        checked.append(entry_id)
    return checked
