"""The server's logs: the 'svid' logger tree through the shared log setup (svid/_logs.py)."""

from __future__ import annotations

from typing import IO

from svid._logs import (
    JsonFormatter,
    TextFormatter,
    configure_logger,
    flush_logger,
    say_last,
)

__all__ = ["JsonFormatter", "TextFormatter", "configure", "flush", "say"]


def configure(log_format: str, level: str, stream: IO[str] | None = None) -> None:
    """Route the 'svid' logger tree to `stream` (stderr) in the chosen format."""
    configure_logger("svid", log_format, level, stream)


def flush() -> None:
    """Waits, a few seconds at most, for the queued log lines to reach stderr: a fatal error
    printed next comes after them."""
    flush_logger("svid")


def say(text: str) -> None:
    """`text` on stderr as the process exits (its fatal error): after the log's queued lines,
    a few seconds at most waited for a stderr no reader drains (svid._logs.say_last)."""
    say_last("svid", text)
