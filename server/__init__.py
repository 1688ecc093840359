"""svid-server: the issuer — CA and key rotation, datastore, node attestation, APIs."""
