"""The CA's key store reads its key and record files without waiting on a FIFO planted at their
names (it hung the server's start) and writes them through the durable writer at their modes."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from server.ca.errors import KeyStoreError
from server.ca.keys import KeyStore, generate_key


def _returns_promptly(fifo: Path, call: Callable[[], object]) -> object:
    """call() run in a thread: it must return within a second, not wait on `fifo`."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # the caller checks what came back
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(1.0)
    if thread.is_alive():  # release the waiting open, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(2.0)
        pytest.fail(f"waited on the FIFO at {fifo}")
    return outcome[0]


def test_a_fifo_at_a_key_files_name_is_refused_not_waited_on(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    os.mkfifo(store.path("x509-a"))
    got = _returns_promptly(store.path("x509-a"), lambda: store.load("x509-a"))
    assert isinstance(got, KeyStoreError)
    assert "a FIFO" in str(got)


def test_a_fifo_at_a_records_name_is_no_record_not_waited_on(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.save("x509-a", generate_key())
    os.mkfifo(store.record_path("x509-a"))
    assert (
        _returns_promptly(store.record_path("x509-a"), lambda: store.load_record("x509-a")) is None
    )


def test_keys_and_records_are_written_at_their_modes_and_read_back(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    old = os.umask(0o000)  # a umask must neither widen a key nor narrow a record
    try:
        store.save_record("x509-a", b'{"slot": 1}')
        store.save("x509-a", generate_key())
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.path("x509-a").stat().st_mode) == 0o600
    assert stat.S_IMODE(store.record_path("x509-a").stat().st_mode) == 0o644
    assert store.load_record("x509-a") == b'{"slot": 1}'
    assert isinstance(store.load("x509-a"), type(generate_key()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x509-a.pem", "x509-a.slot.json"]
