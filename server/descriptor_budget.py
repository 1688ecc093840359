"""Whether the listeners' connection caps fit the process's file descriptor limit, and the
cap on the agents' gRPC ports that the limit leaves.

Each connection a listener holds is a descriptor of the one process that also holds the
datastore, the admin socket's clients and the signing workers' pipes: with every listener at
its cap, what is left must still carry those, or the process runs out of descriptors, the
admin API stops answering and the agents cannot renew. The HTTP listeners' caps are set by
the operator (http_max_connections); the agents' ports take what the limit leaves unless the
operator sets grpc_max_connections too. Caps are ceilings an attack can reach, not the load
expected, and the limit belongs to the host (systemd's LimitNOFILE, the container runtime's
ulimit): caps past it get a start-up warning naming both, as the agent's relay gives and nginx
gives for worker_connections, not a refusal to start.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

from server.config import ServerConfig

_log = logging.getLogger("svid.server")

# A client of any listener gets this long to finish its TLS handshake (asyncio's default is
# 60 s, gRPC's 120 s): a connection that never sends its ClientHello still holds a descriptor,
# and a real client needs one round trip or two.
HANDSHAKE_TIMEOUT = 10.0
# An agents' port connection with no call open is closed after this long (gRPC sends GOAWAY;
# a client reconnects on its next call): an agent always has its Sync stream open, and
# anything else that finished a handshake and calls nothing only holds a descriptor.
GRPC_IDLE_TIMEOUT = 300.0

# Left for everything but the listeners' connections: the admin socket's clients, the metrics
# listener, the datastore's files, the signing workers' pipes and gRPC's own descriptors.
HEADROOM = 1024
# A derived gRPC cap is never below this (a limit too small for it is warned of) nor above the
# second (an unlimited descriptor limit).
GRPC_MIN_CONNECTIONS = 256
GRPC_MAX_DERIVED = 65_536
# The agents' ports (bind_address, attest_bind_address). gRPC counts its connection cap
# (grpc.max_allowed_incoming_connections) per listening port, not per server: given the whole
# cap, the two ports together would hold twice what the budget sets aside for them.
NODE_PORTS = 2


def per_port(cap: int) -> int:
    """The connection cap to give gRPC for each of the agents' ports: its share of `cap`."""
    return max(1, cap // NODE_PORTS)


@dataclass(frozen=True, slots=True)
class DescriptorBudget:
    listeners: tuple[str, ...]  # the config keys of the HTTP listeners that will run
    per_listener: int  # http_max_connections
    grpc: int = 0  # grpc_max_connections as configured; 0: derived from the limit
    headroom: int = HEADROOM

    @property
    def http(self) -> int:
        return len(self.listeners) * self.per_listener

    @property
    def needed(self) -> int:
        """Descriptors the caps and the headroom take (a derived gRPC cap at its least)."""
        return self.http + (self.grpc or GRPC_MIN_CONNECTIONS) + self.headroom

    def fits(self, descriptor_limit: int) -> bool:
        return descriptor_limit == resource.RLIM_INFINITY or self.needed <= descriptor_limit

    def grpc_cap(self, descriptor_limit: int) -> int:
        """The agents' ports' connection cap: the configured one, or what the limit leaves."""
        if self.grpc:
            return self.grpc
        if descriptor_limit == resource.RLIM_INFINITY:
            return GRPC_MAX_DERIVED
        left = descriptor_limit - self.http - self.headroom
        return min(GRPC_MAX_DERIVED, max(GRPC_MIN_CONNECTIONS, left))


def budget(config: ServerConfig) -> DescriptorBudget:
    listeners = []
    if config.oidc_issuer:
        listeners.append("oauth_bind_address")
    if config.bundle_endpoint_address:
        listeners.append("bundle_endpoint_address")
    return DescriptorBudget(
        tuple(listeners), config.http_max_connections, config.grpc_max_connections
    )


def warn_if_short(config: ServerConfig, descriptor_limit: int) -> bool:
    """Log a warning when the listeners at their caps, and the headroom, need more descriptors
    than `descriptor_limit`; whether they fit."""
    caps = budget(config)
    if caps.fits(descriptor_limit):
        return True
    _log.warning(
        "the listeners' connection caps need more file descriptors than the process may open: "
        "lower http_max_connections or grpc_max_connections, or raise the hard RLIMIT_NOFILE "
        "(LimitNOFILE)",
        extra={
            "descriptor_limit": descriptor_limit,
            "http_max_connections": caps.per_listener,
            "listeners": ",".join(caps.listeners),
            "grpc_max_connections": caps.grpc_cap(descriptor_limit),
            "headroom": caps.headroom,
            "needed": caps.needed,
        },
    )
    return False
