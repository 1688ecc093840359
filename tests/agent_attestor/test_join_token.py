"""Where the agent takes its join token from: a 0600 file, the environment, flags or the config.

A token on the command line is readable by every local user in /proc/<pid>/cmdline, and whoever
spends it first attests as this node (issue 11, item 3).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from agent_attestor import cli
from agent_attestor.app import AgentApp
from agent_attestor.config import JOIN_TOKEN_ENV, build_config, read_join_token_file
from agent_attestor.errors import ConfigError, JoinTokenRefusedError
from agent_attestor.node_client import SERVER_NAME, NodeClient
from agent_attestor.sync import SyncSettings
from svid._clock import SystemClock, to_datetime
from svid._proto import node_pb2, node_pb2_grpc
from tests.agent_attestor.pki import LocalCa
from tests.fifo import make_fifo, raised_without_blocking

TOKEN = "tok-id.s3cr3t-value"


def _token_file(tmp_path: Path, text: str = f"  {TOKEN}\n", mode: int = 0o600) -> Path:
    path = tmp_path / "join-token"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_private_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    path = _token_file(tmp_path)
    config = build_config({}, {"join_token_file": str(path)})
    assert config.join_token == TOKEN
    assert config.join_token_file == path


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o602])
def test_a_token_file_others_can_reach_is_refused_naming_file_and_mode(
    tmp_path: Path, mode: int
) -> None:
    path = _token_file(tmp_path, mode=mode)
    with pytest.raises(ConfigError) as caught:
        build_config({}, {"join_token_file": str(path)})
    message = str(caught.value)
    assert message.startswith("join_token_file:")
    assert str(path) in message
    assert f"{mode:04o}" in message
    assert "chmod 600" in message
    assert "s3cr3t" not in message


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "is empty"), (" \n\t", "is empty"), ("a.b\nc.d\n", "more than one word")],
)
def test_a_token_file_without_exactly_one_token_is_refused(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = _token_file(tmp_path, text=text)
    with pytest.raises(ConfigError, match=problem):
        read_join_token_file(path)


def test_a_missing_token_file_or_a_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"join_token_file: {tmp_path / 'nope'} does not exist"):
        read_join_token_file(tmp_path / "nope")
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_join_token_file(tmp_path)


def test_the_environment_gives_the_token_when_no_flag_does(tmp_path: Path) -> None:
    env = {JOIN_TOKEN_ENV: f"{TOKEN}\n"}
    assert build_config({}, {}, env).join_token == TOKEN
    # Flags win over the environment, the environment over the config file.
    assert build_config({}, {"join_token": "flag.t"}, env).join_token == "flag.t"
    path = _token_file(tmp_path, text="file.t")
    assert build_config({}, {"join_token_file": str(path)}, env).join_token == "file.t"
    assert build_config({"join_token": "toml.t"}, {}, env).join_token == TOKEN
    assert build_config({"join_token_file": str(path)}, {}, {}).join_token == "file.t"
    assert build_config({}, {}, {JOIN_TOKEN_ENV: ""}).join_token == ""


def test_a_token_and_a_token_file_together_are_refused(tmp_path: Path) -> None:
    path = _token_file(tmp_path)
    with pytest.raises(ConfigError, match=r"^join_token: give join_token or join_token_file"):
        build_config({}, {"join_token": "a.b", "join_token_file": str(path)})


def test_the_config_repr_never_shows_the_token(tmp_path: Path) -> None:
    config = build_config({}, {"join_token_file": str(_token_file(tmp_path))})
    assert "s3cr3t" not in repr(config)


def test_the_sync_settings_repr_never_shows_the_token(tmp_path: Path) -> None:
    """The config hides it; the settings the syncer is built from carried it into their repr
    (a traceback with locals, a debugger, an error reporter)."""
    config = build_config({}, {"join_token_file": str(_token_file(tmp_path))})
    assert "s3cr3t" in config.join_token
    assert "s3cr3t" not in repr(SyncSettings(config.servers, join_token=config.join_token))


class _NoAgent:
    """Stands in for AgentApp so `run` returns right after reading its configuration."""

    def __init__(self, config: Any) -> None:
        self.config = config

    async def run_until_signalled(self, started: Any = None) -> None:
        return None


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["run", "--log-format", "text", "--data-dir", "d", *args]) == 0
    return capsys.readouterr().err


def test_run_warns_when_the_token_is_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "AgentApp", _NoAgent)
    monkeypatch.delenv(JOIN_TOKEN_ENV, raising=False)
    err = _run(["--join-token", TOKEN], capsys)
    assert "/proc/<pid>/cmdline" in err
    assert "--join-token-file" in err
    assert JOIN_TOKEN_ENV in err
    assert "s3cr3t" not in err

    assert "cmdline" not in _run(["--join-token-file", str(_token_file(tmp_path))], capsys)
    monkeypatch.setenv(JOIN_TOKEN_ENV, TOKEN)
    assert "cmdline" not in _run([], capsys)


def test_run_with_a_readable_token_file_exits_2_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "AgentApp", _NoAgent)
    path = _token_file(tmp_path, mode=0o644)
    assert cli.main(["run", "--join-token-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} has mode 0644" in err
    assert "s3cr3t" not in err
    assert os.stat(path).st_mode & 0o777 == 0o644  # refused, not "fixed" behind the user's back


def test_run_warns_when_a_config_file_others_can_read_holds_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "AgentApp", _NoAgent)
    monkeypatch.delenv(JOIN_TOKEN_ENV, raising=False)
    config = tmp_path / "agent.toml"
    config.write_text(f'join_token = "{TOKEN}"\n')
    config.chmod(0o644)
    err = _run(["--config", str(config)], capsys)
    assert f"config file {config} has mode 0644 and holds join_token" in err
    assert "s3cr3t" not in err
    config.chmod(0o600)
    assert "holds join_token" not in _run(["--config", str(config)], capsys)


def test_a_token_file_that_is_a_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    # os.open without O_NONBLOCK waited for a writer: the agent hung at start, saying nothing.
    fifo = make_fifo(tmp_path / "join-token")
    raised = raised_without_blocking(lambda: read_join_token_file(fifo), fifo)
    assert isinstance(raised, ConfigError)
    assert str(raised) == f"join_token_file: {fifo} is not a regular file"


class _EchoingNode(node_pb2_grpc.NodeServicer):
    """A server that refuses every join token quoting it, as a careless one might."""

    async def Attest(  # type: ignore[override]
        self, request_iterator: AsyncIterator[node_pb2.AttestRequest], context: Any
    ) -> None:
        async for request in request_iterator:
            said = request.params.data.payload.decode()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"unknown token {said}")


def _server_tls(ca: LocalCa, chain: bool = False) -> grpc.ServerCredentials:
    """A certificate the agent's attestation channel accepts: by `ca`, for the name it dials,
    with the server ID of `ca`'s trust domain (a real server's); `chain`: served with `ca`'s
    certificate above it, as a server under an upstream root serves its CA's."""
    return grpc.ssl_server_credentials([server_pems(ca, chain)])


def server_pems(ca: LocalCa, chain: bool = False) -> tuple[bytes, bytes]:
    """The (key, certificate chain) PEMs of _server_tls."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = ca.clock.now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(to_datetime(now - 60))
        .not_valid_after(to_datetime(now + 3600))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(f"spiffe://{ca.trust_domain}/svid/server"),
                    x509.DNSName(SERVER_NAME),
                ]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    served = cert.public_bytes(Encoding.PEM) + (
        ca.cert.public_bytes(Encoding.PEM) if chain else b""
    )
    return key_pem, served


def test_what_a_server_says_refusing_the_token_is_kept_without_the_token() -> None:
    ca = LocalCa(SystemClock())

    async def scenario() -> JoinTokenRefusedError:
        server = grpc.aio.server()
        node_pb2_grpc.add_NodeServicer_to_server(_EchoingNode(), server)
        port = server.add_secure_port("127.0.0.1:0", _server_tls(ca))
        await server.start()
        address = f"127.0.0.1:{port}"
        client = NodeClient(address, address, ca.cert.public_bytes(Encoding.PEM))
        try:
            with pytest.raises(JoinTokenRefusedError) as refused:
                await client.attest(join_token=TOKEN)
            return refused.value
        finally:
            await client.close()
            await server.stop(None)

    error = asyncio.run(scenario())
    assert "PERMISSION_DENIED: unknown token" in str(error)  # the server's words, kept
    assert "s3cr3t" not in str(error)
    assert "tok-id" not in str(error)  # the whole token went, not only its secret


def test_an_x509pop_key_file_others_can_read_is_refused_naming_file_and_mode(
    tmp_path: Path,
) -> None:
    """The x509pop node key attests this node as often as its holder likes, where a join
    token works once: a key file every local user can read is refused as a token file is,
    not used."""
    ca = LocalCa(SystemClock())
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    cert.write_bytes(ca.cert.public_bytes(Encoding.PEM))
    key.write_bytes(ca.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    key.chmod(0o644)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.cert.public_bytes(Encoding.PEM))
    config = build_config(
        {},
        {
            "x509pop_cert": str(cert),
            "x509pop_key": str(key),
            "data_dir": str(tmp_path / "data"),
            "trust_bundle": str(bundle),
        },
    )
    with pytest.raises(ConfigError) as caught:
        AgentApp(config)
    assert f"{key} has mode 0644" in str(caught.value)
