"""A usage error quotes the command line: a PostgreSQL password in it is hidden, as in every
other message of svid-server (a --datastore URL given to a command that takes none put its
password on the terminal and in the CI log)."""

from __future__ import annotations

import pytest

from server.cli import main


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """What argparse writes when it refuses `argv` as a usage error (exit 2)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "prune", "--datastore", "postgresql://svid:hunter2@db.example/svid"],
        ["run", "postgres://svid:hunter2@db/svid?sslmode=require"],
        ["entry", "show", "--output", "postgresql://svid:hunter2@db/svid"],
        ["audit", "prune", "host=db password=hunter2 dbname=svid"],
    ],
)
def test_a_usage_error_hides_the_password(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    err = _usage_error(capsys, argv)
    assert "hunter2" not in err
    assert "***" in err


@pytest.mark.parametrize(
    "argv",
    [
        # A quote or a space in the password ended the pattern's match: the rest was shown.
        ["audit", "prune", "--datastore", "postgresql://svid:it's-hunter2@db/svid"],
        ["audit", "prune", "--datastore", 'postgresql://svid:a"hunter2@db/svid'],
        ["audit", "prune", "--datastore", "postgresql://svid:a hunter2@db/svid"],
        ["audit", "prune", "--datastore=POSTGRES://svid:x'hunter2@db/svid"],
        ["postgresql://svid:x'y\"hunter2@db/svid"],  # repr() escapes it: "invalid choice"
        ["entry", "show", "--output", "postgresql://svid:it's hunter2@db/svid"],
    ],
)
def test_a_password_with_quotes_or_spaces_is_hidden_whole(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    err = _usage_error(capsys, argv)
    assert "hunter2" not in err
    assert "svid:***@db/svid" in err
