"""svid.httpx.mtls_client / async_mtls_client against a real HTTPS server built with svid.tls:
two workloads on fake agents (a real Workload API each), real sockets, real TLS."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

import svid.httpx
from svid import VerifiedX509, der_concat, tls
from tests.svid.tls_pki import make_pki
from tests.svid.tls_world import CLIENT, INTRUDER, SERVER, Workload, https_server, sock_root
from tests.svid.tls_world import workload as fake_workload
from tests.svid.workload_fake import eventually


@dataclass
class World:
    server: Workload
    client: Workload


@pytest.fixture
def world() -> Iterator[World]:
    pki = make_pki()
    with (
        sock_root() as root,
        fake_workload(pki, SERVER, root) as server,
        fake_workload(pki, CLIENT, root) as client,
    ):
        yield World(server, client)


def _refused_in_tls(error: BaseException) -> bool:
    """Whether ``error`` was caused by svid refusing the TLS peer."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, tls.PeerRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def test_mtls_client_presents_its_svid_and_reaches_the_authorised_server(world: World) -> None:
    sctx = tls.server_context(world.server.source, CLIENT)
    with (
        https_server(sctx) as (port, seen, _httpd),
        svid.httpx.mtls_client(
            world.client.source, SERVER, base_url=f"https://127.0.0.1:{port}", timeout=5
        ) as client,
    ):
        assert isinstance(client, httpx.Client)
        assert client.get("/a").text == "hello"
        assert client.get("/b").status_code == 200
    assert seen.requests == ["/a", "/b"]
    assert seen.peers == [CLIENT, CLIENT]


def test_mtls_client_refuses_a_server_it_does_not_authorise(world: World) -> None:
    sctx = tls.server_context(world.server.source, CLIENT)
    with (
        https_server(sctx) as (port, seen, _httpd),
        svid.httpx.mtls_client(world.client.source, INTRUDER) as client,
        pytest.raises(httpx.ConnectError) as raised,
    ):
        client.get(f"https://127.0.0.1:{port}/secret")
    assert _refused_in_tls(raised.value)
    assert seen.requests == []


def test_a_server_that_does_not_authorise_the_client_gets_no_request(world: World) -> None:
    sctx = tls.server_context(world.server.source, INTRUDER)
    with (
        https_server(sctx) as (port, seen, _httpd),
        svid.httpx.mtls_client(world.client.source, SERVER) as client,
        pytest.raises(httpx.HTTPError),
    ):
        client.get(f"https://127.0.0.1:{port}/secret")
    assert seen.requests == []


def test_mtls_client_presents_the_rotated_svid_on_new_connections(world: World) -> None:
    serials: list[int] = []

    def the_client(peer: VerifiedX509) -> bool:
        serials.append(int(peer.serial, 16))
        return str(peer.spiffe_id) == CLIENT

    sctx = tls.server_context(world.server.source, the_client)
    with (
        https_server(sctx) as (port, _seen, _httpd),
        svid.httpx.mtls_client(world.client.source, SERVER) as client,
    ):
        first = world.client.serial
        url = f"https://127.0.0.1:{port}/x"
        assert client.get(url, headers={"Connection": "close"}).status_code == 200
        second = world.client.rotate()
        assert client.get(url).status_code == 200  # the same client object, no restart
    assert serials == [first, second]


def test_async_mtls_client_works_and_refuses_like_the_sync_one(world: World) -> None:
    sctx = tls.server_context(world.server.source, CLIENT)

    async def calls(port: int) -> tuple[str, BaseException]:
        async with svid.httpx.async_mtls_client(world.client.source, SERVER, timeout=5) as ok:
            assert isinstance(ok, httpx.AsyncClient)
            text = (await ok.get(f"https://127.0.0.1:{port}/a")).text
        async with svid.httpx.async_mtls_client(world.client.source, INTRUDER) as wrong:
            with pytest.raises(httpx.ConnectError) as raised:
                await wrong.get(f"https://127.0.0.1:{port}/secret")
        return text, raised.value

    with https_server(sctx) as (port, seen, _httpd):
        text, refused = asyncio.run(calls(port))
    assert text == "hello"
    assert _refused_in_tls(refused)
    assert seen.requests == ["/a"]
    assert seen.peers == [CLIENT]


def test_mtls_clients_take_the_federated_trust_domains_their_server_is_in() -> None:
    # client_context's options go to it from the mtls clients (their docstring says so): a
    # server of a federated trust domain is reached only when named, as svid.tls asks.
    home, other = make_pki(), make_pki("other.org")
    bundles = {str(p.trust_domain.id): der_concat([p.root.cert]) for p in (home, other)}
    remote = "spiffe://other.org/docs"
    with (
        sock_root() as root,
        fake_workload(other, remote, root) as server,
        fake_workload(home, CLIENT, root) as client,
    ):
        for each in (server, client):
            each.state.change(x509=bundles)
        eventually(
            lambda: len(server.source.x509_bundles) == len(client.source.x509_bundles) == 2,
            "both bundles at both workloads",
        )
        sctx = tls.server_context(server.source, CLIENT, trust_domains=["example.org"])
        with https_server(sctx) as (port, seen, _httpd):
            url = f"https://127.0.0.1:{port}"
            with svid.httpx.mtls_client(
                client.source, remote, trust_domains=["other.org"], base_url=url, timeout=5
            ) as http:
                assert http.get("/sync").text == "hello"

            async def fetch() -> str:
                async with svid.httpx.async_mtls_client(
                    client.source, remote, federated=True, base_url=url, timeout=5
                ) as http:
                    return (await http.get("/async")).text

            assert asyncio.run(fetch()) == "hello"
    assert seen.peers == [CLIENT, CLIENT]


@pytest.mark.parametrize("make", [svid.httpx.mtls_client, svid.httpx.async_mtls_client])
@pytest.mark.parametrize("option", ["transport", "mounts"])
def test_a_transport_of_its_own_is_refused(world: World, make: Any, option: str) -> None:
    # httpx ignores verify= for a transport given by hand: the client made no svid TLS, sent
    # no SVID and checked no SPIFFE ID, and authorize was never asked.
    transport = httpx.HTTPTransport(retries=2)
    value = transport if option == "transport" else {"all://": transport}
    with pytest.raises(TypeError, match="client_context"):
        make(world.client.source, SERVER, **{option: value})
