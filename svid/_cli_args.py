"""What the command lines of svidd check of their arguments alike."""

from __future__ import annotations

import argparse
from collections.abc import Collection

# gRPC ends a call whose deadline is out of its range (from about 1e10 s) at once, which read as
# a hung server or agent; a day is more than any call of the command lines needs.
MAX_TIMEOUT = 86400.0


def timeout_problem(timeout: float) -> str | None:
    """What is wrong with a --timeout of `timeout` seconds (NaN too), or None."""
    if 0 < timeout <= MAX_TIMEOUT:
        return None
    return f"--timeout: {timeout:g} must be more than 0 and at most {MAX_TIMEOUT:g} seconds"


def non_utf8_argument(args: argparse.Namespace, skip: Collection[str] = ()) -> str | None:
    """The name of the first text argument (lists included) that is not UTF-8, else None.

    A shell passes any bytes; Python keeps one that is not UTF-8 as a lone surrogate, on which
    protobuf (and a datastore) raise UnicodeEncodeError: a traceback. Only the name is given
    back: the value may be a token, or a URL with a password. `skip`: arguments only ever
    opened as local files, whatever bytes their names hold.
    """
    for name, value in vars(args).items():
        if name in skip:
            continue
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not _is_utf8(text):
                return name
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
