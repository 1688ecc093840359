"""Fuzz target: TaskClaims from the claims of a token that verified.

Property: whatever JSON a signed token carries next to a valid SPIFFE sub/aud/exp, reading its
task claims returns None (no `txn`), a TaskClaims, or raises TaskClaimsError (a
VerificationError a handler already answers 401 for) — never another exception.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from svid import JwtSvid, SpiffeId, TaskClaims, TaskClaimsError, sign_jws, task_claims, tool_scope
from svid._caller import Caller
from svid._verify_jwt import VerifiedJwt
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


GOOD_TCTX = {"classification": "internal", "environment": "test", "resources": ["svc"]}
# One claim of a well-formed task token drawn anew (malformed, mostly): a refusal the quick
# check missed would show next to an otherwise good token, which it grants.
one_claim_drawn = st.one_of(
    *(
        st.fixed_dictionaries({name: json_values})
        for name in ("txn", "scope", "tctx", "obo", "act", "parent_txn")
    ),
    st.builds(
        lambda name, value: {"tctx": {**GOOD_TCTX, name: value}},
        st.sampled_from(["resources", "classification", "environment", "elevated"]),
        json_values,
    ),
    st.builds(lambda value: {"act": {"sub": "spiffe://example.org/a", "act": value}}, json_values),
)


@fuzz_settings()
@given(
    sub=st.sampled_from(SUBS),
    extra=one_claim_drawn,
    # Names the well-formed token grants, mostly (a name it would refuse: tests/svid/test_caller.py)
    tools=st.lists(st.sampled_from(["t1", "t1", "read", "x y"]), min_size=1, max_size=2),
)
def test_the_adapters_quick_grant_decides_what_the_full_read_decides(
    sub: str, extra: dict[str, Any], tools: list[str]
) -> None:
    claims = {
        "sub": sub,
        "aud": ["svc"],
        "exp": 2_000_000_000,
        "txn": "t1",
        "scope": "read tool:t1",
        "tctx": GOOD_TCTX,
        "obo": "user:alice",
        "act": {"sub": sub},
        **extra,
    }
    verified = VerifiedJwt(SpiffeId.parse(sub), MappingProxyType(claims), ("svc",), 0, "k1")
    caller = Caller(verified.spiffe_id, jwt=verified, audience="svc")
    try:
        quick: tuple[str, ...] | str = caller.missing_tools(tuple(tools))
    except ValueError:
        quick = "ValueError"
    try:
        task = task_claims(verified)
    except TaskClaimsError:
        task = None  # a malformed task token grants nothing
    try:
        scopes = [tool_scope(t) for t in tools]
    except ValueError:
        assert quick == "ValueError"
        return
    granted = [task is not None and task.grants_tool(t, audience="svc") for t in tools]
    assert quick == tuple(s for s, ok in zip(scopes, granted, strict=True) if not ok)
