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


FORGED = "2026-12-07T11:50:00.000Z info    svid.server.admin: entry deleted entry_id=FORGED"


@pytest.mark.usefixtures("restore_loggers")
@pytest.mark.parametrize(
    ("configure", "logger"),
    [(server_logs.configure, "svid.server.test"), (agent_logs.configure, "agent_attestor.test")],
)
def test_text_log_lines_keep_a_callers_newlines_and_escapes_on_their_own_line(
    configure: Configure, logger: str
) -> None:
    """A denied mint's reason names the audience the workload asked for (any text but NUL):
    its newline wrote FORGED as a record of its own into the server's text log."""
    stream = io.StringIO()
    configure("text", "info", stream)
    said = f"evil\n{FORGED}\r\x1b[2K"
    logging.getLogger(logger).info(
        "task request denied: %s", f"audience {said}", extra={"reason": said}
    )
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert f"audience evil\\n{FORGED}\\r\\x1b[2K reason=" in lines[0], lines[0]
    assert lines[0].endswith(f"reason={json.dumps(said)}"), lines[0]


@pytest.mark.usefixtures("restore_loggers")
def test_a_text_field_with_spaces_is_quoted_so_none_follows_it_but_its_own() -> None:
    """A denial's reason names the audience asked for: "x agent_id=spiffe://..." in it wrote a
    second agent_id field after the one the server gave, and a reader took the other agent's."""
    stream = io.StringIO()
    server_logs.configure("text", "info", stream)
    reason = 'audience x agent_id=spiffe://example.org/other "y" is not among the resources'
    logging.getLogger("svid.server.test").info(
        "task request denied",
        extra={"agent_id": "spiffe://example.org/bot", "reason": reason, "count": 3, "flag": ""},
    )
    line = stream.getvalue().rstrip("\n")
    assert line.endswith(
        f"task request denied agent_id=spiffe://example.org/bot reason={json.dumps(reason)} "
        'count=3 flag=""'
    ), line


@pytest.mark.usefixtures("restore_loggers")
def test_a_tracebacks_lines_start_no_record_of_their_own() -> None:
    """An error's message holding a newline (the caller's words) wrote the rest as a line of
    its own, at the start of a line as a record is."""
    stream = io.StringIO()
    server_logs.configure("text", "info", stream)
    try:
        raise ValueError(f"bad audience evil\n{FORGED}")
    except ValueError:
        logging.getLogger("svid.server.test").exception("handler failed")
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("svid.server.test: handler failed"), first
    assert rest, "the traceback is kept"
    assert all(line.startswith(" ") for line in rest), rest
    assert any(line.strip() == FORGED for line in rest), rest
