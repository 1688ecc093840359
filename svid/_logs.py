"""The one log setup of svidd's daemons: JSON lines or text on stderr, each line timestamped.

The server and the node agent format alike (they differ only in the logger tree they route), so
an operator reading both logs sees the same time format, the one the CLIs print. Callers never log
keys or tokens.

Where the process's stderr is a pipe, socket or terminal (journald, a container's log driver,
`| less`), its reader can stall, and a write to a full pipe blocks: on the event loop, the daemon
stops serving. There a line is formatted where it is logged and written by one thread of its
own; what the stream does not take waits in a bounded queue; past the bound lines are dropped,
counted, and said once the stream takes lines again. Other loggers' warnings (asyncio's,
grpc's), which logging's last resort wrote as they came, go the same way.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import logging
import logging.handlers
import os
import signal
import stat
import sys
import threading
from collections import deque
from typing import IO, Any, cast

from svid._clock import format_utc
from svid._printable import shown

# What both daemons' log_format and log_level take.
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")

# The log text (characters) that may wait for a stream that takes none: ~5,000 lines of a busy
# daemon, 16 pipe buffers; past it lines are dropped, so a stalled reader costs a bounded 1 MiB.
LOG_QUEUE_CHARS = 1 << 20
# How long a close (process exit, the logger configured again) waits for the queued lines to be
# written: a daemon's last lines reach a healthy stream, and a stalled one does not hold the exit.
FLUSH_SECONDS = 2.0

_STANDARD = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, and every `extra=` field."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": format_utc(record.created, millis=True),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            data[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            data["error"] = self.formatException(record.exc_info)
        return json.dumps(data, separators=(",", ":"))


def _field(value: object) -> str:
    """A field's value as it follows `key=`: bare where it is one word, else quoted as a JSON
    string, so a value with a space and `key=value` in it (an audience in a denial's reason)
    cannot read as a field of its own after it."""
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`<time> <level> <logger>: <msg> key=value ...` on one line (a value with a space or `=`
    quoted), then the traceback if there is one, each of its lines indented: a line that starts
    with a time starts a record, and nothing a caller says (escaped on the first line, indented
    in a traceback's) starts one."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={_field(v)}" for k, v in _extras(record).items())
        line = (
            f"{format_utc(record.created, millis=True)} {record.levelname.lower():7} "
            f"{record.name}: {record.getMessage()}"
        )
        if extras:
            line = f"{line} {extras}"
        # The caller's words (an audience, a path, an error naming them) made one line: a
        # newline among them wrote a line of their own, a forged record, into the text log.
        line = shown(line)
        if record.exc_info:
            trace = self.formatException(record.exc_info).split("\n")
            line = "\n".join([line, *(f"  {shown(part)}" for part in trace)])
        return line


class _Lines:
    """Formatted lines waiting for the writer, bounded by their total size. A line that does not
    fit is counted, and the count rides on the next line that fits (or stands alone once the
    queue is empty), so the writer says the gap where it was."""

    def __init__(self, max_chars: int) -> None:
        self._max_chars = max_chars
        self._chars = 0
        self._queued: deque[tuple[int, str]] = deque()  # (lines dropped just before, line)
        self._dropped = 0
        self._writing = False  # a line taken and not yet written
        self.written_count = 0  # lines written (tried) so far: whether the writer moves at all
        self._closed = False
        self._changed = threading.Condition()

    def offer(self, line: str) -> None:
        with self._changed:
            if self._closed or (self._queued and self._chars + len(line) > self._max_chars):
                self._dropped += 1
                return
            self._queued.append((self._dropped, line))
            self._dropped = 0
            self._chars += len(line)
            self._changed.notify_all()

    def take(self) -> tuple[int, str | None] | None:
        """The next (dropped before, line), (dropped, None) where only drops are left, or None
        once closed and empty; waits for one of these."""
        with self._changed:
            self._changed.wait_for(lambda: self._queued or self._dropped or self._closed)
            self._writing = True
            if self._queued:
                dropped, line = self._queued.popleft()
                self._chars -= len(line)
                return dropped, line
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                return dropped, None
            self._writing = False
            return None

    def written(self) -> None:
        """The writer is done with what it took."""
        with self._changed:
            self._writing = False
            self.written_count += 1
            self._changed.notify_all()

    def wait_written(self, timeout: float) -> bool:
        """Whether everything offered so far was written within `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: not (self._queued or self._writing), timeout)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class QueuedStreamHandler(logging.handlers.QueueHandler):
    """Formats each record where it is logged (QueueHandler.prepare) and hands the line to one
    writer thread that writes it to `stream`'s file descriptor: no thread that logs ever waits
    for the stream. The writer writes the descriptor itself (a line a write), not through the
    stream's buffer: nothing else that writes stderr waits on a buffer lock it holds while
    blocked."""

    def __init__(
        self,
        stream: IO[str],
        logger_name: str,
        formatter: logging.Formatter,
        max_chars: int = LOG_QUEUE_CHARS,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        self._lines = _Lines(max_chars)
        super().__init__(cast(Any, self._lines))  # only enqueue, overridden, puts to it
        self.setFormatter(formatter)  # before the writer starts: it formats the dropped line
        self._flush_seconds = flush_seconds
        self._fd = stream.fileno()
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._errors = getattr(stream, "errors", None) or "backslashreplace"
        self._logger_name = f"{logger_name}.logs"
        self._stalled_at: int | None = None  # written_count when a wait for the writer ran out
        self._writer = threading.Thread(target=self._write_all, name="log writer", daemon=True)
        self._writer.start()

    def enqueue(self, record: logging.LogRecord) -> None:
        self._lines.offer(str(record.msg))  # prepare() made it the formatted line

    def say(self, text: str) -> None:
        """`text` written as it is, after the lines queued before it, flush_seconds at most
        waited for: what a process says as it exits (its fatal error) comes after its log,
        and never holds the exit on a stream that takes nothing."""
        self._lines.offer(text)
        self.flush()

    def flush(self) -> None:
        """Waits (flush_seconds at most) for the lines queued so far to be written: what a
        message printed after them waits for to come after them."""
        if not self._lines.wait_written(self._wait_seconds()):
            self._stalled_at = self._lines.written_count

    def close(self) -> None:
        """Writes what is queued and ends the writer, flush_seconds at most; later lines are
        dropped."""
        self._lines.close()
        self._writer.join(self._wait_seconds())
        super().close()

    def _wait_seconds(self) -> float:
        """No wait where one already ran out and the writer has written nothing since: a daemon
        that exits flushes its log (at its stop, then logging's exit flush and close), and a
        stalled stream holds the exit up once, not at each."""
        return 0 if self._stalled_at == self._lines.written_count else self._flush_seconds

    def _write_all(self) -> None:
        while (taken := self._lines.take()) is not None:
            dropped, line = taken
            try:
                if dropped:
                    self._write(self._dropped_line(dropped))
                if line is not None:
                    self._write(line)
            finally:
                self._lines.written()  # a flush waits for it, whatever the line's fate

    def _dropped_line(self, dropped: int) -> str:
        record = logging.LogRecord(
            self._logger_name,
            logging.WARNING,
            __file__,
            0,
            "%d log lines dropped: the log stream did not take them",
            (dropped,),
            None,
        )
        record.dropped = dropped
        return self.format(record)

    def _write(self, line: str) -> None:
        data = memoryview(f"{line}\n".encode(self._encoding, self._errors))
        # A stream that is gone (EPIPE, a closed descriptor) takes nothing, and there is nowhere
        # left to say so.
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self._fd, data) :]


class _Others(logging.Handler):
    """On the root logger: the warnings of loggers outside the daemon's tree (asyncio's, grpc's,
    the svid library's in the agent), which logging's last resort wrote to stderr as they came,
    on the event loop as often as not, go through the daemon's queue, formatted as its own."""

    def __init__(self, to: QueuedStreamHandler) -> None:
        super().__init__(logging.WARNING)  # what the last resort wrote
        self.to = to

    def emit(self, record: logging.LogRecord) -> None:
        self.to.handle(record)


def _route_others(handler: logging.Handler, replaced: list[logging.Handler]) -> None:
    root = logging.getLogger()
    root.handlers[:] = [
        h for h in root.handlers if not (isinstance(h, _Others) and h.to in replaced)
    ]
    if isinstance(handler, QueuedStreamHandler):
        root.addHandler(_Others(handler))


def _reader_can_stall(stream: IO[str]) -> bool:
    """Whether `stream` is a pipe, socket or terminal: what a reader drains, and can stop
    draining (journald, a log driver, `| less`, a terminal's ^S). A regular file or a device
    takes each write from the disk's or driver's side, as it comes."""
    with contextlib.suppress(AttributeError, ValueError, OSError, io.UnsupportedOperation):
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
        return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)
    return False


def _handler(name: str, stream: IO[str] | None, formatter: logging.Formatter) -> logging.Handler:
    """The process's own stderr, where a reader can stall it, is written through the queue.
    Written synchronously, as each line is logged: a stream given (a test's buffer, read right
    after), a stderr replaced (a test's capture), and a stderr that is a file, whose writes wait
    for no reader; there a line logged before a call is answered is in the file by the answer."""
    stderr = sys.stderr
    if (
        stream is None
        and stderr is sys.__stderr__
        and stderr is not None
        and _reader_can_stall(stderr)
    ):
        return QueuedStreamHandler(stderr, name, formatter)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    return handler


def configure_logger(name: str, log_format: str, level: str, stream: IO[str] | None) -> None:
    """Route the `name` logger tree to `stream` (default stderr) in `log_format` (json | text).
    The handler it replaces is closed: its queued lines written, its writer thread ended. On
    the process's stderr, the other loggers' warnings go the same way."""
    handler = _handler(name, stream, JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger(name)
    previous, logger.handlers[:] = logger.handlers[:], [handler]
    _route_others(handler, previous)
    for old in previous:
        old.close()
    logger.setLevel(level.upper())
    logger.propagate = False


def flush_logger(name: str) -> None:
    """Waits (FLUSH_SECONDS at most) for the `name` tree's queued lines to be written, so that
    what is printed next (a daemon's fatal error) follows them."""
    for handler in logging.getLogger(name).handlers:
        handler.flush()


def say_last(name: str, text: str) -> None:
    """`text` on stderr as a process exits (its fatal error): after the `name` tree's queued
    log lines, through their writer, so a stderr no reader drains (journald stalled on the disk
    that failed) holds the exit up FLUSH_SECONDS at most; a blocking print held it for ever,
    and a supervisor waiting for the exit never started the daemon again. Printed where the
    tree's log is not queued (an admin command, a stderr that is a file)."""
    for handler in logging.getLogger(name).handlers:
        if isinstance(handler, QueuedStreamHandler):
            handler.say(text)
            return
    print(text, file=sys.stderr)


class DaemonLog:
    """One daemon's log, its logger tree `name` through the setup above: what its logs module
    gives the daemon (server/logs.py, agent_attestor/logs.py), so the two differ in the name
    alone."""

    def __init__(self, name: str) -> None:
        self.name = name

    def configure(self, log_format: str, level: str, stream: IO[str] | None = None) -> None:
        """Route the tree to `stream` (stderr) in the chosen format (configure_logger)."""
        configure_logger(self.name, log_format, level, stream)

    def flush(self) -> None:
        """Waits, a few seconds at most, for the queued log lines to reach stderr: a fatal error
        printed next comes after them (flush_logger)."""
        flush_logger(self.name)

    def say(self, text: str) -> None:
        """`text` on stderr as the process exits (its fatal error): after the log's queued
        lines, a few seconds at most waited for a stderr no reader drains (say_last)."""
        say_last(self.name, text)


def stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` writes every thread's stack to stderr and the daemon runs on: what a
    stop or a request that hangs is waiting for. Nothing where stderr is no file (a daemon's
    main run in-process, under a test's capture)."""
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
