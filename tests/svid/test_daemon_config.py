"""svid/_daemon_config: the checks the server's and the agent's configurations share, each one
raising the error type it is given with a message naming the key (or the file)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from svid._daemon_config import (
    FileWords,
    as_choice,
    as_finite,
    as_whole,
    check_address,
    expand_path,
    listening,
    read_table,
    refuse_unknown,
)


class RefusedError(Exception):
    """A daemon's own ConfigError, as far as these checks know it."""


WORDS = FileWords(
    missing="missing {path}: {reason}",
    unreadable="unreadable {path}: {reason}",
    not_utf8="not-utf8 {path} at {reason}",
    not_toml="not-toml {path}: {reason}",
)


def _read(path: Path) -> dict[str, object]:
    return read_table(path, "daemon", RefusedError, WORDS)


# -- the file --------------------------------------------------------------------------------


def test_a_bare_file_is_the_daemons_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('data_dir = "/x"\nrate = 2.5\n')
    assert _read(path) == {"data_dir": "/x", "rate": 2.5}


def test_the_daemons_table_is_read_and_other_daemons_tables_are_left_alone(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[other]\nkey = 1\n[daemon]\ndata_dir = "/x"\n')
    assert _read(path) == {"data_dir": "/x"}


def test_a_file_of_other_daemons_tables_only_is_refused_naming_them(tmp_path: Path) -> None:
    # The agent's file given to the server was refused "agent: unknown configuration key".
    path = tmp_path / "c.toml"
    path.write_text("[agent]\nkey = 1\n[other]\nkey = 2\n")
    with pytest.raises(
        RefusedError, match=re.escape(f"{path}: has no [daemon] table (it holds [agent], [other])")
    ):
        _read(path)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert _read(empty) == {}


def test_a_key_beside_the_daemons_table_is_refused_naming_it_and_the_file(tmp_path: Path) -> None:
    # Read by no daemon: it ran on that key's default without a word.
    path = tmp_path / "c.toml"
    path.write_text('zeta = 1\nalpha = 2\n[daemon]\ndata_dir = "/x"\n')
    with pytest.raises(RefusedError) as refused:
        _read(path)
    assert str(refused.value) == (
        f"alpha: outside the [daemon] table of {path}, where it is not read: move it below the "
        "[daemon] header"
    )


def test_a_table_name_given_as_a_plain_value_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('daemon = "x"\n')
    with pytest.raises(RefusedError, match=r"^daemon: expected a table$"):
        _read(path)


def test_a_missing_file_is_worded_as_the_daemon_words_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(RefusedError) as refused:
        _read(path)
    assert str(refused.value) == f"missing {path}: No such file or directory"


def test_a_directory_is_an_unreadable_file_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(RefusedError) as refused:
        _read(tmp_path)
    assert str(refused.value) == f"unreadable {tmp_path}: Is a directory"


def test_a_path_through_a_file_is_unreadable_not_a_traceback(tmp_path: Path) -> None:
    # Another OSError than the two above (permission bits would not stop root, who runs CI).
    (tmp_path / "plain").write_text("x = 1\n")
    path = tmp_path / "plain" / "c.toml"
    with pytest.raises(RefusedError) as refused:
        _read(path)
    assert str(refused.value) == f"unreadable {path}: Not a directory"


def test_a_file_that_is_not_utf8_is_refused_at_its_first_bad_byte_whatever_the_locale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Latin-1 reads any byte: a file decoded by the locale was taken with the wrong text in it.
    monkeypatch.setenv("LC_ALL", "C")
    path = tmp_path / "c.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(RefusedError) as refused:
        _read(path)
    assert str(refused.value) == f"not-utf8 {path} at 11"


def test_a_utf8_byte_order_mark_is_read_past(tmp_path: Path) -> None:
    # Refused as "Invalid statement (at line 1, column 1)": nothing an editor shows.
    path = tmp_path / "c.toml"
    path.write_bytes(b'\xef\xbb\xbfname = "x"\n')
    assert _read(path) == {"name": "x"}


def test_a_file_that_is_not_toml_is_refused_saying_where(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("x = 1\ny = ?\n")
    with pytest.raises(RefusedError, match=f"^not-toml {path}: .*line 2"):
        _read(path)


def test_an_unknown_key_is_refused_by_name_the_first_in_order() -> None:
    refuse_unknown({"a": 1, "b": 2}, ("a", "b", "c"), RefusedError)
    with pytest.raises(RefusedError, match=r"^bogus: unknown configuration key$"):
        refuse_unknown({"zz": 1, "bogus": 2, "a": 3}, ("a",), RefusedError)


# -- paths -----------------------------------------------------------------------------------


def test_a_leading_tilde_is_the_home_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    assert expand_path("data_dir", "~/svid", RefusedError) == Path("/home/someone/svid")
    assert expand_path("data_dir", Path("~"), RefusedError) == Path("/home/someone")
    assert expand_path("data_dir", "relative/~x", RefusedError) == Path("relative/~x")


def test_a_tilde_user_with_no_home_is_refused_naming_the_key() -> None:
    # Path.expanduser raises RuntimeError: a traceback from `run`.
    with pytest.raises(RefusedError) as refused:
        expand_path("data_dir", "~no-such-user-svidd/x", RefusedError)
    assert (
        str(refused.value) == "data_dir: cannot expand '~no-such-user-svidd/x': no such user's home"
    )


def test_a_path_holding_nul_is_refused_naming_the_key() -> None:
    # No system call takes one: os.mkdir and open raised ValueError, a traceback from `run`.
    with pytest.raises(RefusedError) as refused:
        expand_path("data_dir", "/var/a\x00b", RefusedError)
    assert str(refused.value) == "data_dir: may not contain NUL (0x00)"


# -- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "number"), [(2, 2.0), (2.5, 2.5), ("0.25", 0.25), (-1, -1.0)])
def test_a_finite_number_is_read_from_toml_or_flag_text(value: object, number: float) -> None:
    assert as_finite("rate", value, RefusedError) == number


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf"), "nan", "inf", "-Infinity"]
)
def test_nan_and_infinity_are_refused_from_toml_and_from_flags(value: object) -> None:
    # A NaN compares false with everything (no wait, no limit); an infinite timeout never ends.
    with pytest.raises(RefusedError, match=r"^rate: expected a finite number, got "):
        as_finite("rate", value, RefusedError)


@pytest.mark.parametrize("value", [True, False, "fast", "", [1], None])
def test_what_is_no_number_is_refused_naming_the_key(value: object) -> None:
    with pytest.raises(
        RefusedError, match=f"^rate: expected a number, got {re.escape(repr(value))}$"
    ):
        as_finite("rate", value, RefusedError)


@pytest.mark.parametrize(("value", "number"), [(3, 3), (3.0, 3), ("7", 7), (-2, -2), (0, 0)])
def test_a_whole_number_is_read_from_toml_or_flag_text(value: object, number: int) -> None:
    read = as_whole("size", value, RefusedError)
    assert read == number
    assert type(read) is int


@pytest.mark.parametrize("value", [0.5, 1.7, "1.5", "many", "", True])
def test_a_fraction_or_no_number_is_refused_where_a_whole_one_is_wanted(value: object) -> None:
    # int() cut 0.5 to 0 without a word (0.5 connections: no limit at all).
    with pytest.raises(RefusedError, match=r"^size: expected a (whole )?number, got "):
        as_whole("size", value, RefusedError)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_infinity_and_nan_are_refused_where_a_whole_number_is_wanted(value: float) -> None:
    # int(inf) raised OverflowError: a traceback, not a line naming the key.
    with pytest.raises(RefusedError, match=r"^size: expected a finite number, got "):
        as_whole("size", value, RefusedError)


# -- choices ---------------------------------------------------------------------------------


def test_a_choice_is_taken_in_any_case_and_given_back_in_lower_case() -> None:
    assert as_choice("log_level", "WARNING", ("info", "warning"), RefusedError) == "warning"
    assert as_choice("log_level", "info", ("info", "warning"), RefusedError) == "info"


@pytest.mark.parametrize("value", ["loud", "", " info"])
def test_what_is_no_choice_is_refused_naming_the_key_and_the_choices(value: str) -> None:
    with pytest.raises(RefusedError) as refused:
        as_choice("log_level", value, ("info", "warning"), RefusedError)
    assert str(refused.value) == f"log_level: must be one of info, warning, got {value!r}"


def test_a_choice_that_is_no_string_is_refused() -> None:
    with pytest.raises(RefusedError, match=r"^log_level: expected a string, got 3$"):
        as_choice("log_level", 3, ("info",), RefusedError)


# -- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["127.0.0.1:8081", "svid.example.org:1", "[::1]:65535"])
def test_host_port_addresses_are_taken(value: str) -> None:
    check_address("server_address", value, RefusedError, listen=False)
    check_address("bind_address", value, RefusedError, listen=True)


def test_port_0_is_taken_only_for_an_address_the_daemon_listens_on() -> None:
    check_address("bind_address", "127.0.0.1:0", RefusedError, listen=True)
    with pytest.raises(
        RefusedError, match=r"^server_address: expected host:port, got '127.0.0.1:0'$"
    ):
        check_address("server_address", "127.0.0.1:0", RefusedError, listen=False)


@pytest.mark.parametrize("value", ["nohost", ":8081", "h:", "h:65536", "h:-1", "h:x", "h:\u00b2"])
def test_what_is_no_host_port_is_refused_naming_the_key(value: str) -> None:
    # "²" passes str.isdigit and int() raised: a bare ValueError.
    with pytest.raises(RefusedError, match=r"^bind_address: expected host:port \(port 0 picks"):
        check_address("bind_address", value, RefusedError, listen=True)
    with pytest.raises(RefusedError, match=r"^server_address: expected host:port, got "):
        check_address("server_address", value, RefusedError, listen=False)


# -- listening -------------------------------------------------------------------------------


def test_an_address_in_use_is_refused_naming_the_key_and_why() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    address = f"127.0.0.1:{busy.getsockname()[1]}"
    second = socket.socket()
    try:
        with (
            pytest.raises(RefusedError) as refused,
            listening("metrics_address", address, RefusedError),
        ):
            second.bind(("127.0.0.1", busy.getsockname()[1]))
    finally:
        second.close()
        busy.close()
    assert (
        str(refused.value)
        == f"metrics_address: cannot listen on {address} (Address already in use)"
    )
    assert refused.value.__suppress_context__  # one line, not the OSError's traceback too


def test_an_error_without_strerror_is_shown_whole() -> None:
    refused = pytest.raises(RefusedError, match=r"^k: cannot listen on h:1 \(no way\)$")
    with refused, listening("k", "h:1", RefusedError):
        raise OSError("no way")


def test_a_listener_that_starts_is_left_alone_and_other_errors_pass() -> None:
    with listening("k", "h:1", RefusedError):
        pass
    with pytest.raises(ValueError, match="not mine"), listening("k", "h:1", RefusedError):
        raise ValueError("not mine")
