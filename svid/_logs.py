"""The one log setup of svidd's daemons: JSON lines or text on stderr, each line timestamped.

The server and the node agent format alike (they differ only in the logger tree they route), so
an operator reading both logs sees the same time format, the one the CLIs print. Callers never log
keys or tokens.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import logging
import signal
import sys
from typing import IO, Any

from svid._clock import format_utc

# What both daemons' log_format and log_level take.
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")

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


class TextFormatter(logging.Formatter):
    """`<time> <level> <logger>: <msg> key=value ...`, then the traceback if there is one."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = (
            f"{format_utc(record.created, millis=True)} {record.levelname.lower():7} "
            f"{record.name}: {record.getMessage()}"
        )
        if extras:
            line = f"{line} {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def configure_logger(name: str, log_format: str, level: str, stream: IO[str] | None) -> None:
    """Route the `name` logger tree to `stream` (default stderr) in `log_format` (json | text)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` writes every thread's stack to stderr and the daemon runs on: what a
    stop or a request that hangs is waiting for. Nothing where stderr is no file (a daemon's
    main run in-process, under a test's capture)."""
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
