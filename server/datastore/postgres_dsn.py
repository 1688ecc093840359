"""Telling a PostgreSQL DSN from a SQLite path, showing one without its password, and opening
the backend.

Free of psycopg: configuration and logging use it whether or not the `postgres` extra is
installed; `open_postgres` imports the backend only when a DSN is configured.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Iterable

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
    if 0 <= rest.find("/") < first and any(
        key.lower() in _SECRET_KEYS for key, _ in _split_query(rest)[1]
    ):
        # libpq's reading: no user part before a '/', the '@' is in a secret in the query.
        return scheme, "", rest
    slash = rest.find("/", first)
    at = rest.rfind("@", 0, len(rest) if slash < 0 else slash)
    return scheme, rest[:at], rest[at + 1 :]


# libpq's parameters that are secrets: the password, and the passphrase of the client's key.
_SECRET_KEYS = ("password", "sslpassword")


def _split_query(rest: str) -> tuple[str, list[tuple[str, str]]]:
    """(what precedes the '?', the query's (key, value as spelled) pairs) of a URL DSN's part
    after its user part. As libpq reads it: the query runs to the end, '#' included (libpq's
    URLs have no fragment), its pairs split at '&' and each at its first '='."""
    before, _, query = rest.partition("?")
    pairs = [pair.partition("=") for pair in query.split("&") if pair] if query else []
    return before, [(k, v) for k, _, v in pairs]


def _unquote(spelled: str) -> str:
    try:
        return urllib.parse.unquote(spelled, errors="strict")
    except UnicodeDecodeError:
        return spelled


def _url_secrets(dsn: str) -> list[str]:
    """Every spelling of the URL's secrets a message may quote: each as the URL spells it (libpq
    quotes it so when it cannot decode it), decoded, and fully percent-encoded; longest first,
    so a longer spelling is replaced before a part of it."""
    _, userinfo, rest = _split_userinfo(dsn)
    _user, sep, password = userinfo.partition(":")
    spelled = [password] if sep and password else []
    spelled += [v for k, v in _split_query(rest)[1] if k.lower() in _SECRET_KEYS and v]
    found: set[str] = set()
    for raw in spelled:
        decoded = _unquote(raw)
        found |= {raw, decoded, urllib.parse.quote(decoded, safe="")}
    return sorted((s for s in found if s), key=len, reverse=True)


def redact_dsn(dsn: str) -> str:
    """`dsn` fit for a log line or an error: its secrets (the password in the URL's user part,
    `password=` and `sslpassword=` parameters) replaced by ***."""
    if not is_postgres_dsn(dsn):  # libpq's key=value form
        return _KEYWORD_PASSWORD.sub(rf"\g<1>{_HIDDEN}", dsn)
    scheme, userinfo, rest = _split_userinfo(dsn)
    before, pairs = _split_query(rest)
    try:
        parts = urllib.parse.urlsplit(f"{scheme}://{before}")
    except ValueError:
        return f"{scheme}://{_HIDDEN}"  # unreadable: show nothing of it
    netloc = parts.netloc
    if userinfo:
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}{':' + _HIDDEN if sep else ''}@{netloc}"
    query = "&".join(
        f"{k}={_HIDDEN}" if k.lower() in _SECRET_KEYS else f"{k}={v}" for k, v in pairs
    )
    # Path and a '#' in it as given: before the '?', libpq's dbname may hold one.
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub(text: str, dsn: str) -> str:
    """`text` (a driver's message, say) with the DSN and its secrets taken out."""
    text = text.replace(dsn, redact_dsn(dsn))
    for secret in _url_secrets(dsn):
        text = text.replace(secret, _HIDDEN)
    return _KEYWORD_PASSWORD.sub(rf"\g<1>{_HIDDEN}", text)


def hide_given(text: str, given: Iterable[str]) -> str:
    """`text` (a usage error quoting the command line) with the secrets of each PostgreSQL URL
    in `given` (the arguments, a `--datastore=URL` one included) taken out, as each was given
    and as repr() quotes it; then what `scrub` finds of a URL or `password=` in the text itself.
    By the arguments, not by a pattern: a password holding a quote or a space ended a pattern's
    match early, and the rest of it was shown."""
    for arg in given:
        start = arg.lower().find("postgres")
        while start >= 0:
            if is_postgres_dsn(arg[start:]):
                dsn = arg[start:]
                text = scrub(scrub(text, dsn), repr(dsn)[1:-1])
                break
            start = arg.lower().find("postgres", start + 1)
    return _hide_urls(text)


# A URL DSN in free text, to the first space or quote (when its argument is not known).
_URL_IN_TEXT = re.compile(r"postgres(?:ql)?://[^\s'\"]+", re.IGNORECASE)


def _hide_urls(text: str) -> str:
    hidden = _URL_IN_TEXT.sub(lambda url: redact_dsn(url.group(0)), text)
    return _KEYWORD_PASSWORD.sub(rf"\g<1>{_HIDDEN}", hidden)  # libpq's key=value form


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


def open_postgres(
    dsn: str,
    clock: Clock,
    *,
    migrate: bool = True,
    on_new_schema: Callable[[], None] | None = None,
) -> DataStore:
    """The PostgreSQL datastore at `dsn`: the one place that loads the backend (and psycopg),
    so everything else imports without the `postgres` extra. `migrate=False`: read-only, this
    release's schema only; `on_new_schema`: asked before a schema recording no migration is
    made (PostgresDataStore)."""
    try:
        from server.datastore.postgres import PostgresDataStore  # noqa: PLC0415 - see above
    except ImportError as e:
        raise ConfigError(
            "datastore: a postgresql:// datastore needs the 'postgres' extra "
            f"(pip install 'svidd[postgres]'); cannot import {e.name or e}"
        ) from None
    return PostgresDataStore(dsn, clock, migrate=migrate, on_new_schema=on_new_schema)
