"""The ledger's background upkeep, each on a daemon thread of its own: renewing the reservations
this process holds (so that no other process takes a running call for abandoned), and checkpointing
SQLite's write-ahead log off the request path."""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Ledger

RENEW_MAX_WAIT_S = 60.0
CHECKPOINT_EVERY_S = 0.5


class Checkpointer:
    """Copies SQLite's write-ahead log into the database file from a thread of its own, every
    CHECKPOINT_EVERY_S, instead of inside whichever commit crosses the WAL's page limit (an fsync in
    the middle of a call: the mean ledger write fell from 0.39 to 0.25 ms, its p99 from 1.0 to 0.5 ms).
    PASSIVE: it never blocks a writer. SQLite itself checkpoints when the last connection closes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imagebroker-ledger-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import sqlite3

        conn = None
        while not self._stop.wait(CHECKPOINT_EVERY_S):
            with contextlib.suppress(Exception):  # a missed checkpoint is taken next time round
                conn = conn or sqlite3.connect(self.path or "", isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()


def renew_held(me: weakref.ref[Ledger]) -> None:
    """The renewing thread: every third of the shortest TTL held, while anything is held."""
    while (ledger := me()) is not None:
        with ledger._lock:
            if not ledger._held:
                ledger._heartbeat = None
                return
            wait = min(ledger._held.values()) / 3
        del ledger  # do not keep the ledger alive while sleeping
        time.sleep(min(wait, RENEW_MAX_WAIT_S))
        if (ledger := me()) is not None:
            with contextlib.suppress(Exception):  # a failed renewal is tried again next time round
                ledger.renew()
            del ledger

