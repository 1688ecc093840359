"""`svid-server audit verify | export | checkpoint | prune`.

`verify` and `export` read the datastore file directly (they work with the server stopped, and
never change it; `verify` reads a PostgreSQL datastore too, in one snapshot); `checkpoint` asks
the running server over its admin socket. `prune` opens the datastore itself too, with the
server running or stopped: SQLite serialises it with the server's writes, it never touches the
head the server appends after, and it signs its prune record with the data dir's checkpoint
key, so it runs as the server's user like every operator command that can change the log. No
admin RPC: the server prunes on its own schedule, and an operator's one-off prune (a backlog
before a first start with retention, a --before after an export) should not need a server up.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from server.audit.errors import AuditError
from server.datastore.base import AuditStore
from server.errors import CliError
from server.input_text import shown
from svid._clock import parse_utc

TIMEOUT = 15.0
DEFAULT_DATA_DIR = Path(".svid-server")
DATASTORE_FILE = "datastore.sqlite3"  # ServerConfig.datastore_path
LEGACY_AUDIT_FILE = "audit.db"


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `audit` to svid-server's subparsers (`common` carries the global flags)."""
    audit = sub.add_parser("audit", help="the audit log").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    for name, text in (("verify", "check the hash chain"), ("export", "write JSON lines")):
        p = audit.add_parser(name, parents=[common], help=text)
        p.add_argument("--data-dir", type=Path, default=None)
        p.add_argument(
            "--audit-db",
            type=Path,
            default=None,
            help="the file holding the log: default the datastore, <data_dir>/datastore.sqlite3 "
            "(or an older version's <data_dir>/audit.db the server has not imported yet)",
        )
        p.add_argument(
            "--datastore",
            default=None,
            metavar="URL",
            help=f"a postgresql:// URL: {name} the log in that database (default: the config's "
            f"`datastore` when it is one; several servers share it, any of them may {name})",
        )
    verify = audit.choices["verify"]
    verify.add_argument(
        "--anchor",
        default=None,
        metavar="FILE|SEQ:HASH",
        help="a checkpoint file (e.g. <data_dir>/audit-checkpoints.jsonl, a copy shipped "
        "elsewhere, or a node agent's: svid-agent audit checkpoint > FILE) or a head noted "
        "earlier; finds a cut tail, a wipe, dropped tables, re-hashing",
    )
    verify.add_argument(
        "--anchor-key",
        type=Path,
        default=None,
        metavar="PUBFILE",
        help="the checkpoint public key (PEM) to trust; default: the key in the file itself",
    )
    verify.add_argument(
        "--min-prune-age-days",
        type=_non_negative_days,
        default=None,
        metavar="DAYS",
        help="with an anchor file: the smallest audit_retention_days ever in force; a prune "
        "record that removed events younger than that when signed (by its signed last_ts, or "
        "a checkpoint naming fewer events signed since) is young_prune (default: not checked)",
    )
    export = audit.choices["export"]
    export.add_argument("--agent", default=None)
    export.add_argument("--task", default=None)
    export.add_argument("--since", default=None, help="unix seconds or ISO 8601 (inclusive)")
    export.add_argument("--until", default=None, help="unix seconds or ISO 8601 (exclusive)")
    export.add_argument("--decision", default=None)
    export.add_argument("--kind", default=None)
    export.add_argument("--out", type=Path, default=None, help="file (default stdout)")
    audit.add_parser(
        "checkpoint", parents=[common], help="sign the running server's audit head now"
    )
    prune = audit.add_parser(
        "prune",
        parents=[common],
        help="remove the oldest events behind a signed prune record (export them first)",
    )
    prune.add_argument("--data-dir", type=Path, default=None)
    which = prune.add_mutually_exclusive_group()
    which.add_argument("--before", default=None, help="unix seconds or ISO 8601: events older")
    which.add_argument("--through-seq", type=int, default=None, metavar="SEQ")
    prune.add_argument(
        "--batch", type=int, default=None, help="events per delete transaction (default 1000)"
    )


def run(
    args: argparse.Namespace,
    channel: Callable[[argparse.Namespace], grpc.Channel],
    config: Callable[[argparse.Namespace], dict[str, Any]],
) -> None:
    """Run one audit command; `channel` opens the admin socket, `config` reads --config."""
    if args.action == "checkpoint":
        _checkpoint(args, channel)
    elif args.action == "prune":
        _prune(args, config)
    elif args.action == "verify":
        _verify(args, config)
    else:
        _export(args, config)


def _data_dir(args: argparse.Namespace, config: Callable[[argparse.Namespace], Any]) -> Path:
    from server.config import file_value  # noqa: PLC0415 - as build_config below

    if args.data_dir:
        return Path(args.data_dir)
    # Read as the server reads it (~ expanded), or it is not the server's data_dir.
    path: Path | None = file_value(config(args), "data_dir")
    return DEFAULT_DATA_DIR if path is None else path


def _datastore_file(data_dir: Path, file_values: Mapping[str, Any]) -> Path:
    """The server's SQLite datastore (ServerConfig.datastore_path): the config's `datastore`
    file when it names one, else the one in `data_dir`."""
    from server.config import file_value  # noqa: PLC0415 - as build_config below
    from server.datastore.postgres_dsn import is_postgres_dsn  # noqa: PLC0415

    configured: str | None = file_value(file_values, "datastore")
    if configured and not is_postgres_dsn(configured):
        return Path(configured)
    return data_dir / DATASTORE_FILE


def _audit_db(args: argparse.Namespace, config: Callable[[argparse.Namespace], Any]) -> Path:
    if args.audit_db is not None:
        return Path(args.audit_db)
    data_dir = _data_dir(args, config)
    # An older version's audit.db stays the log until the server's next start imports it.
    legacy = data_dir / LEGACY_AUDIT_FILE
    return legacy if legacy.is_file() else _datastore_file(data_dir, config(args))


MAX_INT64 = 2**63 - 1

# A verify racing a live server's prune reads the checkpoint file and the log again this often.
VERIFY_ATTEMPTS = 3


def _verify(args: argparse.Namespace, config: Callable[[argparse.Namespace], Any]) -> None:
    from server.audit.store import SqliteAuditStore  # noqa: PLC0415 - only this command
    from server.audit.verify import Break, VerifyResult, verify_store  # noqa: PLC0415

    note = ""
    store: AuditStore | None = None
    try:
        for _ in range(VERIFY_ATTEMPTS):
            try:
                # Anchors first: the log only grows, so what they name is never ahead of the
                # snapshot.
                anchors, note = _anchors(args.anchor, args.anchor_key)
            except AuditError as e:
                result = VerifyResult(
                    ok=False, checked=0, head=None, problem=Break.BAD_ANCHOR, detail=str(e)
                )
                break
            if store is None:
                dsn = _postgres_dsn(args, config)
                store = (
                    SqliteAuditStore(_audit_db(args, config))
                    if dsn is None
                    else _open_postgres(dsn, "verify")
                )
            result = verify_store(store, anchors)
            # But a live server's prune moves the base past the prune record it appended after
            # the anchors were read: read both again. A base that no signed record reaches
            # stays so, and is reported.
            if result.ok or result.problem != Break.FORGED_BASE:
                break
    finally:
        if store is not None:
            store.close()
    if getattr(args, "min_prune_age_days", None) is not None and result.ok:
        result = _young_prune(args, result)
    if getattr(args, "output", "text") == "json":
        print(json.dumps({**result.to_json(), "anchor_key": note or None}))
    if not result.ok:
        raise CliError(str(result))
    if getattr(args, "output", "text") != "json":
        print(shown(str(result) + (f" (checkpoints signed by {note})" if note else "")))


def _non_negative_days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not days >= 0 or days == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a finite number of days, 0 or more")
    return days


def _young_prune(args: argparse.Namespace, result: Any) -> Any:
    """`result`, or a YOUNG_PRUNE break when a prune record of the anchor file removed events
    younger than --min-prune-age-days when it was signed (server/audit/prune_age.py)."""
    from server.audit.checkpoint import load_public_key  # noqa: PLC0415 - only this command
    from server.audit.prune_age import young_prunes_in_file  # noqa: PLC0415
    from server.audit.retention import DAY  # noqa: PLC0415
    from server.audit.verify import Break, VerifyResult  # noqa: PLC0415

    # The operator states the age, not the config: a retention raised since (or a count bound
    # removed) would judge every honest past prune against a setting it was not made under.
    if args.anchor is None or not Path(args.anchor).is_file():
        raise CliError("--min-prune-age-days: needs --anchor FILE (the prune records it judges)")
    days = float(args.min_prune_age_days)
    pinned = load_public_key(args.anchor_key)[0] if args.anchor_key is not None else None
    why = young_prunes_in_file(Path(args.anchor), pinned, days * DAY)
    if why is None:
        return result
    return VerifyResult(
        ok=False,
        checked=result.checked,
        head=None,
        problem=Break.YOUNG_PRUNE,
        detail=f"{why}: --min-prune-age-days is {days:g}; a holder of the checkpoint key may "
        "have pruned recent history away",
    )


def _postgres_dsn(
    args: argparse.Namespace, config: Callable[[argparse.Namespace], Any]
) -> str | None:
    """The PostgreSQL datastore to read: --datastore, else the config's, unless --audit-db
    names a file."""
    from server.datastore.postgres_dsn import check_dsn, is_postgres_dsn  # noqa: PLC0415
    from server.errors import ConfigError  # noqa: PLC0415

    given = getattr(args, "datastore", None)
    if given is not None:
        if not is_postgres_dsn(given):
            raise CliError("--datastore: a postgresql:// URL (a SQLite file: --audit-db)")
        try:
            check_dsn("--datastore", given)
        except ConfigError as e:
            raise CliError(str(e)) from None
        return str(given)
    configured = str(config(args).get("datastore") or "")
    if args.audit_db is None and is_postgres_dsn(configured):
        return configured
    return None


def _open_postgres(dsn: str, action: str) -> AuditStore:
    from server.datastore.errors import StorageError  # noqa: PLC0415
    from server.datastore.migrations import AUDIT_CHAIN_SCHEMA  # noqa: PLC0415
    from server.datastore.postgres import PostgresDataStore  # noqa: PLC0415
    from svid._clock import SystemClock  # noqa: PLC0415

    try:
        # One connection: a verify reads one snapshot. Never a migration: run before an
        # upgrade, it would move the schema under the previous release's servers, which then
        # refuse to start on it; an older schema's audit tables read as they are.
        return PostgresDataStore(
            dsn,
            SystemClock(),
            min_connections=1,
            max_connections=1,
            migrate=False,
            oldest_schema=AUDIT_CHAIN_SCHEMA,
        )
    except StorageError as e:
        raise CliError(f"audit {action}: {e}") from None


def _anchors(anchor: str | None, key_file: Path | None) -> tuple[list[Any], str]:
    from server.audit.checkpoint import CheckpointFile, load_public_key  # noqa: PLC0415
    from server.audit.verify import Anchor  # noqa: PLC0415

    if anchor is None:
        if key_file is not None:
            raise CliError("--anchor-key: needs --anchor FILE")
        return [], ""
    path = Path(anchor)
    if ":" in anchor and not path.exists():
        return [Anchor.parse(anchor)], ""
    if not path.is_file():
        raise CliError(f"--anchor: {anchor!r} is neither a checkpoint file nor SEQ:HASH")
    pinned = load_public_key(key_file)[0] if key_file is not None else None
    return CheckpointFile(path).anchors(pinned)


def _export(args: argparse.Namespace, config: Callable[[argparse.Namespace], Any]) -> None:
    from server.audit.log import AuditLog  # noqa: PLC0415 - only this command
    from server.audit.store import SqliteAuditStore  # noqa: PLC0415
    from svid._clock import SystemClock  # noqa: PLC0415

    # Servers sharing PostgreSQL keep their log there: read from the data_dir's SQLite file,
    # export refused as "no audit database" on every one of them.
    dsn = _postgres_dsn(args, config)
    store = (
        SqliteAuditStore(_audit_db(args, config)) if dsn is None else _open_postgres(dsn, "export")
    )
    log = AuditLog(store, SystemClock())
    try:
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
        store.close()


def _prune(args: argparse.Namespace, config: Callable[[argparse.Namespace], Any]) -> None:
    from server.audit.checkpoint import (  # noqa: PLC0415 - only this command
        KEY_DIR,
        KEY_SLOT,
    )
    from server.audit.checkpointer import Checkpointer  # noqa: PLC0415
    from server.audit.log import AuditLog  # noqa: PLC0415
    from server.audit.retention import BATCH, DAY, Cut, Pruner, RetentionPolicy  # noqa: PLC0415
    from server.ca.keys import KeyStore  # noqa: PLC0415
    from server.config import build_config  # noqa: PLC0415
    from server.datastore.errors import StorageError  # noqa: PLC0415
    from server.datastore.postgres_dsn import is_postgres_dsn  # noqa: PLC0415
    from server.datastore.sqlite import SqliteDataStore  # noqa: PLC0415
    from svid._clock import SystemClock  # noqa: PLC0415

    # Not built for PostgreSQL (its checkpoint key is sealed in the datastore under the KEK):
    # said so, where it looked for a SQLite file in data_dir and said none was there.
    if is_postgres_dsn(str(config(args).get("datastore") or "")):
        raise CliError(
            "audit prune: the config's datastore is PostgreSQL, where the servers prune the "
            "log themselves (audit_retention_days, audit_max_events); a prune by hand is for "
            "a SQLite datastore"
        )
    data_dir = _data_dir(args, config)
    db = _datastore_file(data_dir, config(args))
    if (data_dir / LEGACY_AUDIT_FILE).is_file():
        raise CliError(f"{data_dir / LEGACY_AUDIT_FILE} is not imported yet: start the server once")
    if not db.is_file():
        raise CliError(f"no datastore at {db}")
    # Never make a key here: a prune record must be signed by the key already pinned.
    if not KeyStore(data_dir / KEY_DIR).exists(KEY_SLOT):
        raise CliError(f"no audit checkpoint key in {data_dir / KEY_DIR}: start the server once")
    if args.batch is not None and args.batch < 1:
        raise CliError("--batch: must be at least 1")
    if args.batch is not None and args.batch > MAX_INT64:  # SQLite raised OverflowError
        raise CliError(f"--batch: must be at most {MAX_INT64}")
    cut: Cut | None = None
    policy = RetentionPolicy(0, 0)
    if args.before is not None:
        cut = Cut(before=_time("--before", args.before))
    elif args.through_seq is not None:
        cut = Cut(through=args.through_seq)
    else:
        values = {"trust_domain": "unused.example", **config(args)}
        cfg = build_config({k: v for k, v in values.items() if k.startswith(("audit_", "trust"))})
        policy = RetentionPolicy(cfg.audit_retention_days * DAY, cfg.audit_max_events)
        if not policy.enabled:
            raise CliError("retention is off (audit_retention_days = 0, audit_max_events = 0)")
    clock = SystemClock()
    store = SqliteDataStore(db, clock)
    try:
        log = AuditLog(store, clock)
        checkpointer = Checkpointer.in_data_dir(
            log,
            data_dir,
            clock,
            interval=3600.0,
        )
        pruner = Pruner(
            store,
            log,
            checkpointer,
            clock,
            policy,
            batch=args.batch or BATCH,
        )
        report = pruner.prune(cut)
    except (AuditError, StorageError) as e:
        raise CliError(f"audit prune: {e}") from None
    finally:
        store.close()
    through = "nothing pruned yet" if report.base is None else f"seq {report.base.seq}"
    if getattr(args, "output", "text") == "json":
        base = report.base
        print(
            json.dumps(
                {
                    "removed": report.removed,
                    "pruned_through": None if base is None else base.seq,
                    "base_hash": None if base is None else base.hash,
                    "record": None
                    if report.record is None
                    else json.loads(report.record.to_line()),
                }
            )
        )
    else:
        print(f"audit prune: removed {report.removed} events; the log starts after {through}")


def _checkpoint(args: argparse.Namespace, channel: Callable[[argparse.Namespace], Any]) -> None:
    from svid._proto import admin_pb2, admin_pb2_grpc  # noqa: PLC0415

    with channel(args) as ch:
        try:
            reply = admin_pb2_grpc.AdminStub(ch).AuditCheckpoint(
                admin_pb2.AuditCheckpointRequest(), timeout=TIMEOUT
            )
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise CliError(f"{code}: {details}") from None
    if getattr(args, "output", "text") == "json":
        print(reply.line)
    else:
        print(
            f"audit checkpoint: seq {reply.seq} hash {reply.hash} ({reply.count} events), "
            f"key {reply.key_id[:16]}"
        )


def _time(flag: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parse_utc(text)
    except ValueError as exc:
        raise CliError(f"{flag}: {exc}") from None
