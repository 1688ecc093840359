"""`svid-server task list` and `task show` agree (credential counts, time format), end to end."""

from __future__ import annotations

import re

import pytest

from svid._proto import task_pb2
from tests.e2e.conftest import wait_for
from tests.e2e.test_tasks_server import RUNTIME, Setup, setup  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e
RFC3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def _field(text: str, label: str) -> str:
    found = re.search(rf"^{label}\s*: (.*)$", text, re.MULTILINE)
    assert found is not None, f"no {label} in:\n{text}"
    return found.group(1)


def test_list_and_show_count_credentials_the_same_way(setup: Setup) -> None:  # noqa: F811
    task = setup.begin()
    setup.jwt(task.spiffe_id, "docs")
    setup.jwt(task.spiffe_id, "docs")

    def shown_count() -> int:
        return int(setup.server.cli_json("task", "show", task.task_id)["credentials"])

    count = wait_for(shown_count, 10, "the task's credentials to be recorded")
    (listed,) = [
        t for t in setup.server.cli_json("task", "list")["tasks"] if t["task_id"] == task.task_id
    ]
    assert listed["credentials"] == count == 2

    text_list = setup.server.cli("task", "list").stdout
    text_show = setup.server.cli("task", "show", task.task_id).stdout
    assert _field(text_list, "Credentials") == _field(text_show, "Credentials") == "2"
    for text in (text_list, text_show):
        assert re.fullmatch(RFC3339, _field(text, "Created")), text
        assert re.fullmatch(RFC3339, _field(text, "Expires")), text


def test_task_list_follows_pages_and_filters(setup: Setup) -> None:  # noqa: F811
    tasks = [setup.begin() for _ in range(5)]
    setup.tasks.EndTask(task_pb2.NodeEndTaskRequest(task_id=tasks[2].task_id), timeout=10)
    ids = [t.task_id for t in sorted(tasks, key=lambda t: (t.created_at, t.task_id))]

    def listed(*flags: str) -> list[str]:
        return [t["task_id"] for t in setup.server.cli_json("task", "list", *flags)["tasks"]]

    assert listed("--page-size", "2") == ids  # three pages, every one read
    assert listed("--page-size", "1", "--state", "ended") == [tasks[2].task_id]
    assert listed("--page-size", "2", "--state", "active") == [
        i for i in ids if i != tasks[2].task_id
    ]
    assert listed("--runtime-id", RUNTIME, "--agent-id", setup.agent.spiffe_id) == ids
    assert listed("--agent-id", f"{RUNTIME}-elsewhere") == []
    text = setup.server.cli("task", "list", "--page-size", "1").stdout
    assert [_field(t, "Task ID") for t in text.split("\n\n")] == ids
    for flags, message in [
        (("--page-size", "0"), "--page-size: 0 must be between 1 and 5000"),
        (("--agent-id", "node-1"), "agent_id:"),
    ]:
        refused = setup.server.cli("task", "list", *flags, check=False)
        assert refused.returncode == 1
        assert message in refused.stderr


def test_ending_a_task_answers_with_its_credentials_counted(setup: Setup) -> None:  # noqa: F811
    """`svid-agent task end` printed "Credentials : 0" for a task that had been issued two:
    the node API's EndTask answered without counting them (every other view counts)."""
    task = setup.begin()
    setup.jwt(task.spiffe_id, "docs")
    setup.jwt(task.spiffe_id, "docs")

    def shown_count() -> int:
        return int(setup.server.cli_json("task", "show", task.task_id)["credentials"])

    wait_for(lambda: shown_count() == 2, 10, "the task's credentials to be recorded")
    request = task_pb2.NodeEndTaskRequest(task_id=task.task_id, runtime_ids=[RUNTIME])
    ended = setup.tasks.EndTask(request, timeout=10).task
    assert ended.state == "ended"
    assert ended.credentials == 2
