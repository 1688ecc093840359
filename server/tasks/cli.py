"""`svid-server task | audit | policy` subcommands, plugged into server/cli.py.

`audit verify|export` and `policy validate` read files directly (they work with the server
stopped); `task list|show|revoke` and `policy reload` talk to the running server's admin socket.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from server.config import read_toml
from server.errors import ServerError
from svid._clock import SystemClock, format_utc, unix_times_as_numbers
from svid._proto import task_pb2, task_pb2_grpc

DEFAULT_DATA_DIR = Path(".svid-server")


class TaskCliError(ServerError):
    """A failed task/audit/policy command; the message is the one line printed."""


COMMANDS = ("task", "audit", "policy")


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the subcommands to svid-server's subparsers (`common` carries the global flags)."""
    task = sub.add_parser("task", help="task identities").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    tlist = task.add_parser("list", parents=[common], help="list tasks")
    tlist.add_argument("--agent-id", default="", help="only this node agent's tasks")
    tlist.add_argument("--state", default="", choices=("", "active", "ended", "revoked", "expired"))
    tshow = task.add_parser("show", parents=[common], help="show one task")
    tshow.add_argument("task_id")
    trevoke = task.add_parser("revoke", parents=[common], help="end a task, revoke its SVIDs")
    trevoke.add_argument("task_id")
    trevoke.add_argument("--reason", default="")

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    for name, text in (("verify", "check the hash chain"), ("export", "write JSON lines")):
        p = audit.add_parser(name, parents=[common], help=text)
        p.add_argument("--data-dir", type=Path, default=None)
        p.add_argument("--audit-db", type=Path, default=None, help="default <data_dir>/audit.db")
    export = audit.choices["export"]
    export.add_argument("--agent", default=None)
    export.add_argument("--task", default=None)
    export.add_argument("--since", default=None, help="unix seconds or ISO 8601 (inclusive)")
    export.add_argument("--until", default=None, help="unix seconds or ISO 8601 (exclusive)")
    export.add_argument("--decision", default=None)
    export.add_argument("--kind", default=None)
    export.add_argument("--out", type=Path, default=None, help="file (default stdout)")

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


def _audit_db(args: argparse.Namespace) -> Path:
    if args.audit_db is not None:
        return Path(args.audit_db)
    data_dir = args.data_dir or _config(args).get("data_dir") or DEFAULT_DATA_DIR
    return Path(str(data_dir)) / "audit.db"


def _time(flag: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise TaskCliError(f"{flag}: {text!r} is neither unix seconds nor ISO 8601") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _open_log(args: argparse.Namespace) -> Any:
    from server.audit import AuditLog, SqliteAuditStore  # noqa: PLC0415 - only these commands

    return AuditLog(SqliteAuditStore(_audit_db(args), create=False), SystemClock())


def _audit(args: argparse.Namespace) -> None:
    log = _open_log(args)
    try:
        if args.action == "verify":
            result = log.verify()
            if getattr(args, "output", "text") == "json":
                print(
                    json.dumps(
                        {
                            "ok": result.ok,
                            "checked": result.checked,
                            "broken_seq": result.broken_seq,
                            "broken_event_id": result.broken_event_id,
                            "problem": str(result.problem) if result.problem else None,
                            "detail": result.detail,
                        }
                    )
                )
            if not result.ok:
                raise TaskCliError(str(result))
            if getattr(args, "output", "text") != "json":
                print(str(result))
            return
        out = args.out.open("w") if args.out is not None else sys.stdout
        try:
            count = log.export(
                out,
                agent=args.agent,
                task=args.task,
                since=_time("--since", args.since),
                until=_time("--until", args.until),
                decision=args.decision,
                kind=args.kind,
            )
        finally:
            if args.out is not None:
                out.close()
        print(f"exported {count} events", file=sys.stderr)
    finally:
        log.store.close()


def _validate(args: argparse.Namespace) -> None:
    from server.policy import validate_policy_dir  # noqa: PLC0415

    raw = _config(args)
    directory = args.policy_dir or raw.get("policy_dir")
    if not directory:
        raise TaskCliError("--policy-dir: no policy directory given (flag or config policy_dir)")
    trust_domain = args.trust_domain or raw.get("trust_domain") or "example.org"
    problems = validate_policy_dir(
        Path(str(directory)), trust_domain=trust_domain, clock=SystemClock()
    )
    if problems:
        for problem in problems:
            print(str(problem), file=sys.stderr)
        raise TaskCliError(f"policy directory {directory} is invalid ({len(problems)} problems)")
    print(f"policy directory {directory} is valid")


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
    return "\n".join(lines)


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
        reply = stub.ListTasks(
            task_pb2.AdminListTasksRequest(agent_id=args.agent_id, state=args.state),
            timeout=timeout,
        )
        if as_json:
            print(json.dumps({"tasks": [_as_json(t) for t in reply.tasks]}, indent=2))
        elif not reply.tasks:
            print("No tasks.")
        else:
            print("\n\n".join(_task_text(t) for t in reply.tasks))
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
                f"policy reloaded: {info.hash} from {info.source} ({len(info.policy_ids)} policies)"
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
        _audit(args)
    elif (args.command, args.action) == ("policy", "validate"):
        _validate(args)
    else:
        with channel(args) as ch:
            _admin(args, ch, timeout(args))
