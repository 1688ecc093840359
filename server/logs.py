"""The server's logs: the 'svid' logger tree through the shared log setup (svid/_logs.py)."""

from __future__ import annotations

from svid._logs import DaemonLog, JsonFormatter, TextFormatter

__all__ = ["JsonFormatter", "TextFormatter", "configure", "flush", "say"]

_LOG = DaemonLog("svid")
configure = _LOG.configure
flush = _LOG.flush
say = _LOG.say
