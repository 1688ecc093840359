"""Task-scoped just-in-time identities: begin/end, per-mint decisions, revocation, CRLs.

Import the submodules (service, store, wiring, cli); this package file stays empty so the CLI's
admin commands do not load the CA and datastore code.
"""
