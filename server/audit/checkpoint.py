"""Signed checkpoints of the audit chain head, kept outside the audit database.

A hash chain stops no one who can rewrite the whole database: they re-hash it. A checkpoint
is the head (seq, hash, event count) at a moment, signed by a key whose clear form never
enters the datastore (servers sharing one keep it there sealed under the key-encryption key
only: CheckpointSigner.load_shared), and written to a JSON-lines file an operator can ship
elsewhere (and pushed to node agents, which keep each one they accept: server/node_api.py). `audit
verify --anchor FILE` then proves the log still holds what each checkpoint names.

The line format, its signature and its parser are svid's AuditCheckpoint
(svid/_audit_checkpoint.py), shared with the agents. Trust in the key comes from elsewhere:
pin the public key file you shipped off the host (`--anchor-key`); an unpinned verify only
shows the file is self-consistent.

Prune records (server/audit/retention.py) share the file, the key and the format, with one
more signed field, `"kind":"prune"`: `seq`/`hash` name the last event retention removes (the
remaining chain links to that hash), `count` how many events this prune removes, `time` when it
was signed, which is before anything is deleted, and (records signed since it existed)
`last_ts` the `ts` of the last event it removes (server/audit/prune_age.py checks it).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.audit.errors import AuditError
from server.audit.verify import Anchor
from server.ca.keys import EC_P256, KeyStore, generate_key, spki_der
from server.ca.sealing import KeyEncryptionKey
from server.datastore.base import AuditCheckpointStore
from server.datastore.records import SealedAuditKey
from svid import AuditCheckpoint, AuditCheckpointError
from svid._audit_checkpoint import CHECKPOINT, PRUNE, cut_torn_tail, key_id_of, signed_bytes
from svid._bounded_read import read_bounded
from svid._clock import format_utc
from svid._durable import fsync_dir, write_aside, write_durably
from svid._small_file import (
    SmallFileError,
    check_regular_file,
    open_regular_file,
    read_small_file,
)

_log = logging.getLogger("svid.server.audit")
KEY_SLOT = "checkpoint"
# The sealed key's binding (server/ca/sealing.py): a sealed CA key cannot pass for it.
SEALED_SLOT = "audit-checkpoint"
SEALED_KIND = "audit"
# Next to the datastore in the data dir, never inside it.
KEY_DIR = "audit-key"
PUBLIC_KEY_FILE = "audit-checkpoint-key.pub.pem"
CHECKPOINT_FILE = "audit-checkpoints.jsonl"
# Past this the file is rotated to `<file>.1` (CheckpointFile): about 100,000 lines, as the
# agent's copy keeps (agent_attestor/checkpoint_store.py MAX_LINES), ten weeks at one checkpoint
# a minute. Bytes, not lines: servers sharing a data dir all write the file, and its size is
# what fstat tells each of them under the lock, where a line count would need the whole file.
MAX_BYTES = 40 * 1024 * 1024
# How much of the file one read takes when reading it from the end.
_CHUNK = 64 * 1024
# The published public key, read at most this far (to verify with, or to compare before a
# rewrite): a P-256 key's PEM is 178 bytes; room for comments and line ends around it.
MAX_PUBLIC_KEY_BYTES = 64 * 1024
__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_FILE",
    "KEY_DIR",
    "KEY_SLOT",
    "MAX_BYTES",
    "MAX_PUBLIC_KEY_BYTES",
    "PRUNE",
    "PUBLIC_KEY_FILE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointFile",
    "CheckpointSigner",
    "anchor_of",
    "load_public_key",
]


class CheckpointError(AuditError):
    """A checkpoint line or key cannot be read, or does not verify; the message says which."""


# The server's name for the shared line type.
Checkpoint = AuditCheckpoint


def anchor_of(cp: Checkpoint) -> Anchor:
    """What verify checks the log against for this line."""
    when = format_utc(cp.time)
    if cp.kind == PRUNE:
        # Its count is what that prune removed, not the log's length: not a length bound.
        return Anchor(
            cp.seq, cp.hash, source=f"the prune record of {when}", signed=True, pruned=True
        )
    return Anchor(cp.seq, cp.hash, cp.count, source=f"the checkpoint of {when}", signed=True)


def load_public_key(path: Path) -> tuple[str, ec.EllipticCurvePublicKey]:
    """(key id, key) from a PEM public key file, as published next to the checkpoints."""
    try:
        # Read to a bound: `audit verify --anchor-key /dev/zero` read until memory ran out.
        pem = read_bounded(path, MAX_PUBLIC_KEY_BYTES)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if pem is None:
        raise CheckpointError(
            f"{path} holds no PEM public key (more than {MAX_PUBLIC_KEY_BYTES} bytes)"
        )
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise CheckpointError(f"{path} holds no PEM public key") from None
    except UnsupportedAlgorithm:
        # Well-formed PEM of a curve or algorithm the library lacks: not a ValueError.
        raise CheckpointError(f"{path} holds no ECDSA P-256 public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CheckpointError(f"{path} holds no ECDSA P-256 public key")
    return key_id_of(spki_der(key)), key


class CheckpointSigner:
    """Signs checkpoints with one ECDSA P-256 key kept in its own 0600 file."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        der = spki_der(key.public_key())
        self.key_id = key_id_of(der)
        self.public_key_b64 = base64.b64encode(der).decode("ascii")

    @classmethod
    def load_or_create(cls, data_dir: Path) -> CheckpointSigner:
        """The data dir's checkpoint key, made at first start; its public key is (re)published
        as PUBLIC_KEY_FILE so an operator can copy it off the host and pin it."""
        signer = cls(_local_key(KeyStore(data_dir / KEY_DIR)))
        signer._publish(data_dir / PUBLIC_KEY_FILE)
        return signer

    @classmethod
    def load_shared(
        cls, data_dir: Path, store: AuditCheckpointStore, kek: KeyEncryptionKey, now: int
    ) -> CheckpointSigner:
        """The trust domain's checkpoint key, for servers sharing one datastore (each with its
        own data dir) and one key-encryption key: one key signs every checkpoint and prune
        record whichever server holds the housekeeping lease, so an agent that moves to another
        server, and an operator on any server, check them all against one pinned key.

        The first server to start offers its data dir's key, sealed under the KEK (the
        datastore holds it encrypted only: whoever can write the database cannot sign); every
        other server adopts the stored one, keeps it as its data dir's key (its own is kept
        aside as `checkpoint-replaced-<id>`) and publishes its public key. Lines its old key
        signed still verify on their own, under the key they carry.
        """
        keys = KeyStore(data_dir / KEY_DIR)
        fresh = not keys.exists(KEY_SLOT)
        local = _local_key(keys)
        der = spki_der(local.public_key())
        key_id = key_id_of(der)
        sealed = kek.seal(local, SEALED_SLOT, SEALED_KIND, key_id)
        stored = store.offer_audit_key(SealedAuditKey(key_id, der, sealed, now))
        key = local
        if stored.key_id != key_id:
            if key_id_of(stored.public_der) != stored.key_id:
                raise CheckpointError(
                    "the datastore's audit checkpoint key does not match its key id"
                )
            opened = kek.unseal(
                stored.sealed_key, SEALED_SLOT, SEALED_KIND, stored.key_id, stored.public_der
            )
            if not isinstance(opened, ec.EllipticCurvePrivateKey):
                raise CheckpointError("the datastore's audit checkpoint key is not an EC key")
            key = _p256(opened)
            if not fresh:
                # It may have signed checkpoints an operator pinned: never lose it.
                keys.save(f"{KEY_SLOT}-replaced-{key_id[:16]}", local)
                _log.warning(
                    "adopted the trust domain's audit checkpoint key from the datastore; this "
                    "server's own key is kept aside",
                    extra={"key_id": stored.key_id[:16], "replaced_key_id": key_id[:16]},
                )
            keys.save(KEY_SLOT, key)
        signer = cls(key)
        signer._publish(data_dir / PUBLIC_KEY_FILE)
        return signer

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(
        self,
        seq: int,
        digest: str,
        count: int,
        time: float,
        kind: str = CHECKPOINT,
        *,
        last_ts: float | None = None,
    ) -> Checkpoint:
        signature = self._key.sign(
            signed_bytes(seq, digest, count, time, self.key_id, kind=kind, last_ts=last_ts),
            ec.ECDSA(hashes.SHA256()),
        )
        return Checkpoint(
            seq=seq,
            hash=digest,
            count=count,
            time=time,
            key_id=self.key_id,
            public_key=self.public_key_b64,
            sig=base64.b64encode(signature).decode("ascii"),
            kind=kind,
            last_ts=last_ts,
        )

    def _publish(self, path: Path) -> None:
        pem = self.public_pem()
        try:
            # Compared as read_small_file reads (a FIFO there is not waited on, a link not
            # followed), and rewritten through the one durable writer: the temporary file
            # was renamed unfsynced, and a link planted at its name was written through.
            with contextlib.suppress(SmallFileError):
                if read_small_file(path, max_bytes=MAX_PUBLIC_KEY_BYTES, follow_links=False) == pem:
                    return
            write_durably(path, pem, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot publish the checkpoint public key: {e}") from None


def _local_key(keys: KeyStore) -> ec.EllipticCurvePrivateKey:
    """The data dir's checkpoint key, made when there is none."""
    if keys.exists(KEY_SLOT):
        key = keys.load(KEY_SLOT)
    else:
        key = generate_key(EC_P256)
        keys.save(KEY_SLOT, key)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CheckpointError("the audit checkpoint key is not an ECDSA P-256 key")
    return _p256(key)


def _p256(key: ec.EllipticCurvePrivateKey) -> ec.EllipticCurvePrivateKey:
    if key.curve.name != "secp256r1":
        raise CheckpointError("the audit checkpoint key is not an ECDSA P-256 key")
    return key


class CheckpointFile:
    """The JSON-lines file checkpoints are appended to, each line fsynced before it counts.

    Mode 0644: it holds heads and signatures only, meant to be copied elsewhere.

    Append-only, as the agent's copy is: no line is ever changed, so a copy shipped off the host
    stays a prefix of the file until it is rotated. Bounded as that copy is, by dropping the
    oldest: a line that would take the file past `max_bytes` goes to a new file that starts
    with the newest checkpoint and prune record, and the full one becomes `<file>.1` (an older
    `.1` is dropped; ship both off the host well within that time). Each file is an anchor file
    on its own, and the writer, which reads the file from its end only, continues from its
    newest lines.
    """

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self._max_bytes = max_bytes

    @property
    def rotated(self) -> Path:
        """Where the previous file goes when this one reaches its bound."""
        return self.path.with_name(self.path.name + ".1")

    def append(self, checkpoint: Checkpoint) -> None:
        self._append(checkpoint, unless_behind=False)

    def append_unless_behind(self, checkpoint: Checkpoint) -> Checkpoint:
        """Append `checkpoint` unless the file's newest checkpoint signed by the same key is
        already past it: then that one is returned and nothing is written. Checked and written
        under an exclusive lock on the file, so against other processes too.

        Why: servers sharing a data dir (one database) sign with one key into one file, each
        its own committed head. One behind another must not follow it, or the file reads as a
        log cut back in between (CheckpointFile.anchors). The newer one vouches for more: its
        hash chains through every event before it.
        """
        return self._append(checkpoint, unless_behind=True)

    def _append(self, checkpoint: Checkpoint, *, unless_behind: bool) -> Checkpoint:
        line = (checkpoint.to_line() + "\n").encode("utf-8")
        try:
            created = not self.path.exists()
            fd = self._open_locked()
            try:
                if unless_behind:
                    newest = self.newest_signed_by(checkpoint.key_id)
                    if newest is not None and newest.seq > checkpoint.seq:
                        return newest
                cut_torn_tail(fd)
                if os.fstat(fd).st_size + len(line) > self._max_bytes:
                    self._rotate(line)
                    created = True
                else:
                    _write_all(fd, line)
                    os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path.parent)
        except OSError as e:
            raise CheckpointError(f"cannot write the checkpoint file: {e.strerror or e}") from None
        return checkpoint

    def _open_locked(self) -> int:
        """The file, open for appending under an exclusive lock (released by its close). One
        another writer rotated while this one waited for the lock is `.1` by then: let go and
        open the new one."""
        # O_NOFOLLOW: the server never makes this file a link (a rotation renames over one);
        # a link planted at its name had checkpoints appended to the file it named.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        while True:
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as e:
                raise self._not_regular() if e.errno == errno.ELOOP else e from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device
                    raise self._not_regular()
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _not_regular(self) -> OSError:
        """What is at the file's name instead of a regular file, said with its path."""
        try:
            check_regular_file(self.path, follow_links=False)
        except SmallFileError as refused:
            return OSError(f"{self.path} {refused.problem}")
        return OSError(f"{self.path} is not a regular file")

    def _rotate(self, line: bytes) -> None:
        """The full file becomes `.1` and a new one takes the newest checkpoint and prune record,
        in file order (a subsequence of an anchor file is one too), then `line`. The path names
        a complete file throughout: the full one is linked as `.1` before the new one is
        renamed over it, so no other writer ever sees it missing."""
        newest: dict[str, tuple[int, str]] = {}
        for at, text in enumerate(self._lines_from_end()):
            kind = _kind_of(text)
            if kind is not None and kind not in newest:
                newest[kind] = (at, text)
            if len(newest) == 2:
                break
        carried = [text for _, text in sorted(newest.values(), reverse=True)]
        head = "".join(text + "\n" for text in carried).encode("utf-8") + line
        linked = self.path.with_name(self.rotated.name + ".tmp")
        # A fresh file (write_aside): opened with O_TRUNC, a link planted at its name had the
        # file it names truncated and overwritten.
        fresh = write_aside(self.path, head, 0o644)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(linked)
        os.link(self.path, linked)
        os.replace(linked, self.rotated)
        os.replace(fresh, self.path)
        _log.warning(
            "the audit checkpoint file reached its bound: moved it aside, the one before it "
            "dropped; ship both off the host",
            extra={"rotated_to": str(self.rotated), "max_bytes": self._max_bytes},
        )

    def newest_signed_by(self, key_id: str) -> Checkpoint | None:
        """The newest checkpoint line whose signature verifies under `key_id`'s key: a line
        anyone could have added must not stop a real checkpoint from being written."""
        return self._newest_verified(key_id, lambda cp: cp.kind == CHECKPOINT)

    def newest_signed_through(self, key_id: str, seq: int) -> Checkpoint | None:
        """The last line, checkpoint or prune record, that `key_id`'s key signed (its signature
        verified) for an event at or before `seq`."""
        return self._newest_verified(key_id, lambda cp: cp.seq <= seq)

    def oldest_signed_from(self, key_id: str, seq: int) -> Checkpoint | None:
        """The line, checkpoint or prune record, with the lowest seq at or after `seq` that
        `key_id`'s key signed (its signature verified). Read from the end until a checkpoint
        of that key names an earlier seq: checkpoints follow the log forward in the file
        (CheckpointFile.anchors), where a prune record signed lately names an old seq.

        Read newest first, each line has a lower seq than the one before: verifying each as it
        came verified every line back to `seq` (a month of minutely checkpoints, seconds of
        CPU under the checkpointer's lock at every hourly prune). Only the lowest is wanted,
        so the candidates are verified after the walk, lowest first, until one holds.

        A file rotated since `seq` was signed starts with the checkpoint newest at its rotation
        (_rotate), up to the whole retention window after `seq`: the walk goes on into the
        file moved aside, else every prune until the next rotation read back and hashed every
        event from its target to there (a million, at every hourly prune)."""
        candidates: list[Checkpoint] = []
        if self._collect_from(self._lines_from_end(), key_id, seq, candidates):
            with contextlib.suppress(CheckpointError):  # none there: the current file's pin
                rotated = CheckpointFile(self.rotated)._lines_from_end()
                self._collect_from(rotated, key_id, seq, candidates)
        for cp in sorted(candidates, key=lambda c: c.seq):
            try:
                cp.verify_signature(cp.public_key_object())
            except AuditCheckpointError:
                continue
            return cp
        return None

    @staticmethod
    def _collect_from(
        lines: Iterator[str], key_id: str, seq: int, candidates: list[Checkpoint]
    ) -> bool:
        """Add to `candidates` `key_id`'s lines at or after `seq`, newest first, until a
        checkpoint of that key names an earlier seq; True when none did (read on before)."""
        for line in lines:
            try:
                cp = Checkpoint.parse(line)
            except AuditCheckpointError:
                continue
            if cp.key_id != key_id:
                continue
            if cp.seq < seq:
                if cp.kind == CHECKPOINT:
                    return False
                continue
            candidates.append(cp)
        return True

    def _newest_verified(
        self, key_id: str, wanted: Callable[[Checkpoint], bool]
    ) -> Checkpoint | None:
        for line in self._lines_from_end():
            try:
                cp = Checkpoint.parse(line)
                if cp.key_id != key_id or not wanted(cp):
                    continue
                cp.verify_signature(cp.public_key_object())
            except AuditCheckpointError:
                continue
            return cp
        return None

    def last(self, kind: str = CHECKPOINT) -> Checkpoint | None:
        """The newest complete, parsable line of `kind` (not verified): what the writer
        continues from."""
        for line in self._lines_from_end():
            try:
                cp = Checkpoint.parse(line)
            except AuditCheckpointError:
                continue
            if cp.kind == kind:
                return cp
        return None

    def _lines_from_end(self) -> Iterator[str]:
        """The complete lines, newest first, read from the end of the file as far as the
        caller goes: what the writer needs is near the end, and reading the whole file for it
        made each checkpoint cost more than the one before."""
        try:
            fd, _ = open_regular_file(self.path, follow_links=True)
        except SmallFileError as refused:
            if refused.missing:
                return
            raise CheckpointError(f"cannot read {self.path}: {_said(refused)}") from None
        try:
            with os.fdopen(fd, "rb") as f:
                end = _complete_end(f)
                tail = b""  # the start of a line whose rest was read already
                while end > 0:
                    start = max(0, end - _CHUNK)
                    f.seek(start)
                    parts = (f.read(end - start) + tail).split(b"\n")
                    end = start
                    tail = parts.pop(0) if end > 0 else b""
                    for raw in reversed(parts):
                        if raw.strip():
                            yield self._decoded(raw)
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e}") from None

    def _decoded(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"cannot read {self.path}: {e}") from None

    def _lines(self) -> list[str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {self.path}: {e}") from None
        lines = text.split("\n")
        # A crash mid-write leaves a last line without its newline: not a checkpoint yet.
        return [line for line in lines[:-1] if line.strip()]

    def anchors(self, pinned_key_id: str | None = None) -> tuple[list[Anchor], str]:
        """Every checkpoint and prune record, verified, as anchors (prune records flagged
        `pruned`); and a note on which key was trusted.

        Each line must parse and its signature verify. Lines signed by the trusted key (the
        pinned one, else the newest line's) are the anchors; among them checkpoints' seq and
        count never go back, prune records' seq never goes back, no checkpoint names less than
        an earlier prune removed, and one seq never has two hashes. Lines by other keys are
        skipped and counted in the note. Raises CheckpointError naming the first bad line.
        """
        lines = self._lines()
        if not lines:
            raise CheckpointError(f"{self.path} holds no checkpoint")
        parsed: list[tuple[int, Checkpoint]] = []
        keys: dict[tuple[str, str], ec.EllipticCurvePublicKey] = {}
        for number, line in enumerate(lines, 1):
            try:
                cp = Checkpoint.parse(line)
                # Lines repeat one key: decode it once per (id, encoding).
                key = keys.get((cp.key_id, cp.public_key))
                if key is None:
                    key = keys[(cp.key_id, cp.public_key)] = cp.public_key_object()
                cp.verify_signature(key)
            except AuditCheckpointError as e:
                raise CheckpointError(f"{self.path} line {number}: {e}") from None
            parsed.append((number, cp))
        if pinned_key_id is not None:
            key_id = pinned_key_id
            note = f"key {key_id[:16]} (pinned)"
        else:
            key_id = parsed[-1][1].key_id
            note = f"key {key_id[:16]} (from the file itself, not pinned: see --anchor-key)"
        mine = [(n, cp) for n, cp in parsed if cp.key_id == key_id]
        if not mine:
            raise CheckpointError(f"{self.path}: no checkpoint is signed by key {key_id[:16]}")
        # A line's key_id is the hash of the key it carries and verified under: the same id is
        # the same key, so every line kept here is signed by the trusted one.
        _check_order(self.path, mine)
        skipped = len(parsed) - len(mine)
        if skipped:
            note += f"; {skipped} checkpoint(s) by other keys skipped"
        return [anchor_of(cp) for _, cp in mine], note


def _check_order(path: Path, checkpoints: Sequence[tuple[int, Checkpoint]]) -> None:
    seen: dict[int, str] = {}
    before: Checkpoint | None = None
    pruned = 0
    for number, cp in checkpoints:
        if seen.setdefault(cp.seq, cp.hash) != cp.hash:
            raise CheckpointError(
                f"{path} line {number}: seq {cp.seq} was signed with two different hashes"
            )
        if cp.kind == PRUNE:
            if cp.seq < pruned:
                raise CheckpointError(
                    f"{path} line {number}: a prune through seq {cp.seq} comes after one "
                    f"through seq {pruned}"
                )
            pruned = cp.seq
            continue
        # A prune only ever removes events at or before the head it saw, and heads only grow.
        if cp.seq < pruned:
            raise CheckpointError(
                f"{path} line {number}: checkpoint seq {cp.seq} comes after a prune through "
                f"seq {pruned}: the log was cut back in between"
            )
        if before is not None and (cp.seq < before.seq or cp.count < before.count):
            raise CheckpointError(
                f"{path} line {number}: seq {cp.seq} ({cp.count} events) comes after seq "
                f"{before.seq} ({before.count} events): the log was cut back in between"
            )
        before = cp


def _complete_end(f: BinaryIO) -> int:
    """Where the file's last complete line ends: a torn last line (a crash cut its write short,
    no newline yet) is not a checkpoint."""
    at = f.seek(0, os.SEEK_END)
    while at > 0:
        start = max(0, at - _CHUNK)
        f.seek(start)
        newline = f.read(at - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        at = start
    return 0


def _said(refused: SmallFileError) -> str:
    """Why a checkpoint or key file was not read, after "cannot read PATH: "."""
    return refused.strerror or f"it {refused.problem}"


def _kind_of(line: str) -> str | None:
    """A line's kind, None for one that does not parse (not carried into a new file)."""
    try:
        return Checkpoint.parse(line).kind
    except AuditCheckpointError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write part of `data` (a disk filling up): write the rest, or raise."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
