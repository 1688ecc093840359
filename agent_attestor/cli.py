"""The svid-agent command line: run the agent, check its health, talk to its Workload API, and
print the server's audit checkpoint it keeps."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import shlex
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from google.protobuf import json_format
from grpc_health.v1 import health_pb2  # type: ignore[import-untyped]

from agent_attestor import _crypto
from agent_attestor.app import AgentApp
from agent_attestor.checkpoint_store import read_records
from agent_attestor.config import (
    DEFAULT_SOCKET,
    JOIN_TOKEN_ENV,
    KEYS,
    LIST_KEYS,
    AgentConfig,
    build_config,
    load_toml,
)
from agent_attestor.data_dir_lock import holding_data_dir
from agent_attestor.errors import AgentError, ConfigError
from agent_attestor.file_set import NewFile, replace_together
from agent_attestor.logs import configure, say
from agent_attestor.logs import flush as flush_logs
from agent_attestor.workload_client import WorkloadClient, endpoint, socket_uri
from svid._audit_checkpoint import CHECKPOINT
from svid._cli_args import non_utf8_argument, timeout_problem
from svid._clock import format_utc, unix_times_as_numbers
from svid._daemon_config import expand_path
from svid._der import certs_to_pem, parse_der_certs
from svid._errors import SvidError
from svid._logs import stacks_on_sigusr1
from svid._proto import task_pb2
from svid._safe_dir import Who, secure_dir
from svid._stdout import flush_stdout, stdout_closed_by_reader

_BOOL_FLAGS = {"insecure_bootstrap", "socket_dir_shared"}
_OUTPUT_HELP = "text (times in RFC 3339 UTC) or json (times in Unix seconds)"
_INT32_MAX = 2**31 - 1
_WRITER = Who("svid-agent", AgentError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svid-agent", description="svidd node agent")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", type=Path, help="agent TOML config file")
    for key in KEYS:
        flag = f"--{key.replace('_', '-')}"
        if key in _BOOL_FLAGS:
            run.add_argument(flag, dest=f"cfg_{key}", action="store_const", const=True)
        elif key in LIST_KEYS:  # repeatable, and each may be a comma-separated list
            run.add_argument(flag, dest=f"cfg_{key}", action="append", default=None)
        else:
            run.add_argument(flag, dest=f"cfg_{key}", default=None)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--socket-path",
        type=Path,
        help=f"Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET, else {DEFAULT_SOCKET})",
    )
    client.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the agent (default 10)"
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--output", choices=("text", "json"), default="text", help=_OUTPUT_HELP)

    sub.add_parser("healthcheck", parents=[client, output], help="exit 0 when the agent is serving")

    api = sub.add_parser("api", help="Workload API client").add_subparsers(
        dest="api", required=True
    )
    fetch = api.add_parser("fetch", help="fetch an SVID").add_subparsers(dest="kind", required=True)
    x509 = fetch.add_parser("x509", parents=[client, output], help="fetch X.509-SVIDs")
    x509.add_argument("--write", type=Path, help="write svid.N.pem, svid.N.key, bundle.N.pem here")
    jwt = fetch.add_parser("jwt", parents=[client], help="fetch JWT-SVIDs")
    jwt.add_argument("--audience", action="append", required=True)
    jwt.add_argument("--spiffe-id", default="")
    jwt.add_argument(
        "--output",
        choices=("text", "json", "raw"),
        default="text",
        help="text, json, or raw: only the token(s), one a line, for scripts",
    )
    validate = api.add_parser("validate", help="validate an SVID").add_subparsers(
        dest="kind", required=True
    )
    vjwt = validate.add_parser("jwt", parents=[client, output], help="validate a JWT-SVID")
    vjwt.add_argument("--audience", required=True)
    token = vjwt.add_mutually_exclusive_group(required=True)
    token.add_argument(
        "--svid",
        help="the JWT-SVID, '-' to read it from stdin (a token given here is readable by "
        "every local user in /proc/<pid>/cmdline while the command runs)",
    )
    token.add_argument("--svid-file", type=Path, help="read the JWT-SVID from this file")
    api.add_parser("watch", parents=[client, output], help="print every X.509-SVID update")

    task = sub.add_parser("task", help="task-scoped identities for the calling workload")
    tasks = task.add_subparsers(dest="task", required=True)
    begin = tasks.add_parser(
        "begin", parents=[client, output], help="begin a task with a declared intent"
    )
    begin.add_argument("--action", action="append", default=[], help="repeatable, e.g. read")
    begin.add_argument("--resource", action="append", default=[], help="repeatable audience")
    begin.add_argument(
        "--tool", action="append", default=[], help="repeatable SERVER#TOOL, e.g. mcp-tickets#read"
    )
    begin.add_argument(
        "--classification", default="", help="public|internal|confidential|restricted"
    )
    begin.add_argument("--environment", default="")
    begin.add_argument("--on-behalf-of", default="")
    goal = begin.add_mutually_exclusive_group()
    goal.add_argument(
        "--goal",
        default="",
        help="free text; only its sha256 leaves this node; '-' to read it from stdin (text "
        "given here is readable by every local user in /proc/<pid>/cmdline while it runs)",
    )
    goal.add_argument("--goal-file", type=Path, help="read the goal from this file")
    begin.add_argument("--ttl", type=_int32, default=300, help="requested seconds")
    begin.add_argument("--parent-task", default="")
    begin.add_argument(
        "--elevate",
        action="store_true",
        help="with --parent-task: a short elevated step, decided by policy on its own",
    )
    begin.add_argument("--spiffe-id", default="", help="identity to act under (default: first)")
    end = tasks.add_parser("end", parents=[client, output], help="end a task and revoke its SVIDs")
    end.add_argument("--id", required=True)
    end.add_argument(
        "--reason", default="", help="why, on the task and its audit event (one printable line)"
    )
    tlist = tasks.add_parser("list", parents=[client, output], help="the calling workload's tasks")
    tlist.add_argument("--state", default="", choices=("", "active", "ended", "revoked", "expired"))
    tlist.add_argument(
        "--spiffe-id", default="", help="only the tasks under this one of the caller's identities"
    )
    tlist.add_argument(
        "--page-size",
        type=_page_size,
        default=0,
        metavar="N",
        help="tasks per page asked of the server (default 500, at most 5000); every page is read",
    )

    audit = sub.add_parser("audit", help="the server's audit log, as this node saw it")
    audit_actions = audit.add_subparsers(dest="audit", required=True)
    checkpoint = audit_actions.add_parser(
        "checkpoint",
        help="print every audit checkpoint and prune record the server pushed to this agent "
        "and it kept, as lines of its checkpoint file: an anchor for svid-server audit verify "
        "--anchor",
    )
    checkpoint.add_argument("--config", type=Path, help="agent TOML config file (for data_dir)")
    checkpoint.add_argument("--data-dir", type=Path, help="the agent's data_dir")
    return parser


def _int32(text: str) -> int:
    """A number that fits the int32 it is sent as (protobuf raises a bare ValueError past it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value > _INT32_MAX:
        raise argparse.ArgumentTypeError(f"{value} must be at most {_INT32_MAX}")
    if value < -_INT32_MAX - 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least {-_INT32_MAX - 1}")
    return value


def _page_size(text: str) -> int:
    value = _int32(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _x509_summary(msg: Any) -> list[dict[str, Any]]:
    out = []
    for svid in msg.svids:
        chain = parse_der_certs(svid.x509_svid)
        out.append(
            {
                "spiffe_id": svid.spiffe_id,
                "hint": svid.hint,
                "not_after": int(chain[0].not_valid_after_utc.timestamp()),
                "serial": format(chain[0].serial_number, "x"),
                "chain_length": len(chain),
            }
        )
    return out


def _write_x509(directory: Path, msg: Any) -> None:
    # Made if missing, and refused when another user owns it or may write a directory above
    # it: one who made /tmp/svids first could otherwise swap the files once written (a
    # bundle.0.pem of a CA of theirs, trusted by whatever reads it). The directory itself may
    # be open to others when it is ours or root's (a Kubernetes emptyDir shared with a sidecar).
    directory = secure_dir(directory, "--write", 0o755, _WRITER, shared=True)
    files = []
    for i, svid in enumerate(msg.svids):
        key = _crypto.key_pem(serialization.load_der_private_key(svid.x509_svid_key, None))
        # Certificate before key: a server reloading reads its certificate, then its key (nginx,
        # Envoy). Renamed in this order, it meets a new certificate beside the old key only if
        # both its reads fall between these two renames, microseconds apart; key first, any
        # reload that read the old certificate before the key's rename and the key after it
        # would pair them wrongly. No order of separate files closes the window entirely.
        files += [
            NewFile(f"svid.{i}.pem", certs_to_pem(parse_der_certs(svid.x509_svid)), 0o644),
            NewFile(f"svid.{i}.key", key, 0o600),
        ]
    # The bundles after: a bundle pairs with no key.
    files += [
        NewFile(f"bundle.{i}.pem", certs_to_pem(parse_der_certs(svid.bundle)), 0o644)
        for i, svid in enumerate(msg.svids)
    ]
    replace_together(directory, files)


def _cmd_fetch_x509(args: argparse.Namespace, client: WorkloadClient) -> int:
    msg = client.fetch_x509()
    if args.write is not None:
        try:
            _write_x509(args.write, msg)
        except OSError as exc:  # a file in the way, no permission, a full disk
            where = exc.filename or args.write
            raise AgentError(f"--write: cannot write {where}: {exc.strerror or exc}") from None
    summary = _x509_summary(msg)
    if args.output == "json":
        print(json.dumps({"svids": summary}, indent=2))
    else:
        for item in summary:
            print(f"SPIFFE ID:\t{item['spiffe_id']}")
            print(f"Expires:\t{format_utc(item['not_after'])}")
            if item["hint"]:
                print(f"Hint:\t\t{item['hint']}")
        if args.write is not None:
            print(f"Written to {args.write}")
    return 0


def _cmd_fetch_jwt(args: argparse.Namespace, client: WorkloadClient) -> int:
    resp = client.fetch_jwt(args.audience, args.spiffe_id)
    if args.output == "json":
        svids = [{"spiffe_id": s.spiffe_id, "svid": s.svid, "hint": s.hint} for s in resp.svids]
        print(json.dumps({"svids": svids}, indent=2))
    elif args.output == "raw":
        for s in resp.svids:
            print(s.svid)
    else:
        for s in resp.svids:
            print(f"token({s.spiffe_id}):\n\t{s.svid}")
    return 0


def _off_argv(flag: str, value: str, path: Path | None) -> str | None:
    """The text of `--<flag>-file PATH` or `--<flag> -` (stdin), stripped; None when neither
    was used. Errors never quote what was read (a token, a user's goal)."""
    if path is not None:
        try:
            text: str = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"--{flag}-file: cannot read {path}: {problem}") from None
        return text.strip()
    if value == "-":
        try:
            return sys.stdin.read().strip()
        except UnicodeDecodeError:
            raise ConfigError(f"--{flag} -: stdin is not UTF-8 text") from None
    return None


def _jwt_to_validate(args: argparse.Namespace) -> str:
    """The token `api validate jwt` checks: from stdin (`--svid -`), --svid-file, or (warned
    of) --svid's argument, which every local user reads in /proc/<pid>/cmdline."""
    text = _off_argv("svid", args.svid, args.svid_file)
    if text is not None:
        return text
    print(
        "svid-agent: warning: --svid TOKEN is readable by every local user in "
        "/proc/<pid>/cmdline; use --svid - (stdin) or --svid-file PATH",
        file=sys.stderr,
    )
    return str(args.svid)


def _cmd_validate_jwt(args: argparse.Namespace, client: WorkloadClient) -> int:
    resp = client.validate_jwt(args.audience, _jwt_to_validate(args))
    claims = json_format.MessageToDict(resp.claims)
    if args.output == "json":
        print(json.dumps({"spiffe_id": resp.spiffe_id, "claims": claims}, indent=2))
    else:
        print("SVID is valid.")
        print(f"SPIFFE ID : {resp.spiffe_id}")
        print(f"Claims    : {json.dumps(claims)}")
    return 0


def _cmd_watch(args: argparse.Namespace, client: WorkloadClient) -> int:
    for msg in client.watch_x509():
        summary = _x509_summary(msg)
        if args.output == "json":
            print(json.dumps({"svids": summary}), flush=True)
        else:
            ids = ", ".join(
                f"{s['spiffe_id']} (until {format_utc(s['not_after'])})" for s in summary
            )
            print(f"Received {len(summary)} svid(s): {ids}", flush=True)
    return 0


def _task_summary(task: task_pb2.Task) -> object:
    return unix_times_as_numbers(json_format.MessageToDict(task, preserving_proto_field_name=True))


def _print_tasks(args: argparse.Namespace, tasks: list[task_pb2.Task]) -> None:
    if args.output == "json":
        print(json.dumps({"tasks": [_task_summary(t) for t in tasks]}, indent=2))
        return
    for t in tasks:
        print(f"Task ID     : {t.task_id}")
        print(f"SPIFFE ID   : {t.spiffe_id}")
        print(f"State       : {t.state} ({t.decision}{': ' + t.reason if t.reason else ''})")
        print(f"Actions     : {', '.join(t.actions)}")
        print(f"Resources   : {', '.join(t.resources)}")
        print(f"Expires     : {format_utc(t.expires_at) if t.expires_at else '-'}")
        if t.end_reason:
            print(f"Ended       : {t.end_reason}")
        print(f"Credentials : {t.credentials}")
        print()


def _cmd_task(args: argparse.Namespace, client: WorkloadClient) -> int:
    if args.task == "begin":
        goal = _off_argv("goal", args.goal, args.goal_file)
        intent = task_pb2.Intent(
            actions=args.action,
            resources=args.resource,
            tools=args.tool,
            classification=args.classification,
            environment=args.environment,
            on_behalf_of=args.on_behalf_of,
            goal=(args.goal if goal is None else goal).strip(),  # one hash, however given
        )
        request = task_pb2.BeginTaskRequest(
            spiffe_id=args.spiffe_id,
            intent=intent,
            ttl=args.ttl,
            parent_task_id=args.parent_task,
            elevate=args.elevate,
        )
        _print_tasks(args, [client.begin_task(request)])
    elif args.task == "end":
        _print_tasks(args, [client.end_task(args.id, args.reason)])
    else:
        _print_tasks(
            args,
            client.list_tasks(state=args.state, spiffe_id=args.spiffe_id, page_size=args.page_size),
        )
    return 0


def _cmd_healthcheck(args: argparse.Namespace, client: WorkloadClient) -> int:
    if client.health() != health_pb2.HealthCheckResponse.SERVING:
        print("svid-agent: the agent answers but is not ready yet", file=sys.stderr)
        return 1
    print('{"status": "SERVING"}' if args.output == "json" else "Agent is healthy.")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    flags = {key: getattr(args, f"cfg_{key}") for key in KEYS}
    file_values = load_toml(args.config) if args.config is not None else {}
    config = build_config(file_values, flags, os.environ)
    # Logging first: a start waiting for another agent's data directory (take_over_wait) says so.
    configure(config.log_format, config.log_level)
    # Held before anything of the data directory is read or written, and until the process
    # ends (a refusal is the one line main prints).
    with holding_data_dir(config.data_dir, config.take_over_wait):
        return _run(args, config, file_values)


def _run(args: argparse.Namespace, config: AgentConfig, file_values: dict[str, Any]) -> int:
    # Another local user who reads the token before the agent spends it can attest first and be
    # handed this node's workload entries.
    log = logging.getLogger("agent_attestor.cli")
    safer = f"--join-token-file (mode 0600), ${JOIN_TOKEN_ENV} or join_token_file in the config"
    if args.cfg_join_token is not None:
        log.warning(
            f"--join-token is readable by every local user in /proc/<pid>/cmdline; use {safer}"
        )
    elif args.config is not None and file_values.get("join_token"):
        mode = stat.S_IMODE(args.config.stat().st_mode)
        if mode & 0o077:
            log.warning(
                f"config file {args.config} has mode {mode:04o} and holds join_token, which "
                f"other local users can read; use {safer}"
            )
    if config.log_format == "text":
        # For whoever started it by hand, to export. With JSON logs the "agent started" record
        # says it, as the server's says its addresses: a plain line here was the one line not
        # JSON of what a log shipper reads (stdout and stderr, merged in a container's log).
        # Shell-quoted, to paste after `export`: a path with a space split it there.
        print(f"SPIFFE_ENDPOINT_SOCKET={shlex.quote(socket_uri(config.socket_path))}", flush=True)
    stacks_on_sigusr1()
    try:
        # What start-up made (config, keys, state, modules) lives as long as the process:
        # frozen, full collections stop walking it (as the server's, server/cli.py).
        asyncio.run(AgentApp(config).run_until_signalled(started=gc.freeze))
    finally:
        flush_logs()  # the log's last lines before a fatal error main() prints
    return 0


def _cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    """Reads the agent's file (the agent need not run); checked before it is printed."""
    # Only data_dir: the rest of a config (a join token file among it) is not this command's.
    file_values = load_toml(args.config) if args.config is not None else {}
    data_dir = args.data_dir or file_values.get("data_dir") or AgentConfig.data_dir
    if not isinstance(data_dir, (str, Path)):
        raise ConfigError(f"data_dir: expected a string, got {data_dir!r}")
    data_dir = expand_path("data_dir", data_dir, ConfigError)
    path = AgentConfig(data_dir=data_dir).audit_checkpoint_path
    try:
        records = read_records(path)
    except FileNotFoundError:
        print(
            f"svid-agent: no audit checkpoint in {path.parent} yet: the server pushes one "
            "over Sync once it has signed one",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"svid-agent: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for record in records:
        print(record.to_line())
    # Every line is kept: the summary names the newest of each kind, not 100,000 lines.
    newest = {r.kind: r for r in sorted(records, key=lambda r: (r.seq, r.time))}
    print(f"audit checkpoint file: {len(records)} line(s)", file=sys.stderr)
    for record in newest.values():
        what = "events" if record.kind == CHECKPOINT else "events removed"
        print(
            f"audit {record.kind}: seq {record.seq} ({record.count} {what}), signed "
            f"{format_utc(record.time)} by key {record.key_id[:16]}",
            file=sys.stderr,
        )
    return 0


def _client_command(args: argparse.Namespace, client: WorkloadClient) -> int:
    if args.command == "healthcheck":
        return _cmd_healthcheck(args, client)
    if args.command == "task":
        return _cmd_task(args, client)
    if args.api == "fetch" and args.kind == "x509":
        return _cmd_fetch_x509(args, client)
    if args.api == "fetch":
        return _cmd_fetch_jwt(args, client)
    if args.api == "validate":
        return _cmd_validate_jwt(args, client)
    return _cmd_watch(args, client)


def _check_timeout(timeout: float) -> None:
    problem = timeout_problem(timeout)
    if problem is not None:
        raise ConfigError(problem)


def _check_text(args: argparse.Namespace) -> None:
    """Every text argument is UTF-8, as protobuf needs it to be (the value is not shown: --svid
    is a token)."""
    name = non_utf8_argument(args)
    if name is not None:
        raise ConfigError(f"--{name.replace('_', '-')}: not UTF-8 text")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "audit":
            return _cmd_audit_checkpoint(args)
        _check_timeout(args.timeout)
        _check_text(args)
        with WorkloadClient(endpoint(args.socket_path), args.timeout) as client:
            code = _client_command(args, client)
        flush_stdout()
        return code
    except BrokenPipeError:
        return stdout_closed_by_reader()
    except ConfigError as exc:
        say(f"svid-agent: configuration error: {exc}")  # after the log of `run`, never held
        return 2
    except (AgentError, SvidError) as exc:
        say(f"svid-agent: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
