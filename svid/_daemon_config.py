"""What the server's and the node agent's configurations check alike: their TOML file, the
paths, numbers and host:port addresses in it or in their flags, and an address they are given
but cannot listen on.

Each daemon keeps its own keys, its own table in the file, and its own ConfigError (the server's
is a ServerError, mapped to a gRPC status; the agent's an AgentError, on which its command line
exits 2): every check here raises the `error` type it is given, with a message naming the key.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svid._bounded_read import read_bounded

ErrorType = Callable[[str], Exception]

MAX_PORT = 65535


@dataclass(frozen=True)
class FileWords:
    """How a daemon says that its config file could not be read, each a str.format template of
    {path} and {reason}. (The two daemons have always worded these apart, and their tests and
    operators' scripts read the words.)"""

    missing: str  # {reason}: the OS's strerror, as for the next
    unreadable: str  # {reason}: the OS's strerror
    not_utf8: str  # {reason}: the offset of the first bad byte
    not_toml: str  # {reason}: where tomllib stopped, and why


# Past any daemon's config (its longest lists: a few thousand relationships or issuers).
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_table(path: Path, table: str, error: ErrorType, words: FileWords) -> dict[str, Any]:
    """The daemon's values in the TOML file at `path`: its [`table`] table, or the top level of a
    file without one.

    Beside the table, other tables may be other daemons' ([server] and [agent] in one file); a
    plain key above them is read by no daemon, and is refused naming it (else the daemon ran on
    that key's default without a word).
    """
    try:
        body = read_bounded(path, MAX_CONFIG_BYTES)
        if body is None:
            reason = f"more than {MAX_CONFIG_BYTES} bytes: not a config file"
            raise error(words.unreadable.format(path=path, reason=reason))
        # TOML is UTF-8, whatever the locale. A leading byte order mark (Windows editors write
        # one) is dropped: tomllib refused it as "Invalid statement (at line 1, column 1)", in a
        # file that looks right in every editor.
        data = tomllib.loads(body.decode("utf-8").removeprefix("\ufeff"))
    except OSError as exc:  # absent, a directory, a file this user may not read
        said = words.missing if isinstance(exc, FileNotFoundError) else words.unreadable
        raise error(said.format(path=path, reason=exc.strerror or exc)) from None
    except UnicodeDecodeError as exc:
        raise error(words.not_utf8.format(path=path, reason=exc.start)) from None
    except tomllib.TOMLDecodeError as exc:
        raise error(words.not_toml.format(path=path, reason=exc)) from None
    if table not in data:
        others = sorted(key for key, value in data.items() if isinstance(value, dict))
        if others and len(others) == len(data):
            # Another daemon's file (no daemon has a key that is a table): refused as its
            # first table, "agent: unknown configuration key", naming no file or table.
            listed = ", ".join(f"[{name}]" for name in others)
            raise error(f"{path}: has no [{table}] table (it holds {listed})")
        return data
    own = data[table]
    if not isinstance(own, dict):
        raise error(f"{table}: expected a table")
    stray = sorted(key for key, value in data.items() if not isinstance(value, dict))
    if stray:
        raise error(
            f"{stray[0]}: outside the [{table}] table of {path}, where it is not read: move it "
            f"below the [{table}] header"
        )
    return dict(own)


def refuse_unknown(values: Mapping[str, Any], keys: Collection[str], error: ErrorType) -> None:
    """A key the daemon does not have is refused by name (a typo ran on the default)."""
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise error(f"{unknown[0]}: unknown configuration key")


def expand_path(key: str, value: str | Path, error: ErrorType) -> Path:
    """`value` with a leading ~ or ~user expanded; a user with no home is refused naming `key`
    (Path.expanduser raises RuntimeError: a traceback), and so is a NUL, which a TOML escape
    can write and no system call takes (each raised ValueError: a traceback)."""
    if "\x00" in str(value):
        raise error(f"{key}: may not contain NUL (0x00)")
    try:
        return Path(value).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        raise error(f"{key}: cannot expand {str(value)!r}: no such user's home") from None


def as_finite(key: str, value: Any, error: ErrorType) -> float:
    """A finite number, from TOML or a flag's text.

    TOML and float() read nan and inf: a NaN compares false with everything (a wait or backoff
    of none, a limit that never holds), an infinite grace or timeout never ends.
    """
    if isinstance(value, bool):  # an int to Python, never a number to an operator
        raise error(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise error(f"{key}: expected a finite number, got {value!r}")
    return number


def as_whole(key: str, value: Any, error: ErrorType) -> int:
    """A whole number: an integer, a float without a fraction (TOML's 3.0), or a flag's digits.

    int() cut 0.5 to 0 without a word, and raised OverflowError for TOML's inf (a traceback).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise error(f"{key}: expected a whole number, got {value!r}") from None
    number = as_finite(key, value, error)
    if not number.is_integer():
        raise error(f"{key}: expected a whole number, got {value!r}")
    return int(number)


def as_choice(key: str, value: Any, choices: Collection[str], error: ErrorType) -> str:
    """One of `choices` (lower case), given in any case: logging's own level names are upper
    case, and one file may serve both daemons, which must not read it apart."""
    if not isinstance(value, str):
        raise error(f"{key}: expected a string, got {value!r}")
    text = value.lower()
    if text not in choices:
        raise error(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
    return text


def check_address(key: str, value: str, error: ErrorType, *, listen: bool) -> None:
    """`value` is host:port (an IPv6 host in brackets); a port from 1, or from 0 (any free one)
    for an address the daemon listens on."""
    host, sep, port = value.rpartition(":")
    lowest = 0 if listen else 1
    # isascii: str.isdigit also takes "²" (int() raises) and other scripts' digits.
    digits = port.isascii() and port.isdigit()
    if not sep or not host or not digits or not lowest <= int(port) <= MAX_PORT:
        hint = " (port 0 picks a free one)" if listen else ""
        raise error(f"{key}: expected host:port{hint}, got {value!r}")


@contextmanager
def listening(key: str, address: str, error: ErrorType) -> Iterator[None]:
    """Around starting a listener on `address`, the value of `key`: an OSError (in use, no such
    address) is the operator's to fix, and is refused as a configuration error naming the key."""
    try:
        yield
    except OSError as exc:
        raise error(f"{key}: cannot listen on {address} ({exc.strerror or exc})") from None
