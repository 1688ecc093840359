"""Whether the HTTP listeners' connection caps fit the process's file descriptor limit.

Each connection an HTTP listener holds is a descriptor of the process that also serves the
agents' gRPC APIs: with every listener at its http_max_connections, what is left must still
carry the agents' connections and the server's own files, or the process runs out of
descriptors and the agents cannot renew. The caps are ceilings an attack can reach, not the
load expected, and the limit belongs to the host (systemd's LimitNOFILE, the container
runtime's ulimit): so a start-up warning naming both, as the agent's relay gives and nginx
gives for worker_connections, not a refusal to start.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

from server.config import ServerConfig

_log = logging.getLogger("svid.server")

# Left for everything but the HTTP listeners: the agents' connections to the node and
# attestation APIs (one each, and no cap bounds them: room for several hundred agents), the
# admin socket's clients, the metrics listener, the datastore's files, the signing workers'
# pipes and gRPC's own descriptors.
HEADROOM = 1024


@dataclass(frozen=True, slots=True)
class DescriptorBudget:
    listeners: tuple[str, ...]  # the config keys of the HTTP listeners that will run
    per_listener: int  # http_max_connections
    headroom: int = HEADROOM

    @property
    def needed(self) -> int:
        return len(self.listeners) * self.per_listener + self.headroom

    def fits(self, descriptor_limit: int) -> bool:
        return descriptor_limit == resource.RLIM_INFINITY or self.needed <= descriptor_limit


def http_budget(config: ServerConfig) -> DescriptorBudget:
    listeners = []
    if config.oidc_issuer:
        listeners.append("oauth_bind_address")
    if config.bundle_endpoint_address:
        listeners.append("bundle_endpoint_address")
    return DescriptorBudget(tuple(listeners), config.http_max_connections)


def warn_if_short(config: ServerConfig, descriptor_limit: int) -> bool:
    """Log a warning when the HTTP listeners at their caps, and the headroom, need more
    descriptors than `descriptor_limit`; whether they fit."""
    budget = http_budget(config)
    if budget.fits(descriptor_limit):
        return True
    _log.warning(
        "the HTTP listeners' connection caps need more file descriptors than the process may "
        "open: lower http_max_connections or raise the hard RLIMIT_NOFILE (LimitNOFILE)",
        extra={
            "descriptor_limit": descriptor_limit,
            "http_max_connections": budget.per_listener,
            "listeners": ",".join(budget.listeners),
            "headroom": budget.headroom,
            "needed": budget.needed,
        },
    )
    return False
