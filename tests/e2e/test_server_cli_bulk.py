"""End to end: bulk entry work through the real `svid-server` CLI against a real server process:
`entry create|update|delete --file` in batches with per-item results, and list commands that
follow every page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess
from tests.e2e.test_server_cli import attest

pytestmark = pytest.mark.e2e
TD = f"spiffe://{TRUST_DOMAIN}"
PARENT = f"{TD}/svid/agent/join_token/bulk"


def _line(path: str, uid: int, **extra: object) -> str:
    return json.dumps(
        {"spiffe_id": f"{TD}{path}", "parent_id": PARENT, "selectors": [f"unix:uid:{uid}"]} | extra
    )


def test_create_from_a_jsonl_file_in_batches_and_show_every_page(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    server = server_process
    lines = [_line(f"/bulk/{n}", n) for n in range(2500)]
    lines.insert(1200, _line("/bulk/7", 7))  # a repeat of line 8, in the second batch
    lines.append(json.dumps({"spiffe_id": f"{TD}/bulk/bad", "parent_id": PARENT}))
    source = tmp_path / "entries.jsonl"
    source.write_text("\n".join(lines) + "\n")

    done = server.cli("entry", "create", "--file", str(source), check=False, timeout=120)
    assert done.returncode == 1
    assert done.stdout.strip() == "Created 2500 of 2502 entries; 2 refused"
    problems = done.stderr.strip().splitlines()
    assert problems[0].startswith(f"svid-server: {source}:1201: ALREADY_EXISTS: an entry for")
    assert problems[1] == (
        f"svid-server: {source}:2502: INVALID_ARGUMENT: selectors: at least one selector is "
        "required"
    )
    assert problems[2] == "svid-server: error: 2 of 2502 entries refused (listed above)"

    shown = server.cli_json("entry", "show", "--parent-id", PARENT, "--page-size", "300")
    ids = [e["id"] for e in shown["entries"]]
    assert len(ids) == len(set(ids)) == 2500
    assert {e["spiffe_id"] for e in shown["entries"]} == {f"{TD}/bulk/{n}" for n in range(2500)}

    text = server.cli("entry", "show", "--spiffe-id-prefix", f"{TD}/bulk/1", "--page-size", "7")
    # Path segments: /bulk/1 only, never /bulk/10 or /bulk/1999 as a string prefix would.
    assert text.stdout.startswith("Found 1 entry\n")
    by_selector = server.cli_json(
        "entry", "show", "--selector", "unix:uid:42", "--selector", "unix:uid:43", "--match", "any"
    )
    assert sorted(e["spiffe_id"] for e in by_selector["entries"]) == [
        f"{TD}/bulk/42",
        f"{TD}/bulk/43",
    ]


def test_show_update_delete_round_trip_through_files(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    server = server_process
    source = tmp_path / "entries.json"
    source.write_text(json.dumps([json.loads(_line(f"/rt/{n}", n)) for n in range(30)]))
    created = server.cli_json("entry", "create", "--file", str(source))
    assert (created["ok"], created["refused"]) == (30, 0)
    assert [r["code"] for r in created["results"]] == ["OK"] * 30
    assert created["results"][0]["item"] == f"{source}#1"

    listing = server.cli("entry", "show", "--spiffe-id-prefix", f"{TD}/rt", "--output", "json")
    exported = tmp_path / "exported.json"
    exported.write_text(listing.stdout.replace('"hint": ""', '"hint": "edited"'))
    updated = server.cli("entry", "update", "--file", str(exported))
    assert updated.stdout.strip() == "Updated 30 of 30 entries"
    again = server.cli_json("entry", "show", "--spiffe-id-prefix", f"{TD}/rt")
    assert {e["hint"] for e in again["entries"]} == {"edited"}
    assert {int(e["revision"]) for e in again["entries"]} == {2}

    # The export carries revision 1: a second update from it is refused per item (ABORTED).
    stale = server.cli("entry", "update", "--file", str(exported), check=False)
    assert stale.returncode == 1
    assert stale.stdout.strip() == "Updated 0 of 30 entries; 30 refused"
    assert "ABORTED: entry" in stale.stderr

    deleted = server.cli("entry", "delete", "--file", str(exported))
    assert deleted.stdout.strip() == "Deleted 30 of 30 entries"
    gone = server.cli("entry", "show", "--spiffe-id-prefix", f"{TD}/rt")
    assert gone.stdout.strip() == "Found 0 entries"

    ids = [r["id"] for r in server.cli_json("entry", "create", "--file", str(source))["results"]]
    by_id = server.cli(
        "entry", "delete", "--id", ids[0], "--id", ids[1], "--id", "nope", check=False
    )
    assert by_id.returncode == 1
    assert by_id.stdout.strip() == "Deleted 2 of 3 entries; 1 refused"
    assert "svid-server: --id #3: NOT_FOUND: entry nope not found" in by_id.stderr


def test_a_bad_file_is_one_line_naming_the_item_and_creates_nothing(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    server = server_process
    source = tmp_path / "entries.jsonl"
    source.write_text(_line("/bad/1", 1) + "\n" + _line("/bad/2", 2) + "\n{oops\n")
    done = server.cli("entry", "create", "--file", str(source), check=False)
    assert done.returncode == 1
    assert done.stderr.startswith(f"svid-server: error: {source}:3: not JSON")
    assert len(done.stderr.strip().splitlines()) == 1
    source.write_text(json.dumps([{"spiffe_id": f"{TD}/x", "selectors": ["uid-without-type"]}]))
    done = server.cli("entry", "create", "--file", str(source), check=False)
    assert "#1: selector 'uid-without-type' must be TYPE:VALUE" in done.stderr
    shown = server.cli("entry", "show", "--spiffe-id-prefix", f"{TD}/bad")
    assert shown.stdout.strip() == "Found 0 entries"
    mixed = server.cli(
        "entry", "create", "--file", str(source), "--spiffe-id", f"{TD}/x", check=False
    )
    assert "--file cannot be combined with entry flags" in mixed.stderr
    for size in ("0", "5001"):
        paged = server.cli("entry", "show", "--page-size", size, check=False)
        assert paged.returncode == 1
        assert paged.stderr == (
            f"svid-server: error: --page-size: {size} must be between 1 and 5000\n"
        )


def test_agent_list_follows_every_page(server_process: ServerProcess) -> None:
    server = server_process
    bundle = server.cli("bundle", "show").stdout.encode()
    agents = sorted(
        attest(server, server.cli_json("token", "generate")["token"], bundle).spiffe_id
        for _ in range(3)
    )
    listed = server.cli_json("agent", "list", "--page-size", "1")
    assert [a["spiffe_id"] for a in listed["agents"]] == agents
    one = server.cli_json("agent", "list", "--spiffe-id-prefix", agents[2])
    assert [a["spiffe_id"] for a in one["agents"]] == [agents[2]]
