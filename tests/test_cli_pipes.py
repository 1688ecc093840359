"""`svid-server ... | head` and `svid-agent ... | head` end quietly: the CLI's stdout reader goes
away early, and the CLI exits without a traceback or an "Exception ignored" line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from svid._proto import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    workload_pb2,
    workload_pb2_grpc,
)
from tests.tmpdirs import short_tmpdir

MANY = 4000  # several pipe buffers (64 KiB) of output: the writer must meet the closed pipe


class _Admin(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def ListEntries(self, request: Any, context: Any) -> admin_pb2.ListEntriesResponse:
        entries = [
            common_pb2.Entry(
                id=f"e{i}",
                spiffe_id=f"spiffe://example.org/w/{i}",
                parent_id="spiffe://example.org/svid/agent/join_token/x",
                selectors=[common_pb2.Selector(type="unix", value=f"uid:{i}")],
            )
            for i in range(MANY)
        ]
        return admin_pb2.ListEntriesResponse(entries=entries)


class _Workload(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    def FetchJWTSVID(self, request: Any, context: Any) -> workload_pb2.JWTSVIDResponse:
        svids = [
            workload_pb2.JWTSVID(spiffe_id=f"spiffe://example.org/w/{i}", svid="e30." * 40)
            for i in range(MANY)
        ]
        return workload_pb2.JWTSVIDResponse(svids=svids)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = short_tmpdir("pipe")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_servers(sock_dir: Path) -> Iterator[tuple[Path, Path]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    admin_pb2_grpc.add_AdminServicer_to_server(_Admin(), server)
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(_Workload(), server)
    admin, workload = sock_dir / "admin.sock", sock_dir / "api.sock"
    server.add_insecure_port(f"unix:{admin}")
    server.add_insecure_port(f"unix:{workload}")
    server.start()
    yield admin, workload
    server.stop(0)


def _piped_into_head(argv: list[str]) -> tuple[int, str, str]:
    """Run `argv | head -n 1`; the CLI's exit code and stderr, and what head printed."""
    cli = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert cli.stdout is not None
    head = subprocess.run(["head", "-n", "1"], stdin=cli.stdout, capture_output=True, check=False)
    cli.stdout.close()  # head holds the only read end now; when it exits, the pipe is closed
    _, err = cli.communicate(timeout=30)
    return cli.returncode, head.stdout.decode(), err.decode()


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "server.cli", "entry", "show", "--admin-socket", "{admin}"],
        [sys.executable, "-m", "agent_attestor.cli", "api", "fetch", "jwt", "--audience", "a",
         "--output", "raw", "--socket-path", "{workload}"],
        [sys.executable, "-m", "agent_attestor.cli", "api", "fetch", "jwt", "--audience", "a",
         "--socket-path", "{workload}"],
    ],
)  # fmt: skip
def test_head_ends_the_cli_quietly(fake_servers: tuple[Path, Path], argv: list[str]) -> None:
    admin, workload = fake_servers
    argv = [a.format(admin=admin, workload=workload) for a in argv]
    code, first, err = _piped_into_head(argv)
    assert first.strip()  # the CLI did print before the reader went away
    assert err == ""  # no traceback, no "Exception ignored", no error line
    assert code == 141  # like `yes | head`: closed by its reader, not a success


def test_a_closed_stdout_is_refused_before_anything_is_done(sock_dir: Path) -> None:
    """`svid-server keys new-kek --out F >&-`: Python drops every print where descriptor 1 was
    closed at start, so the key was written, a traceback followed, and the answer was lost."""
    out = sock_dir / "kek"
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "keys", "new-kek", "--out", str(out)],
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.close(1),  # the child's descriptor 1 only
        check=False,
        timeout=30,
    )
    err = done.stderr.decode()
    assert done.returncode == 1
    assert err.startswith("svid-server: error: stdout is closed: ")
    assert err.endswith("; nothing done\n")
    assert err.count("\n") == 1  # no traceback
    assert not out.exists()


def test_a_closed_stderr_keeps_errors_out_of_stdout(sock_dir: Path) -> None:
    """`... --output json > answer.json 2>&-`: the error line went to stdout (print to a None
    stderr writes there), into the file a script reads as JSON."""
    argv = ["entry", "show", "--output", "json", "--admin-socket", str(sock_dir / "none.sock")]
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", *argv],
        stdout=subprocess.PIPE,
        preexec_fn=lambda: os.close(2),  # the child's descriptor 2 only
        check=False,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (1, b"")
