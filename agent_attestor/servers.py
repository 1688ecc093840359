"""Which server the agent talks to: the configured servers, their DNS answers, the pick after a
failure, and the reconnect backoff.

Several svid-server processes share one datastore and any of them serves any agent, so the
agent holds one of them and moves only when it fails. The decisions are pure functions of the
candidates, what was tried and an injected random source; `ServerChooser` only keeps that state
between failures and asks the resolver (the one piece of I/O, passed in) for fresh DNS answers.

Why the choices:
- The first server is drawn at random per agent, so agents spread over the list.
- After a failure the next one is drawn at random among those not yet tried since the last
  good connection, so a dead server's agents spread over the survivors (a fixed "next in the
  list" would send them all to one) and a bad server is not retried before the others.
- An agent stays where it is until its server fails: a dead server that comes back is not
  rushed by everyone who left it.
- Delays are exponential with full jitter (uniform over [0, ceiling]), so agents that lost the
  same server at the same instant do not come back at the same instant; the first after a
  live stream is lost spreads wider, and none outlasts the agent SVID (reconnect.py).
- A server is its node API and its Attest listener together: the agent attests on the Attest
  address paired with the server it then syncs with, so its new record is in that server's
  memory at once, whatever the change feed between servers lags. One Attest address for all
  (a load balancer) works too: any server can attest any agent.
- Every address a name resolves to is a server, both families included: an address that does
  not answer costs one refused attempt, where dropping one family could drop every server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

# gRPC status codes that are the server's answer about this agent or request: another server
# reading the same datastore would answer the same, so moving would only add load.
_DECISIONS = frozenset(
    {
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
    }
)

# host -> its addresses (IP literals); raises OSError when the name does not resolve.
Resolver = Callable[[str], Awaitable[list[str]]]


@dataclass(frozen=True)
class Target:
    """One configured server, as written: its node API and Attest addresses (host:port)."""

    node: str
    attest: str


@dataclass(frozen=True, order=True)
class Server:
    """One server to dial: addresses gRPC connects to as they are."""

    node: str
    attest: str


def split_host_port(address: str) -> tuple[str, str]:
    """("h", "1") from "h:1", ("::1", "1") from "[::1]:1"."""
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def join_host_port(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def pair_targets(nodes: Sequence[str], attests: Sequence[str]) -> tuple[Target, ...]:
    """One attest address for every server, or one per server in the same order."""
    if len(attests) == 1:
        return tuple(Target(node, attests[0]) for node in nodes)
    if len(attests) != len(nodes):
        raise ValueError(f"{len(nodes)} server addresses but {len(attests)} attest addresses")
    return tuple(Target(node, attest) for node, attest in zip(nodes, attests, strict=True))


def expand(targets: Iterable[Target], answers: Mapping[str, Sequence[str]]) -> tuple[Server, ...]:
    """The servers `targets` stand for, given the DNS answers for their host names.

    A name with several addresses is several servers. Its attest address follows it to the
    same machine when it names the same host (one DNS name for both listeners); any other
    attest address is dialled as written. A name without an answer is dialled as written
    (gRPC resolves it). Order: the configured order, then each name's addresses sorted.
    """
    servers: list[Server] = []
    for target in targets:
        host, port = split_host_port(target.node)
        attest_host, attest_port = split_host_port(target.attest)
        addresses = sorted(set(answers.get(host) or ()))
        if not addresses:
            servers.append(Server(target.node, target.attest))
            continue
        for ip in addresses:
            attest = join_host_port(ip, attest_port) if attest_host == host else target.attest
            servers.append(Server(join_host_port(ip, port), attest))
    return tuple(dict.fromkeys(servers))  # the same server listed twice is one server


def first_pick(servers: Sequence[Server], rand: random.Random) -> Server:
    """Where an agent starts: at random, so a fleet spreads evenly over the servers."""
    return rand.choice(list(servers))


def next_pick(
    servers: Sequence[Server], current: Server | None, tried: frozenset[Server], rand: random.Random
) -> tuple[Server, frozenset[Server]]:
    """The server to try after `current` failed, and the set tried in this round.

    Each server is tried once per round, in random order; when all have been, a new round
    starts (still not with `current`, if there is another).
    """
    tried = tried | {current} if current is not None else tried
    pool = [s for s in servers if s not in tried]
    if not pool:
        tried = frozenset({current}) if current is not None else frozenset()
        pool = [s for s in servers if s != current] or list(servers)
    choice = rand.choice(pool)
    return choice, tried | {choice}


def should_move(code: str | None) -> bool:
    """Whether a failure (a gRPC status code name; None for a transport error) means the
    server is gone or unwell, so another one should be tried."""
    return code not in _DECISIONS


async def system_resolver(host: str) -> list[str]:
    """The host's addresses from the system resolver, asked anew each time (a changed DNS
    answer is honoured at the next pick)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except UnicodeError as exc:
        # A name IDNA cannot encode (an empty or over-long label) never resolves: it is the
        # OSError of the Resolver contract, not an error that ends the Sync loop.
        raise OSError(f"{host!r} is not a valid host name: {exc}") from exc
    return sorted({str(info[4][0]) for info in infos})


class ServerChooser:
    """The agent's current server, and the next one when it fails."""

    def __init__(
        self,
        targets: Sequence[Target],
        rand: random.Random,
        resolver: Resolver = system_resolver,
    ) -> None:
        if not targets:
            raise ValueError("no server to connect to")
        self._targets = tuple(targets)
        self._rand = rand
        self._resolver = resolver
        self._answers: dict[str, list[str]] = {}  # the last good answer per name
        self._tried: frozenset[Server] = frozenset()
        self._last: tuple[Server, ...] = ()  # what the targets stood for at the last pick
        self.current: Server | None = None

    async def candidates(self) -> tuple[Server, ...]:
        """Every server the targets stand for now (names resolved anew)."""
        names = {split_host_port(t.node)[0] for t in self._targets}
        for host in sorted(name for name in names if not is_ip(name)):
            try:
                self._answers[host] = await self._resolver(host)
            except OSError as exc:
                # Keep the last answer (or let gRPC resolve the name) rather than stop.
                log.warning(
                    "cannot resolve the server name", extra={"host": host, "error": str(exc)}
                )
        self._last = expand(self._targets, self._answers)
        return self._last

    def has_others(self) -> bool:
        """Whether a move has somewhere to go: the servers the targets stood for at the last
        pick (resolved then, not now: asking DNS here could hang on what only decides whether
        to ask it again at the pick) hold one other than the current one."""
        return any(server != self.current for server in self._last)

    async def first(self) -> Server:
        self.current = first_pick(await self.candidates(), self._rand)
        self._tried = frozenset({self.current})
        return self.current

    async def next(self) -> Server:
        """Another server after the current one failed."""
        self.current, self._tried = next_pick(
            await self.candidates(), self.current, self._tried, self._rand
        )
        return self.current

    def connected(self) -> None:
        """The current server works: a later failure starts a new round."""
        self._tried = frozenset({self.current}) if self.current is not None else frozenset()
