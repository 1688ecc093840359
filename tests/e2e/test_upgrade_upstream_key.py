"""A server of the previous release (b395c82) read `upstream_ca_key` whatever its mode; this
one refuses a key file its group or others can read. Upgrading such a deployment stops the
server at start, which is fine when the refusal names the setting to fix. It names
`upstream_key`, a setting the config does not have (the file is `upstream_ca_key`)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.conftest import make_server, server_command, short_tmpdir
from tests.server.shared_root import corporate_ca, upstream_intermediate

pytestmark = pytest.mark.e2e


def test_a_group_readable_upstream_key_of_the_previous_release_is_refused_naming_its_setting() -> (
    None
):
    root = short_tmpdir()
    try:
        root_key = ec.generate_private_key(ec.SECP256R1())
        corp = (corporate_ca("corp-root", root_key, None), root_key)
        settings, _ = upstream_intermediate(root, "td-intermediate", corp)
        # As many a deployment of the previous release had it: root's group of the server's
        # user reads it (the previous release did not look).
        (root / "td-intermediate.key").chmod(0o640)
        server = make_server(root, **settings)
        done = subprocess.run(
            [*server_command(), "run", "--config", str(server.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(root),
            check=False,
        )
        assert done.returncode != 0, "started on a group-readable upstream key"
        said = done.stderr
        assert "chmod 600" in said, said  # what to do: said
        assert "upstream_ca_key" in said, (
            f"the refusal names no setting of the config file: {said.strip()[-300:]}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
