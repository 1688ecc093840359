"""The svid-server command line: `run`, and admin commands over the admin Unix socket (and a
few that open the datastore themselves: `audit`, `ca forget-lost-keys`).

Every admin command prints human-readable text, or JSON with `--output json`. Errors are one
line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from server import cli_ca, cli_entries, cli_federation, logs
from server import cli_output as out
from server.audit.rollback import RESTORED_DATASTORE_FLAG
from server.config import (
    CONFIG_KEYS,
    DEFAULT_ADMIN_SOCKET,
    ServerConfig,
    file_value,
    load_config,
    read_toml,
)
from server.datastore.lost import NEW_DATASTORE_FLAG
from server.datastore.postgres_dsn import hide_given, redact_dsn
from server.errors import CliError, ConfigError, ServerError
from server.input_text import shown
from server.tasks import cli as task_cli
from svid._cli_args import non_utf8_argument, timeout_problem
from svid._clock import parse_utc
from svid._errors import SvidError
from svid._logs import stacks_on_sigusr1
from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2
from svid._stdout import flush_stdout, stdout_closed_by_reader
from svid._stop_signals import stop_on_signals
from svid._unix_socket import SocketProblem, grpc_unix_target, socket_problem
from svid._workload_errors import unreachable

ADMIN_SOCKET_ENV = "SVID_SERVER_ADMIN_SOCKET"
# `make run` writes its server's config here; admin commands run from the checkout use it.
DEMO_CONFIG = Path(".run") / "server.toml"
RPC_TIMEOUT = 15.0


# -- argument parsing ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, its usage errors shown with every PostgreSQL password hidden: "unrecognized
    arguments: ..." and "invalid choice: ..." quote the command line, and a --datastore URL
    given to a command that takes none (`audit prune`) put its password on the terminal and in
    the CI log that ran it."""

    _given: Sequence[str] = ()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Kept for error(): the arguments are where each password starts and ends.
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        super().error(hide_given(message, self._given))


def _common() -> _Parser:
    """Global flags; accepted before or after the subcommand."""
    default = argparse.SUPPRESS
    parser = _Parser(add_help=False)
    parser.add_argument(
        "--admin-socket",
        type=Path,
        default=default,
        help=f"admin API socket (default: from --config, ${ADMIN_SOCKET_ENV}, "
        f"the `make run` demo's {DEMO_CONFIG} in the current directory, "
        f"or {DEFAULT_ADMIN_SOCKET})",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        help=f"server TOML config file (admin commands: default {DEMO_CONFIG} when it exists)",
    )
    parser.add_argument(
        "--output",
        choices=("text", "json"),
        default=default,
        help="output format (default text; text shows times as RFC 3339 UTC, json as Unix seconds)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default,
        help=f"seconds to wait for the server's answer (default {RPC_TIMEOUT:g})",
    )
    return parser


def _run_flags(parser: argparse.ArgumentParser) -> None:
    for key in CONFIG_KEYS:
        if key == "admin_socket":
            continue  # a global flag
        parser.add_argument(f"--{key.replace('_', '-')}", dest=f"cfg_{key}", default=None)


_FILE_HELP = (
    "entries from a JSON file ('-' for stdin): an array, {\"entries\": [...]} as "
    "`entry show --output json` prints, or JSON Lines; sent in batches of up to "
    f"{cli_entries.BATCH_ITEMS}, each item answered on its own"
)
_ENTRY_FLAGS = (
    "spiffe_id",
    "parent_id",
    "selector",
    "x509_ttl",
    "jwt_ttl",
    "dns",
    "hint",
    "federates_with",
)


def _entry_flags(parser: argparse.ArgumentParser, *, update: bool) -> None:
    parser.add_argument("--spiffe-id", help=None if update else "required unless --file is given")
    parser.add_argument("--parent-id", help=None if update else "required unless --file is given")
    parser.add_argument(
        "--selector",
        action="append",
        default=None,
        help="TYPE:VALUE, e.g. unix:uid:1000 "
        "(repeatable" + ("; replaces all selectors)" if update else ")"),
    )
    unset = " (unchanged if not given)" if update else ""
    parser.add_argument(
        "--x509-ttl",
        "--x509-svid-ttl",
        type=int,
        default=None,
        metavar="SECONDS",
        help="X.509-SVID lifetime in seconds; 0 = the server default (default_x509_svid_ttl)"
        + unset,
    )
    parser.add_argument(
        "--jwt-ttl",
        "--jwt-svid-ttl",
        type=int,
        default=None,
        metavar="SECONDS",
        help="JWT-SVID lifetime in seconds; 0 = the server default (default_jwt_svid_ttl)" + unset,
    )
    parser.add_argument("--dns", action="append", default=None, help="DNS SAN (repeatable)")
    parser.add_argument(
        "--federates-with",
        action="append",
        default=None,
        metavar="TRUST_DOMAIN",
        help="spiffe://other.org: the entry's workloads get that foreign trust domain's bundle "
        "(repeatable" + ("; replaces the list; '' clears it)" if update else ")"),
    )
    parser.add_argument("--hint", default=None)
    admin = parser.add_mutually_exclusive_group()
    admin.add_argument("--admin", dest="admin", action="store_true", default=None)
    if update:
        admin.add_argument("--no-admin", dest="admin", action="store_false")
    parser.add_argument(
        "--expires-at", default=None, help="unix seconds or ISO 8601 time; 0 = never"
    )
    parser.add_argument("--file", metavar="PATH", help=_FILE_HELP)


def _filter_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--spiffe-id-prefix",
        metavar="ID",
        help=f"only {what} whose SPIFFE ID is ID or under it, by path segment "
        "(spiffe://td/a covers spiffe://td/a/b, not spiffe://td/ab)",
    )
    parser.add_argument(
        "--selector",
        action="append",
        default=None,
        help=f"only {what} with this selector, TYPE:VALUE (repeatable; see --match)",
    )
    parser.add_argument(
        "--match",
        choices=("all", "exact", "any"),
        default="all",
        help="with several --selector: all = has every one (default), exact = has exactly "
        "these, any = has at least one",
    )
    cli_entries.add_page_size(parser)


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="svid-server", description="SPIFFE identity issuer", parents=[_common()])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the server")
    _run_flags(run)
    run.add_argument(
        NEW_DATASTORE_FLAG,
        dest="new_datastore",
        action="store_true",
        help="begin a new datastore (a new CA, an empty audit log) even though the data_dir "
        "holds CA key files or audit checkpoints of one that is now missing or empty (a "
        "SQLite file, or a PostgreSQL schema dropped or emptied); without it such a start "
        "is refused. For this start only: not a config key",
    )
    run.add_argument(
        RESTORED_DATASTORE_FLAG,
        dest="restored_datastore",
        action="store_true",
        help="serve from a datastore restored from a backup (or otherwise rolled back) whose "
        "audit log lacks events the data_dir's audit checkpoints signed: the rollback is "
        "recorded on the audit log and the checkpoint file moved aside; without it such a "
        "start is refused, and with it a start on a datastore that lacks nothing is refused "
        "too. For this start only: not a config key",
    )
    sub.add_parser("healthcheck", parents=[common], help="check that the server is serving")

    token = sub.add_parser("token", help="join tokens").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    gen = token.add_parser("generate", parents=[common], help="create a join token")
    gen.add_argument("--ttl", type=int, default=0, help="seconds (default: join_token_ttl)")
    gen.add_argument("--agent-id", default="", help="token id to use (default: random)")

    entry = sub.add_parser("entry", help="registration entries").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = entry.add_parser("create", parents=[common], help="create an entry")
    _entry_flags(create, update=False)
    show = entry.add_parser("show", parents=[common], help="show entries")
    show.add_argument("--id")
    show.add_argument("--spiffe-id", help="only entries with exactly this SPIFFE ID")
    show.add_argument("--parent-id", help="only entries with this parent ID")
    _filter_flags(show, "entries")
    update = entry.add_parser("update", parents=[common], help="change an entry")
    update.add_argument("--id", help="the entry to change (required unless --file is given)")
    _entry_flags(update, update=True)
    delete = entry.add_parser("delete", parents=[common], help="delete entries")
    delete.add_argument("--id", action="append", default=None, help="entry ID (repeatable)")
    delete.add_argument(
        "--file",
        metavar="PATH",
        help="delete the entries (by their id) of a file, read as for `entry create --file`",
    )

    agent = sub.add_parser("agent", help="attested agents").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    agents = agent.add_parser("list", parents=[common], help="list attested agents")
    _filter_flags(agents, "agents")
    for name, text in (("show", "show"), ("evict", "evict (must re-attest)"), ("ban", "ban")):
        p = agent.add_parser(name, parents=[common], help=f"{text} an agent")
        p.add_argument("--spiffe-id", required=True)

    bundle = sub.add_parser("bundle", help="the trust bundle").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    bshow = bundle.add_parser("show", parents=[common], help="print the bundle")
    bshow.add_argument("--format", choices=("pem", "spiffe"), default="pem")
    bshow.add_argument(
        "--id", default=None, metavar="TRUST_DOMAIN", help="a foreign trust domain's bundle"
    )
    cli_federation.add_bundle_commands(bundle, common)
    cli_federation.add_commands(sub, common)
    keys = sub.add_parser("keys", help="the trust domain's shared keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    kek = keys.add_parser(
        "new-kek",
        help="write a new key-encryption key (give the same file to every server of the "
        "trust domain as key_encryption_key_file)",
    )
    kek.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help="created 0600; an existing file is never overwritten",
    )
    kek.add_argument(
        "--output", choices=("text", "json"), default=argparse.SUPPRESS, help="default text"
    )
    cli_ca.add_commands(sub, common)
    task_cli.add_commands(sub, common)
    return parser


# -- admin client ----------------------------------------------------------------------------


_CHECK = (
    "is svid-server running? Check --admin-socket, admin_socket in --config, "
    f"or ${ADMIN_SOCKET_ENV}"
)


def _admin_socket_and_origin(args: argparse.Namespace) -> tuple[Path, str]:
    if getattr(args, "admin_socket", None):
        return Path(args.admin_socket), "--admin-socket"
    config = getattr(args, "config", None)
    if config is not None:
        # Read as the server reads it (~ expanded), or it is not the socket the server binds.
        path: Path | None = file_value(read_toml(config), "admin_socket")
        if path is not None:
            return path, f"admin_socket in {config}"
    env = os.environ.get(ADMIN_SOCKET_ENV)
    if env:
        return Path(env), f"${ADMIN_SOCKET_ENV}"
    return DEFAULT_ADMIN_SOCKET, "the default"


def _admin_socket(args: argparse.Namespace) -> Path:
    return _admin_socket_and_origin(args)[0]


def _where(args: argparse.Namespace) -> str:
    path, origin = _admin_socket_and_origin(args)
    return f"{path} (from {origin})"


def _timeout(args: argparse.Namespace) -> float:
    timeout = float(getattr(args, "timeout", RPC_TIMEOUT))
    problem = timeout_problem(timeout)
    if problem is not None:
        raise CliError(problem)
    return timeout


def demo_config(cwd: Path) -> Path | None:
    """The `make run` demo's server config under `cwd`, if there is one this user alone controls.

    Admin commands trust the socket it names, so a file or directory another user could write
    (a shared checkout, a planted .run/) is ignored, with a note saying why.
    """
    path = cwd / DEMO_CONFIG
    for item in (path.parent, path):
        try:
            st = item.stat()
        except FileNotFoundError:
            return None
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            print(
                f"svid-server: ignoring {path}: {item} is not writable by you alone "
                f"(owner uid {st.st_uid}, mode {st.st_mode & 0o777:04o})",
                file=sys.stderr,
            )
            return None
    return path


def _discover_config(args: argparse.Namespace) -> None:
    """Admin commands with no target named use the demo's config found in the current directory."""
    named = (
        getattr(args, "config", None) is not None
        or getattr(args, "admin_socket", None) is not None
        or os.environ.get(ADMIN_SOCKET_ENV)
    )
    if not named:
        found = demo_config(Path.cwd())
        if found is not None:
            args.config = found


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the admin socket, once the file system says it can be one.

    gRPC alone would only say "failed to connect"; the file system names the exact problem, and
    the admin socket's 0700 directory makes "permission denied" the usual one for a wrong user.
    """
    path = _admin_socket(args)
    problem = socket_problem(path)
    if problem in (SocketProblem.MISSING, SocketProblem.NOT_A_SOCKET):
        raise CliError(f"admin socket {_where(args)} {problem.value}: {_CHECK}")
    if problem is not None:
        raise CliError(
            f"cannot open admin socket {_where(args)}: permission denied (the socket and its "
            "directory are only for the server's user); run the command as that user"
        )
    return grpc.insecure_channel(grpc_unix_target(path))


def _rpc_error(exc: grpc.RpcError, args: argparse.Namespace) -> CliError:
    """The one line for a failed admin call; connection trouble names the socket and what to try."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or "no details"
    message = unreachable(
        code,
        details,
        f"admin socket {_where(args)}",
        daemon="svid-server",
        check=_CHECK,
        timeout=_timeout(args),
    )
    if message is not None:
        return CliError(message)
    return CliError(f"{code.name}: {details}")


def _emit(args: argparse.Namespace, text: str, json_text: str) -> None:
    print(json_text if getattr(args, "output", "text") == "json" else text)


def _parse_time(text: str) -> int:
    try:
        when = int(parse_utc(text))
    except ValueError as exc:
        raise CliError(f"--expires-at: {exc}") from None
    if when >= 2**63:  # expires_at is an int64: protobuf raised a bare ValueError
        raise CliError(f"--expires-at: {text!r} is past the last time an entry can hold")
    return when


def _selector(text: str) -> common_pb2.Selector:
    kind, sep, value = text.partition(":")
    if not sep or not kind or not value:
        raise CliError(f"--selector: {text!r} must be TYPE:VALUE, e.g. unix:uid:1000")
    return common_pb2.Selector(type=kind, value=value)


def _apply_entry_flags(entry: common_pb2.Entry, args: argparse.Namespace) -> None:
    if args.spiffe_id is not None:
        entry.spiffe_id = args.spiffe_id
    if args.parent_id is not None:
        entry.parent_id = args.parent_id
    if args.selector is not None:
        del entry.selectors[:]
        entry.selectors.extend(_selector(s) for s in args.selector)
    if args.x509_ttl is not None:
        entry.x509_svid_ttl = args.x509_ttl
    if args.jwt_ttl is not None:
        entry.jwt_svid_ttl = args.jwt_ttl
    if args.dns is not None:
        del entry.dns_names[:]
        entry.dns_names.extend(args.dns)
    if args.federates_with is not None:
        del entry.federates_with[:]
        entry.federates_with.extend(td for td in args.federates_with if td)
    if args.hint is not None:
        entry.hint = args.hint
    if args.admin is not None:
        entry.admin = args.admin
    if args.expires_at is not None:
        entry.expires_at = _parse_time(args.expires_at)


def _for_int32(name: str, value: int | None) -> None:
    if value is not None and not 0 <= value < 2**31:
        raise CliError(f"{name}: must be between 0 and {2**31 - 1}")


_MATCH = {
    "all": admin_pb2.SELECTOR_MATCH_ALL,
    "exact": admin_pb2.SELECTOR_MATCH_EXACT,
    "any": admin_pb2.SELECTOR_MATCH_ANY,
}


def _apply_filter_flags(
    query: admin_pb2.ListEntriesRequest | admin_pb2.ListAgentsRequest, args: argparse.Namespace
) -> None:
    cli_entries.refuse_empty(args, "spiffe_id_prefix")
    query.page_size = cli_entries.page_size(args)
    query.spiffe_id_prefix = args.spiffe_id_prefix or ""
    query.selectors.extend(_selector(s) for s in args.selector or ())
    query.selector_match = _MATCH[args.match]


def _entry_batch(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub, t: float) -> None:
    """create/update/delete --file (and delete with several --id): batches, per-item results."""
    action = args.action
    if action != "delete" or args.file:
        given = [f"--{k.replace('_', '-')}" for k in _ENTRY_FLAGS if getattr(args, k, None)]
        if action != "delete" and (given or args.admin is not None or args.expires_at):
            raise CliError(f"entry {action}: --file cannot be combined with entry flags")
        if getattr(args, "id", None):
            raise CliError(f"entry {action}: --file cannot be combined with --id")
        items = cli_entries.read_entries(args.file)
    else:
        items = [
            cli_entries.Item(f"--id #{n}", common_pb2.Entry(id=i)) for n, i in enumerate(args.id, 1)
        ]
    if action == "create":
        verb = "created"

        def call(batch: list[common_pb2.Entry]) -> list[admin_pb2.EntryResult]:
            request = admin_pb2.BatchCreateEntryRequest(entries=batch)
            return list(stub.BatchCreateEntry(request, timeout=t).results)

    elif action == "update":
        verb = "updated"

        def call(batch: list[common_pb2.Entry]) -> list[admin_pb2.EntryResult]:
            request = admin_pb2.BatchUpdateEntryRequest(entries=batch)
            return list(stub.BatchUpdateEntry(request, timeout=t).results)

    else:
        verb = "deleted"
        for item in items:
            if not item.entry.id:
                raise CliError(f"{item.where}: an entry to delete needs its id")

        def call(batch: list[common_pb2.Entry]) -> list[admin_pb2.EntryResult]:
            request = admin_pb2.BatchDeleteEntryRequest(ids=[e.id for e in batch])
            return list(stub.BatchDeleteEntry(request, timeout=t).results)

    outcomes = cli_entries.send_batches(items, call, verb)
    summary, problems = cli_entries.outcomes_text(outcomes, verb)
    _emit(args, summary, cli_entries.outcomes_json(outcomes))
    if problems:
        for line in problems:
            print(f"svid-server: {shown(line)}", file=sys.stderr)
        raise CliError(f"{len(problems)} of {len(outcomes)} entries refused (listed above)")


def _admin_command(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> None:
    t = _timeout(args)
    cmd = (args.command, getattr(args, "action", None))
    if cmd == ("token", "generate"):
        _for_int32("--ttl", args.ttl)
        token = stub.CreateJoinToken(
            admin_pb2.CreateJoinTokenRequest(ttl=args.ttl, agent_id=args.agent_id), timeout=t
        )
        _emit(args, out.token_text(token), out.to_json(token))
    elif cmd in {("entry", "create"), ("entry", "update"), ("entry", "delete")} and args.file:
        _entry_batch(args, stub, t)
    elif cmd == ("entry", "create"):
        _for_int32("--x509-ttl", args.x509_ttl)
        _for_int32("--jwt-ttl", args.jwt_ttl)
        if args.spiffe_id is None or args.parent_id is None:
            raise CliError("entry create: --spiffe-id and --parent-id are required (or --file)")
        entry = common_pb2.Entry()
        _apply_entry_flags(entry, args)
        created = stub.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=t).entry
        _emit(args, out.entry_text(created), out.to_json(created))
    elif cmd == ("entry", "show"):
        # `--id "$ID"` with $ID empty is asked of the server (an error), never the whole list.
        if args.id is not None:
            entries = [stub.GetEntry(admin_pb2.GetEntryRequest(id=args.id), timeout=t)]
        else:
            cli_entries.refuse_empty(args, "spiffe_id", "parent_id")
            query = admin_pb2.ListEntriesRequest(
                spiffe_id=args.spiffe_id or "", parent_id=args.parent_id or ""
            )
            _apply_filter_flags(query, args)

            def entry_page(token: str) -> tuple[list[common_pb2.Entry], str]:
                query.page_token = token
                reply = stub.ListEntries(query, timeout=t)
                return list(reply.entries), reply.next_page_token

            entries = cli_entries.all_pages(entry_page)
        _emit(args, out.entries_text(entries), out.to_json(entries, key="entries"))
    elif cmd == ("entry", "update"):
        if not args.id:
            raise CliError("entry update: --id is required (or --file)")
        _for_int32("--x509-ttl", args.x509_ttl)
        _for_int32("--jwt-ttl", args.jwt_ttl)
        entry = stub.GetEntry(admin_pb2.GetEntryRequest(id=args.id), timeout=t)
        _apply_entry_flags(entry, args)
        updated = stub.UpdateEntry(admin_pb2.UpdateEntryRequest(entry=entry), timeout=t).entry
        _emit(args, out.entry_text(updated), out.to_json(updated))
    elif cmd == ("entry", "delete") and args.id and len(args.id) > 1:
        _entry_batch(args, stub, t)
    elif cmd == ("entry", "delete"):
        if not args.id:
            raise CliError("entry delete: --id is required (or --file)")
        (entry_id,) = args.id
        stub.DeleteEntry(admin_pb2.DeleteEntryRequest(id=entry_id), timeout=t)
        gone = out.to_json(admin_pb2.GetEntryRequest(id=entry_id))
        _emit(args, f"Deleted entry {shown(entry_id)}", gone)
    elif cmd == ("agent", "list"):
        agent_query = admin_pb2.ListAgentsRequest()
        _apply_filter_flags(agent_query, args)

        def agent_page(token: str) -> tuple[list[admin_pb2.Agent], str]:
            agent_query.page_token = token
            reply = stub.ListAgents(agent_query, timeout=t)
            return list(reply.agents), reply.next_page_token

        agents = cli_entries.all_pages(agent_page)
        _emit(args, out.agents_text(agents), out.to_json(agents, key="agents"))
    elif cmd == ("agent", "show"):
        agent = stub.GetAgent(admin_pb2.GetAgentRequest(spiffe_id=args.spiffe_id), timeout=t)
        _emit(args, out.agent_text(agent), out.to_json(agent))
    elif cmd == ("agent", "evict"):
        stub.EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=args.spiffe_id), timeout=t)
        _emit(
            args,
            f"Evicted agent {shown(args.spiffe_id)}",
            out.to_json(admin_pb2.GetAgentRequest(spiffe_id=args.spiffe_id)),
        )
    elif cmd == ("agent", "ban"):
        stub.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=args.spiffe_id), timeout=t)
        _emit(
            args,
            f"Banned agent {shown(args.spiffe_id)}",
            out.to_json(admin_pb2.GetAgentRequest(spiffe_id=args.spiffe_id)),
        )
    # `--id "$TD"` with $TD empty is asked of the server (an error), never our own bundle.
    elif cmd in cli_federation.COMMANDS or (cmd == ("bundle", "show") and args.id is not None):
        cli_federation.run_command(args, stub, t, _emit)
    elif cmd == ("bundle", "show"):
        bundle = stub.GetBundle(admin_pb2.GetBundleRequest(), timeout=t)
        if getattr(args, "output", "text") == "json" and args.format == "pem":
            print(out.to_json(bundle))
        elif args.format == "spiffe":
            print(out.bundle_spiffe(bundle))
        else:
            sys.stdout.write(out.bundle_pem(bundle))
    else:  # pragma: no cover - argparse only offers the commands above
        raise CliError(f"unknown command {' '.join(c for c in cmd if c)}")


def _healthcheck(args: argparse.Namespace) -> None:
    with _channel(args) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=_timeout(args)
        )
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise CliError(f"server is not serving (status {reply.status})")
    if getattr(args, "output", "text") == "json":
        print('{"status": "SERVING"}')
    else:
        print("Server is healthy.")


# -- local commands -------------------------------------------------------------------------


def _keys(args: argparse.Namespace) -> None:
    from server.ca.sealing import KeyEncryptionKey  # noqa: PLC0415 - admin commands stay light

    KeyEncryptionKey.generate().write_new(args.out)
    _emit(
        args,
        f"Wrote a new key-encryption key to {args.out} (mode 0600).",
        json.dumps({"key_encryption_key_file": str(args.out)}),
    )


# -- run ------------------------------------------------------------------------------------


def _run_config(args: argparse.Namespace) -> ServerConfig:
    flags: dict[str, Any] = {
        key: getattr(args, f"cfg_{key}", None) for key in CONFIG_KEYS if key != "admin_socket"
    }
    if getattr(args, "admin_socket", None):
        flags["admin_socket"] = str(args.admin_socket)
    return load_config(getattr(args, "config", None), flags)


def _warn_of_a_secret_on_argv(datastore: str | None) -> None:
    """A password in --datastore's URL is readable by every local user in /proc/<pid>/cmdline
    for as long as the server runs: said once at start, the URL shown redacted."""
    if datastore and redact_dsn(datastore) != datastore:
        logging.getLogger("svid.server").warning(
            "--datastore: the URL's password is readable by every local user in "
            "/proc/<pid>/cmdline while the server runs; give the URL in the config file "
            "(readable by the server's user only), or the password in PGPASSFILE or PGPASSWORD",
            extra={"datastore": redact_dsn(datastore)},
        )


# The daemon's young-generation GC threshold (CPython's default is 700 allocations).
DAEMON_GC_THRESHOLD = 10_000


def freeze_start_up() -> None:
    """What start-up loaded (datastore view, CA, policy, caches) lives as long as the process:
    moved to the permanent generation, full collections stop walking it. Measured with 100,000
    entries under issuance and Sync load: a full collection took ~470 ms, ~3 ms frozen.

    No gc.collect() first: on that heap it stalled the loop for ~360 ms just as serving began.
    Frozen objects are still freed when their last reference goes; only start-up's cyclic
    garbage not yet collected stays, once."""
    gc.freeze()


def _run(args: argparse.Namespace) -> None:
    from server.app import Server  # noqa: PLC0415 - admin commands must not load the CA
    from server.data_dir import prepare_data_dir  # noqa: PLC0415

    config = _run_config(args)
    logs.configure(config.log_format, config.log_level)
    _warn_of_a_secret_on_argv(getattr(args, "cfg_datastore", None))
    prepare_data_dir(config.data_dir)  # before the datastore or any key in it is opened
    # Issuance allocates a few container objects per credential that live for one batch: at
    # 700 a collection ran every few credentials and walked objects that were about to be
    # freed anyway. Measured on the JWT batch bench load: ~1.3 us less main-process CPU per JWT.
    # Cycles are still collected; only less often.
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(DAEMON_GC_THRESHOLD, older, oldest)

    stacks_on_sigusr1()

    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop, logging.getLogger("svid.server"))
        server = Server(
            config,
            new_datastore=args.new_datastore,
            restored_datastore=args.restored_datastore,
        )
        server.metrics.gc_pauses.install()
        try:
            await server.run(stop, started=freeze_start_up)
        finally:
            server.metrics.gc_pauses.remove()

    try:
        asyncio.run(main())
    finally:
        logs.flush()  # the log's last lines before a fatal error main() prints


# -- entry point ----------------------------------------------------------------------------

# Arguments the CLI only opens as local files, whatever bytes their names hold.
_LOCAL_PATHS = frozenset({"file", "anchor"})
_POSITIONALS = frozenset({"task_id"})


def _check_text(args: argparse.Namespace) -> None:
    """Every text argument is UTF-8, as protobuf and the datastore need it to be (the value is
    not shown: it may be a URL with a password)."""
    name = non_utf8_argument(args, skip=_LOCAL_PATHS)
    if name is not None:
        label = name if name in _POSITIONALS else f"--{name.replace('_', '-')}"
        raise CliError(f"{label}: not UTF-8 text")


def main(argv: Sequence[str] | None = None) -> int:
    if sys.stderr is None:
        # Started with descriptor 2 closed (`2>&-`): print(file=None) writes to stdout, and an
        # error line landed in the `--output json` answer a script reads; dropped, as asked.
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            if sys.stdout is None and args.command != "run":
                # Started with descriptor 1 closed (`>&-`): Python drops every print, so a
                # token was made, or a key file written, and the command answered nothing.
                raise CliError("stdout is closed: the command's answer would be lost; nothing done")
            if args.command not in ("run", "keys"):  # these read only what they are given
                _check_text(args)
                _discover_config(args)
                _timeout(args)  # a bad --timeout is reported before anything is opened
            if args.command == "run":
                _run(args)
            elif args.command == "keys":
                _keys(args)
            elif args.command == "healthcheck":
                _healthcheck(args)
            elif (args.command, getattr(args, "action", None)) in cli_ca.COMMANDS:
                cli_ca.run_command(args, _run_config)
            elif args.command in task_cli.COMMANDS:
                task_cli.run_command(args, _channel, _timeout)
            else:
                with _channel(args) as channel:
                    _admin_command(args, admin_pb2_grpc.AdminStub(channel))
            flush_stdout()
        except grpc.RpcError as exc:
            raise _rpc_error(exc, args) from None
    except BrokenPipeError:
        return stdout_closed_by_reader()
    except (ServerError, SvidError) as exc:
        prefix = "config error" if isinstance(exc, ConfigError) else "error"
        # One line, escaped: a server's details and a CliError quote values others set.
        logs.say(f"svid-server: {prefix}: {shown(str(exc))}")  # after the log of `run`, never held
        return 1
    except OSError as exc:
        logs.say(f"svid-server: error: {shown(str(exc))}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
