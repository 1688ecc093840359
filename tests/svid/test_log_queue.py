"""The daemons' stderr log (svid/_logs.py QueuedStreamHandler): a thread that logs never waits
for the stream; what a stalled stream does not take is queued up to a bound, then dropped and
counted where the gap is; a close and the process's exit write what is queued."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from svid._logs import (
    FLUSH_SECONDS,
    LOG_QUEUE_CHARS,
    QueuedStreamHandler,
    TextFormatter,
    configure_logger,
)

LOGGER = "svid.test.queue"
F_SETPIPE_SZ = 1031  # Linux; fcntl.F_SETPIPE_SZ from Python 3.10 on, named here for mypy
_LINE = re.compile(r" svid\.test\.queue: line (\d+) ")
_DROPPED = re.compile(r" svid\.test\.logs: (\d+) log lines dropped: the log stream did not take")


class _Pipe:
    """A pipe of one page (4 KiB) whose write end is a text stream; read only when asked."""

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        fcntl.fcntl(write_fd, F_SETPIPE_SZ, 4096)
        self.reader = os.fdopen(read_fd, "rb")
        self.writer: IO[str] = os.fdopen(write_fd, "w")

    def read_to_end(self) -> list[str]:
        """Closes the write end (a write still to come is lost) and reads every line."""
        self.writer.close()
        return self.reader.read().decode().splitlines()


@pytest.fixture
def pipe() -> Iterator[_Pipe]:
    made = _Pipe()
    yield made
    for end in (made.writer, made.reader):
        end.close()


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def _handler(
    pipe: _Pipe, max_chars: int = LOG_QUEUE_CHARS, flush_seconds: float = FLUSH_SECONDS
) -> QueuedStreamHandler:
    return QueuedStreamHandler(pipe.writer, "svid.test", TextFormatter(), max_chars, flush_seconds)


def _draining(pipe: _Pipe) -> tuple[threading.Thread, list[str]]:
    lines: list[str] = []
    thread = threading.Thread(target=lambda: lines.extend(pipe.reader.read().decode().splitlines()))
    thread.start()
    return thread, lines


def test_a_stalled_stream_drops_lines_past_the_bound_and_says_how_many_where(
    pipe: _Pipe,
) -> None:
    handler = _handler(pipe, max_chars=2000)
    logger = _logger(handler)
    count = 300  # ~30 KiB: the pipe (4 KiB) and the queue (2,000 characters) many times over
    for i in range(count):
        logger.info("line %d %s", i, "x" * 80)  # returns though nothing reads the pipe

    thread, lines = _draining(pipe)
    handler.close()
    pipe.writer.close()
    thread.join()

    written = [int(m.group(1)) for line in lines if (m := _LINE.search(line))]
    notes = [(n, int(m.group(1))) for n, line in enumerate(lines) if (m := _DROPPED.search(line))]
    assert notes, lines[-3:]
    assert len(written) + sum(dropped for _, dropped in notes) == count
    assert written == sorted(written)
    # Each note stands where its lines were lost: between the two lines around the gap.
    for at, dropped in notes:
        before = _LINE.search(lines[at - 1])
        after = _LINE.search(lines[at + 1]) if at + 1 < len(lines) else None
        assert before is not None
        end = int(after.group(1)) if after is not None else count
        assert end - int(before.group(1)) - 1 == dropped
    assert " warning " in lines[notes[0][0]]


def test_close_writes_what_is_queued_and_ends_the_writer(pipe: _Pipe) -> None:
    handler = _handler(pipe)
    logger = _logger(handler)
    for i in range(200):  # ~20 KiB: most of it waits in the queue, none dropped
        logger.info("line %d %s", i, "x" * 80)

    thread, lines = _draining(pipe)
    handler.close()
    assert not handler._writer.is_alive()
    pipe.writer.close()  # what the writer had not written by now would be lost
    thread.join()
    assert [int(m.group(1)) for line in lines if (m := _LINE.search(line))] == list(range(200))


def test_close_on_a_stalled_stream_waits_a_bounded_time(pipe: _Pipe) -> None:
    handler = _handler(pipe, flush_seconds=0.05)
    logger = _logger(handler)
    for i in range(100):
        logger.info("line %d %s", i, "x" * 80)
    handler.close()  # returns though the stream takes nothing
    logger.info("after the close")  # dropped, not queued: no one would write it

    thread, lines = _draining(pipe)  # the writer, unblocked, writes the rest and ends
    handler._writer.join()
    pipe.writer.close()
    thread.join()
    assert [int(m.group(1)) for line in lines if (m := _LINE.search(line))] == list(range(100))
    assert not any("after the close" in line for line in lines)


def test_configuring_the_logger_again_closes_the_queued_handler_with_its_lines(
    pipe: _Pipe,
) -> None:
    handler = _handler(pipe)
    logger = _logger(handler)
    for i in range(200):
        logger.info("line %d %s", i, "x" * 80)

    thread, lines = _draining(pipe)
    configure_logger(LOGGER, "text", "info", io.StringIO())
    assert not handler._writer.is_alive()
    pipe.writer.close()
    thread.join()
    assert [int(m.group(1)) for line in lines if (m := _LINE.search(line))] == list(range(200))


_DAEMON = """
import logging, sys
from svid._logs import configure_logger
configure_logger("svid", sys.argv[1], "info", None)
log = logging.getLogger("svid.test.queue")
for i in range(2000):
    log.info("line %d %s", i, "x" * 80)
log.error("the last line")
"""


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_process_that_exits_writes_its_last_lines_to_a_healthy_stderr(log_format: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _DAEMON, log_format],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stderr.splitlines()
    assert len(lines) == 2001, lines[-3:]
    assert "the last line" in lines[-1]
    assert "dropped" not in done.stderr


_OTHERS_ON_A_STALLED_PIPE = """
import logging
from svid._logs import configure_logger
configure_logger("svid", "json", "info", None)
log = logging.getLogger("asyncio")
for i in range(2000):  # ~2 MiB: the pipe and the queue (1 MiB) over
    log.warning("line %d %s", i, "x" * 1000)
print("logged", flush=True)
"""


def test_other_loggers_warnings_never_wait_for_a_stalled_stderr() -> None:
    """asyncio's and grpc's warnings went to logging's last resort, which wrote stderr as they
    came: on a stalled pipe it blocked the thread that logged (the event loop)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _OTHERS_ON_A_STALLED_PIPE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the process blocked logging to a stderr nobody read"
        assert proc.stdout.readline() == "logged\n"
        lines = proc.stderr.read().splitlines()  # now drained, the rest comes, and the end
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    records = [json.loads(line) for line in lines]
    assert {r["logger"] for r in records} == {"asyncio", "svid.logs"}
    dropped = [r["dropped"] for r in records if r["logger"] == "svid.logs"]
    assert len(records) - len(dropped) + sum(dropped) == 2000


_WRITERS = """
import logging, threading
from svid._logs import configure_logger
configure_logger("svid", "text", "info", None)
logging.getLogger("svid.test.queue").info("logged")
print(sum(t.name == "log writer" for t in threading.enumerate()))
"""


def test_a_stderr_that_is_a_file_is_written_as_each_line_is_logged(tmp_path: Path) -> None:
    """A file's writes wait for no reader: a line logged is in the file when the call that
    logged it returns, as the end-to-end tests that read a daemon's log file expect."""
    log = tmp_path / "log"
    with log.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-c", _WRITERS],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=60,
            check=True,
        )
    assert done.stdout == "0\n"
    assert "logged" in log.read_text()

    piped = subprocess.run(
        [sys.executable, "-c", _WRITERS], capture_output=True, text=True, timeout=60, check=True
    )
    assert piped.stdout == "1\n"
    assert "logged" in piped.stderr


_EXITS_ON_A_STALLED_PIPE = """
import logging
from svid._logs import configure_logger
configure_logger("svid", "text", "info", None)
log = logging.getLogger("svid.test.queue")
for i in range(2000):  # ~2 MiB: the writer is blocked in a write when the process exits
    log.info("line %d %s", i, "x" * 1000)
"""


def test_a_process_whose_stderr_is_stalled_still_exits() -> None:
    """Its exit waits for the queued lines a bounded time (FLUSH_SECONDS) and ends cleanly,
    the writer still blocked in its write."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXITS_ON_A_STALLED_PIPE], stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    try:
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


_CONFIGURED_TWICE = """
import io, logging
from svid._logs import configure_logger
configure_logger("svid", "text", "info", None)
configure_logger("svid", "json", "info", None)
routes = [h for h in logging.getLogger().handlers if hasattr(h, "to")]
assert [h.to for h in routes] == logging.getLogger("svid").handlers, routes
configure_logger("svid", "json", "info", io.StringIO())  # a stream given: the root left alone
assert not [h for h in logging.getLogger().handlers if hasattr(h, "to")]
logging.getLogger("asyncio").warning("to the last resort")
"""


def test_configuring_again_routes_other_loggers_to_the_new_handler_only() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CONFIGURED_TWICE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "to the last resort\n"
