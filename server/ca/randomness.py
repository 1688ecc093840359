"""Random bytes for serials and JWT ids: os.urandom, drawn a few KiB at a time per thread.

Why: os.urandom releases the GIL around its getrandom() call, and while the signing threads are
busy, getting the GIL back took about as long as the signature it preceded (py-spy: 13-15% of a
signing thread's time went to a jti's 16 bytes). Drawing 4 KiB at once makes that one wait per
few hundred credentials. The bytes are the same CSPRNG output; each is handed out once, from a
buffer that belongs to one thread, and a forked child starts with empty buffers.
"""

from __future__ import annotations

import os
import threading

_CHUNK = 4096


class RandomPool:
    def __init__(self) -> None:
        self._local = threading.local()
        # A child must not hand out what its parent already did (subprocesses exec at once,
        # but nothing here should depend on that).
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._local = threading.local()

    def take(self, size: int) -> bytes:
        """`size` fresh random bytes, as os.urandom(size) gives them."""
        local = self._local
        buffer: bytes = getattr(local, "buffer", b"")
        at: int = getattr(local, "at", 0)
        if at + size > len(buffer):
            buffer = os.urandom(max(_CHUNK, size))
            local.buffer = buffer
            at = 0
        local.at = at + size
        return buffer[at : at + size]


_POOL = RandomPool()


def random_bytes(size: int) -> bytes:
    return _POOL.take(size)


def random_serial_number() -> int:
    """x509.random_serial_number from the pool: 20 random bytes as a big-endian integer, shifted
    right by one so it is positive and at most 159 bits (RFC 5280 §4.1.2.2 allows 20 octets)."""
    return int.from_bytes(_POOL.take(20), "big") >> 1
