"""Files (or stdin) the svid-server CLI reads whole: read to a bound, never past it.

`bundle set --path /dev/zero` (or a stdin that never ends, a log file named by mistake) read
on until the machine's memory was gone: a bound past what the command can use ends it at once,
naming the file and the bound.
"""

from __future__ import annotations

import sys
from pathlib import Path

from server.errors import CliError
from svid._bounded_read import read_bounded


def read_at_most(flag: str, path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of `path` (`-`: stdin), or a CliError naming `flag` when it cannot be read or
    holds more than `limit` bytes (`what` says what so large a file would be)."""
    name = "stdin" if str(path) == "-" else str(path)
    if str(path) == "-" and sys.stdin is None:  # started with `<&-`: a traceback
        raise CliError(f"{flag}: stdin is closed: nothing to read")
    try:
        body = read_bounded(sys.stdin.buffer if str(path) == "-" else Path(path), limit)
    except OSError as exc:
        raise CliError(f"{flag}: cannot read {name}: {exc.strerror or exc}") from None
    if body is None:
        raise CliError(f"{flag}: {name} holds more than {limit} bytes ({what})")
    return body
