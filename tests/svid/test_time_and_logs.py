"""One time format (RFC 3339 UTC) for CLIs and logs, and both daemons' log lines carry it."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import IO

import pytest

from agent_attestor import logs as agent_logs
from server import logs as server_logs
from svid._clock import format_utc, unix_times_as_numbers

RFC3339_MS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def test_format_utc_is_rfc3339_with_z() -> None:
    assert format_utc(1_796_455_871) == "2026-12-05T07:31:11Z"
    assert format_utc(1_796_455_871.25, millis=True) == "2026-12-05T07:31:11.250Z"
    assert format_utc(0) == "1970-01-01T00:00:00Z"


Configure = Callable[[str, str, IO[str] | None], None]


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate)
        for name in ("svid", "agent_attestor")
        for lg in [logging.getLogger(name)]
    }
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


@pytest.mark.usefixtures("restore_loggers")
@pytest.mark.parametrize(
    ("configure", "logger"),
    [(server_logs.configure, "svid.server.test"), (agent_logs.configure, "agent_attestor.test")],
)
def test_text_log_lines_start_with_a_timestamp(configure: Configure, logger: str) -> None:
    stream = io.StringIO()
    configure("text", "info", stream)
    logging.getLogger(logger).info("agent attested", extra={"count": 3})
    line = stream.getvalue().rstrip("\n")
    assert re.fullmatch(rf"{RFC3339_MS} info    {logger}: agent attested count=3", line), line


@pytest.mark.usefixtures("restore_loggers")
@pytest.mark.parametrize(
    ("configure", "logger"),
    [(server_logs.configure, "svid.server.test"), (agent_logs.configure, "agent_attestor.test")],
)
def test_json_log_lines_carry_the_same_timestamp_format(configure: Configure, logger: str) -> None:
    stream = io.StringIO()
    configure("json", "info", stream)
    logging.getLogger(logger).warning("slow")
    data = json.loads(stream.getvalue())
    assert re.fullmatch(RFC3339_MS, data["time"]), data["time"]
    assert (data["level"], data["logger"], data["msg"]) == ("warning", logger, "slow")


@pytest.mark.usefixtures("restore_loggers")
def test_text_log_lines_keep_the_traceback() -> None:
    stream = io.StringIO()
    agent_logs.configure("text", "info", stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("agent_attestor.test").exception("failed")
    assert "ValueError: boom" in stream.getvalue()


def test_unix_times_as_numbers_only_touches_times() -> None:
    data = {"expires_at": "17", "id": "42", "items": [{"created_at": "-1", "at": "x"}], "n": 3}
    assert unix_times_as_numbers(data) == {
        "expires_at": 17,
        "id": "42",
        "items": [{"created_at": -1, "at": "x"}],
        "n": 3,
    }
