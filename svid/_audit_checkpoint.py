"""One signed audit checkpoint line: the format svid-server writes and node agents keep.

The server signs the head of its audit hash chain (seq, hash, event count, time) with a key
that never enters its datastore, and writes one line per checkpoint, canonical JSON (sorted
keys, compact):

    {"count":N,"hash":H,"key_id":K,"public_key":P,"seq":N,"sig":S,"time":T,"v":1}

The signature (ECDSA P-256, SHA-256, DER, base64) covers the canonical JSON of every field but
`public_key` and `sig`. `key_id` is the sha256 (hex) of the public key's DER
SubjectPublicKeyInfo; `public_key` is that DER in base64, so a line verifies on its own; whether
to trust that key is the reader's decision (a pinned key file, or the server's Sync stream).
A prune record has one more signed field, `"kind":"prune"`; a line without `kind` is a
checkpoint, and a reader that predates prune records rejects one (its signature covers `kind`).
Prune records signed since also carry `"last_ts"`, signed: the time the last removed event was
written, so a prune of history younger than the retention is seen as one (readers before it
reject such a line; records without it still verify).

Both daemons read and write lines through this one type, so they cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from svid._clock import format_utc
from svid._errors import SvidError

VERSION = 1
CHECKPOINT = "checkpoint"
PRUNE = "prune"
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


class AuditCheckpointError(SvidError, ValueError):
    """A checkpoint line or its key cannot be read, or does not verify; the message says which."""


@dataclass(frozen=True)
class AuditCheckpoint:
    seq: int
    hash: str
    count: int
    time: float
    key_id: str
    public_key: str
    sig: str
    kind: str = CHECKPOINT
    # A prune record's last removed event's `ts` (None: a checkpoint, or an older record).
    last_ts: float | None = None

    def _fields(self) -> dict[str, Any]:
        return _body(
            self.seq,
            self.hash,
            self.count,
            self.time,
            self.key_id,
            kind=self.kind,
            last_ts=self.last_ts,
        )

    def signed_bytes(self) -> bytes:
        return _ENCODER.encode(self._fields()).encode("utf-8")

    def to_line(self) -> str:
        """The line, without its newline."""
        body = self._fields()
        body["public_key"] = self.public_key
        body["sig"] = self.sig
        return _ENCODER.encode(body)

    @classmethod
    def parse(cls, line: str) -> AuditCheckpoint:
        """The fields of one line (not verified: see `verify`)."""
        try:
            data = json.loads(line)
        except ValueError:
            raise AuditCheckpointError("not JSON") from None
        if not isinstance(data, dict) or data.get("v") != VERSION:
            raise AuditCheckpointError(f"not a version {VERSION} checkpoint")
        # Absent means a checkpoint (lines written before prune records existed); a present
        # `kind` is signed, so only the value that is written is accepted.
        kind = data.get("kind", CHECKPOINT)
        if "kind" in data and kind != PRUNE:
            raise AuditCheckpointError(f"unknown kind {str(kind)[:40]!r}")
        if "last_ts" in data and kind != PRUNE:
            raise AuditCheckpointError("last_ts on a checkpoint: only prune records carry it")
        try:
            last_ts = None if "last_ts" not in data else _time(data["last_ts"])
            return cls(
                seq=_count(data["seq"]),
                hash=str(data["hash"]),
                count=_count(data["count"]),
                time=float(data["time"]),
                key_id=str(data["key_id"]),
                public_key=str(data["public_key"]),
                sig=str(data["sig"]),
                kind=kind,
                last_ts=last_ts,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise AuditCheckpointError(f"missing or malformed field {e}") from None

    def public_key_der(self) -> bytes:
        """The DER SubjectPublicKeyInfo the line carries, checked against its `key_id`."""
        try:
            der = base64.b64decode(self.public_key, validate=True)
        except (binascii.Error, ValueError):
            raise AuditCheckpointError("public_key is not base64") from None
        if key_id_of(der) != self.key_id:
            raise AuditCheckpointError("public_key does not match key_id")
        return der

    def public_key_object(self) -> ec.EllipticCurvePublicKey:
        return load_public_der(self.public_key_der())

    def verify_signature(self, key: ec.EllipticCurvePublicKey) -> None:
        try:
            key.verify(
                base64.b64decode(self.sig, validate=True),
                self.signed_bytes(),
                ec.ECDSA(hashes.SHA256()),
            )
        except (InvalidSignature, binascii.Error, ValueError):
            raise AuditCheckpointError("signature does not verify") from None


def key_id_of(der: bytes) -> str:
    """The key id of a DER SubjectPublicKeyInfo: its sha256, hex."""
    return hashlib.sha256(der).hexdigest()


def load_public_der(der: bytes) -> ec.EllipticCurvePublicKey:
    """An ECDSA P-256 public key from DER SubjectPublicKeyInfo; AuditCheckpointError if not."""
    try:
        key = serialization.load_der_public_key(der)
    except ValueError:
        raise AuditCheckpointError("public_key is not a DER public key") from None
    except UnsupportedAlgorithm:
        # Well-formed DER of a curve or algorithm the library lacks: not a ValueError.
        raise AuditCheckpointError("public_key is not an ECDSA P-256 key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise AuditCheckpointError("public_key is not an ECDSA P-256 key")
    return key


def signed_bytes(
    seq: int,
    digest: str,
    count: int,
    time: float,
    key_id: str,
    *,
    kind: str = CHECKPOINT,
    last_ts: float | None = None,
) -> bytes:
    """What a checkpoint's signature covers."""
    body = _body(seq, digest, count, time, key_id, kind=kind, last_ts=last_ts)
    return _ENCODER.encode(body).encode("utf-8")


def _time(value: Any) -> float:
    # bool is an int; NaN and infinities are not JSON and not times.
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a time")
    return float(value)


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _body(
    seq: int,
    digest: str,
    count: int,
    time: float,
    key_id: str,
    *,
    kind: str,
    last_ts: float | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": VERSION,
        "seq": seq,
        "hash": digest,
        "count": count,
        "time": time,
        "key_id": key_id,
    }
    # Checkpoints keep the exact bytes they were signed over before prune records existed.
    if kind != CHECKPOINT:
        body["kind"] = kind
    # Prune records signed before it existed keep their exact bytes too.
    if last_ts is not None:
        body["last_ts"] = last_ts
    return body


# Clocks of the servers and the agent differ, and an event's ts is taken just before its commit
# (a checkpoint names committed heads): a prune that many seconds younger is no finding.
PRUNE_AGE_SLACK = 300.0


def young_prune(
    prune: AuditCheckpoint, min_age: float, at: float, signed_before: float | None
) -> str | None:
    """Why `prune` removed events younger than `min_age` seconds at `at`, or None.

    Two signs, either enough: its signed `last_ts` (a key holder may sign a false one), and
    `signed_before`, the newest signing time of a checkpoint by the same key naming fewer
    events than it removes: the head was then before the last removed event, so that event
    was written after it, whatever `last_ts` says. `min_age` 0 checks nothing."""
    if min_age <= 0:
        return None
    limit = at - min_age + PRUNE_AGE_SLACK
    days = f"{min_age / 86400:g} days"
    if prune.last_ts is not None and prune.last_ts > limit:
        return (
            f"the prune record through seq {prune.seq} removes events written less than {days} "
            f"before {format_utc(at)} (its last one at {format_utc(prune.last_ts)})"
        )
    if signed_before is not None and signed_before > limit:
        return (
            f"the prune record through seq {prune.seq} removes events written after a "
            f"checkpoint signed at {format_utc(signed_before)}, less than {days} before "
            f"{format_utc(at)}"
        )
    return None


def cut_torn_tail(fd: int) -> None:
    """Cut off a checkpoint file's last line if it has no newline (a crash or a full disk cut
    its write short): it never counted as a record, and the next line appended to it would make
    one line no parser reads, so the file would fail as an anchor for good. The caller holds
    the file so that no other writer is mid-line (the server's lock, the agent's one writer)."""
    end = os.fstat(fd).st_size
    at = end
    while at > 0:
        start = max(0, at - 4096)
        chunk = os.pread(fd, at - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            at = start + newline + 1
            break
        at = start
    if at < end:
        os.ftruncate(fd, at)
