"""Who may replace the public Workload API socket: nobody but the agent's user (and root).

The default socket is /tmp/svid-agent/public/api.sock, and /tmp is any user's to make
directories in. A user who makes that directory before the agent first starts owns it; the
agent takes it as it finds it, and the owner can then move the agent's socket aside and bind
its own in its place. Every workload on the node then asks that user for its SVIDs and bundles
(a bundle of the user's own CA is trusted by whoever takes it) and sends it the JWT-SVIDs it
asks to have validated, which the user can replay.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_attestor.endpoint import WorkloadEndpoint
from agent_attestor.errors import ConfigError
from agent_attestor.peer import CallerRegistry
from agent_attestor.relay import WorkloadRelay
from svid._proto import workload_pb2_grpc
from tests.tmpdirs import short_tmpdir
from tests.users import NOBODY

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmpdir("sd-")
    os.chmod(path, 0o755)  # stands for /tmp: others may enter it
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _take_over_as_nobody(public: Path) -> dict[str, object]:
    """As `nobody`: move the agent's socket aside and bind a listener of its own at its path;
    keeps the listener until stdin closes. Returns what it managed."""
    code = textwrap.dedent(
        f"""
        import json, os, socket, sys
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        out = {{}}
        try:
            os.rename({str(public)!r}, {str(public) + ".agent"!r})
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind({str(public)!r})
            os.chmod({str(public)!r}, 0o777)
            s.listen(8)
            out["took_over"] = True
        except OSError as exc:
            out["took_over"] = False
            out["error"] = type(exc).__name__
        print(json.dumps(out), flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        result: dict[str, object] = json.loads(line)
        if result["took_over"]:
            # Who answers a workload that connects to the socket's path now.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(str(public))
                raw = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                result["listener_uid"] = int.from_bytes(raw[4:8], sys.byteorder)
        return result
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


@as_root
def test_another_user_cannot_replace_the_socket_in_a_directory_it_made_first(root: Path) -> None:
    """Fails on main: the relay binds in a directory another uid owns, and that uid replaces
    the socket. Either the agent refuses to start there, or its socket stays its own."""
    public_dir = root / "public"
    public_dir.mkdir(mode=0o755)
    os.chown(public_dir, NOBODY, NOBODY)  # made first by another user, as /tmp/svid-agent/public
    public = public_dir / "api.sock"

    async def scenario() -> dict[str, object] | None:
        internal = root / "internal.sock"
        relay = WorkloadRelay(public, internal, CallerRegistry(), [])
        try:
            await relay.start()
        except ConfigError:
            return None  # refused to serve from a directory another user controls
        try:
            return await asyncio.to_thread(_take_over_as_nobody, public)
        finally:
            await relay.close()

    result = asyncio.run(scenario())
    assert result is None or result == {"took_over": False, "error": "PermissionError"}, (
        f"another uid replaced the agent's Workload API socket: {result}"
    )


@as_root
def test_another_user_cannot_replace_the_socket_in_a_world_writable_directory(
    root: Path,
) -> None:
    """Fails on main: socket_path in a world-writable directory without the sticky bit (a
    shared runtime directory made 0777) is replaced by any user."""
    public_dir = root / "public"
    public_dir.mkdir()
    os.chmod(public_dir, 0o777)
    public = public_dir / "api.sock"

    async def scenario() -> dict[str, object] | None:
        relay = WorkloadRelay(public, root / "internal.sock", CallerRegistry(), [])
        try:
            await relay.start()
        except ConfigError:
            return None
        try:
            return await asyncio.to_thread(_take_over_as_nobody, public)
        finally:
            await relay.close()

    result = asyncio.run(scenario())
    assert result is None or result == {"took_over": False, "error": "PermissionError"}, (
        f"another uid replaced the agent's Workload API socket: {result}"
    )


def _take_over_private_dir_as_nobody(private: Path, ready: str) -> subprocess.Popen[str]:
    """As `nobody`: move the agent's private directory aside, make one of its own with a
    listener at the internal socket's path, and say whether a connection reached it."""
    internal = private / "api.sock"
    code = textwrap.dedent(
        f"""
        import os, socket, sys
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        try:
            os.rename({str(private)!r}, {str(private) + ".agent"!r})
            os.mkdir({str(private)!r}, 0o755)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind({str(internal)!r})
            os.chmod({str(internal)!r}, 0o777)
            s.listen(8)
        except OSError as exc:
            print(type(exc).__name__, flush=True)
            sys.exit(0)
        print({ready!r}, flush=True)
        s.settimeout(10)
        try:
            s.accept()
            print("relayed here", flush=True)
        except OSError:
            print("nothing came", flush=True)
        """
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


@as_root
def test_another_user_cannot_replace_the_private_dir_in_a_directory_it_owns(root: Path) -> None:
    """Fails on main: prepare_private_dir checks the private directory itself, not the one it
    sits in; a private_dir under a directory another uid owns (a shared /tmp path that user
    made first) is renamed by that uid, and the relay, which connects to the internal socket by
    path for every workload, then hands identified workloads to that user's server."""
    parent = root / "shared"
    parent.mkdir(mode=0o755)
    os.chown(parent, NOBODY, NOBODY)
    private = parent / "private"
    public = root / "api.sock"

    async def scenario() -> list[str] | None:
        endpoint = WorkloadEndpoint(
            socket_path=public,
            private_dir=private,
            servicer=workload_pb2_grpc.SpiffeWorkloadAPIServicer(),
            registry=CallerRegistry(),
            attestors=[],
        )
        try:
            await endpoint.start()
        except ConfigError:
            return None  # refused to keep its internal socket where another user may reach
        try:
            attacker = _take_over_private_dir_as_nobody(private, "ready")
            assert attacker.stdout is not None
            lines = [await asyncio.to_thread(attacker.stdout.readline)]
            if lines[0].strip() == "ready":
                # A workload connects to the agent's own public socket, as every one does.
                _reader, writer = await asyncio.open_unix_connection(str(public))
                writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                lines.append(await asyncio.to_thread(attacker.stdout.readline))
                writer.close()
            await asyncio.to_thread(attacker.wait, 20)
            return [line.strip() for line in lines]
        finally:
            await endpoint.stop(0)

    result = asyncio.run(scenario())
    assert result is None or result == ["PermissionError"], (
        f"another uid took over the agent's internal socket: {result}"
    )
