"""Another party's words as one line of printable text, written one way wherever they are
shown: the text log (svid/_logs.py), the refusals quoting a foreign endpoint or issuer
(server/input_text.py), so an operator reads the same escape in each."""

from __future__ import annotations


def shown(text: str) -> str:
    """`text` with each character that is not printable (a NUL, a newline, a carriage return,
    an escape sequence's ESC, a bidi override) written as its Python escape (`\\n`, `\\x1b`,
    `\\u202e`); printable text (a backslash among it) as it is, so text shown once is shown
    the same again, never escaped twice."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
