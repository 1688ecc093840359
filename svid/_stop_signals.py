"""The signals that stop a daemon (`svid-server run`, `svid-agent run`) cleanly.

SIGHUP is among them: left to its default action it killed the daemon at once and without a
word (no drain, no final audit checkpoint or saved state, its socket and runtime file left), when
an operator sent it expecting a reload (as nginx or sshd take it) or a terminal closed. Neither
daemon reloads anything on a signal: SIGHUP stops it as SIGTERM does, and its log says why.

Unless it was started with SIGHUP ignored (nohup, a supervisor detaching it from a terminal): that
was asked for so that the terminal may close, and it stays ignored, as it was before SIGHUP had a
handler. So does a SIGINT it was started with ignored: a non-interactive shell hands a job it starts
with `&` SIGINT ignored so that a Ctrl-C meant for the script's foreground does not reach it, and
the handler put in its place stopped the daemon with it (Python itself leaves an ignored SIGINT).
"""

from __future__ import annotations

import asyncio
import logging
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Left as they are when the process was started with them ignored (SIGTERM never is by choice).
_KEPT_IGNORED = (signal.SIGINT, signal.SIGHUP)


def stop_on_signals(stop: asyncio.Event, log: logging.Logger) -> None:
    """Set `stop` on each of STOP_SIGNALS (on the running loop); say so for SIGHUP. A SIGHUP
    or SIGINT this process was started with ignored is left ignored."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        if sig in _KEPT_IGNORED and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        loop.add_signal_handler(sig, _stop, sig, stop, log)


def _stop(sig: signal.Signals, stop: asyncio.Event, log: logging.Logger) -> None:
    if sig == signal.SIGHUP and not stop.is_set():
        log.warning(
            "SIGHUP: stopping; nothing is reloaded on a signal (the configuration is read at "
            "start): start the daemon again to apply a change"
        )
    stop.set()
