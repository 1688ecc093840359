"""One audit event, its canonical encoding and its place in the hash chain.

Canonical encoding (what the hash covers): every field of the event except `hash`, as a JSON array
of their values in the fixed order of CANONICAL_FIELDS (seq, event_id, ts, kind, agent_id, node_id,
on_behalf_of, resource, action, decision, reason, task_id, risk, credential_id, policy_ids,
policy_set_hash, ttl, latency_us, extra, prev_hash), no insignificant whitespace (separators ","
and ":"), non-ASCII characters kept as UTF-8 (ensure_ascii off), floats in Python's shortest
round-trip form, absent values as null, `policy_ids` as an array and `extra` as an object with its
keys sorted (at every depth; keys are text, as JSON reads them back: text_keyed_extra); then
encoded as UTF-8. An array in a fixed order rather than an object
with sorted keys: same information, and it is encoded without building a dict per event.

    hash = sha256(bytes.fromhex(prev_hash) || canonical(event without hash)).hexdigest()

The first event chains from GENESIS_HASH. Because `seq` and `prev_hash` are inside the hashed
encoding, an edited, reordered or deleted event breaks the chain at or right after it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from server.audit.errors import AuditError, SecretInAuditError, UnstorableTextError
from server.datastore.records import AUDIT_COLUMNS

GENESIS_HASH = "0" * 64
MAX_EXTRA_BYTES = 4096
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# Three base64url segments with a JSON header ("eyJ" = '{"'): a compact JWS/JWE.
# What every secret check looks for first: a value without either cannot hold a JWT or a PEM
# block (the fast paths spell them inline; SECRET_MARKERS is for code outside this package).
SECRET_MARKERS = ("eyJ", "-----BEGIN")
# What a fast path outside the log (a draft's body made elsewhere, see AuditLog.record_later)
# looks for before it skips the log's own check: a secret marker, or a NUL (refuse_nul).
CHECK_MARKERS = (*SECRET_MARKERS, "\x00")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.")
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----")


class EventKind(StrEnum):
    NODE_ATTESTATION = "node_attestation"
    X509_ISSUED = "x509_issued"
    JWT_MINTED = "jwt_minted"
    JWT_VALIDATED = "jwt_validated"
    TASK_BEGIN = "task_begin"
    TASK_END = "task_end"
    DENIAL = "denial"
    REVOCATION = "revocation"
    POLICY_RELOAD = "policy_reload"
    AGENT_EVICTED = "agent_evicted"
    AGENT_BANNED = "agent_banned"
    CA_KEYS_FORGOTTEN = "ca_keys_forgotten"
    CA_KEYS_TAKEN_BACK = "ca_keys_taken_back"
    DATASTORE_RESTORED = "datastore_restored"
    # Written once the ledger commits again: identity decisions were refused from `began_at`.
    LEDGER_OUTAGE = "ledger_outage"
    AGENT_CERTIFICATE_ADOPTED = "agent_certificate_adopted"


@dataclass(frozen=True)
class EventDraft:
    """What a caller knows about an event; the log adds id, seq, time and chain hashes."""

    kind: str
    agent_id: str | None = None
    node_id: str | None = None
    on_behalf_of: str | None = None
    resource: str | None = None
    action: str | None = None
    decision: str | None = None
    reason: str | None = None
    task_id: str | None = None
    risk: int | None = None
    # A certificate serial (hex) or a JWT's jti: never the credential itself.
    credential_id: str | None = None
    policy_ids: tuple[str, ...] = ()
    policy_set_hash: str | None = None
    ttl: int | None = None
    latency_us: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind = str(self.kind)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "policy_ids", tuple(self.policy_ids))
        if not _KIND.match(kind):
            raise AuditError(f"kind {kind!r} is not a lowercase identifier")
        check_policy_ids(self.policy_ids)
        for name in NUMBER_FIELDS:
            value = getattr(self, name)
            number = column_number(name, value)
            if number is not value:
                object.__setattr__(self, name, number)
        if isinstance(self.reason, str):
            object.__setattr__(self, "reason", storable_reason(self.reason))
        for name, value in self.__dict__.items():
            # Plain text without either marker (nearly every value) needs no closer look for a
            # secret; a secret is refused as one before its NUL is.
            if type(value) is not str or "eyJ" in value or "-----BEGIN" in value:
                check_no_secret(name, value)
            if isinstance(value, str) and "\x00" in value:
                refuse_nul(name)
        if self.extra:
            object.__setattr__(self, "extra", text_keyed_extra(self.extra))


DRAFT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EventDraft))
# The numeric fields, each of its column's kind (see column_number).
NUMBER_FIELDS: tuple[str, ...] = ("risk", "ttl", "latency_us")


def storable_reason(text: str) -> str:
    """`text` with each NUL and lone surrogate written as its Python escape (`\\x00`,
    `\\ud800`), the rest as it is. A reason quotes what others said (a peer's error, an
    attestor's refusal, a foreign issuer's message): refusing it as unstorable let whoever
    wrote one NUL there keep refusals off the log and turn them into the caller's error."""
    if "\x00" not in text and (text.isascii() or _encodes(text)):
        return text
    return "".join(repr(c)[1:-1] if c == "\x00" or "\ud800" <= c <= "\udfff" else c for c in text)


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def refuse_nul(name: str) -> None:
    """UnstorableTextError for the text field `name`, which holds a NUL: SQLite stores one,
    PostgreSQL refuses it at the commit, which then fails every caller sharing it and reads
    as a ledger outage. (Inside policy_ids and extra a NUL is JSON's escape: stored anywhere.)"""
    raise UnstorableTextError(f"{name}: may not contain NUL (0x00)")


def unstorable(error: UnicodeEncodeError) -> UnstorableTextError:
    """What encoding an event's text as UTF-8 raised, as the caller's error: JSON's "\\ud800"
    escape decodes to a lone surrogate, which no UTF-8 holds."""
    return UnstorableTextError(
        f"an audit field holds text that is not UTF-8 (a lone surrogate): {error.reason}"
    )


def check_policy_ids(policy_ids: Any) -> None:
    """Refuse policy ids other than text: verify reads a stored policy_ids as an array of
    strings only (anything else there would have been written behind the log)."""
    if type(policy_ids) is not tuple and type(policy_ids) is not list:
        raise AuditError(f"policy_ids: a {type(policy_ids).__name__}, not a tuple of text")
    for value in policy_ids:
        if type(value) is not str:
            raise AuditError(f"policy_ids: {value!r} is not text")


def column_number(name: str, value: Any) -> Any:
    """`value` of the numeric field `name` as its column stores it: an event is hashed as
    given and read back as the column holds it, so a number of the other kind (300.0 for a
    ttl, 5 for a latency) would verify as EDITED. Whole floats become ints for risk and ttl,
    ints become floats for latency_us; None, or a value already of its kind, is returned
    itself; anything else (a bool, a fraction for a ttl, text) is refused."""
    if value is None:
        return value
    kind = type(value)
    if name == "latency_us":
        if kind is float:
            return value
        if kind is not int:
            raise AuditError(f"latency_us: {value!r} is not a number")
        return float(value)
    if kind is int:
        return value
    if not (kind is float and value.is_integer()):
        raise AuditError(f"{name}: {value!r} is not a whole number")
    return int(value)


@dataclass(frozen=True)
class AuditEvent(EventDraft):
    """A recorded event. Not re-validated on construction: its draft was, and a row read back is
    judged by its hash, not by the rules of today's code."""

    event_id: str = ""
    seq: int = 0
    ts: float = 0.0
    prev_hash: str = GENESIS_HASH
    hash: str = ""

    def __post_init__(self) -> None:
        pass

    def canonical(self) -> bytes:
        """The hashed encoding: every field but `hash` (see the module docstring)."""
        body = [getattr(self, name) for name in CANONICAL_FIELDS]
        body[_POLICY_AT] = list(self.policy_ids)
        body[_EXTRA_AT] = dict(self.extra)
        return canonical_json(body)

    def compute_hash(self) -> str:
        return chain_hash(self.prev_hash, self.canonical())

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in EVENT_FIELDS}
        out["policy_ids"] = list(self.policy_ids)
        out["extra"] = dict(self.extra)
        return out


EVENT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AuditEvent))
# The hashed fields in hash order: the store's audit columns but the row's own `hash`, which
# comes last there. One list, kept by the datastore, so the two cannot drift apart.
assert AUDIT_COLUMNS[-1] == "hash"
CANONICAL_FIELDS: tuple[str, ...] = AUDIT_COLUMNS[:-1]
_POLICY_AT = CANONICAL_FIELDS.index("policy_ids")
_EXTRA_AT = CANONICAL_FIELDS.index("extra")
# One encoder for every call: json.dumps with options builds a new one each time.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(value: Any) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


def canonical_encoder() -> Callable[[Any], str]:
    """`_ENCODER.encode` without building a new C encoder per call (JSONEncoder.encode does).

    Not thread-safe: the encoder's circular-reference markers are shared between calls (and
    cleared after a failed one, which leaves its markers behind). One per single-threaded user.
    """
    # The C accelerator (absent on some interpreters: then the plain encoder is used).
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _ENCODER.encode
    markers: dict[int, Any] = {}
    iterencode = make(
        markers,
        _ENCODER.default,
        json.encoder.encode_basestring,  # ensure_ascii=False
        None,  # indent
        ":",
        ",",
        True,  # sort_keys
        False,  # skipkeys
        False,  # allow_nan
    )

    def encode(value: Any) -> str:
        if isinstance(value, str):  # as JSONEncoder.encode: a bare string skips iterencode
            return _ENCODER.encode(value)
        try:
            return "".join(iterencode(value, 0))
        except BaseException:
            markers.clear()
            raise

    return encode


def event_from_row(row: Mapping[str, Any]) -> AuditEvent:
    """A stored row (policy_ids and extra as JSON text) as an event; not validated."""
    values = dict(row)
    values["policy_ids"] = tuple(json.loads(values["policy_ids"]))
    values["extra"] = json.loads(values["extra"])
    return AuditEvent(**values)


def extra_text(extra: Mapping[str, Any]) -> str:
    """`extra` in its canonical (and stored) form; refuses what cannot be encoded or is too big."""
    if not extra:
        return "{}"
    try:
        text = _ENCODER.encode(dict(extra))
    except (TypeError, ValueError) as e:
        raise AuditError(f"extra is not JSON-encodable: {e}") from e
    return checked_extra_text(text)


def text_keyed_extra(extra: Mapping[str, Any]) -> Mapping[str, Any]:
    """`extra` as it reads back from the log; refuses what extra_text refuses.

    An event is hashed as given but verified as read back from its stored JSON, whose keys
    are text: {10: .., 9: ..} is hashed with its keys in number order ("9" first) and reads
    back in text order ("10" first), a false EDITED. So an `extra` with a key other than text,
    at any depth, is its canonical text decoded again (what the log then stores and hashes);
    one whose keys are all text (nearly every one) is returned itself. Keys already in text
    order are stored in the very text they were before: only events that could never verify
    are recorded otherwise."""
    text = extra_text(extra)
    return extra if keys_are_text(extra) else json.loads(text)


def keys_are_text(value: Any) -> bool:
    """Whether every key of every object in `value` is text, at any depth."""
    # A walk of its own, not recursion: 4 KiB of "[[[[" nest deeper than Python's stack.
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, Mapping):
            if not all(isinstance(k, str) for k in item):
                return False
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return True


def checked_extra_text(text: str) -> str:
    """An encoded `extra`, refused if it is too big (what extra_text checks after encoding)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise unstorable(e) from None
    if size > MAX_EXTRA_BYTES:
        raise AuditError(f"extra is {size} bytes encoded; at most {MAX_EXTRA_BYTES}")
    return text


def joined_names(names: Iterable[str]) -> str:
    """Names svidd does not control (the audience a workload validated a foreign token for)
    as one event field that keeps their boundaries: joined with commas, each name's "%" and ","
    written "%25" and "%2C", so one name holding a comma cannot read as two (split on "," and
    percent-decode each to read them back). A name holding neither is written as is, so the
    field reads as the plain join did. Names svidd accepts itself are refused a comma at intake
    (svid._limits) and joined plainly."""
    return ",".join(n.replace("%", "%25").replace(",", "%2C") for n in names)


def chain_hash(prev_hash: str, canonical: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical).hexdigest()


def check_no_secret(name: str, value: Any) -> None:
    """Refuse values that look like a JWT or a PEM block, anywhere inside `value`."""
    if value is None or isinstance(value, int | float):
        return
    if isinstance(value, str):
        # Substring tests first: the regexes run only on values that could match.
        if "eyJ" in value and _JWT.search(value):
            raise SecretInAuditError(f"{name} looks like a JWT; record its jti instead")
        if "-----BEGIN" in value and _PEM.search(value):
            raise SecretInAuditError(f"{name} looks like a PEM key or certificate")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            check_no_secret(f"{name}.{k}", k)
            check_no_secret(f"{name}.{k}", v)
    elif isinstance(value, list | tuple | set | frozenset):
        for i, v in enumerate(value):
            check_no_secret(f"{name}[{i}]", v)
    elif isinstance(value, bytes | bytearray):
        raise SecretInAuditError(f"{name} is raw bytes; audit fields are text")
