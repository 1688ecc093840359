"""`svid-server policy validate` with the server stopped: what it calls valid is a policy
directory that exists, checked under the trust domain `run` would serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cli import main

READ_ONLY = 'permit (principal, action == Action::"read", resource);\n'


def test_a_policy_dir_that_does_not_exist_is_not_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A typo in --policy-dir validated the shipped default policy and answered "valid": true.
    missing = tmp_path / "polciy"
    assert main(["policy", "validate", "--policy-dir", str(missing), "--output", "json"]) == 1
    out, err = capsys.readouterr()
    assert '"valid"' not in out
    assert str(missing) in err
    assert "no such directory" in err


def test_a_policy_dir_that_is_a_file_is_not_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy_file = tmp_path / "site.cedar"
    policy_file.write_text(READ_ONLY)
    assert main(["policy", "validate", "--policy-dir", str(policy_file)]) == 1
    out, err = capsys.readouterr()
    assert "is valid" not in out
    assert "not a directory" in err


@pytest.mark.parametrize(
    ("value", "complaint"),
    [("42", "expected a string"), ('"bad domain"', "trust_domain: ")],
)
def test_the_configs_trust_domain_is_checked_as_run_checks_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, complaint: str
) -> None:
    # It was passed on unchecked (raw.get): a trust domain `run` refuses validated the policies.
    (tmp_path / "policy").mkdir()
    config = tmp_path / "server.toml"
    config.write_text(f'trust_domain = {value}\npolicy_dir = "{tmp_path / "policy"}"\n')
    assert main(["policy", "validate", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert "is valid" not in out
    assert complaint in err


def test_the_trust_domain_flag_is_checked_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["policy", "validate", "--policy-dir", str(tmp_path), "--trust-domain", "Bad Domain"]
    assert main(argv) == 1
    assert "--trust-domain: " in capsys.readouterr().err


def test_an_existing_policy_dir_with_a_good_trust_domain_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "site.cedar").write_text(READ_ONLY)
    config = tmp_path / "server.toml"
    config.write_text(f'trust_domain = "example.org"\npolicy_dir = "{tmp_path}"\n')
    assert main(["policy", "validate", "--config", str(config), "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"policy_dir": str(tmp_path), "valid": True}


TOOLS_OF_MCP_A = (
    'permit (principal, action == Action::"invoke_tool", resource in Resource::"mcp-a");\n'
)


def test_a_forbid_the_tool_probes_cannot_decide_is_warned_of_and_still_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Such a forbid makes the server refuse every whole-server grant it could reach; validate
    # said only "valid", and the operator learnt of it from the first refused task.
    (tmp_path / "site.cedar").write_text(
        TOOLS_OF_MCP_A
        + 'forbid (principal, action, resource is Tool in Resource::"mcp-a")\n'
        + "when { resource.name == context.intent.environment };\n"
        # Decided by the probes (one tool named, whatever the context): no warning.
        + 'forbid (principal, action, resource is Tool) when { resource.name == "drop" && '
        + 'context.intent.environment == "prod" };\n'
    )
    argv = ["policy", "validate", "--policy-dir", str(tmp_path), "--output", "json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"policy_dir": str(tmp_path), "valid": True}
    (warning,) = err.splitlines()
    assert warning.startswith("warning: site.cedar [site.cedar:policy1]: ")
    assert "every tool of mcp-a" in warning
    assert "it reads the tool other than by its name" in warning
    assert "intent.tools" in warning


def test_a_forbid_of_any_server_the_probes_cannot_decide_names_every_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "site.cedar").write_text(
        TOOLS_OF_MCP_A
        + '@id("two-patterns")\nforbid (principal, action, resource is Tool)\n'
        + 'when { resource.name like "admin_*" && resource.name like "*_write" };\n'
    )
    assert main(["policy", "validate", "--policy-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "is valid" in out
    (warning,) = err.splitlines()
    assert warning.startswith("warning: site.cedar [site.cedar:two-patterns]: ")
    assert "every tool of any server" in warning
    assert "two `like` patterns" in warning
