"""Text a request carries that no datastore can hold: PostgreSQL text takes no NUL, so one is
refused as input (INVALID_ARGUMENT), on either backend, rather than met as a storage failure
that callers retry (and, in a shared commit, fails its neighbours too)."""

from __future__ import annotations

from server.errors import InvalidRequestError

# `shown`: another party's text (a foreign endpoint's status line, a certificate's URI SAN) as
# one line of printable text, escaped as the text log escapes it. Re-exported, the one
# escaping: messages reach an operator's terminal, the logs, and the ledger, which on
# PostgreSQL takes no NUL (a refusal holding one was not recorded at all).
from svid._printable import shown

__all__ = ["refuse_nul", "refuse_unprintable", "shown"]


def refuse_nul(name: str, *values: str) -> None:
    """InvalidRequestError naming `name` when any of `values` holds a NUL."""
    if any("\x00" in value for value in values):
        raise InvalidRequestError(f"{name}: may not contain NUL (0x00)")


def refuse_unprintable(name: str, *values: str) -> None:
    """InvalidRequestError naming `name` unless each of `values` is one line of printable text
    (a NUL named as such). For text a workload gives that an operator's terminal shows (`task
    show`): a newline would forge a line of the view, an escape sequence rewrite the screen."""
    refuse_nul(name, *values)
    if not all(value.isprintable() for value in values):
        raise InvalidRequestError(f"{name}: one line of printable text")
