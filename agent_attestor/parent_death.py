"""Run a command that gets SIGTERM when the process that started it dies, even by SIGKILL (Linux).

    python -m agent_attestor.parent_death PARENT_PID PROGRAM [ARG ...]

This small process arms the parent-death signal for itself, then execs the program, which keeps
it (the kernel clears it across exec only for set-user-ID and similar programs).

Why not a ``preexec_fn`` doing the same in the child: a ``preexec_fn`` makes ``subprocess`` use
``fork()`` rather than ``vfork()``, and forking a process that has gRPC threads runs gRPC's fork
handlers in the child. From grpcio 1.81 on, those restart a poller whose epoll descriptor the
child then closes before its exec, and the child now and then aborts (SIGABRT) before it runs
at all (grpc/grpc#43055). Without a ``preexec_fn``, ``subprocess`` uses ``vfork()`` and runs no
fork handler.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def command(argv: Sequence[str]) -> list[str]:
    """``argv``, run so that it dies with this process (unchanged where Linux's prctl is not)."""
    if sys.platform != "linux":
        return list(argv)
    return [sys.executable, "-m", __name__, str(os.getpid()), *argv]


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        usage = "usage: python -m agent_attestor.parent_death PARENT_PID PROGRAM [ARG ...]"
        print(usage, file=sys.stderr)
        return 2
    parent, program = int(argv[0]), list(argv[1:])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        print(f"parent_death: prctl: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    os.execvp(program[0], program)  # noqa: S606 - the starter's own argv, as Popen would run it
    return 1  # not reached: execvp replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
