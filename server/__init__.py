"""svid-server: the trust domain's issuer — CA and key rotation, datastore, node attestation, APIs."""
