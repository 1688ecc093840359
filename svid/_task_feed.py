"""The agent's revocation stream read for a sync task client, on a thread of its own.

An accelerator only: while the stream is down the tasks work as before (a refused token still
asks the server whether its task ended), so nothing here ever blocks or fails a task call.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

from svid._backoff import Backoff
from svid._workload_calls import RevocationsUpdate
from svid._workload_client import Watch
from svid._workload_errors import WorkloadApiError

log = logging.getLogger("svid.tasks")

# Reconnect delays as the Workload API sources use.
BACKOFF = Backoff()

OpenWatch = Callable[[], Watch[RevocationsUpdate]]
# Takes an update; False once there is no one left to tell (the client was collected).
Deliver = Callable[[RevocationsUpdate], bool]


def unimplemented(exc: WorkloadApiError, address: str) -> bool:
    """Whether ``exc`` says the agent serves no revocation stream (an older or foreign agent):
    then there is nothing to watch, and tasks learn of their end as they did before."""
    if exc.code != "UNIMPLEMENTED":
        return False
    log.info(
        "the agent at %s serves no revocation stream: a task ended at the server is noticed "
        "when its next token is refused",
        address,
    )
    return True


class RevocationFeed:
    """Reads the stream ``open_watch`` opens, handing each update to ``deliver``, reconnecting
    with backoff until close(). It holds no reference to its client (``deliver`` is expected to
    hold it weakly), so a client dropped unclosed is still collected."""

    def __init__(self, open_watch: OpenWatch, deliver: Deliver, address: str) -> None:
        self._open = open_watch
        self._deliver = deliver
        self._address = address
        self._rand = random.Random()  # noqa: S311 - jitter, not a secret
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watch: Watch[RevocationsUpdate] | None = None
        self._thread: threading.Thread | None = None
        self._attempt = 0  # failed connections since the last update

    def start(self) -> None:
        """Start reading (once; never after close())."""
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(
                target=self._run, name="svid-task-revocations", daemon=True
            )
        self._thread.start()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def close(self) -> None:
        """Stop reading: the open stream is cancelled, a backoff wait ends."""
        with self._lock:
            self._stop.set()
            watch = self._watch
        if watch is not None:
            watch.cancel()

    def join(self, timeout: float) -> None:
        thread = self._thread
        # Not started (a Ctrl-C between its creation and its start), or close() called from a
        # delivery on the thread itself: nothing to wait for.
        if thread is None or thread.ident is None or thread is threading.current_thread():
            return
        thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._read()
            except _GoneError:
                return
            except WorkloadApiError as exc:
                if unimplemented(exc, self._address):
                    return
                if not self._stop.is_set():
                    log.debug("task revocation stream lost, reconnecting: %s", exc)
            except Exception as exc:  # a background thread: log, go on
                if self._stop.is_set():
                    # gRPC's "Cannot invoke RPC on closed channel!" among them: close() won.
                    return
                log.warning("task revocation stream failed, reconnecting: %r", exc)
            finally:
                with self._lock:
                    self._watch = None
            self._stop.wait(BACKOFF.delay(self._attempt, self._rand))
            self._attempt += 1

    def _read(self) -> None:
        """Read one stream until it ends, delivering every update."""
        # Opened here, on this thread: a Ctrl-C lands in the main thread only, so it cannot
        # cut this call's setup short (svid._call_setup).
        watch = self._open()
        with self._lock:
            if self._stop.is_set():
                watch.cancel()  # close() ran before it could see this stream
                return
            self._watch = watch
        for update in watch:
            self._attempt = 0  # an update came: the connection is good again
            if not self._deliver(update):
                watch.cancel()
                raise _GoneError


class _GoneError(Exception):
    """The client the feed delivered to no longer exists."""
