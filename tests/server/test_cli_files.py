"""Files the CLI reads whole are read to a bound: `bundle set --path /dev/zero` read on until
the machine's memory was gone (the kernel's OOM killer ended it, at 22 GB here)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from server import cli_entries, cli_output
from server.federation.fetch import MAX_BUNDLE_BYTES
from svid._proto import common_pb2
from tests.server.cli_run import run_cli
from tests.server.fixtures import RunningServer


def test_a_bundle_file_past_the_largest_bundle_is_refused_unread(
    capsys: pytest.CaptureFixture[str],
    srv: RunningServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_BUNDLE_BYTES + 1))
    code, out, err = run_cli(
        capsys, srv, "bundle", "set", "--id", "spiffe://o.org", "--path", str(big)
    )
    assert (code, out) == (1, "")
    assert f"--path: {big} holds more than {MAX_BUNDLE_BYTES} bytes" in err

    endless = io.TextIOWrapper(io.BytesIO(b" " * (MAX_BUNDLE_BYTES + 1)))
    monkeypatch.setattr(sys, "stdin", endless)
    code, out, err = run_cli(capsys, srv, "bundle", "set", "--id", "spiffe://o.org", "--path", "-")
    assert (code, out) == (1, "")
    assert f"--path: stdin holds more than {MAX_BUNDLE_BYTES} bytes" in err
    assert endless.buffer.tell() == MAX_BUNDLE_BYTES + 1  # read to the bound, no further

    code, out, err = run_cli(
        capsys, srv, "bundle", "set", "--id", "spiffe://o.org", "--path", str(tmp_path)
    )
    assert code == 1
    assert f"--path: cannot read {tmp_path}: Is a directory" in err


def test_an_entry_file_past_its_bound_is_refused_unread(
    capsys: pytest.CaptureFixture[str],
    srv: RunningServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli_entries, "MAX_FILE_BYTES", 1000)
    big = tmp_path / "entries.json"
    big.write_bytes(b"[" + b" " * 1000 + b"]")
    code, out, err = run_cli(capsys, srv, "entry", "create", "--file", str(big))
    assert (code, out) == (1, "")
    assert f"--file: {big} holds more than 1000 bytes (split it into several files)" in err


@pytest.mark.parametrize(
    "argv",
    [
        ("bundle", "set", "--id", "spiffe://o.org", "--path", "-"),
        ("entry", "create", "--file", "-"),
    ],
)
def test_reading_a_closed_stdin_is_refused_in_a_line(
    capsys: pytest.CaptureFixture[str],
    srv: RunningServer,
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
) -> None:
    """Started with `<&-`, Python's stdin is None: `--path -` ended in an AttributeError's
    traceback."""
    monkeypatch.setattr(sys, "stdin", None)
    code, out, err = run_cli(capsys, srv, *argv)
    assert (code, out) == (1, "")
    assert f"{argv[-2]}: stdin is closed" in err


def test_an_entry_file_bound_holds_a_large_listing_fed_back() -> None:
    """`entry show --output json > f; entry create --file f` for 200,000 entries (what the bound
    was said to hold): at some 650 bytes an entry as the listing prints it, 64 MiB held only
    100,000, and a larger deployment's export was refused."""
    entry = common_pb2.Entry(
        id="0f8e6a1c-3b7d-4e2a-9c1f-5d6e7f8a9b0c",
        spiffe_id="spiffe://example.org/ns/production/sa/payments-api",
        parent_id="spiffe://example.org/spire/agent/k8s_psat/prod-cluster/node-1234",
        selectors=[
            common_pb2.Selector(type="k8s", value="ns:production"),
            common_pb2.Selector(type="k8s", value="sa:payments-api"),
        ],
        dns_names=["payments.example.org"],
    )
    per_entry = len(cli_output.to_json([entry] * 100, key="entries")) / 100
    assert 200_000 * per_entry <= cli_entries.MAX_FILE_BYTES
