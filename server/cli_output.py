"""Human-readable and JSON renderings of admin API messages for the CLI.

Text shows times as RFC 3339 UTC (svid._clock.format_utc, like every svidd CLI and log line);
JSON keeps the messages' fields, with every time as a number of Unix seconds.

Every value the text of the svid-server CLI shows goes through server.input_text.shown (the
one escaping of the server's logs and messages): selectors, hints, task intents, relationship
fields and error details are set by agents, nodes, workloads and foreign servers, and a
terminal obeys the control characters among them (an ESC sequence in an agent's selector or an
entry's hint cleared the screen or recoloured the lines above; a `\r` or U+202E made a value
read as another one). JSON output is exact JSON, never escaped by it (json.dumps escapes
control characters itself).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import json_format
from google.protobuf.message import Message

from server.input_text import shown
from svid._bundle import SpiffeBundle
from svid._clock import format_utc, unix_times_as_numbers
from svid._der import certs_to_pem
from svid._proto import admin_pb2, common_pb2
from svid._spiffe_id import TrustDomain


def to_json(message: Message | Sequence[Message], key: str | None = None) -> str:
    def one(m: Message) -> object:
        return unix_times_as_numbers(
            json_format.MessageToDict(
                m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
        )

    if isinstance(message, Message):
        data: object = one(message)
    else:
        data = [one(m) for m in message]
    if key is not None:
        data = {key: data}
    return json.dumps(data, indent=2, sort_keys=True)


def _when(ts: int) -> str:
    return format_utc(ts) if ts else "never"


def _ttl(seconds: int) -> str:
    return f"{seconds}" if seconds else "default"


def _row(label: str, value: object) -> str:
    return f"{label:<17}: {shown(str(value))}"


def entry_text(entry: common_pb2.Entry) -> str:
    lines = [
        _row("Entry ID", entry.id),
        _row("SPIFFE ID", entry.spiffe_id),
        _row("Parent ID", entry.parent_id),
        _row("Revision", entry.revision),
        _row("X509-SVID TTL", _ttl(entry.x509_svid_ttl)),
        _row("JWT-SVID TTL", _ttl(entry.jwt_svid_ttl)),
    ]
    lines += [_row("Selector", f"{s.type}:{s.value}") for s in entry.selectors]
    lines += [_row("DNS name", d) for d in entry.dns_names]
    lines += [_row("Federates with", f"spiffe://{td}") for td in entry.federates_with]
    if entry.hint:
        lines.append(_row("Hint", entry.hint))
    if entry.admin:
        lines.append(_row("Admin", "true"))
    if entry.expires_at:
        lines.append(_row("Expires at", _when(entry.expires_at)))
    return "\n".join(lines)


def entries_text(entries: Sequence[common_pb2.Entry]) -> str:
    head = f"Found {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    return "\n\n".join([head, *(entry_text(e) for e in entries)])


def agent_text(agent: admin_pb2.Agent) -> str:
    lines = [
        _row("SPIFFE ID", agent.spiffe_id),
        _row("Attestation type", agent.attestation_type),
        _row("Serial", agent.serial),
        _row("Expires at", _when(agent.expires_at)),
        _row("Attested at", _when(agent.attested_at)),
        _row("Banned", "true" if agent.banned else "false"),
    ]
    lines += [_row("Selector", f"{s.type}:{s.value}") for s in agent.selectors]
    return "\n".join(lines)


def agents_text(agents: Sequence[admin_pb2.Agent]) -> str:
    head = f"Found {len(agents)} attested agent{'' if len(agents) == 1 else 's'}"
    return "\n\n".join([head, *(agent_text(a) for a in agents)])


def bundle_pem(bundle: common_pb2.Bundle) -> str:
    return certs_to_pem(
        x509.load_der_x509_certificate(der) for der in bundle.x509_authorities
    ).decode()


def bundle_spiffe(bundle: common_pb2.Bundle) -> str:
    spiffe = SpiffeBundle(
        trust_domain=TrustDomain(bundle.trust_domain),
        x509_authorities=tuple(x509.load_der_x509_certificate(d) for d in bundle.x509_authorities),
        jwt_authorities={
            k.kid: serialization.load_der_public_key(k.public_key)  # type: ignore[misc]
            for k in bundle.jwt_keys
        },
        sequence=bundle.sequence,
        refresh_hint=bundle.refresh_hint,
    )
    return spiffe.to_json().decode()


def token_text(response: admin_pb2.CreateJoinTokenResponse) -> str:
    return "\n".join(
        [
            _row("Token", response.token),
            _row("Agent SPIFFE ID", response.agent_spiffe_id),
            _row("Expires at", _when(response.expires_at)),
        ]
    )
