"""`svid-server ca forget-lost-keys`: the way out of a start refused for lost CA keys.

A server refuses to start when the datastore journals a live key slot whose private key is
neither sealed in the datastore nor a file in its data_dir (server/ca/manager.py): a wrong
data_dir must not cost the trust domain its CA. When the keys are truly gone, this command
(run as the server's user, with the server's config, every server on the datastore stopped)
names those slots, and with --yes drops them from the journal and records that on the audit
log, so that the next start makes new keys as a first start does. A retired slot whose key is
lost is named and dropped too: the server starts with it, and publishes it until it expires
(it verifies the SVIDs it signed), but an operator starting afresh would not keep the one CA
of the lost ones whose SVIDs still verify, nor does a key file gone unaccounted for leave it
trustworthy. It opens the config, the
datastore and the data_dir itself, as `audit prune` does: no admin socket, no server needed.

Shared keys are sealed in the datastore under a key-encryption key (KEK): when that KEK is lost,
every key sealed under it is. With --lost-kek (the config naming a new KEK, from
`svid-server keys new-kek`), the slots sealed under any other KEK are the lost ones, retired
ones too: no server could open them, and a start refuses on any of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from server.errors import CliError
from server.input_text import shown

if TYPE_CHECKING:
    from server.ca.manager import CaManager, LostKey
    from server.config import ServerConfig
    from server.datastore.base import DataStore
    from svid._clock import Clock

COMMANDS = frozenset({("ca", "forget-lost-keys")})

_FORGET_HELP = (
    "list the CA and JWT key slots whose private key is lost (the server refuses to start on "
    "them); with --yes, drop them so the next start makes new keys. Every server on the "
    "datastore must be stopped (with PostgreSQL: all of them): a running one would rotate to "
    "keys of its own"
)
_CONSEQUENCES = (
    "A new X.509 CA is a new root unless upstream_ca_cert signs it: every agent (and every "
    "workload) that trusts only the lost CA must be given the new bundle: each agent "
    "re-bootstrapped with --trust-bundle holding `svid-server bundle show --format pem` of the "
    "restarted server (and a new join token). SVIDs of the "
    "lost CA and JWT-SVIDs of a lost JWT key no longer verify once their keys leave the bundle "
    "(those of a retired one too: the bundle the restarted servers send their agents drops it)."
)
_LOST_KEK_HELP = (
    "the key-encryption key the datastore's keys were sealed with is lost for good: the lost "
    "slots are those sealed under any other key than key_encryption_key_file's (make that a "
    "new one first: `svid-server keys new-kek --out FILE`)"
)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `ca` to svid-server's subparsers (`common` carries the global flags)."""
    ca = sub.add_parser("ca", help="the trust domain's CA and JWT keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    forget = ca.add_parser(
        "forget-lost-keys", parents=[common], help=_FORGET_HELP, description=_FORGET_HELP
    )
    forget.add_argument(
        "--yes",
        action="store_true",
        help="drop the lost slots (default: only say what would be dropped, change nothing)",
    )
    forget.add_argument("--lost-kek", action="store_true", help=_LOST_KEK_HELP)


def run_command(
    args: argparse.Namespace, config: Callable[[argparse.Namespace], ServerConfig]
) -> None:
    """Run `ca forget-lost-keys`; `config` reads --config as `run` does."""
    from svid._clock import SystemClock  # noqa: PLC0415 - admin commands stay light

    if getattr(args, "config", None) is None:
        raise CliError(
            "ca forget-lost-keys: --config is required (the server's TOML file: its data_dir "
            "and datastore)"
        )
    cfg = config(args)
    lost_kek = bool(getattr(args, "lost_kek", False))
    if lost_kek and cfg.key_encryption_key_file is None:
        # Without a KEK the next start would refuse on nothing, but then keep the keys as
        # one server's files: a new KEK keeps the trust domain's keys shared and sealed.
        raise CliError(
            "ca forget-lost-keys --lost-kek: key_encryption_key_file is required: make a new "
            "key-encryption key (`svid-server keys new-kek --out FILE`), name it in the "
            "config, copy it to every server, then run this again"
        )
    clock = SystemClock()
    datastore = _open_datastore(cfg, clock, migrate=bool(args.yes))
    try:
        ca = _manager(cfg, datastore, clock)
        lost = _lost_or_refuse(ca, cfg, lost_kek=lost_kek)
        if not args.yes:
            _emit(args, _plan_text(lost), _as_json(lost, forgotten=False))
            return
        with _servers_stopped(datastore, clock):
            lost = _lost_or_refuse(
                ca, cfg, lost_kek=lost_kek
            )  # as it stands now no server can change it
            _record(datastore, clock, lost)
            ca.forget_lost_keys(lost)
        _emit(args, _done_text(lost), _as_json(lost, forgotten=True))
    finally:
        datastore.close()


def _open_datastore(cfg: ServerConfig, clock: Clock, *, migrate: bool) -> DataStore:
    """The config's datastore. Migrated only for --yes, which writes to it: the dry run,
    often run with the new release before its upgrade, would otherwise move the schema under
    the previous release's servers (a restarted one refuses it)."""
    from server.datastore.errors import StorageError  # noqa: PLC0415
    from server.datastore.postgres_dsn import open_postgres, redact_dsn  # noqa: PLC0415
    from server.datastore.sqlite import SqliteDataStore  # noqa: PLC0415

    try:
        if cfg.datastore_dsn is not None:
            dsn = cfg.datastore_dsn

            def nothing_to_forget() -> None:  # never make the schema: a start then passes
                raise CliError(f"no datastore in {redact_dsn(dsn)}: check --config")

            return open_postgres(dsn, clock, migrate=migrate, on_new_schema=nothing_to_forget)
        if not cfg.datastore_path.is_file():  # never make an empty one: nothing to forget
            raise CliError(f"no datastore at {cfg.datastore_path}: check --config")
        return SqliteDataStore(cfg.datastore_path, clock, migrate=migrate)
    except StorageError as e:
        raise CliError(f"ca forget-lost-keys: {e}") from None


def _manager(cfg: ServerConfig, datastore: DataStore, clock: Clock) -> CaManager:
    from server.app import ca_config  # noqa: PLC0415
    from server.ca.keys import KeyStore  # noqa: PLC0415
    from server.ca.manager import CaManager  # noqa: PLC0415
    from server.ca.sealing import KeyEncryptionKey  # noqa: PLC0415

    kek_file = cfg.key_encryption_key_file
    kek = KeyEncryptionKey.load(kek_file) if kek_file is not None else None
    # Reading only: a data_dir the server never made stays unmade.
    keystore = KeyStore(cfg.keys_dir, create=False)
    return CaManager(ca_config(cfg), datastore, keystore, clock, kek=kek)


def _lost_or_refuse(ca: CaManager, cfg: ServerConfig, *, lost_kek: bool) -> tuple[LostKey, ...]:
    elsewhere = ca.lost_kek_keys()
    if elsewhere and not lost_kek:
        # Never taken as lost unasked: a wrong KEK file looks just the same.
        ids = sorted({item.sealed_under or "" for item in elsewhere})
        raise CliError(
            f"key slots {', '.join(item.slot.slot_id for item in elsewhere)} are sealed under "
            f"another key-encryption key (key id {', '.join(ids)}) than "
            f"{cfg.key_encryption_key_file}: if the trust domain's key-encryption key is there, "
            "name it in the config; if it is lost for good, run this again with --lost-kek; "
            "nothing forgotten"
        )
    lost = (*ca.lost_keys(), *elsewhere)
    if not lost:
        raise CliError(
            "no key slot is lost: the datastore's every key slot has its key (sealed in "
            f"the datastore, or a file in {cfg.keys_dir}); nothing to forget"
        )
    return lost


# How long the guard below holds the housekeeping lease at most, should this command die.
GUARD_TTL = 60


@contextlib.contextmanager
def _servers_stopped(datastore: DataStore, clock: Clock) -> Iterator[None]:
    """Hold the housekeeping lease while forgetting: every running server on the datastore
    renews it (one of them holds it), so taking it tells no server runs, and keeps one that
    starts meanwhile from taking it."""
    from server.ca.manager import default_holder  # noqa: PLC0415
    from server.housekeeping import DEFAULT_LEASE_TTL, HOUSEKEEPING_LEASE  # noqa: PLC0415

    holder = f"ca-forget-lost-keys:{default_holder()}"
    if not datastore.acquire_lease(HOUSEKEEPING_LEASE, holder, int(clock.now()), GUARD_TTL):
        raise CliError(
            "a server is running on this datastore (it holds the housekeeping lease): stop "
            "every server first (one that died without a clean stop holds it up to "
            f"{DEFAULT_LEASE_TTL} s longer); nothing forgotten"
        )
    try:
        yield
    finally:
        datastore.release_lease(HOUSEKEEPING_LEASE, holder)


def _record(datastore: DataStore, clock: Clock, lost: Sequence[LostKey]) -> None:
    """The audit event first: if it cannot be written, nothing is forgotten."""
    from server.audit import AuditLog, EventKind  # noqa: PLC0415

    log = AuditLog(datastore, clock)
    log.append(
        EventKind.CA_KEYS_FORGOTTEN,
        action="forget_lost_keys",
        decision="forgotten",
        reason="private keys lost: slots dropped by an operator; the next start makes new keys",
        extra={"slots": [_slot_json(item) for item in lost]},
    )


def _slot_json(item: LostKey) -> dict[str, Any]:
    slot = item.slot
    where = (
        {"sealed_under": item.sealed_under} if item.sealed_under else {"key_file": str(item.path)}
    )
    return {"slot_id": slot.slot_id, "kind": slot.kind, "status": slot.status, **where}


def _slot_lines(lost: Sequence[LostKey]) -> list[str]:
    return [
        shown(
            f"  {i.slot.kind:<4} {i.slot.status:<8} slot {i.slot.slot_id}  "
            + (f"sealed under key id {i.sealed_under}" if i.sealed_under else f"key file {i.path}")
        )
        for i in lost
    ]


def _plan_text(lost: Sequence[LostKey]) -> str:
    return "\n".join(
        [
            "Key slots whose private key is lost (neither in data_dir nor sealed in the "
            "datastore, or sealed under a lost key-encryption key); the server refuses to "
            "start on an active or prepared one, and keeps a retired one in the bundle "
            "(verifying the SVIDs it signed) until it expires:",
            *_slot_lines(lost),
            "",
            "Nothing changed. With --yes (every server on the datastore stopped), these slots "
            "are dropped from the datastore and the next start makes new keys, as a first "
            "start does.",
            _CONSEQUENCES,
        ]
    )


def _done_text(lost: Sequence[LostKey]) -> str:
    return "\n".join(
        [
            "Forgot the key slots whose private key was lost (recorded on the audit log):",
            *_slot_lines(lost),
            "",
            "The next start makes new keys. " + _CONSEQUENCES,
        ]
    )


def _as_json(lost: Sequence[LostKey], *, forgotten: bool) -> str:
    return json.dumps({"forgotten": forgotten, "slots": [_slot_json(i) for i in lost]})


def _emit(args: argparse.Namespace, text: str, json_text: str) -> None:
    print(json_text if getattr(args, "output", "text") == "json" else text)
