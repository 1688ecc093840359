"""The committed stubs equal a fresh generation, and the Workload API is wire-exact."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from svid._proto import workload_pb2

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "svid" / "_proto"


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    generator = runpy.run_path(str(ROOT / "proto" / "generate.py"))
    generator["generate"](tmp_path)
    fresh = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "stub files differ: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs, run `make proto`: {stale}"


def test_workload_api_has_no_package_and_exact_service() -> None:
    file = workload_pb2.DESCRIPTOR
    assert file.package == ""
    service = file.services_by_name["SpiffeWorkloadAPI"]
    methods = {
        m.name: (m.input_type.name, m.output_type.name, m.server_streaming, m.client_streaming)
        for m in service.methods
    }
    assert methods == {
        "FetchX509SVID": ("X509SVIDRequest", "X509SVIDResponse", True, False),
        "FetchX509Bundles": ("X509BundlesRequest", "X509BundlesResponse", True, False),
        "FetchJWTSVID": ("JWTSVIDRequest", "JWTSVIDResponse", False, False),
        "FetchJWTBundles": ("JWTBundlesRequest", "JWTBundlesResponse", True, False),
        "ValidateJWTSVID": ("ValidateJWTSVIDRequest", "ValidateJWTSVIDResponse", False, False),
    }
    assert [d.name for d in file.dependencies] == ["google/protobuf/struct.proto"]


_T = FieldDescriptor
WIRE = {
    "X509SVIDRequest": {},
    "X509BundlesRequest": {},
    "JWTBundlesRequest": {},
    "X509SVIDResponse": {
        "svids": (1, _T.TYPE_MESSAGE, True),
        "crl": (2, _T.TYPE_BYTES, True),
        "federated_bundles": (3, _T.TYPE_MESSAGE, True),
    },
    "X509SVID": {
        "spiffe_id": (1, _T.TYPE_STRING, False),
        "x509_svid": (2, _T.TYPE_BYTES, False),
        "x509_svid_key": (3, _T.TYPE_BYTES, False),
        "bundle": (4, _T.TYPE_BYTES, False),
        "hint": (5, _T.TYPE_STRING, False),
    },
    "X509BundlesResponse": {
        "crl": (1, _T.TYPE_BYTES, True),
        "bundles": (2, _T.TYPE_MESSAGE, True),
    },
    "JWTSVIDRequest": {
        "audience": (1, _T.TYPE_STRING, True),
        "spiffe_id": (2, _T.TYPE_STRING, False),
    },
    "JWTSVIDResponse": {"svids": (1, _T.TYPE_MESSAGE, True)},
    "JWTSVID": {
        "spiffe_id": (1, _T.TYPE_STRING, False),
        "svid": (2, _T.TYPE_STRING, False),
        "hint": (3, _T.TYPE_STRING, False),
    },
    "JWTBundlesResponse": {"bundles": (1, _T.TYPE_MESSAGE, True)},
    "ValidateJWTSVIDRequest": {
        "audience": (1, _T.TYPE_STRING, False),
        "svid": (2, _T.TYPE_STRING, False),
    },
    "ValidateJWTSVIDResponse": {
        "spiffe_id": (1, _T.TYPE_STRING, False),
        "claims": (2, _T.TYPE_MESSAGE, False),
    },
}


@pytest.mark.parametrize("message", sorted(WIRE))
def test_workload_message_fields_match_the_standard(message: str) -> None:
    desc = workload_pb2.DESCRIPTOR.message_types_by_name[message]
    got = {f.name: (f.number, f.type, f.is_repeated) for f in desc.fields}
    assert got == WIRE[message]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("X509SVIDResponse", "federated_bundles"),
        ("X509BundlesResponse", "bundles"),
        ("JWTBundlesResponse", "bundles"),
    ],
)
def test_bundle_maps_are_string_to_bytes(message: str, field: str) -> None:
    holder = workload_pb2.DESCRIPTOR.message_types_by_name[message]
    entry = holder.fields_by_name[field].message_type
    assert entry is not None
    assert entry.GetOptions().map_entry
    assert entry.fields_by_name["key"].type == _T.TYPE_STRING
    assert entry.fields_by_name["value"].type == _T.TYPE_BYTES


def test_claims_is_a_struct() -> None:
    desc = workload_pb2.DESCRIPTOR.message_types_by_name["ValidateJWTSVIDResponse"]
    struct = desc.fields_by_name["claims"].message_type
    assert struct is not None
    assert struct.full_name == "google.protobuf.Struct"


def test_workload_stub_coexists_with_another_copy_of_the_workload_api() -> None:
    # py-spiffe registers the same unpackaged names in the default pool; ours must not clash.
    spiffe_pb2 = pytest.importorskip("spiffe._proto.workload_pb2")
    ours = workload_pb2.X509SVIDResponse(crl=[b"x"])
    theirs = spiffe_pb2.X509SVIDResponse.FromString(ours.SerializeToString())
    assert list(theirs.crl) == [b"x"]
