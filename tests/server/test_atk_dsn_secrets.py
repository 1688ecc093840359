"""A PostgreSQL URL's secrets in what a real svid-server process prints when it cannot open the
datastore: its password, and the client key's passphrase (libpq's sslpassword), never."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.ca.sealing import KeyEncryptionKey
from server.datastore.postgres_dsn import redact_dsn, scrub
from tests.e2e.conftest import server_command, short_tmpdir

pytest.importorskip("psycopg")

PASSWORD = "hunter2-not-shown"
PASSPHRASE = "key-passphrase-not-shown"


@pytest.fixture
def root() -> Iterator[Path]:
    where = short_tmpdir("svds")
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def run_server(root: Path, dsn: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """`svid-server run` on `dsn` at debug level; it must stop at start, the datastore unopened."""
    kek = root / "kek"
    KeyEncryptionKey.generate().write_new(kek)
    (root / "priv").mkdir(mode=0o700)
    values = {
        "trust_domain": "example.org",
        "data_dir": str(root / "data"),
        "bind_address": "127.0.0.1:0",
        "attest_bind_address": "127.0.0.1:0",
        "admin_socket": str(root / "priv" / "admin.sock"),
        "log_level": "debug",
        "datastore": dsn,
        "key_encryption_key_file": str(kek),
    }
    config = root / "server.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return subprocess.run(
        [*server_command(), "run", "--config", str(config), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def test_a_password_with_a_bad_percent_escape_is_not_printed(root: Path) -> None:
    # libpq refuses "%zz" in the URL's password, quoting the password in its message; the
    # server parses the URL for its connection options before the scrubbed open.
    done = run_server(root, f"postgresql://postgres:{PASSWORD}%zz@127.0.0.1:1/test")
    said = done.stdout + done.stderr
    assert done.returncode != 0
    assert PASSWORD not in said, said[-600:]
    assert "Traceback" not in said, said[-600:]


def test_a_password_given_on_the_command_line_is_warned_of_not_printed(root: Path) -> None:
    """--datastore's URL is in /proc/<pid>/cmdline for every local user while the server runs:
    a password there is said at start (the URL redacted), one in the config file is not."""
    dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/test"
    warning = "--datastore: the URL's password is readable by every local user"
    done = run_server(root, "postgresql://127.0.0.1:1/test", "--datastore", dsn)
    said = done.stdout + done.stderr
    assert done.returncode != 0  # nothing listens there
    assert warning in said, said[-600:]
    assert "postgresql://postgres:***@127.0.0.1:1/test" in said, said[-600:]
    assert PASSWORD not in said, said[-600:]
    from_file = root / "from-file"
    from_file.mkdir()
    done = run_server(from_file, dsn)
    assert done.returncode != 0
    assert warning not in done.stdout + done.stderr

    # libpq's sslpassword decrypts the client's TLS key: as much a secret as the password.
    dsn = f"postgresql://postgres@127.0.0.1/test?sslpassword={PASSPHRASE}&sslmode=require"
    assert PASSPHRASE not in redact_dsn(dsn)


def _refused_for_sslmode_without(root: Path, dsn: str, secret: str) -> None:
    """The server started on `dsn` (its sslmode bogus) stops, refusing the datastore, and says
    nothing of `secret`."""
    done = run_server(root, dsn)
    said = done.stdout + done.stderr
    assert done.returncode != 0
    assert "sslmode" in said, said[-600:]  # refused for the datastore, not something else
    assert secret not in said, said[-600:]


def test_the_client_key_passphrase_is_not_printed_when_the_datastore_is_refused(
    root: Path,
) -> None:
    _refused_for_sslmode_without(
        root,
        f"postgresql://postgres@127.0.0.1:1/test?sslpassword={PASSPHRASE}&sslmode=bogus",
        PASSPHRASE,
    )


def test_audit_verify_does_not_print_a_malformed_urls_password() -> None:
    # `audit verify --datastore` takes the URL as given (no config check): libpq's complaint
    # about the unclosed IPv6 bracket quotes the whole URL, password and all.
    done = subprocess.run(
        [
            *server_command(),
            "audit",
            "verify",
            "--datastore",
            f"postgresql://postgres:{PASSWORD}@[::1/test",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    said = done.stdout + done.stderr
    assert done.returncode != 0
    assert PASSWORD not in said, said[-600:]


def test_scrub_hides_a_password_spelled_partly_percent_encoded() -> None:
    # libpq quotes the password as the URL spells it; scrub replaces only its decoded form and
    # quote()'s full encoding, so "...show%6E" (an "n" encoded) is left whole in the message.
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    dsn = "postgresql://postgres:hunter2-not-show%6E%zz@127.0.0.1:1/test"
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        said = str(exc)
    else:
        raise AssertionError("libpq took a URL with %zz in it")
    assert "hunter2-not-show" in said  # libpq does quote it: what scrub is for
    assert "hunter2-not-show" not in scrub(said, dsn)


def test_a_query_password_holding_a_hash_is_hidden_whole() -> None:
    # libpq reads "?password=abc#rest" as the password "abc#rest" (no fragment in its URLs);
    # urlsplit ends the query at the '#', so redact_dsn hides "abc" and shows the rest.
    dsn = f"postgresql://postgres@127.0.0.1/test?password=abc#{PASSWORD}"
    assert PASSWORD not in redact_dsn(dsn)


def test_a_query_password_holding_a_hash_is_not_printed_when_the_datastore_is_refused(
    root: Path,
) -> None:
    _refused_for_sslmode_without(
        root,
        f"postgresql://postgres@127.0.0.1:1/test?sslmode=bogus&password=abc#{PASSWORD}",
        PASSWORD,
    )
