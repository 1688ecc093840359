"""The agent's logs: the 'agent_attestor' logger tree through the shared log setup."""

from __future__ import annotations

from svid._logs import DaemonLog, JsonFormatter, TextFormatter

__all__ = ["JsonFormatter", "TextFormatter", "configure", "flush", "say"]

_LOG = DaemonLog("agent_attestor")
configure = _LOG.configure
flush = _LOG.flush
say = _LOG.say
