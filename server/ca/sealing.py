"""Private keys sealed for the datastore: AES-256-GCM under the trust domain's key-encryption
key (KEK), which every server of the trust domain reads from a file of its own.

A sealed key is `MAGIC | kek_id | nonce | ciphertext+tag`. The additional data binds it to its
slot (slot id, kind, kid), so a row copied onto another slot does not open. `kek_id` is an HMAC
of the KEK, not the KEK: it tells a wrong KEK ("this file is not the one the keys were sealed
with") apart from a damaged row, and reveals nothing about the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.ca.errors import CaConfigError, SealedKeyError
from server.ca.keys import PrivateKey, spki_der
from svid._durable import fsync_dir
from svid._secret_file import SecretFile, read_owner_only

KEK_SETTING = "key_encryption_key_file"
KEK_BYTES = 32
MAGIC = b"SVK1"
KEK_ID_BYTES = 8
NONCE_BYTES = 12
_HEADER = len(MAGIC) + KEK_ID_BYTES + NONCE_BYTES
_TAG_BYTES = 16
_AAD_PREFIX = b"svidd sealed key v1\0"
_KEK_FILE = SecretFile(
    setting=KEK_SETTING,
    owner="this server's user",
    max_bytes=4096,
    # A KEK lost for good costs the keys sealed under it: say the way out where it is missed.
    missing=(
        "{path} does not exist: it holds the trust domain's key-encryption key, which every "
        "key sealed in the datastore needs (restore it from where the other servers' copies "
        "or a backup are). If it is lost for good, so are those keys: write a new one with "
        "`svid-server keys new-kek --out {path}`, then, with every server stopped, "
        "`svid-server ca forget-lost-keys --lost-kek --config FILE` forgets the keys sealed "
        "under the lost one, and the next start makes a new CA and JWT key"
    ),
)


class KeyEncryptionKey:
    """The 32-byte KEK. Its bytes never appear in repr, str or any message."""

    __slots__ = ("_aead", "_key", "kek_id", "source")

    def __init__(self, key: bytes, source: str = "(in memory)") -> None:
        if len(key) != KEK_BYTES:
            raise CaConfigError(f"{KEK_SETTING}: a key-encryption key is {KEK_BYTES} bytes")
        self._key = key
        self._aead = AESGCM(key)
        self.kek_id = hmac.new(key, b"svidd kek id v1", hashlib.sha256).digest()[:KEK_ID_BYTES]
        self.source = source

    def __repr__(self) -> str:
        return f"KeyEncryptionKey(id={self.kek_id.hex()}, source={self.source!r})"

    @classmethod
    def generate(cls) -> KeyEncryptionKey:
        return cls(secrets.token_bytes(KEK_BYTES))

    @classmethod
    def load(cls, path: Path) -> KeyEncryptionKey:
        """Read a KEK file: owner-only (no group or other bits), owned by this process's user,
        holding the key as base64 text (what `svid-server keys new-kek` writes) or 32 raw bytes.
        The checks look at the file actually opened, not at a name that could be swapped."""
        data = read_owner_only(path, _KEK_FILE, CaConfigError)
        return cls(_decode_kek(data, path), source=str(path))

    def write_new(self, path: Path) -> None:
        """Write this KEK to a new file, mode 0600; an existing file is never replaced. The file
        and its directory are fsynced: a power cut after `new-kek` must not lose the new name,
        whose key every key sealed under it needs."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise CaConfigError(f"{path} already exists; refusing to overwrite a key") from None
        except OSError as exc:
            raise CaConfigError(f"cannot create {path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(base64.b64encode(self._key) + b"\n")
            while view:  # os.write may take less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)

    # -- sealing --------------------------------------------------------------------------------

    def seal(self, key: PrivateKey, slot_id: str, kind: str, kid: str) -> bytes:
        plain = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plain, _aad(slot_id, kind, kid))
        return MAGIC + self.kek_id + nonce + sealed

    def check_sealed_here(self, sealed: bytes, slot_id: str) -> None:
        """Refuse, without decrypting, a sealed key that is malformed (SealedKeyError) or was
        sealed under another KEK (CaConfigError naming this KEK's file): what a server checks
        at start-up for every slot, so a wrong KEK stops it before it serves."""
        kek_id = sealed_kek_id(sealed)
        if kek_id is None:
            raise SealedKeyError(f"key slot {slot_id}: the sealed key is malformed")
        if not hmac.compare_digest(kek_id, self.kek_id):
            raise CaConfigError(
                f"{KEK_SETTING}: {self.source} is not the key-encryption key the datastore's "
                f"keys are sealed with (key slot {slot_id} was sealed under key id "
                f"{kek_id.hex()}, this file is key id {self.kek_id.hex()})"
            )

    def unseal(self, sealed: bytes, slot_id: str, kind: str, kid: str, spki: bytes) -> PrivateKey:
        """The private key of a slot. `spki` is the slot's public key (SubjectPublicKeyInfo
        DER): a key that does not match it is refused too. SealedKeyError names the slot; a
        key sealed under another KEK is a CaConfigError naming this KEK's file."""
        self.check_sealed_here(sealed, slot_id)
        nonce = sealed[len(MAGIC) + KEK_ID_BYTES : _HEADER]
        try:
            plain = self._aead.decrypt(nonce, sealed[_HEADER:], _aad(slot_id, kind, kid))
        except InvalidTag:
            raise SealedKeyError(
                f"key slot {slot_id}: the sealed key fails its integrity check (the row was "
                "altered or belongs to another slot); refusing to load it"
            ) from None
        try:
            key = serialization.load_der_private_key(plain, password=None)
        except (ValueError, TypeError):
            raise SealedKeyError(f"key slot {slot_id}: the sealed key is not a key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise SealedKeyError(f"key slot {slot_id}: the sealed key is not an EC or RSA key")
        if not hmac.compare_digest(spki_der(key.public_key()), spki):
            raise SealedKeyError(
                f"key slot {slot_id}: the sealed key does not match the slot's public key"
            )
        return key


def sealed_kek_id(sealed: bytes) -> bytes | None:
    """The id of the KEK a sealed key was sealed under (None: not a sealed key at all)."""
    if len(sealed) < _HEADER + _TAG_BYTES or not sealed.startswith(MAGIC):
        return None
    return sealed[len(MAGIC) : len(MAGIC) + KEK_ID_BYTES]


def _aad(slot_id: str, kind: str, kid: str) -> bytes:
    # NUL-separated: none of the three can hold a NUL, so no two triples give the same bytes.
    return _AAD_PREFIX + b"\0".join(part.encode() for part in (slot_id, kind, kid))


def _decode_kek(data: bytes, path: Path) -> bytes:
    bad = CaConfigError(
        f"{KEK_SETTING}: {path} must hold {KEK_BYTES} random bytes as base64 text "
        "(`svid-server keys new-kek --out FILE` writes one)"
    )
    if len(data) == KEK_BYTES:  # raw bytes (base64 of 32 bytes is 44 characters)
        return data
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise bad from None
    if len(key) != KEK_BYTES:
        raise bad
    return key
