"""`svid-server task list` and `task show` agree (credential counts, time format), end to end."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import wait_for
from tests.e2e.test_tasks_server import Setup, setup  # noqa: F401 - the fixture

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
