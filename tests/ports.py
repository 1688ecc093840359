"""A free loopback TCP port, for a listener that must keep its address across a restart.

The port is picked below the kernel's ephemeral range. A port the kernel hands out for `bind(0)`
(every other test server binds that way) or for an outgoing connection comes from that range, so
between our pick and the listener's bind nothing else in the run can take it; a port picked from
the range itself was once taken by another server in that window and CI failed on it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_FALLBACK_EPHEMERAL_LOW = 32768
_LOWEST = 10000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_LOW
    return low


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing listens on now, outside the ephemeral range, not handed out before in this
    process."""
    high = _ephemeral_low() - 1
    if high - _LOWEST < 1000:
        with socket.socket() as s:  # no room below the range on this host: the kernel's pick
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _ in range(200):
        port = random.randint(_LOWEST, high)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free loopback port between {_LOWEST} and {high}")
