"""Workload API endpoint addresses (SPIFFE Workload Endpoint §4): ``unix:///abs/path`` or
``tcp://IP:port``, from an argument or the SPIFFE_ENDPOINT_SOCKET environment variable."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from svid._errors import SvidError

ENV_SOCKET = "SPIFFE_ENDPOINT_SOCKET"


class WorkloadApiAddressError(SvidError, ValueError):
    """The Workload API address is missing or not one the SPIFFE spec allows."""


def address_of(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """``address``, or $SPIFFE_ENDPOINT_SOCKET when it is None (unchecked; "" when unset)."""
    if address is None:
        return (os.environ if environ is None else environ).get(ENV_SOCKET, "")
    return address


def grpc_target(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The gRPC target for ``address`` (or $SPIFFE_ENDPOINT_SOCKET when it is None)."""
    if address is None:
        address = address_of(None, environ)
        if not address:
            raise WorkloadApiAddressError(
                f"no Workload API address given and {ENV_SOCKET} is not set; set it to the "
                "agent's socket, e.g. unix:///run/svid-agent/public/api.sock"
            )
    parts = urlsplit(address)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise WorkloadApiAddressError(
            f"Workload API address {address!r} must not have a query, fragment or user info"
        )
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise WorkloadApiAddressError(
                f"Workload API address {address!r} must be unix:///absolute/path"
            )
        return f"unix://{parts.path}"
    if parts.scheme == "tcp":
        try:
            host = ipaddress.ip_address(parts.hostname or "")
            port = parts.port
        except ValueError:
            raise WorkloadApiAddressError(
                f"Workload API address {address!r} must be tcp://IP:port with an IP literal"
            ) from None
        if port is None or parts.path not in ("", "/"):
            raise WorkloadApiAddressError(f"Workload API address {address!r} must be tcp://IP:port")
        return f"[{host}]:{port}" if host.version == 6 else f"{host}:{port}"
    if not parts.scheme and address.startswith("/"):
        raise WorkloadApiAddressError(
            f"Workload API address {address!r} has no scheme; write unix://{address}"
        )
    raise WorkloadApiAddressError(
        f"Workload API address {address!r} has scheme {parts.scheme!r}; use unix:///absolute/path "
        "or tcp://IP:port"
    )
