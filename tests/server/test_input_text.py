"""server/input_text: text another party wrote, shown to operators, logs and the ledger."""

from __future__ import annotations

import logging

from server.input_text import shown
from svid._logs import TextFormatter


def test_shown_escapes_what_is_not_printable_and_keeps_the_rest() -> None:
    assert shown("plain text, é and ✓") == "plain text, é and ✓"
    assert shown("a\x00b\r\nc\x1b[2J") == "a\\x00b\\r\\nc\\x1b[2J"
    assert shown("\u2028\U000e0001") == "\\u2028\\U000e0001"
    assert shown("\x1b\x00\u2028").isprintable()


def test_shown_once_is_shown_the_same_again_and_as_the_text_log_writes_it() -> None:
    # A refusal quoting a foreign endpoint is shown when raised, then logged: the operator
    # reads one escape (\x1b), never \\x1b, in the error, the ledger and the log line.
    hostile = "403 Forbidden\x1b[2J\nforged line \\x1b"
    once = shown(hostile)
    assert shown(once) == once
    record = logging.LogRecord("svid", logging.WARNING, __file__, 1, once, None, None)
    assert TextFormatter().format(record).endswith(f"svid: {once}")
