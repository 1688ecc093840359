"""What others set (an entry's hint, an agent's selectors, a task's reason, a server's error
details) reaches an operator's terminal escaped in every text output, never as control
characters it obeys; `--output json` stays exact JSON."""

from __future__ import annotations

import json

import pytest

from server.cli_output import agent_text
from server.input_text import shown
from server.tasks.cli import _task_text
from svid._proto import admin_pb2, common_pb2, task_pb2
from tests.server.cli_run import run_cli
from tests.server.fixtures import TRUST_DOMAIN, RunningServer

TD = f"spiffe://{TRUST_DOMAIN}"
# Clears the screen and homes the cursor; a carriage return to overwrite; a bidi override.
HOSTILE = "ok\x1b[2J\x1b[H\rforged\u202egnp.exe\u200b\x9b31m"


def _no_control(text: str) -> None:
    assert all(c.isprintable() or c == "\n" for c in text), repr(text)


def test_shown_escapes_what_a_terminal_obeys() -> None:
    assert shown("unix:uid:1000") == "unix:uid:1000"
    assert shown("naïve ☃") == "naïve ☃"
    assert shown(HOSTILE) == r"ok\x1b[2J\x1b[H\rforged\u202egnp.exe\u200b\x9b31m"
    assert shown("a\nb\x00") == r"a\nb\x00"


def test_entry_hint_and_selector_escaped_in_text_exact_in_json(
    capsys: pytest.CaptureFixture[str], srv: RunningServer
) -> None:
    code, out, err = run_cli(
        capsys,
        srv,
        "entry",
        "create",
        "--spiffe-id",
        f"{TD}/shown/web",
        "--parent-id",
        f"{TD}/svid/agent/join_token/shown",
        "--selector",
        f"k8s:pod-label:{HOSTILE}",
        "--hint",
        HOSTILE,
    )
    assert code == 0, err
    _no_control(out)
    assert f"Hint             : {shown(HOSTILE)}" in out
    entry_id = next(line.split(": ", 1)[1] for line in out.splitlines() if "Entry ID" in line)

    for argv in (("--id", entry_id), ("--spiffe-id", f"{TD}/shown/web")):
        code, out, err = run_cli(capsys, srv, "entry", "show", *argv)
        assert code == 0, err
        _no_control(out)
        assert f"Selector         : k8s:pod-label:{shown(HOSTILE)}" in out
        assert f"Hint             : {shown(HOSTILE)}" in out

    code, out, err = run_cli(capsys, srv, "entry", "show", "--id", entry_id, "--output", "json")
    assert code == 0, err
    shown_json = json.loads(out)["entries"][0]
    assert shown_json["hint"] == HOSTILE
    assert shown_json["selectors"] == [{"type": "k8s", "value": f"pod-label:{HOSTILE}"}]


def test_a_server_error_quoting_a_value_is_one_escaped_line(
    capsys: pytest.CaptureFixture[str], srv: RunningServer
) -> None:
    code, out, err = run_cli(capsys, srv, "entry", "show", "--id", f"no-such-{HOSTILE}")
    assert code == 1
    assert out == ""
    _no_control(err)
    assert err.count("\n") == 1
    assert shown(HOSTILE) in err


def test_agent_selectors_from_attestation_escaped() -> None:
    agent = admin_pb2.Agent(
        spiffe_id=f"{TD}/svid/agent/x",
        attestation_type="k8s_psat",
        selectors=[common_pb2.Selector(type="k8s_psat", value=f"node-label:{HOSTILE}")],
    )
    text = agent_text(agent)
    _no_control(text)
    assert f"node-label:{shown(HOSTILE)}" in text


def test_task_fields_escaped() -> None:
    task = task_pb2.Task(
        task_id="t1",
        actions=[HOSTILE],
        resources=[HOSTILE],
        environment=HOSTILE,
        on_behalf_of=HOSTILE,
        reason=HOSTILE,
        end_reason=HOSTILE,
    )
    text = _task_text(task)
    _no_control(text)
    assert text.count(shown(HOSTILE)) == 6


def test_an_error_quoting_a_huge_value_reaches_the_cli_cut_short(
    capsys: pytest.CaptureFixture[str], srv: RunningServer
) -> None:
    huge = "d" * 70_000
    code, out, err = run_cli(
        capsys,
        srv,
        "entry",
        "create",
        "--spiffe-id",
        f"{TD}/shown/dns",
        "--parent-id",
        f"{TD}/svid/server",
        "--selector",
        "unix:uid:1",
        "--dns",
        huge,
    )
    assert (code, out) == (1, "")
    assert "INVALID_ARGUMENT: " in err, err[:300]
    assert "bytes more)" in err
    assert len(err) < 3000
