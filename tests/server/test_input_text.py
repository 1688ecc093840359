"""server/input_text: text another party wrote, shown to operators, logs and the ledger."""

from __future__ import annotations

from server.input_text import shown


def test_shown_escapes_what_is_not_printable_and_keeps_the_rest() -> None:
    assert shown("plain text, é and ✓") == "plain text, é and ✓"
    assert shown("a\x00b\r\nc\x1b[2J") == "a\\x00b\\r\\nc\\x1b[2J"
    assert shown("\u2028\U000e0001") == "\\u2028\\U000e0001"
    assert shown("\x1b\x00\u2028").isprintable()
