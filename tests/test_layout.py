"""The design's layering: server and agent share only what lives in svid."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "svid": {"server", "agent_attestor"},
    "server": {"agent_attestor"},
    "agent_attestor": {"server"},
}


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_layering(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_roots(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "layering broken:\n" + "\n".join(offenders)


def test_layering_check_detects_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("from server.ca import signer\nimport agent_attestor.cache\n")
    assert _imported_roots(sample) >= {"server", "agent_attestor"}


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


# The task layer is a side wing: it plugs into the issuance spine through the port the spine
# defines (server.issuance.TaskDecisions), and only app.py wires it in. Transport and the
# spine never import it.
NOT_THE_TASK_LAYER = ("server/node_api.py", "server/admin_api.py", "server/issuance")


@pytest.mark.parametrize("where", NOT_THE_TASK_LAYER)
def test_transport_and_spine_do_not_import_the_task_layer(where: str) -> None:
    target = ROOT / where
    paths = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert paths
    offenders = [
        f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        for path in paths
        if (bad := {m for m in _imported_modules(path) if m.split(".")[:2] == ["server", "tasks"]})
    ]
    assert not offenders, "the task layer must plug in through a port:\n" + "\n".join(offenders)


def test_task_layer_check_detects_an_import(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("from server.tasks.wiring import NodeHooks\nfrom server import tasks\n")
    found = {m for m in _imported_modules(sample) if m.split(".")[:2] == ["server", "tasks"]}
    assert found == {"server.tasks.wiring", "server.tasks.wiring.NodeHooks", "server.tasks"}


def test_a_process_the_tests_start_imports_this_checkout(tmp_path: Path) -> None:
    # Started from elsewhere (the daemons' temporary directories), it imported the checkout the
    # virtualenv was installed from: from a git worktree, the tests ran another tree's code.
    done = subprocess.run(
        [sys.executable, "-c", "import server, svid; print(server.__file__, svid.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    for module in done.stdout.split():
        assert Path(module).resolve().is_relative_to(ROOT), module
