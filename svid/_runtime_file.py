"""A daemon's runtime file (the server's server.json, the agent's runtime file): where it
listens and its pid, for tests, demos and tools that start it. One writer for both daemons.

Written whole and durably (svid/_durable.write_durably): the temporary file fsynced before its
rename, the directory after it. Without the first, a power cut after the rename could leave the
name holding an empty file, which a waiting tool reads as a daemon up with no addresses.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Self

from svid._durable import write_durably
from svid._small_file import read_small_file

# Addresses and a pid: readable by the tools that wait for them, as it always was.
MODE = 0o644
MAX_BYTES = 64 << 10


class RuntimeFile:
    """Base of a daemon's frozen dataclass of runtime facts, each field a JSON value."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def write(self, path: Path) -> None:
        write_durably(path, (json.dumps(asdict(self), indent=2) + "\n").encode(), MODE)

    @classmethod
    def read(cls, path: Path) -> Self:
        """The file the daemon wrote. SmallFileError (svid/_small_file.py) when there is none, or
        something else at the name: a FIFO is not waited on, a link not followed."""
        return cls(**json.loads(read_small_file(path, max_bytes=MAX_BYTES, follow_links=False)))
