"""OIDC discovery and an OAuth 2.0 authorization server for JWT-SVIDs (issue 16).

Small modules, one job each: `settings` (validated config), `http` (an HTTPS listener on h11
that routes paths to handlers; other endpoints, such as a SPIFFE bundle endpoint, mount on the
same listener), `discovery` (the OIDC and RFC 8414 metadata documents), `jwks` (the published
keys and how long they may be cached), `errors` (RFC 6749 §5.2 errors), `assertions` (checking
an incoming JWT-SVID), `grants` (the token endpoint's grant types), `endpoint` (the token
endpoint's HTTP face) and `wiring` (the one place that builds it for server/app.py).
"""
