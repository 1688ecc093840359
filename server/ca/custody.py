"""Where the private half of a key slot lives: a file in this server's KeyStore (one server), or
sealed into the slot's own datastore row (several servers sharing the trust domain's keys).

The manager asks custody to `keep` a new key before journaling its slot, to `forget` it once
the slot left the journal (or never made it in), and to `load` the key of a slot to sign with.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from cryptography import x509

from server.ca.errors import SealedKeyError
from server.ca.keys import KeyStore, PrivateKey, PublicKey, spki_der
from server.ca.sealing import KeyEncryptionKey
from server.datastore.records import X509_KIND, KeySlot


class KeyCustody(Protocol):
    def keep(self, slot: KeySlot, key: PrivateKey) -> KeySlot:
        """Make `key` loadable for `slot`; returns the row to journal."""
        ...

    def forget(self, slot_id: str) -> None: ...

    def load(self, slot: KeySlot) -> PrivateKey: ...


class FileCustody:
    """Keys as owner-only files: saved (fsynced) before their slot is journaled."""

    def __init__(self, keystore: KeyStore) -> None:
        self._keys = keystore

    def keep(self, slot: KeySlot, key: PrivateKey) -> KeySlot:
        self._keys.save(slot.slot_id, key)
        return slot

    def forget(self, slot_id: str) -> None:
        self._keys.delete(slot_id)

    def load(self, slot: KeySlot) -> PrivateKey:
        return self._keys.load(slot.slot_id)


def slot_spki(slot: KeySlot) -> bytes:
    """The SubjectPublicKeyInfo of a slot's key (an X.509 slot journals its CA certificate)."""
    if slot.kind == X509_KIND:
        public: PublicKey = x509.load_der_x509_certificate(slot.public_der).public_key()  # type: ignore[assignment]
        return spki_der(public)
    return slot.public_der


class SealedCustody:
    """Keys sealed into their slot's row: the row and its key commit together, so there is no
    orphan file and no journal entry without its key, and every server with the KEK reads the
    same key. Nothing is written to disk: a cached copy would be one more plaintext key per
    server, stale as soon as another server drops the slot, to save an AES-GCM open that runs
    only when the active key changes."""

    def __init__(self, kek: KeyEncryptionKey) -> None:
        self.kek = kek

    def keep(self, slot: KeySlot, key: PrivateKey) -> KeySlot:
        return replace(slot, sealed_key=self.kek.seal(key, slot.slot_id, slot.kind, slot.kid))

    def forget(self, slot_id: str) -> None:
        """The key went with its row."""

    def load(self, slot: KeySlot) -> PrivateKey:
        if not slot.sealed_key:
            raise SealedKeyError(
                f"key slot {slot.slot_id} has no sealed key (made by a server without "
                "key_encryption_key_file)"
            )
        return self.kek.unseal(slot.sealed_key, slot.slot_id, slot.kind, slot.kid, slot_spki(slot))
