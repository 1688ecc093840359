"""Datastore errors: the caller learns what was missing or clashing, never a backend detail."""

from __future__ import annotations

from svid._errors import SvidError


class DataStoreError(SvidError):
    """Root of every datastore error."""


class NotFoundError(DataStoreError, LookupError):
    """No record with that key."""


class AlreadyExistsError(DataStoreError):
    """A record with the same identity is already stored."""


class ConflictError(DataStoreError):
    """The write lost a race: the record changed since the caller read it."""


class StorageError(DataStoreError):
    """The backend could not complete a write or a read (I/O error, disk full, locked file).

    A failed write kept nothing: its whole transaction was rolled back. The message names the
    operation, never a file path or a driver detail a client should not see.
    """
