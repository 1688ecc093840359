"""`svid-server federation ...` and the foreign-bundle `bundle ...` commands (admin API)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server import cli_output as out
from server.cli_entries import add_page_size, all_pages, page_size
from server.cli_files import read_at_most
from server.errors import CliError
from server.federation.fetch import MAX_BUNDLE_BYTES
from server.input_text import shown
from svid._bundle import SpiffeBundle
from svid._daemon_config import expand_path
from svid._errors import SvidError
from svid._proto import admin_pb2, admin_pb2_grpc
from svid._spiffe_id import TrustDomain

COMMANDS = frozenset(
    {
        ("federation", "create"),
        ("federation", "list"),
        ("federation", "show"),
        ("federation", "update"),
        ("federation", "delete"),
        ("federation", "refresh"),
        ("bundle", "set"),
        ("bundle", "list"),
        ("bundle", "delete"),
    }
)
Emit = Callable[[argparse.Namespace, str, str], None]


def _relationship_flags(parser: argparse.ArgumentParser, *, update: bool) -> None:
    parser.add_argument("--trust-domain", required=True, help="the foreign trust domain")
    need = "" if update else " (required)"
    parser.add_argument("--bundle-endpoint-url", help=f"https://host:port/path{need}")
    parser.add_argument(
        "--bundle-endpoint-profile",
        choices=("https_spiffe", "https_web"),
        help=f"how the endpoint is authenticated{need}",
    )
    parser.add_argument(
        "--endpoint-spiffe-id", help="https_spiffe: the SPIFFE ID the endpoint presents"
    )
    parser.add_argument(
        "--ca-file",
        help="https_web: CA file on the server's host (default: the system's roots); a relative "
        "path is taken from this command's working directory and sent absolute",
    )


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    fed = sub.add_parser("federation", help="federation relationships").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    _relationship_flags(
        fed.add_parser("create", parents=[common], help="federate with"), update=False
    )
    _relationship_flags(fed.add_parser("update", parents=[common], help="change one"), update=True)
    add_page_size(
        fed.add_parser("list", parents=[common], help="list relationships"), "as many as fit 2 MiB"
    )
    for name, text in (
        ("show", "show a relationship"),
        ("delete", "end a relationship (its last bundle stays: `bundle delete`)"),
        ("refresh", "fetch the foreign bundle now"),
    ):
        fed.add_parser(name, parents=[common], help=text).add_argument(
            "--trust-domain", required=True
        )


def add_bundle_commands(bundle: Any, common: argparse.ArgumentParser) -> None:
    bset = bundle.add_parser("set", parents=[common], help="set a foreign trust domain's bundle")
    bset.add_argument("--id", required=True, metavar="TRUST_DOMAIN", help="spiffe://other.org")
    bset.add_argument(
        "--path", required=True, type=Path, help="SPIFFE bundle JSON file ('-' for stdin)"
    )
    add_page_size(bundle.add_parser("list", parents=[common], help="list foreign bundles"))
    bundle.add_parser("delete", parents=[common], help="forget a foreign bundle").add_argument(
        "--id", required=True, metavar="TRUST_DOMAIN"
    )


def _relationship_text(rel: admin_pb2.FederationRelationship) -> str:
    rows = [
        ("Trust domain", f"spiffe://{rel.trust_domain}"),
        ("Bundle endpoint", rel.bundle_endpoint_url),
        ("Profile", rel.profile),
    ]
    if rel.endpoint_spiffe_id:
        rows.append(("Endpoint SPIFFE ID", rel.endpoint_spiffe_id))
    if rel.ca_file:
        rows.append(("CA file", rel.ca_file))
    rows.append(("Static", "true (configuration file)" if rel.static else "false"))
    return "\n".join(f"{name:<20}: {shown(value)}" for name, value in rows)


def _bundle_json(bundle: admin_pb2.FederatedBundle) -> str:
    return json.dumps(
        {
            "trust_domain": f"spiffe://{bundle.trust_domain}",
            "bundle": json.loads(bundle.bundle),
            "updated_at": bundle.updated_at,
        }
    )


def _bundle_text(bundle: admin_pb2.FederatedBundle, fmt: str = "spiffe") -> str:
    parsed = SpiffeBundle.parse(TrustDomain.parse(bundle.trust_domain), bundle.bundle)
    if fmt == "pem":
        return parsed.x509_bundle().to_pem().decode().rstrip("\n")
    return (
        f"spiffe://{bundle.trust_domain} (sequence {parsed.sequence}, "
        f"{len(parsed.x509_authorities)} X.509 and {len(parsed.jwt_authorities)} JWT authorities)"
        f"\n{bundle.bundle.decode()}"
    )


def _read(path: Path) -> bytes:
    return read_at_most(
        "--path", path, MAX_BUNDLE_BYTES, "no bundle is larger: the server refuses it"
    )


def _merge(rel: admin_pb2.FederationRelationship, args: argparse.Namespace) -> None:
    rel.trust_domain = args.trust_domain
    if args.bundle_endpoint_url is not None:
        rel.bundle_endpoint_url = args.bundle_endpoint_url
    if args.bundle_endpoint_profile is not None:
        rel.profile = args.bundle_endpoint_profile
        if rel.profile == "https_web":
            rel.endpoint_spiffe_id = ""
        else:
            rel.ca_file = ""
    if args.endpoint_spiffe_id is not None:
        rel.endpoint_spiffe_id = args.endpoint_spiffe_id
    if args.ca_file:
        # The server reads it from its own working directory: sent as the caller means it.
        rel.ca_file = str(expand_path("--ca-file", args.ca_file, CliError).absolute())
    elif args.ca_file is not None:
        rel.ca_file = ""  # '' clears it


def run_command(
    args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub, t: float, emit: Emit
) -> None:
    cmd = (args.command, args.action)
    if cmd == ("federation", "create"):
        if not args.bundle_endpoint_url or not args.bundle_endpoint_profile:
            raise CliError(
                "federation create: --bundle-endpoint-url and --bundle-endpoint-profile "
                "are required"
            )
        rel = admin_pb2.FederationRelationship()
        _merge(rel, args)
        made = stub.CreateFederationRelationship(
            admin_pb2.CreateFederationRelationshipRequest(relationship=rel), timeout=t
        )
        emit(args, _relationship_text(made), out.to_json(made))
    elif cmd == ("federation", "update"):
        rel = stub.GetFederationRelationship(
            admin_pb2.GetFederationRelationshipRequest(trust_domain=args.trust_domain), timeout=t
        )
        _merge(rel, args)
        changed = stub.UpdateFederationRelationship(
            admin_pb2.UpdateFederationRelationshipRequest(relationship=rel), timeout=t
        )
        emit(args, _relationship_text(changed), out.to_json(changed))
    elif cmd == ("federation", "list"):

        def relationship_page(token: str) -> tuple[list[admin_pb2.FederationRelationship], str]:
            request = admin_pb2.ListFederationRelationshipsRequest(
                page_size=page_size(args), page_token=token
            )
            reply = stub.ListFederationRelationships(request, timeout=t)
            return list(reply.relationships), reply.next_page_token

        rels = all_pages(relationship_page)
        text = "\n\n".join(
            [f"Found {len(rels)} relationship(s)", *(_relationship_text(r) for r in rels)]
        )
        emit(args, text, out.to_json(rels, key="relationships"))
    elif cmd == ("federation", "show"):
        rel = stub.GetFederationRelationship(
            admin_pb2.GetFederationRelationshipRequest(trust_domain=args.trust_domain), timeout=t
        )
        emit(args, _relationship_text(rel), out.to_json(rel))
    elif cmd == ("federation", "delete"):
        stub.DeleteFederationRelationship(
            admin_pb2.DeleteFederationRelationshipRequest(trust_domain=args.trust_domain),
            timeout=t,
        )
        emit(
            args,
            f"Deleted the relationship with {shown(args.trust_domain)}",
            json.dumps({"trust_domain": args.trust_domain}),
        )
    elif cmd == ("federation", "refresh"):
        done = stub.RefreshFederatedBundle(
            admin_pb2.RefreshFederatedBundleRequest(trust_domain=args.trust_domain), timeout=t
        )
        what = "changed" if done.changed else "unchanged"
        emit(
            args,
            f"Refreshed: bundle {what}\n{_bundle_text(done.bundle)}",
            json.dumps({"changed": done.changed, **json.loads(_bundle_json(done.bundle))}),
        )
    elif cmd == ("bundle", "set"):
        body = _read(args.path)
        try:
            SpiffeBundle.parse(TrustDomain.parse(args.id), body)
        except SvidError as exc:
            raise CliError(f"--path: {exc}") from None
        stored = stub.SetFederatedBundle(
            admin_pb2.SetFederatedBundleRequest(
                bundle=admin_pb2.FederatedBundle(trust_domain=args.id, bundle=body)
            ),
            timeout=t,
        )
        emit(args, _bundle_text(stored), _bundle_json(stored))
    elif cmd == ("bundle", "list"):

        def bundle_page(token: str) -> tuple[list[admin_pb2.FederatedBundle], str]:
            request = admin_pb2.ListFederatedBundlesRequest(
                page_size=page_size(args), page_token=token
            )
            reply = stub.ListFederatedBundles(request, timeout=t)
            return list(reply.bundles), reply.next_page_token

        bundles = all_pages(bundle_page)
        text = "\n\n".join(
            [f"Found {len(bundles)} foreign bundle(s)", *(_bundle_text(b) for b in bundles)]
        )
        listed = [json.loads(_bundle_json(b)) for b in bundles]
        emit(args, text, json.dumps({"bundles": listed}))
    elif cmd == ("bundle", "delete"):
        stub.DeleteFederatedBundle(
            admin_pb2.DeleteFederatedBundleRequest(trust_domain=args.id), timeout=t
        )
        emit(
            args,
            f"Deleted the bundle of {shown(args.id)}",
            json.dumps({"trust_domain": args.id}),
        )
    elif cmd == ("bundle", "show"):
        found = stub.GetFederatedBundle(
            admin_pb2.GetFederatedBundleRequest(trust_domain=args.id), timeout=t
        )
        if args.format == "pem":
            emit(args, _bundle_text(found, "pem"), _bundle_json(found))
        else:
            emit(args, found.bundle.decode(), _bundle_json(found))
    else:  # pragma: no cover - argparse only offers the commands above
        raise CliError(f"unknown command {' '.join(cmd)}")
