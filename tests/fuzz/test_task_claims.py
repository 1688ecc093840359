"""Fuzz target: TaskClaims from the claims of a token that verified.

Property: whatever JSON a signed token carries next to a valid SPIFFE sub/aud/exp, reading its
task claims returns None (no `txn`), a TaskClaims, or raises TaskClaimsError (a
VerificationError a handler already answers 401 for) — never another exception.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from svid import JwtSvid, TaskClaims, TaskClaimsError, sign_jws, task_claims
from tests.fuzz._profile import fuzz_settings
from tests.svid.certs import ec_key

KEY = ec_key()
SUBS = [
    "spiffe://example.org/agents/bot/task/t1",
    "spiffe://example.org/agents/bot",
    "spiffe://example.org/task/t1",
    "spiffe://example.org/a/task/t1/task/t1",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
task_like = st.fixed_dictionaries(
    {},
    optional={
        "txn": st.one_of(st.just("t1"), json_values),
        "scope": st.one_of(st.text(max_size=30), json_values),
        "tctx": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "resources": json_values,
                    "classification": json_values,
                    "environment": json_values,
                    "elevated": json_values,
                },
            ),
            json_values,
        ),
        "obo": json_values,
        "act": json_values,
        "parent_txn": json_values,
    },
)


@fuzz_settings()
@given(sub=st.sampled_from(SUBS), extra=task_like)
def test_task_claims_are_read_or_refused_with_their_own_error(
    sub: str, extra: dict[str, Any]
) -> None:
    claims = {"sub": sub, "aud": ["svc"], "exp": 2_000_000_000, **extra}
    token = JwtSvid.parse_insecure(sign_jws({"kid": "k1", "typ": "JWT"}, claims, KEY))
    try:
        got = task_claims(token)
    except TaskClaimsError:
        return
    assert got is None or isinstance(got, TaskClaims)
    if got is not None:
        assert str(got.spiffe_id).endswith(f"/task/{got.task_id}")
