"""A daemon whose stderr is a pipe nobody drains (journald stalled, a paused `| less`, a blocked
log driver) goes on serving: its log lines queue, bounded, and past the bound are dropped and
counted; once the pipe is drained again a line says how many were lost."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import IO

import grpc
import pytest

from server.audit.checkpoint import CHECKPOINT_FILE
from svid._logs import LOG_QUEUE_CHARS
from svid._proto import admin_pb2
from tests.e2e.agent_process import entry
from tests.e2e.conftest import (
    START_TIMEOUT,
    TRUST_DOMAIN,
    ServerProcess,
    make_server,
    server_command,
    short_tmpdir,
)

# Each CreateEntry logs both IDs: at SPIFFE's 2048-byte limit a line holds ~4 KiB, so a few
# hundred calls fill the pipe (64 KiB) and the log queue behind it.
_LONG = "x" * 1900
_PARENT = f"spiffe://{TRUST_DOMAIN}/svid/agent/{_LONG}"
_PIPE_AND_QUEUE = 64 * 1024 + LOG_QUEUE_CHARS
CALL_TIMEOUT = 15.0  # generous: a call served at all answers in milliseconds


class _Lines:
    """The lines of a pipe, read by a thread once `start` is called."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._pipe = pipe
        self.lines: list[str] = []
        self.ended = threading.Event()
        self._changed = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self._pipe:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        self.ended.set()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.ended.is_set(), timeout
            )
            matching = [line for line in self.lines if text in line]
        assert found, f"no line with {text!r} in time; the log ends: {self.lines[-5:]}"
        assert matching, f"the log ended with no line with {text!r}: {self.lines[-5:]}"
        return matching[0]


@pytest.fixture
def server_on_a_stalled_pipe() -> Iterator[tuple[ServerProcess, _Lines]]:
    root = short_tmpdir()
    server = make_server(root, log_format="json")
    server.proc = subprocess.Popen(
        [*server_command(), "run", "--config", str(server.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=str(root),
    )
    assert server.proc.stderr is not None
    lines = _Lines(server.proc.stderr)
    try:
        server.runtime = server.wait_runtime_file(
            server.data_dir / "server.json", "server", START_TIMEOUT
        )
        yield server, lines
    finally:
        lines.start()  # a daemon still blocked on the pipe can stop
        if server.proc is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_server_whose_stderr_is_not_drained_goes_on_serving(
    server_on_a_stalled_pipe: tuple[ServerProcess, _Lines],
) -> None:
    server, lines = server_on_a_stalled_pipe
    logged = 0
    n = 0
    while logged < 2 * _PIPE_AND_QUEUE:
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/w/{n:05d}/{_LONG}"
        request = admin_pb2.CreateEntryRequest(entry=entry(spiffe_id, _PARENT))
        try:
            server.admin("CreateEntry", request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                pytest.fail(
                    f"the server stopped answering after {n} calls ({logged} bytes logged) "
                    "with its stderr pipe full"
                )
            raise
        logged += len(spiffe_id) + len(_PARENT)
        n += 1
    # The loop is free: a call that logs nothing answers too.
    server.admin("GetBundle", admin_pb2.GetBundleRequest(), timeout=CALL_TIMEOUT)

    lines.start()
    dropped = json.loads(lines.wait_for("log lines dropped", timeout=CALL_TIMEOUT))
    assert dropped["level"] == "warning"
    assert 0 < dropped["dropped"] < n
    assert server.stop() == 0
    # The last line at exit reaches a healthy pipe.
    lines.wait_for('"msg":"server stopped"', timeout=CALL_TIMEOUT)


def _full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is full: the next blocking write to it waits for a reader."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write, b"x" * 4096)
    os.set_blocking(write, True)  # the daemon's writes block, as on a stalled journald
    return read, write


def test_a_fatal_error_on_a_stalled_stderr_does_not_hold_the_exit() -> None:
    """The error a daemon says as it exits (a datastore lost at start; a commit whose outcome is
    unknown, when journald stalls on the same failing disk) waits for the stream as its log
    lines do, a bounded time: a blocking print held the process for ever, and its supervisor
    never started it again."""
    root = short_tmpdir()
    server = make_server(root)
    read, write = _full_pipe()
    try:
        server.data_dir.mkdir(parents=True)
        (server.data_dir / CHECKPOINT_FILE).touch()  # a datastore lost beside its checkpoints
        proc = subprocess.Popen(
            [*server_command(), "run", "--config", str(server.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=write,
            cwd=str(root),
        )
        os.close(write)
        write = -1
        try:
            # Bounded by the log's exit waits (FLUSH_SECONDS each); held for ever before.
            assert proc.wait(timeout=START_TIMEOUT) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        for fd in (read, write):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(root, ignore_errors=True)
