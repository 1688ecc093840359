"""SPIFFE federation: our bundle endpoint, and the foreign bundles of the trust domains we
federate with (SPIFFE Trust Domain and Bundle, section 5)."""
