"""Reading a file (or a stream) whole, to a bound, never past it.

`--config /dev/zero`, `bundle set --path /dev/zero`, a pipe that never ends: read whole, each
read on until the machine's memory was gone. One reader for every such file, so each stops at
its bound the same way (one byte past it says there is more) and refuses in its own words.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO


def read_bounded(source: Path | BinaryIO, limit: int) -> bytes | None:
    """The bytes of `source` (a file, or an open binary stream from where it stands), or None
    when it holds more than `limit` bytes: limit + 1 are read at most. OSError as opening or
    reading raises it."""
    if isinstance(source, Path):
        with source.open("rb") as stream:
            body = stream.read(limit + 1)
    else:
        body = source.read(limit + 1)
    return None if len(body) > limit else body
