"""A slot's record as this release writes it, at its full lineage depth, is read back by the
key store: its size is bounded by LINEAGE_DEPTH, not by the cap that suits a PEM key."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from server.ca.adoption import LINEAGE_DEPTH, decode_record, encode_record
from server.ca.keys import KeyStore, generate_key
from server.datastore.records import X509_KIND, KeySlot
from tests.server.test_ca_manager import _ca_cert


def _slot(key: ec.EllipticCurvePrivateKey, n: int) -> KeySlot:
    # An X.509 slot's public_der is its CA certificate, as the CA makes it.
    cert = _ca_cert(f"ca-{n}", key, None, start=1000.0 + n, days=1)
    return KeySlot(f"x509-{n}", X509_KIND, "", cert.public_bytes(Encoding.DER), "", n, n + 1, n)


def test_a_record_with_a_full_chain_is_read_back(tmp_path: Path) -> None:
    # Even with the default P-256 keys an X.509 slot's full-depth record is well past 64 KiB;
    # refused as too large, its key was not taken back after a datastore restore.
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(LINEAGE_DEPTH + 1)]
    slots = [_slot(key, i) for i, key in enumerate(keys)]
    record = None
    data = b""
    for i in range(1, len(slots)):
        data = encode_record(slots[i], ["x509-0"], (slots[i - 1], keys[i - 1], record))
        record = decode_record(slots[i].slot_id, data)
    assert len(data) > 64 * 1024
    store = KeyStore(tmp_path)
    store.save_record(slots[-1].slot_id, data)
    store.save(slots[-1].slot_id, generate_key())
    assert store.load_record(slots[-1].slot_id) == data
