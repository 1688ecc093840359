"""`svid-server task | audit | policy` subcommands, plugged into server/cli.py.

`audit` lives in server/audit/cli.py. `policy validate` reads files directly (it works with
the server stopped); `task list|show|revoke` and `policy reload` talk to the running server's
admin socket.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from server import cli_entries
from server.audit import cli as audit_cli
from server.config import file_value, read_toml
from server.errors import CliError
from server.input_text import shown
from svid._clock import SystemClock, format_utc, unix_times_as_numbers
from svid._errors import SpiffeIdError
from svid._proto import task_pb2, task_pb2_grpc
from svid._spiffe_id import TrustDomain

COMMANDS = ("task", "audit", "policy")


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the subcommands to svid-server's subparsers (`common` carries the global flags)."""
    task = sub.add_parser("task", help="task identities").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    tlist = task.add_parser("list", parents=[common], help="list tasks, oldest first")
    tlist.add_argument("--agent-id", default=None, help="only this node agent's tasks")
    tlist.add_argument(
        "--runtime-id", default=None, help="only the tasks of this runtime (workload SPIFFE ID)"
    )
    tlist.add_argument("--state", default="", choices=("", "active", "ended", "revoked", "expired"))
    cli_entries.add_page_size(tlist)
    tshow = task.add_parser("show", parents=[common], help="show one task")
    tshow.add_argument("task_id")
    trevoke = task.add_parser("revoke", parents=[common], help="end a task, revoke its SVIDs")
    trevoke.add_argument("task_id")
    trevoke.add_argument("--reason", default="")

    audit_cli.add_commands(sub, common)

    policy = sub.add_parser("policy", help="task policies").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    validate = policy.add_parser("validate", parents=[common], help="check a policy directory")
    validate.add_argument("--policy-dir", type=Path, default=None)
    validate.add_argument("--trust-domain", default=None)
    policy.add_parser("reload", parents=[common], help="reload the server's policies")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    path = getattr(args, "config", None)
    return read_toml(path) if path is not None else {}


def _validate(args: argparse.Namespace) -> None:
    from server.policy import validate_policy_dir  # noqa: PLC0415

    raw = _config(args)
    # Read as the server reads it (~ expanded), or it is not the server's policy_dir.
    directory = args.policy_dir or file_value(raw, "policy_dir")
    if not directory:
        raise CliError("--policy-dir: no policy directory given (flag or config policy_dir)")
    check = validate_policy_dir(
        Path(str(directory)), trust_domain=_trust_domain(args, raw), clock=SystemClock()
    )
    if check.problems:
        for problem in check.problems:
            print(shown(str(problem)), file=sys.stderr)
        raise CliError(f"policy directory {directory} is invalid ({len(check.problems)} problems)")
    # On stderr, as problems are: stdout stays the one answer (`--output json` parses it).
    for warning in check.warnings:
        print(f"warning: {shown(str(warning))}", file=sys.stderr)
    if getattr(args, "output", "text") == "json":
        print(json.dumps({"policy_dir": str(directory), "valid": True}))
    else:
        print(f"policy directory {directory} is valid")


def _trust_domain(args: argparse.Namespace, raw: dict[str, Any]) -> str:
    """The trust domain the policies are checked under, refused as `run` refuses it: policies
    see it as context.trust_domain, so one the server would never serve validates nothing."""
    if args.trust_domain is not None:
        try:
            return TrustDomain.parse(args.trust_domain).name
        except SpiffeIdError as exc:
            raise CliError(f"--trust-domain: {exc}") from None
    configured = file_value(raw, "trust_domain")
    return configured.name if configured is not None else "example.org"


def _task_text(task: task_pb2.Task) -> str:
    def when(ts: int) -> str:
        return format_utc(ts) if ts else "-"

    lines = [
        f"Task ID        : {task.task_id}",
        f"SPIFFE ID      : {task.spiffe_id}",
        f"Runtime        : {task.runtime_id}",
        f"Agent          : {task.agent_id}",
        f"State          : {task.state}" + (f" ({task.end_reason})" if task.end_reason else ""),
        f"Actions        : {', '.join(task.actions)}",
        f"Resources      : {', '.join(task.resources)}",
        f"Classification : {task.classification}",
        f"Environment    : {task.environment or '-'}",
        f"On behalf of   : {task.on_behalf_of or '-'}",
        f"Parent task    : {task.parent_task_id or '-'} (depth {task.depth})",
        f"Decision       : {task.decision}: {task.reason}",
        f"Created        : {when(task.created_at)}",
        f"Expires        : {when(task.expires_at)}",
        f"Credentials    : {task.credentials}",
    ]
    if task.ended_at:
        lines.append(f"Ended          : {when(task.ended_at)}")
    # A workload states its intent and a policy words the reason: each line shown escaped.
    return "\n".join(shown(line) for line in lines)


def _as_json(message: Any) -> object:
    return unix_times_as_numbers(
        json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )


def _admin(args: argparse.Namespace, channel: grpc.Channel, timeout: float) -> None:
    stub = task_pb2_grpc.TaskAdminStub(channel)
    as_json = getattr(args, "output", "text") == "json"
    cmd = (args.command, args.action)
    if cmd == ("task", "list"):
        cli_entries.refuse_empty(args, "agent_id", "runtime_id")
        query = task_pb2.AdminListTasksRequest(
            agent_id=args.agent_id or "",
            runtime_id=args.runtime_id or "",
            state=args.state,
            page_size=cli_entries.page_size(args),
        )

        def task_page(token: str) -> tuple[list[task_pb2.Task], str]:
            query.page_token = token
            reply = stub.ListTasks(query, timeout=timeout)
            return list(reply.tasks), reply.next_page_token

        tasks = cli_entries.all_pages(task_page)
        if as_json:
            print(json.dumps({"tasks": [_as_json(t) for t in tasks]}, indent=2))
        elif not tasks:
            print("No tasks.")
        else:
            print("\n\n".join(_task_text(t) for t in tasks))
    elif cmd in (("task", "show"), ("task", "revoke")):
        call: Callable[..., task_pb2.Task] = (
            stub.ShowTask if args.action == "show" else stub.RevokeTask
        )
        task = call(
            task_pb2.AdminTaskRequest(task_id=args.task_id, reason=getattr(args, "reason", "")),
            timeout=timeout,
        )
        print(json.dumps(_as_json(task), indent=2) if as_json else _task_text(task))
    elif cmd == ("policy", "reload"):
        info = stub.ReloadPolicy(task_pb2.ReloadPolicyRequest(), timeout=timeout)
        if as_json:
            print(json.dumps(_as_json(info), indent=2))
        else:
            print(
                f"policy reloaded: {info.hash} from {shown(info.source)} "
                f"({len(info.policy_ids)} policies)"
            )
            # What the others do with it is theirs to report (server/policy/fleet.py).
            print(
                "announced to the servers sharing the datastore: each reloads its own "
                "policy_dir and reports (svid_server_policy_diverged) if it loads another set"
            )


def run_command(
    args: argparse.Namespace,
    channel: Callable[[argparse.Namespace], grpc.Channel],
    timeout: Callable[[argparse.Namespace], float],
) -> None:
    """Run a task/audit/policy command; `channel` opens the admin socket and `timeout` reads
    --timeout (server/cli.py's). A grpc.RpcError goes up to server/cli.py, which words every
    admin call's failure the same way."""
    if args.command == "audit":
        audit_cli.run(args, channel, _config)
    elif (args.command, args.action) == ("policy", "validate"):
        _validate(args)
    else:
        with channel(args) as ch:
            _admin(args, ch, timeout(args))
