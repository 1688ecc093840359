"""ValidateJWTSVID for a caller the agent holds no identity for.

SPIFFE.md §1: "Caller with no identity / not entitled / no bundle: PERMISSION_DENIED", and every
other Workload API call keeps it (test_caller_with_no_identity_is_denied_everywhere, which
leaves ValidateJWTSVID out). ValidateJWTSVID answers any local process: it checks tokens of
this trust domain against a bundle FetchJWTBundles refuses that process, tells it their claims
(the `txn` of a task among them), and writes an audit record of every answer, with no caller
to name, to the server's hash-chained log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.agent_attestor.harness import Harness
from tests.users import NOBODY

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
REPO = Path(__file__).resolve().parents[2]


@as_root
def test_a_caller_without_identity_cannot_have_tokens_validated(agent: Harness) -> None:
    """Fails on main: `nobody`, with no entry, has root's workload's token validated (OK, with
    its claims) and the validation is audited with an empty caller."""
    seen: list[dict[str, object]] = []
    agent.api._on_validate = lambda **kw: seen.append(kw)
    agent.add_entry("/w")  # root's only
    token = agent.ca.mint_jwt("spiffe://example.org/w", ["svc"]).token
    os.chmod(agent.root, 0o755)
    os.chmod(agent.socket_path.parent, 0o755)
    code = textwrap.dedent(
        f"""
        import json, os, grpc
        from svid._proto import workload_pb2, workload_pb2_grpc
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(
            grpc.insecure_channel("unix:{agent.socket_path}"))
        header = (("workload.spiffe.io", "true"),)
        out = {{}}
        for name, call in (
            ("bundles", lambda: next(stub.FetchJWTBundles(
                workload_pb2.JWTBundlesRequest(), metadata=header, timeout=20))),
            ("validate", lambda: stub.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(
                audience="svc", svid={token!r}), metadata=header, timeout=20)),
        ):
            try:
                call()
                out[name] = "OK"
            except grpc.RpcError as exc:
                out[name] = exc.code().name
        print(json.dumps(out))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"bundles": "PERMISSION_DENIED", "validate": "PERMISSION_DENIED"}, (
        f"{got}; audited: {[(s['ok'], s['caller_id']) for s in seen]}"
    )
