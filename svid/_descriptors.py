"""The process's file descriptor limit, for the daemons (server and agent): each connection
they hold costs a descriptor, and the usual default soft limit (1024) is small."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

_NR_OPEN = "/proc/sys/fs/nr_open"
_FALLBACK_CEILING = 1 << 20


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped by fs.nr_open), as Go's runtime
    does for SPIRE at start; the soft limit in force after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # setrlimit refuses an unlimited soft limit past fs.nr_open: ask for the ceiling.
        try:
            with open(_NR_OPEN, "rb") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = _FALLBACK_CEILING
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the descriptor limit", extra={"error": str(exc)})
            return soft
        return target
    return soft
