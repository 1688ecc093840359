"""Two trust domains on this machine, federated both ways: for tests/e2e/test_federation*.py and
bench/test_bench_federation.py.

Each domain has a real `svid-server` (bundle endpoint, profile https_spiffe) and a real
`svid-agent`. Bootstrap as an operator would: each server's bundle is set on the other with
`svid-server bundle set`, then `svid-server federation create` names the other's endpoint.
Workloads are told apart by executable path: this test process is one workload of each domain
(alice in example.org, bob in other.org, both federating), and a copy of the interpreter is a
second one of each (carol, dave) whose entries federate with nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from svid._der import parse_der_certs
from svid._proto import workload_pb2, workload_pb2_grpc
from tests.e2e.agent_process import HEADER, AgentProcess, agent_stack, create_entry
from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir, wait_for
from tests.ports import free_port

A, B = "example.org", "other.org"
REPO = Path(__file__).resolve().parents[2]
ME = os.path.realpath(sys.executable)


@dataclass
class Domain:
    name: str
    server: ServerProcess
    agent: AgentProcess
    endpoint_port: int

    @property
    def socket(self) -> str:
        return f"unix://{self.agent.socket_path}"

    @property
    def endpoint_url(self) -> str:
        return f"https://127.0.0.1:{self.endpoint_port}/"


@dataclass
class World:
    a: Domain
    b: Domain
    other_python: Path

    def run_other(self, domain: Domain, token: str = "", audience: str = "") -> dict[str, Any]:
        """What the second workload (the interpreter copy) of `domain` is given."""
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([*site.getsitepackages(), str(REPO)]),
        }
        done = subprocess.run(
            [
                str(self.other_python),
                "-m",
                "tests.e2e.federation_world",
                domain.socket,
                token,
                audience,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env=env,
            cwd=str(REPO),
        )
        return json.loads(done.stdout)  # type: ignore[no-any-return]


def views(socket: str, token: str = "", audience: str = "") -> dict[str, Any]:
    """The caller's bundles as the Workload API gives them, and (with a token) whether the agent
    validates it for this caller."""
    channel = grpc.insecure_channel(socket.replace("unix://", "unix:"))
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    out: dict[str, Any] = {}
    x509 = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=10))
    out["svids"] = [s.spiffe_id for s in x509.svids]
    out["federated_bundles"] = sorted(x509.federated_bundles)
    bundles = next(
        stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=10)
    )
    out["x509_bundles"] = sorted(bundles.bundles)
    jwt = next(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER, timeout=10))
    out["jwt_bundles"] = sorted(jwt.bundles)
    if token:
        try:
            stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token),
                metadata=HEADER,
                timeout=10,
            )
            out["validate"] = "OK"
        except grpc.RpcError as exc:
            out["validate"] = exc.code().name  # type: ignore[attr-defined]
    channel.close()
    return out


def authorities(domain: Domain, trust_domain: str) -> int:
    """How many X.509 authorities of `trust_domain` the agent gives this process (-1: none)."""
    with grpc.insecure_channel(f"unix:{domain.agent.socket_path}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        msg = next(
            stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=10)
        )
    der = msg.bundles.get(f"spiffe://{trust_domain}")
    if der is None:
        return -1
    return len(parse_der_certs(der))


def _server(root: Path, name: str, port: int, **overrides: Any) -> ServerProcess:
    return make_server(
        root,
        trust_domain=name,
        # Fixed ports: a test may stop a server and start it again where its agent expects it.
        bind_address=f"127.0.0.1:{free_port()}",
        attest_bind_address=f"127.0.0.1:{free_port()}",
        bundle_endpoint_address=f"127.0.0.1:{port}",
        log_level="info",
        **overrides,
    )


def federate(home: Domain, foreign: Domain) -> None:
    """Bootstrap `foreign`'s bundle on `home`'s server and create the relationship (CLI)."""
    body = foreign.server.cli("bundle", "show", "--format", "spiffe").stdout
    path = home.server.root / f"{foreign.name}.json"
    path.write_text(body)
    home.server.cli("bundle", "set", "--id", f"spiffe://{foreign.name}", "--path", str(path))
    home.server.cli_json(
        "federation",
        "create",
        "--trust-domain",
        foreign.name,
        "--bundle-endpoint-url",
        foreign.endpoint_url,
        "--bundle-endpoint-profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        f"spiffe://{foreign.name}/svid/server",
    )


@contextmanager
def federated_world(**server_overrides: Any) -> Iterator[World]:
    with ExitStack() as stack:
        tmp = short_tmpdir("svfed")
        stack.callback(shutil.rmtree, tmp, True)
        other_python = tmp / "other-python"
        shutil.copy2(ME, other_python)
        domains = []
        for name in (A, B):
            root = short_tmpdir("svf")
            port = free_port()
            server = _server(root, name, port, **server_overrides).start()
            # Workloads told apart by path: this machine lets any user make a user namespace,
            # where `auto` gives no unix:path (test_exe_mask_shared_mm.py).
            agent = stack.enter_context(
                agent_stack(root, server, flags=("--exe-selectors", "always"))
            )
            domains.append(Domain(name, server, agent, port))
        a, b = domains
        federate(a, b)
        federate(b, a)
        for home, foreign, me, other in ((a, b, "alice", "carol"), (b, a, "bob", "dave")):
            agent_id = home.agent.agent_id()
            create_entry(
                home.server,
                f"spiffe://{home.name}/{me}",
                agent_id,
                f"unix:path:{ME}",
                federates_with=[f"spiffe://{foreign.name}"],
            )
            create_entry(
                home.server, f"spiffe://{home.name}/{other}", agent_id, f"unix:path:{other_python}"
            )
            home.agent.wait_svid(f"spiffe://{home.name}/{me}")
        world = World(a, b, other_python)
        # Both foreign bundles reach the federating workloads.
        for home, foreign in ((a, b), (b, a)):
            wait_for(lambda h=home, f=foreign: authorities(h, f.name) > 0, 30, "a foreign bundle")
        yield world


if __name__ == "__main__":  # the second workload: print what it is given
    print(json.dumps(views(*sys.argv[1:4])))
