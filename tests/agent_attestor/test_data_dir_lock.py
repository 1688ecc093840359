"""One agent per data directory (agent_attestor/data_dir_lock.py), and a data directory the agent
cannot make refused naming it (it was a traceback from `svid-agent run`)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import pytest

from agent_attestor import cli
from agent_attestor.data_dir_lock import holding_data_dir
from agent_attestor.errors import ConfigError


def test_a_held_data_dir_is_refused_naming_the_holder_and_free_again_once_released(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "agent"
    with holding_data_dir(data_dir):
        assert os.stat(data_dir).st_mode & 0o777 == 0o700
        refusal = f"data_dir: another agent is running on {data_dir} (pid {os.getpid()})"
        with (
            pytest.raises(ConfigError, match=f"^{re.escape(refusal)}:"),
            holding_data_dir(data_dir),
        ):
            pass
    with holding_data_dir(data_dir):  # released with the block, as with the process
        pass


@pytest.mark.parametrize(
    ("under", "said"),
    [
        ("file", "is not a directory"),
        ("file/below", "is not a directory"),
        ("open", "mode 0777"),
        # As /tmp itself: others may not replace the agent's files, but may put their own
        # under the names it reads at start (a bundle.der of their CA) before it writes them.
        ("sticky", "mode 1777: others may add files to it"),
    ],
)
def test_a_data_dir_that_cannot_be_made_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], under: str, said: str
) -> None:
    (tmp_path / "file").write_text("")
    # A data_dir others may write, with the private_dir elsewhere (checked on its own): taken.
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    (tmp_path / "sticky").mkdir()
    os.chmod(tmp_path / "sticky", 0o1777)
    data_dir = tmp_path / under
    run = ["run", "--server-address", "127.0.0.1:1", "--insecure-bootstrap"]
    private = ["--private-dir", str(tmp_path / "private")]
    assert cli.main([*run, "--data-dir", str(data_dir), *private]) == 2
    err = capsys.readouterr().err
    assert err.startswith("svid-agent: configuration error: data_dir: ")
    assert str(tmp_path / under.split("/", maxsplit=1)[0]) in err
    assert said in err
    assert err.count("\n") == 1


def test_directories_made_above_the_data_dir_are_0755_the_socket_may_be_below_them(
    tmp_path: Path,
) -> None:
    # data_dir /run/svid-agent/state beside socket_path /run/svid-agent/public/api.sock, on a
    # boot where /run/svid-agent is missing (tmpfs): made 0700 with the data_dir, it shut every
    # other user's workload out of the socket below it, and the agent started as if serving.
    run = tmp_path / "run"
    with holding_data_dir(run / "state"):
        assert os.stat(run / "state").st_mode & 0o777 == 0o700
        assert os.stat(run).st_mode & 0o777 == 0o755


class _Waits:
    """A clock that moves only when slept on, and the sleeps taken."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_with_take_over_wait_a_held_data_dir_is_waited_for_then_refused_past_the_bound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "agent"
    waits = _Waits()
    with holding_data_dir(data_dir):
        refusal = (
            f"data_dir: another agent is still running on {data_dir} (pid {os.getpid()}) "
            "after take_over_wait (5 s)"
        )
        with (
            caplog.at_level(logging.INFO, "agent_attestor"),
            pytest.raises(ConfigError, match=f"^{re.escape(refusal)}:"),
            holding_data_dir(data_dir, 5, clock=waits.clock, sleep=waits.sleep),
        ):
            pass
    assert sum(waits.slept) == pytest.approx(5)  # waited the bound, not past it
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        f"data_dir: another agent is running on {data_dir} (pid {os.getpid()}): waiting up to "
        "5 s (take_over_wait) for it to stop"
    ]


def test_with_take_over_wait_the_data_dir_is_taken_once_its_holder_lets_go(tmp_path: Path) -> None:
    data_dir = tmp_path / "agent"
    waits = _Waits()
    first = contextlib.ExitStack()
    first.enter_context(holding_data_dir(data_dir))

    def the_first_stops_while_waited_for(seconds: float) -> None:
        waits.sleep(seconds)
        if len(waits.slept) == 3:
            first.close()

    with holding_data_dir(data_dir, 60, clock=waits.clock, sleep=the_first_stops_while_waited_for):
        assert len(waits.slept) == 3
        assert (data_dir / "agent.lock").read_text() == f"{os.getpid()}\n"
    first.close()


def test_without_take_over_wait_the_refusal_names_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "agent"
    with (
        holding_data_dir(data_dir),
        pytest.raises(ConfigError, match=r"\(for a rollout .*: take_over_wait\)$"),
        holding_data_dir(data_dir),
    ):
        pass
