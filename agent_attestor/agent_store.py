"""The agent's own SVID, key and trust bundle on disk, so a restart needs no new join token."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from agent_attestor import _crypto
from agent_attestor.data_file import read_data_file
from svid._der import certs_to_pem, der_concat, parse_der_certs
from svid._durable import replace_durably, write_aside, write_durably
from svid._errors import SvidParseError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentSvid:
    spiffe_id: str
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes = field(repr=False)

    @property
    def not_before(self) -> float:
        return self.chain[0].not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.chain[0].not_valid_after_utc.timestamp()

    @property
    def serial_hex(self) -> str:
        return format(self.chain[0].serial_number, "x")

    @property
    def chain_pem(self) -> bytes:
        return certs_to_pem(self.chain)

    @property
    def key_pem(self) -> bytes:
        return _crypto.key_pem(self.key)


def _write_private(path: Path, data: bytes) -> None:
    """Write via a 0600 temp file and rename, so a crash never leaves a half-written key."""
    write_file(path, data, 0o600)


def write_file(path: Path, data: bytes, mode: int) -> None:
    """`data` in a fresh file of `mode`, fsynced and renamed over `path`: a crash never leaves
    it half written, and a file or symlink planted at the name never receives it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_durably(path, data, mode)


def _written_aside(path: Path, data: bytes, mode: int) -> Path:
    """`data` in a fresh file of `mode` beside `path` (its `.tmp`), fsynced: the caller renames
    it over `path`."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return write_aside(path, data, mode)


def _identity(path: Path) -> list[int]:
    """Which file is at `path` (a rename keeps all three; another writer's file, even of the
    same bytes, differs in its mtime at least)."""
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns]


# In bundle.der.sequence beside the digests (sequence_floor, and the files they were saved
# in: bundle_sequence); no digest is named so.
_FLOOR = "floor"
_FILES = "files"
_SPENDING_BYTES = 4096  # the spending file holds a join token's ID, far shorter


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ages_in(doc: dict[str, object]) -> dict[str, int]:
    """The sequence file's ages by digest."""
    return {k: v for k, v in doc.items() if k != _FLOOR and _is_int(v)}


def _floor_in(doc: dict[str, object]) -> int | None:
    floor = doc.get(_FLOOR)
    return floor if _is_int(floor) else None


class AgentStore:
    def __init__(self, svid_path: Path, key_path: Path, bundle_path: Path) -> None:
        self.svid_path = svid_path
        self.key_path = key_path
        self.bundle_path = bundle_path

    @property
    def _next_key_path(self) -> Path:
        return self.key_path.with_name(self.key_path.name + ".next")

    @property
    def spending_path(self) -> Path:
        return self.svid_path.with_name(self.svid_path.name + ".spending")

    def note_spending(self, token_id: str) -> None:
        """Before a join token is sent: its ID (never its secret), until the SVID it buys is
        saved (forget_spending). Written first, it also proves the directory takes writes."""
        write_file(self.spending_path, token_id.encode(), 0o600)

    def spent_unsaved(self) -> str:
        """The ID of the join token a run sent without saving what it bought ('' if none)."""
        try:
            # Read as every data file is: a FIFO at its name hung the start waiting for a writer.
            raw = read_data_file(self.spending_path, "join token spending file", _SPENDING_BYTES)
            return raw.decode() if raw is not None else ""
        except (OSError, UnicodeDecodeError):
            return ""

    def forget_spending(self) -> None:
        # Left behind, it only adds a reason to the message of that same token refused.
        with contextlib.suppress(OSError):
            self.spending_path.unlink(missing_ok=True)

    def save_svid(self, svid: AgentSvid) -> None:
        # The new key waits beside the old one until its chain is in place: a crash between
        # the files leaves the old pair, or the new chain with its key still under the `.next`
        # name, which load_svid also tries. Replacing the key first left the old chain with
        # a key that does not fit: an identity lost, and a join token works once.
        _write_private(self._next_key_path, _crypto.key_der(svid.key))
        _write_private(self.svid_path, der_concat(svid.chain))
        replace_durably(self._next_key_path, self.key_path)

    def remove_svid(self) -> None:
        """Forget the saved identity (the server refused it); its key is useless without it."""
        self.svid_path.unlink(missing_ok=True)

    def load_svid(self) -> AgentSvid | None:
        """The saved identity, or None: none saved yet, or one that cannot be used (logged). A
        save a kill cut short before its key's rename is finished here."""
        chain_der = read_data_file(self.svid_path, "agent SVID file")
        if chain_der is None:
            return None
        problem = "its private key file is missing"
        for key_path in (self.key_path, self._next_key_path):
            key_der = read_data_file(key_path, "agent key file")
            if key_der is None:
                continue
            try:
                chain = tuple(parse_der_certs(chain_der))
                key = serialization.load_der_private_key(key_der, None)
                svid = _crypto.issued_svid("agent", chain_der, key)
            except (ValueError, TypeError, UnsupportedAlgorithm, SvidParseError) as exc:
                problem = str(exc)
                continue
            if key_path == self._next_key_path:
                # A save killed before its last step: finished now. Left under the `.next`
                # name, the key was overwritten by the next save's first write, and a disk
                # refusing that save's chain then left the chain on disk without its key.
                with contextlib.suppress(OSError):  # refused too: loaded all the same
                    replace_durably(self._next_key_path, self.key_path)
            return AgentSvid(spiffe_id=svid.spiffe_id, chain=chain, key=key)
        self._unusable(problem)
        return None

    def _unusable(self, problem: str) -> None:
        # Without this line the agent just attests again, and with a join token already spent
        # that fails: it would serve nothing with no word as to why.
        log.error(
            "the agent SVID on disk is unusable; attesting again. A join token works once: if "
            "attestation is refused, remove both files and start the agent with a new "
            "join token (--join-token-file; svid-server token generate)",
            extra={
                "svid_file": str(self.svid_path),
                "key_file": str(self.key_path),
                "problem": problem[:200],
            },
        )

    @property
    def sequence_path(self) -> Path:
        """Beside bundle.der (kept in the plain DER form): which bundle sequence it holds."""
        return self.bundle_path.with_name(self.bundle_path.name + ".sequence")

    def save_bundle(self, authorities: tuple[bytes, ...], sequence: int = 0, seen: int = 0) -> None:
        """The roots of bundle `sequence` for the next start. The sequence file is written
        first and names both the file on disk and the new one (by digest), so whichever of the
        two a crash or a refusal leaves, bundle_sequence tells its age. `seen`: the highest
        sequence the agent has held (the state file's bundle's too): a `sequence` below it, or
        below the file's, is another lineage's (sequence_floor)."""
        new = b"".join(authorities)
        new_digest = _digest(new)
        # The sequence file and bundle.der read once each: their ages, floor and digests.
        doc = self._sequence_doc()
        ages: dict[str, object] = {new_digest: sequence}
        files: dict[str, list[int]] = {}
        on_disk = self._bundle_bytes()
        if on_disk is not None:
            disk_digest = _digest(on_disk)
            current_age = self._age(disk_digest, doc)  # None: unknown, and not carried
            if current_age is not None and disk_digest not in ages:
                with contextlib.suppress(OSError):
                    files[disk_digest] = _identity(self.bundle_path)
                    ages[disk_digest] = current_age
        high = max([seen, *_ages_in(doc).values(), _floor_in(doc) or 0])
        if sequence < high:
            ages[_FLOOR] = high
        tmp = _written_aside(self.bundle_path, new, 0o600)
        try:
            files[new_digest] = _identity(tmp)  # as it will be at bundle.der's name
            try:
                _write_private(self.sequence_path, json.dumps({**ages, _FILES: files}).encode())
            except OSError:
                self._forget_sequences(new_digest, sequence)
            replace_durably(tmp, self.bundle_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def sequence_floor(self) -> int | None:
        """The highest sequence of the bundles held before the server's went back (a datastore
        restored from a backup, or another one: a rebuilt server), while bundle.der's is still
        below it; None when it did not go back. A state file's bundle up to it may be of the
        lineage before, its sequence no measure of its age beside bundle.der's."""
        return _floor_in(self._sequence_doc())

    def _forget_sequences(self, new: str, sequence: int) -> None:
        """The sequence file was not brought up to date: removed, so bundle.der's age is unknown
        (bundle_sequence: None), never a wrong one. Left, it could name the new roots' digest with
        the older sequence they were seen at before (a root added, then removed again): taken for
        that age at a start, the state file's bundle between the two replaced them, bringing the
        removed root back. Not removable and naming it so: OSError, bundle.der left as it is."""
        try:
            self.sequence_path.unlink()
        except FileNotFoundError:
            return
        except OSError:
            if _ages_in(self._sequence_doc()).get(new, sequence) != sequence:
                raise

    def _sequence_doc(self) -> dict[str, object]:
        """bundle.der.sequence as saved; {} when it cannot be read or is damaged (the ages are
        unknown). Read only if a regular file: a FIFO at its name hung the start for good."""
        try:
            raw = read_data_file(self.sequence_path, "bundle sequence file")
            doc = json.loads(raw) if raw is not None else {}
        except (OSError, ValueError, RecursionError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _bundle_bytes(self) -> bytes | None:
        """bundle.der's bytes; None when there is none or it cannot be read (a FIFO at its
        name is refused, not read: that hung)."""
        try:
            return read_data_file(self.bundle_path, "trust bundle file")
        except OSError:
            return None

    def bundle_sequence(self) -> int | None:
        """The bundle sequence of the roots in bundle.der; None when unknown (no file, or one
        an agent saved before sequences were kept beside it, or one another writer put there
        since: an older agent, run again, rewrites bundle.der and leaves this file, whose
        digests may name the same roots seen at an older sequence)."""
        der = self._bundle_bytes()
        if der is None:
            return None
        return self._age(_digest(der), self._sequence_doc())

    def _age(self, digest: str, doc: dict[str, object]) -> int | None:
        """bundle_sequence of the bundle.der of `digest`, by the sequence file's `doc`."""
        files = doc.get(_FILES)
        if isinstance(files, dict) and digest in files:
            try:
                if files[digest] != _identity(self.bundle_path):
                    return None
            except OSError:
                return None
        return _ages_in(doc).get(digest)

    def load_bundle(self) -> list[x509.Certificate] | None:
        """The saved roots; None when there are none (or none parse: the server is then
        verified with the trust bundle given). DataFileUnreadableError: see _read."""
        der = read_data_file(self.bundle_path, "trust bundle file")
        if der is None:
            return None
        try:
            return parse_der_certs(der)
        except SvidParseError:
            return None
