"""What a logger wrote, record by record, for a test of what a daemon's log says: its level
lowered to DEBUG while the test runs (the daemons' loggers need not propagate to pytest's)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class LogLines(logging.Handler):
    """The records written, those whose message is `message` only when one is given."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.message = message
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.message is None or record.getMessage() == self.message:
            self.records.append(record)

    def said(self, message: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == message]


@contextlib.contextmanager
def log_lines(logger_name: str, message: str | None = None) -> Iterator[LogLines]:
    """The records `logger_name` writes inside the block (see LogLines)."""
    logger = logging.getLogger(logger_name)
    lines, level = LogLines(message), logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
