"""Private keys: generation by configured type, and owner-only PKCS#8 files on disk, each with
the public record of its slot beside it."""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.ca.errors import CaConfigError, KeyStoreError
from svid._durable import write_durably
from svid._small_file import SmallFileError, open_regular_file, read_small_file

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

EC_P256 = "ec-p256"
EC_P384 = "ec-p384"
RSA_2048 = "rsa-2048"
KEY_TYPES = (EC_P256, EC_P384, RSA_2048)
DEFAULT_KEY_TYPE = EC_P256

_SLOT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Beside each key file: its slot as journaled (server/ca/adoption.py), public, so a datastore
# restored from before the key was made can journal it again.
RECORD_SUFFIX = ".slot.json"
# Far above any PEM key (RSA-4096 PKCS#8 is ~3.3 KB): more is not one.
_MAX_KEY_BYTES = 64 * 1024
# A record carries up to LINEAGE_DEPTH (64) links, each with a CA certificate twice in base64:
# ~150 KB with P-256 keys, more with RSA. Bounded by the depth, not by the key cap.
_MAX_RECORD_BYTES = 4 * 1024 * 1024


def generate_key(key_type: str = DEFAULT_KEY_TYPE) -> PrivateKey:
    if key_type == EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == RSA_2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise CaConfigError(f"key_type: must be one of {', '.join(KEY_TYPES)}, got {key_type!r}")


def signature_hash(key: PrivateKey | PublicKey) -> hashes.SHA256 | hashes.SHA384:
    """SHA-384 for P-384 (matching strength), SHA-256 otherwise: for a signer and, by its
    public half, for whoever checks what it signed."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and (
        key.curve.key_size >= 384
    ):
        return hashes.SHA384()
    return hashes.SHA256()


def spki_der(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class KeyStore:
    """One PKCS#8 PEM file per key slot, `<directory>/<slot_id>.pem`, mode 0600, dir 0700.

    Files are written to a temporary name, fsynced and renamed, so a crash leaves either the
    whole key or none; the manager saves the key before journaling its slot.
    """

    def __init__(self, directory: Path, *, create: bool = True) -> None:
        """`create=False` only reads what is there (an offline command that must not make a
        data_dir a server has not)."""
        self._dir = Path(directory)
        if create:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self._dir, 0o700)

    @property
    def directory(self) -> Path:
        return self._dir

    def path(self, slot_id: str) -> Path:
        if not _SLOT_ID.match(slot_id):
            raise KeyStoreError(f"slot id {slot_id!r} is not a plain name ([A-Za-z0-9_-])")
        return self._dir / f"{slot_id}.pem"

    def record_path(self, slot_id: str) -> Path:
        self.path(slot_id)  # the same check of the name
        return self._dir / f"{slot_id}{RECORD_SUFFIX}"

    def save_record(self, slot_id: str, record: bytes) -> None:
        """Write the public record of a slot, whole or not at all (as `save`). Saved before
        the key: a key file is never left without its record by a crash."""
        write_durably(self.record_path(slot_id), record, 0o644)

    def load_record(self, slot_id: str) -> bytes | None:
        """A slot's public record, when it and the key file are this server's own: regular
        files (no links), owned by this user, writable by no one else. None otherwise."""
        uid = os.geteuid()

        def own(info: os.stat_result) -> str | None:
            mine = info.st_uid == uid and not info.st_mode & 0o022
            return None if mine else "is not this server's own"

        def own_key(info: os.stat_result) -> str | None:
            too_big = info.st_size > _MAX_KEY_BYTES
            return own(info) or (f"is over {_MAX_KEY_BYTES} bytes" if too_big else None)

        # Checked as opened, not by name and then read: a FIFO there is not waited on (it hung
        # the start), and the file checked is the one read.
        key_path, record_path = self.path(slot_id), self.record_path(slot_id)
        try:
            # The key file is only checked (opened, fstat), never read: its private bytes are
            # not this method's business.
            fd, _ = open_regular_file(key_path, follow_links=False, check=own_key)
            os.close(fd)
            return read_small_file(
                record_path, max_bytes=_MAX_RECORD_BYTES, follow_links=False, check=own
            )
        except SmallFileError:
            return None

    def save(self, slot_id: str, key: PrivateKey) -> Path:
        target = self.path(slot_id)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Its temporary file is `<slot>.pem.tmp` (remove_unfinished sweeps any `*.tmp`).
        write_durably(target, pem, 0o600)
        return target

    def load(self, slot_id: str) -> PrivateKey:
        path = self.path(slot_id)
        try:
            # Links followed as before (keys may be mounted); a FIFO is not waited on (it hung
            # the start).
            data = read_small_file(path, max_bytes=_MAX_KEY_BYTES, follow_links=True)
        except SmallFileError as refused:
            if refused.missing:
                raise KeyStoreError(f"no key file for slot {slot_id} in {self._dir}") from None
            raise KeyStoreError(f"key file {path} {refused.problem}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):  # the last: an unknown key type
            raise KeyStoreError(f"key file {path} is not an unencrypted PKCS#8 PEM key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise KeyStoreError(f"key file {path} holds a {type(key).__name__}, not EC or RSA")
        return key

    def exists(self, slot_id: str) -> bool:
        return self.path(slot_id).exists()

    def delete(self, slot_id: str) -> None:
        self.path(slot_id).unlink(missing_ok=True)
        self.record_path(slot_id).unlink(missing_ok=True)

    def slot_ids(self) -> list[str]:
        return sorted(p.stem for p in self._dir.glob("*.pem"))

    def remove_unfinished(self) -> None:
        """Delete the temporary files of saves a crash cut short: each holds a private key
        no slot names (the rename had not happened), and no later save of a new slot id
        would ever replace it; and the records of keys never saved."""
        for path in self._dir.glob("*.tmp"):
            path.unlink(missing_ok=True)
        # A record is saved before its key: one alone is of a save cut short before the key.
        for path in self._dir.glob(f"*{RECORD_SUFFIX}"):
            if not (self._dir / f"{path.name.removesuffix(RECORD_SUFFIX)}.pem").exists():
                path.unlink(missing_ok=True)
