"""Private keys on disk: owner-only files, atomic writes, typed failures without key material."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.ca.errors import CaConfigError, KeyStoreError
from server.ca.keys import KEY_TYPES, KeyStore, generate_key, signature_hash


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_generate_key_types(key_type: str) -> None:
    key = generate_key(key_type)
    if key_type.startswith("ec"):
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}[key_type]
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == 2048


def test_signature_hash_matches_key_strength() -> None:
    assert signature_hash(generate_key("ec-p256")).name == "sha256"
    assert signature_hash(generate_key("ec-p384")).name == "sha384"


def test_unknown_key_type_names_the_setting() -> None:
    with pytest.raises(CaConfigError, match=r"key_type: must be one of .* got 'dsa'"):
        generate_key("dsa")


def test_keys_are_saved_owner_only_and_load_back(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    key = generate_key()
    path = store.save("slot1", key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    loaded = store.load("slot1")
    assert loaded.private_numbers() == key.private_numbers()  # type: ignore[union-attr]
    assert store.slot_ids() == ["slot1"]
    assert not list((tmp_path / "keys").glob("*.tmp"))


def test_a_link_planted_at_the_temporary_name_never_receives_the_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    elsewhere = tmp_path / "elsewhere.pem"
    elsewhere.write_bytes(b"not a key\n")
    elsewhere.chmod(0o644)
    (tmp_path / "keys" / "slot1.tmp").symlink_to(elsewhere)
    path = store.save("slot1", generate_key())
    assert elsewhere.read_bytes() == b"not a key\n"
    assert not path.is_symlink()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert store.load("slot1") is not None


def test_existing_directory_is_tightened(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir(mode=0o755)
    KeyStore(tmp_path / "keys")
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700


def test_delete_is_idempotent(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.save("a", generate_key())
    store.delete("a")
    store.delete("a")
    assert not store.exists("a")
    with pytest.raises(KeyStoreError, match="no key file for slot a"):
        store.load("a")


@pytest.mark.parametrize("slot_id", ["../evil", "a/b", "", ".hidden", "x" * 65])
def test_slot_ids_cannot_escape_the_directory(tmp_path: Path, slot_id: str) -> None:
    with pytest.raises(KeyStoreError, match="not a plain name"):
        KeyStore(tmp_path).save(slot_id, generate_key())


def test_corrupt_key_file_is_a_typed_error_without_content(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    (tmp_path / "bad.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nsecretstuff\n")
    with pytest.raises(KeyStoreError, match="not an unencrypted PKCS#8") as info:
        store.load("bad")
    assert "secretstuff" not in str(info.value)


def unsupported_key_pem() -> bytes:
    """A PKCS#8 PEM key on a curve OID cryptography does not know (it raises
    UnsupportedAlgorithm, which is neither ValueError nor TypeError)."""
    der = bytearray(
        generate_key().private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    at = der.index(bytes.fromhex("2a8648ce3d030107"))  # prime256v1
    der[at + 7] = 0x20
    body = base64.encodebytes(bytes(der))
    return b"-----BEGIN PRIVATE KEY-----\n" + body + b"-----END PRIVATE KEY-----\n"


def test_key_file_of_an_unsupported_algorithm_is_a_typed_error(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    (tmp_path / "odd.pem").write_bytes(unsupported_key_pem())
    with pytest.raises(KeyStoreError, match="not an unencrypted PKCS#8"):
        store.load("odd")
