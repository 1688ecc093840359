from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from svid import JwtSvid, JwtSvidError, b64url_encode, sign_jws
from tests.svid.certs import ec_key

KEY = ec_key()
CLAIMS = {"sub": "spiffe://example.org/w", "aud": ["svc"], "exp": 1_700_000_300, "iat": 1}


def _token(header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None) -> str:
    return sign_jws(
        header if header is not None else {"kid": "k1", "typ": "JWT"},
        claims if claims is not None else CLAIMS,
        KEY,
    )


def _raw(header: object, claims: object) -> str:
    def seg(o: object) -> str:
        return b64url_encode(json.dumps(o).encode())

    return f"{seg(header)}.{seg(claims)}.c2ln"


def test_parse_insecure_reads_fields() -> None:
    tok = _token()
    svid = JwtSvid.parse_insecure(tok)
    assert str(svid.spiffe_id) == "spiffe://example.org/w"
    assert svid.audience == ("svc",)
    assert svid.expires_at == 1_700_000_300
    assert svid.header["kid"] == "k1"
    assert svid.claims["iat"] == 1
    assert svid.token == tok


def test_parse_insecure_claims_are_read_only_at_every_depth() -> None:
    # A JwtSvid is cached and handed out again (a task's token, a client's): editing what its
    # claims nest changed what every later holder of it read.
    svid = JwtSvid.parse_insecure(_token(claims={**CLAIMS, "act": {"sub": "spiffe://x.org/a"}}))
    with pytest.raises(TypeError, match="read-only"):
        svid.claims["aud"].append("other")
    with pytest.raises(TypeError, match="read-only"):
        svid.claims["act"]["sub"] = "spiffe://x.org/evil"
    assert json.loads(json.dumps(dict(svid.claims)))["act"] == {"sub": "spiffe://x.org/a"}


def test_single_string_audience() -> None:
    assert JwtSvid.parse_insecure(_token(claims={**CLAIMS, "aud": "svc"})).audience == ("svc",)


def test_repr_and_str_never_show_the_token() -> None:
    tok = _token()
    svid = JwtSvid.parse_insecure(tok)
    for text in (repr(svid), str(svid), f"{svid}"):
        assert tok not in text
        assert tok.split(".")[2] not in text
        assert "example.org/w" in text


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("a.b", "3 dot-separated parts"),
        ("a.b.c.d", "3 dot-separated parts"),
        ("!!.e30.c2ln", "base64url"),
        (f"{b64url_encode(b'nope')}.e30.c2ln", "header is not valid JSON"),
        (_raw([1], {}), "header is not a JSON object"),
        (_raw({"alg": "ES256", "kid": "k"}, [1]), "claims is not a JSON object"),
        (_raw({"alg": "none", "kid": "k"}, CLAIMS), "alg 'none' is not allowed"),
        (_raw({"alg": "HS256", "kid": "k"}, CLAIMS), "alg 'HS256' is not allowed"),
        (_raw({"alg": "EdDSA", "kid": "k"}, CLAIMS), "alg 'EdDSA' is not allowed"),
        (_raw({"kid": "k"}, CLAIMS), "alg None is not allowed"),
        (_raw({"alg": "ES256"}, CLAIMS), "no 'kid'"),
        (_raw({"alg": "ES256", "kid": ""}, CLAIMS), "no 'kid'"),
        (_raw({"alg": "ES256", "kid": "k", "typ": "at+jwt"}, CLAIMS), "typ 'at\\+jwt'"),
        (_raw({"alg": "ES256", "kid": "k", "crit": ["x"]}, CLAIMS), "crit"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "sub": None}), "no 'sub'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "sub": "bob"}), "not a SPIFFE ID"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "sub": "spiffe://e.org"}), "without a path"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "aud": []}), "'aud'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "aud": None}), "'aud'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "aud": [1]}), "'aud'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "aud": [""]}), "empty audience"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "exp": None}), "'exp'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "exp": "1"}), "'exp'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "exp": True}), "'exp'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "nbf": "x"}), "'nbf'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "exp": float("nan")}), "'exp'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "exp": float("inf")}), "'exp'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "iat": float("-inf")}), "'iat'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "exp": 10**30}), "'exp'"),
        # Found by tests/fuzz against PyJWT, which refuses these too: null times, non-string jti.
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "iat": None}), "'iat'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "nbf": None}), "'nbf'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "jti": 3}), "'jti'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "jti": None}), "'jti'"),
        # Found by tests/fuzz: beyond a double's range, isfinite() raised OverflowError.
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "exp": 10**400}), "'exp'"),
        (_raw({"alg": "ES256", "kid": "k"}, {**CLAIMS, "nbf": -(10**400)}), "'nbf'"),
        ("a" * 70000, "too long"),
    ],
)
def test_structure_errors_name_the_problem(token: str, message: str) -> None:
    with pytest.raises(JwtSvidError, match=message):
        JwtSvid.parse_insecure(token)


def test_typ_jose_accepted() -> None:
    assert JwtSvid.parse_insecure(_token({"kid": "k", "typ": "JOSE"}))
    assert JwtSvid.parse_insecure(_token({"kid": "k"}))


def test_error_messages_do_not_leak_the_token() -> None:
    tok = _raw({"alg": "none", "kid": "k"}, CLAIMS)
    with pytest.raises(JwtSvidError) as info:
        JwtSvid.parse_insecure(tok)
    assert tok not in str(info.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_header = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["ES256", "none"]) | _json,
        "kid": _json,
        "typ": _json,
        "crit": _json,
    },
)
_claims = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.sampled_from(["spiffe://example.org/w", "spiffe://e.org"]) | _json,
        "aud": _json,
        "exp": _json,
        "nbf": _json,
        "iat": _json,
    },
)


@given(_header | _json, _claims | _json)
def test_parse_insecure_raises_only_jwt_svid_error(header: object, claims: object) -> None:
    try:
        svid = JwtSvid.parse_insecure(_raw(header, claims))
    except JwtSvidError:
        return
    assert svid.audience
