"""Sealed private keys: the round trip, a wrong KEK, altered and swapped rows, the KEK file."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from server.ca.errors import CaConfigError, SealedKeyError
from server.ca.keys import EC_P384, RSA_2048, generate_key, spki_der
from server.ca.sealing import KEK_SETTING, KeyEncryptionKey
from tests.fifo import make_fifo, raised_without_blocking

SPKI = spki_der


def _sealed(kek: KeyEncryptionKey, slot_id: str = "s1") -> tuple[bytes, bytes]:
    key = generate_key()
    return kek.seal(key, slot_id, "jwt", "kid-1"), SPKI(key.public_key())


@pytest.mark.parametrize("key_type", ["ec-p256", EC_P384, RSA_2048])
def test_a_sealed_key_opens_to_the_same_key(key_type: str) -> None:
    kek = KeyEncryptionKey.generate()
    key = generate_key(key_type)
    sealed = kek.seal(key, "s1", "x509", "kid-1")
    opened = kek.unseal(sealed, "s1", "x509", "kid-1", SPKI(key.public_key()))
    assert opened.private_numbers() == key.private_numbers()  # type: ignore[union-attr]
    # Sealing is randomised (fresh nonce): the same key never gives the same row twice.
    assert kek.seal(key, "s1", "x509", "kid-1") != sealed


def test_a_wrong_kek_is_a_config_error_naming_its_file() -> None:
    sealed, spki = _sealed(KeyEncryptionKey.generate())
    other = KeyEncryptionKey(os.urandom(32), source="/etc/svid/kek")
    with pytest.raises(CaConfigError, match=f"{KEK_SETTING}: /etc/svid/kek is not the") as err:
        other.unseal(sealed, "s1", "jwt", "kid-1", spki)
    assert "key slot s1" in str(err.value)


@pytest.mark.parametrize("position", [4, 12, 20, 30, -1])
def test_a_flipped_bit_refuses_the_key_and_names_the_slot(position: int) -> None:
    kek = KeyEncryptionKey.generate()
    sealed, spki = _sealed(kek)
    damaged = bytearray(sealed)
    damaged[position] ^= 0x01
    # Position 4..11 is the KEK id: a flip there reads as another KEK, also refused.
    with pytest.raises((SealedKeyError, CaConfigError), match="key slot s1"):
        kek.unseal(bytes(damaged), "s1", "jwt", "kid-1", spki)


@pytest.mark.parametrize(
    ("slot_id", "kind", "kid"),
    [("s2", "jwt", "kid-1"), ("s1", "x509", "kid-1"), ("s1", "jwt", "kid-2")],
)
def test_a_row_moved_to_another_slot_does_not_open(slot_id: str, kind: str, kid: str) -> None:
    kek = KeyEncryptionKey.generate()
    sealed, spki = _sealed(kek)
    with pytest.raises(SealedKeyError, match=f"key slot {slot_id}: .*integrity"):
        kek.unseal(sealed, slot_id, kind, kid, spki)


def test_a_key_that_is_not_the_slots_public_key_is_refused() -> None:
    kek = KeyEncryptionKey.generate()
    sealed, _ = _sealed(kek)
    with pytest.raises(SealedKeyError, match="does not match the slot's public key"):
        kek.unseal(sealed, "s1", "jwt", "kid-1", SPKI(generate_key().public_key()))


@pytest.mark.parametrize("sealed", [b"", b"SVK1", b"XXXX" + b"\0" * 60])
def test_a_malformed_row_is_refused(sealed: bytes) -> None:
    with pytest.raises(SealedKeyError, match="key slot s1: the sealed key is malformed"):
        KeyEncryptionKey.generate().unseal(sealed, "s1", "jwt", "kid-1", b"")


def test_the_kek_never_shows_in_repr_or_errors(tmp_path: Path) -> None:
    key = os.urandom(32)
    kek = KeyEncryptionKey(key, source="f")
    for text in (repr(kek), str(kek)):
        assert key.hex() not in text
        assert base64.b64encode(key).decode() not in text
    sealed, spki = _sealed(KeyEncryptionKey.generate())
    with pytest.raises(CaConfigError) as err:
        kek.unseal(sealed, "s1", "jwt", "kid-1", spki)
    assert base64.b64encode(key).decode() not in str(err.value)


# -- the KEK file --------------------------------------------------------------------------------


def test_new_kek_file_is_owner_only_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    kek = KeyEncryptionKey.generate()
    kek.write_new(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(base64.b64decode(path.read_bytes().strip())) == 32
    loaded = KeyEncryptionKey.load(path)
    assert loaded.kek_id == kek.kek_id
    assert loaded.source == str(path)
    sealed, spki = _sealed(kek)
    loaded.unseal(sealed, "s1", "jwt", "kid-1", spki)


def test_a_kek_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    path.write_text("precious")
    with pytest.raises(CaConfigError, match="already exists; refusing to overwrite"):
        KeyEncryptionKey.generate().write_new(path)
    assert path.read_text() == "precious"


def test_a_raw_32_byte_kek_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    key = os.urandom(32)
    path.write_bytes(key)
    path.chmod(0o600)
    assert KeyEncryptionKey.load(path).kek_id == KeyEncryptionKey(key).kek_id


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o700 | 0o007])
def test_a_kek_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "kek"
    KeyEncryptionKey.generate().write_new(path)
    path.chmod(mode)
    with pytest.raises(CaConfigError, match=f"{KEK_SETTING}: .*kek has mode .*chmod 600"):
        KeyEncryptionKey.load(path)


def test_a_read_only_kek_file_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    KeyEncryptionKey.generate().write_new(path)
    path.chmod(0o400)
    KeyEncryptionKey.load(path)


def test_a_kek_file_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kek"
    KeyEncryptionKey.generate().write_new(path)
    # Pretend to be another user rather than chown (tests do not run as root).
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 1)
    with pytest.raises(CaConfigError, match=r"is owned by uid \d+, not by this server's user"):
        KeyEncryptionKey.load(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"not base64 at all!", base64.b64encode(b"k" * 16), base64.b64encode(b"x" * 40)],
    ids=["empty", "not base64", "16 bytes", "40 bytes"],
)
def test_a_kek_file_without_a_32_byte_key_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "kek"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(CaConfigError, match=f"{KEK_SETTING}: .* must hold 32 random bytes") as err:
        KeyEncryptionKey.load(path)
    if content:
        assert content.decode() not in str(err.value)


def test_a_missing_kek_file_or_a_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(CaConfigError, match=f"{KEK_SETTING}: .*missing does not exist"):
        KeyEncryptionKey.load(tmp_path / "missing")
    tmp_path.chmod(0o700)
    with pytest.raises(CaConfigError, match="is not a regular file"):
        KeyEncryptionKey.load(tmp_path)


def test_a_kek_file_that_is_a_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    # os.open without O_NONBLOCK waited for a writer: the server hung at start, saying nothing.
    fifo = make_fifo(tmp_path / "kek")
    raised = raised_without_blocking(lambda: KeyEncryptionKey.load(fifo), fifo)
    assert isinstance(raised, CaConfigError)
    assert str(raised) == f"{KEK_SETTING}: {fifo} is not a regular file"
