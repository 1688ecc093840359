"""Binding each RPC to the connecting process, and the ways a local process might forge it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import grpc
import pytest

from agent_attestor import proc
from agent_attestor.identify import caller_log, identify
from agent_attestor.model import Selector
from agent_attestor.peer import Caller, CallerRegistry
from agent_attestor.workload_attestor import UnixAttestor
from svid._clock import SystemClock
from svid._proto import workload_pb2, workload_pb2_grpc
from tests.agent_attestor.harness import HEADER, Harness, fetch_ids

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")


def test_registry_maps_only_what_was_added() -> None:
    reg = CallerRegistry()
    caller = Caller("c1", 1, 2, 3, frozenset())
    reg.add("unix-abstract:svid-agent/1/c1", caller)
    assert reg.lookup("unix-abstract:svid-agent/1/c1") is caller
    assert reg.lookup("unix-abstract:svid-agent/1/c2") is None
    with pytest.raises(ValueError, match="already registered"):
        reg.add("unix-abstract:svid-agent/1/c1", caller)
    reg.remove("unix-abstract:svid-agent/1/c1")
    assert reg.lookup("unix-abstract:svid-agent/1/c1") is None


def test_registry_refuses_a_path_bound_name() -> None:
    with pytest.raises(ValueError, match="not an abstract socket name"):
        CallerRegistry().add("unix:/private/c/1", Caller("c1", 1, 2, 3, frozenset()))


def _direct_stub(target: str) -> workload_pb2_grpc.SpiffeWorkloadAPIStub:
    return workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel(target))


def test_each_connection_is_seen_under_its_own_registered_name(agent: Harness) -> None:
    agent.add_entry("/w")
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    next(stream)
    callers = agent.lt.call(lambda: list(agent.registry._callers.items()))
    assert len(callers) == 1
    peer, caller = callers[0]
    assert peer.startswith("unix-abstract:svid-agent/")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s,
        pytest.raises(OSError, match="in use"),
    ):
        s.bind(_bindable(peer))  # the name stays taken while the connection lives
    assert caller.pid == os.getpid()
    assert caller.uid == os.getuid()
    assert Selector("unix", f"uid:{os.getuid()}") in caller.selectors
    stream.cancel()


def test_connecting_straight_to_the_internal_socket_is_denied(agent: Harness) -> None:
    agent.add_entry("/w")
    stub = _direct_stub(f"unix:{agent.endpoint.internal_path}")
    with pytest.raises(grpc.RpcError) as exc:
        next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def _forwarder(listen: Path, target: Path, bind_as: str | bytes) -> socket.socket:
    """A hand-made relay: connect to `target` from a socket bound to `bind_as` (raising if that
    name cannot be bound), and carry whatever connects to `listen` over it — what a same-user
    process would do to pose as a relayed connection."""
    out = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        out.bind(bind_as)
        out.connect(str(target))
    except OSError:
        out.close()
        raise
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(listen))
    server.listen(4)

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

    def accept() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            threading.Thread(target=pipe, args=(conn, out), daemon=True).start()
            threading.Thread(target=pipe, args=(out, conn), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


@pytest.mark.parametrize("name", ["abstract", "path"])
def test_a_self_chosen_name_is_denied(agent: Harness, name: str) -> None:
    """Even the agent's own user, binding a name the relay did not write, gets nothing."""
    agent.add_entry("/w")
    fwd = agent.root / "fwd.sock"
    bind_as: str | bytes = (
        b"\0svid-agent/forged" if name == "abstract" else str(agent.root / "private" / "forged")
    )
    server = _forwarder(fwd, agent.endpoint.internal_path, bind_as)
    try:
        assert fetch_ids(f"unix:{fwd}") == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.close()


def _bindable(registered: str) -> str | bytes:
    """The socket address behind a registry key, in the form bind() takes."""
    if registered.startswith("unix-abstract:"):
        return b"\0" + registered[len("unix-abstract:") :].encode()
    return registered.removeprefix("unix:")


def test_the_agents_own_user_cannot_take_over_a_live_callers_name(agent: Harness) -> None:
    """Issue 11 item 4: a process of the agent's own user may unlink a bound file and bind the
    same path; it must still not be taken for the live caller that name was given to."""
    agent.add_entry("/w")
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    next(stream)
    registered = agent.lt.call(lambda: next(iter(agent.registry._callers)))
    address = _bindable(registered)
    if isinstance(address, str):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)  # the old scheme's weakness: the name is just a file
    fwd = agent.root / "takeover.sock"
    server: socket.socket | None = None
    bind_errno = 0
    try:
        server = _forwarder(fwd, agent.endpoint.internal_path, address)
    except OSError as exc:
        bind_errno = exc.errno or 0
    if server is None:
        assert bind_errno == errno.EADDRINUSE  # the live connection holds the name
    else:
        try:
            assert fetch_ids(f"unix:{fwd}") == grpc.StatusCode.PERMISSION_DENIED
        finally:
            server.close()
    stream.cancel()


def _run_as_nobody(code: str) -> dict[str, object]:
    # Everything is imported before dropping privileges: the interpreter may live under /root.
    script = (
        "import os, json, sys, socket, grpc\n"
        "from svid._proto import workload_pb2, workload_pb2_grpc\n"
        f"os.setgroups([])\nos.setgid({NOBODY})\nos.setuid({NOBODY})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(Path(__file__).resolve().parents[2]),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@as_root
def test_another_user_cannot_reach_the_internal_socket_or_bind_a_name(agent: Harness) -> None:
    agent.add_entry("/w")
    os.chmod(agent.root, 0o755)
    internal = agent.endpoint.internal_path
    result = _run_as_nobody(
        f"""
        import socket
        out = {{}}
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect({str(internal)!r}); out["connect"] = "ok"
        except OSError as e:
            out["connect"] = type(e).__name__
        s2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s2.bind({str(internal.parent / "forged")!r}); out["bind"] = "ok"
        except OSError as e:
            out["bind"] = type(e).__name__
        print(json.dumps(out))
        """
    )
    assert result == {"connect": "PermissionError", "bind": "PermissionError"}


@as_root
def test_another_user_gets_its_own_identity_not_ours(agent: Harness) -> None:
    agent.add_entry("/root-only")  # uid 0
    agent.add_entry("/nobody", frozenset({Selector("unix", f"uid:{NOBODY}")}))
    os.chmod(agent.root, 0o755)
    os.chmod(agent.socket_path.parent, 0o755)
    result = _run_as_nobody(
        f"""
        import grpc
        from svid._proto import workload_pb2, workload_pb2_grpc
        ch = grpc.insecure_channel("unix:{agent.socket_path}")
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
        msg = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(),
                                      metadata=(("workload.spiffe.io", "true"),)))
        print(json.dumps({{"ids": [s.spiffe_id for s in msg.svids]}}))
        """
    )
    assert result == {"ids": ["spiffe://example.org/nobody"]}


@pytest.mark.parametrize("exe_selectors", ["always", "never"])
def test_a_caller_that_exited_before_attestation_gets_no_selectors(
    tmp_path: Path, exe_selectors: str
) -> None:
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})",
            ]
        )
        conn, _ = listener.accept()
        child.wait(30)
        with conn:
            caller = identify(
                conn, "c1", [UnixAttestor(exe_selectors=exe_selectors)], caller_log(SystemClock())
            )
    assert caller.pid == child.pid
    assert caller.selectors == frozenset()


def test_a_callers_descriptors_are_listed_only_when_a_selector_depends_on_its_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Finding the connection among the caller's descriptors costs ~10 us for each one it holds,
    # and any user may hold hundreds of thousands (its RLIMIT_NOFILE) and connect in a loop:
    # seconds of the agent's CPU a connection, spent even where no selector is read from the
    # process (exe selectors off, the default wherever a user may make a user namespace).
    listed: list[int] = []
    holds = proc.holds_close_on_exec

    def counted(pid: int, ino: int) -> bool:
        listed.append(pid)
        return holds(pid, ino)

    monkeypatch.setattr(proc, "holds_close_on_exec", counted)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        plain = identify(a, "c1", [UnixAttestor(exe_selectors="never")], caller_log(SystemClock()))
        assert listed == []
        exe = identify(a, "c2", [UnixAttestor(exe_selectors="always")], caller_log(SystemClock()))
        assert listed == [os.getpid()]
    kinds = {s.value.split(":", 1)[0] for s in plain.selectors}
    assert kinds == {"uid", "gid", "user", "group"}
    assert plain.selectors < exe.selectors


def test_a_live_caller_gets_uid_gid_path_and_sha256(tmp_path: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        caller = identify(
            a, "c1", [UnixAttestor(exe_selectors="always")], caller_log(SystemClock())
        )
    values = {s.value.split(":", 1)[0] for s in caller.selectors}
    assert {"uid", "gid", "path", "sha256", "user", "group"} <= values
    assert Selector("unix", f"path:{os.path.realpath(sys.executable)}") in caller.selectors
