"""Telling a PostgreSQL DSN from a SQLite path, showing one without its password, and opening
the backend.

Free of psycopg: configuration and logging use it whether or not the `postgres` extra is
installed; `open_postgres` imports the backend only when a DSN is configured.
"""

from __future__ import annotations

import re
import urllib.parse

from server.datastore.base import DataStore
from server.errors import ConfigError
from svid._clock import Clock

SCHEMES = ("postgresql://", "postgres://")
_HIDDEN = "***"
# key=value DSNs (libpq's other form), as they may appear inside a driver's message.
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def is_postgres_dsn(text: str) -> bool:
    """True for a postgresql:// (or postgres://) URL; anything else names a SQLite file."""
    return text.lower().startswith(SCHEMES)


def _split_userinfo(dsn: str) -> tuple[str, str, str]:
    """(scheme, user part, the rest) of a URL DSN; the user part is "" when there is none.

    Not urlsplit's reading: libpq ends the user part at its '@' and takes '?' and '#' in a
    password as they are, where urlsplit ends it at the first '?', '#' or '/' and shows the
    password as host, query or path. The user part here runs to the last '@' before the first
    '/' after an '@': a password with an unescaped '/' (which libpq refuses) is hidden too."""
    scheme, _, rest = dsn.partition("://")
    first = rest.find("@")
    if first < 0:
        return scheme, "", rest
    slash = rest.find("/", first)
    at = rest.rfind("@", 0, len(rest) if slash < 0 else slash)
    return scheme, rest[:at], rest[at + 1 :]


def _url_password(dsn: str) -> str | None:
    _, userinfo, rest = _split_userinfo(dsn)
    _user, sep, password = userinfo.partition(":")
    if sep and password:
        return urllib.parse.unquote(password)
    try:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(f"x://{rest}").query)
    except ValueError:
        return None
    found = query.get("password")
    return found[0] if found else None


def redact_dsn(dsn: str) -> str:
    """`dsn` fit for a log line or an error: the password (in the URL's user part or as a
    `password=` parameter) replaced by ***."""
    if not is_postgres_dsn(dsn):  # libpq's key=value form
        return _KEYWORD_PASSWORD.sub(rf"\g<1>{_HIDDEN}", dsn)
    scheme, userinfo, rest = _split_userinfo(dsn)
    try:
        parts = urllib.parse.urlsplit(f"{scheme}://{rest}")
    except ValueError:
        return f"{scheme}://{_HIDDEN}"  # unreadable: show nothing of it
    netloc = parts.netloc
    if userinfo:
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}{':' + _HIDDEN if sep else ''}@{netloc}"
    query = "&".join(
        f"{k}={_HIDDEN}" if k.lower() == "password" else f"{k}={urllib.parse.quote(v, safe='')}"
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub(text: str, dsn: str) -> str:
    """`text` (a driver's message, say) with the DSN and its password taken out."""
    password = _url_password(dsn)
    text = text.replace(dsn, redact_dsn(dsn))
    if password:
        text = text.replace(password, _HIDDEN)
        quoted = urllib.parse.quote(password, safe="")
        if quoted != password:
            text = text.replace(quoted, _HIDDEN)
    return _KEYWORD_PASSWORD.sub(rf"\g<1>{_HIDDEN}", text)


def check_dsn(what: str, dsn: str) -> None:
    """ConfigError unless libpq can read `dsn`, naming it only as redact_dsn shows it: libpq's
    own complaint quotes the URL as spelled, secrets and all. Without psycopg (no `postgres`
    extra) nothing is checked here: open_postgres refuses such a DSN."""
    try:
        from psycopg import Error  # noqa: PLC0415 - see the module's docstring
        from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415
    except ImportError:
        return
    try:
        conninfo_to_dict(dsn)
    except Error:
        raise ConfigError(f"{what}: not a valid PostgreSQL URL: {redact_dsn(dsn)}") from None


def open_postgres(dsn: str, clock: Clock, *, migrate: bool = True) -> DataStore:
    """The PostgreSQL datastore at `dsn`: the one place that loads the backend (and psycopg),
    so everything else imports without the `postgres` extra. `migrate=False`: read-only, this
    release's schema only (PostgresDataStore)."""
    try:
        from server.datastore.postgres import PostgresDataStore  # noqa: PLC0415 - see above
    except ImportError as e:
        raise ConfigError(
            "datastore: a postgresql:// datastore needs the 'postgres' extra "
            f"(pip install 'svidd[postgres]'); cannot import {e.name or e}"
        ) from None
    return PostgresDataStore(dsn, clock, migrate=migrate)
