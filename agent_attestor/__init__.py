"""svid-agent: the node agent — attestation, pushed sync, SVID cache and rotation, Workload API."""
