"""The sync `Broker`: on the caller's thread while uncontended, on a thread of its own once several
threads (or a thread with its own running loop) call it; Ctrl-C cancels the call and records it."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from imagebroker import Broker
from imagebroker.testing.mock import MockProvider, mock_offering, ok_result
from tests.conftest import mock_policy


def slow_policy(seconds: float = 0.2):
    return mock_policy(mock_offering("x", settings={"script": [f"sleep:{seconds}"]}))


def test_one_thread_runs_the_call_on_its_own_thread(tmp_path):
    seen = []

    def handler(request, offering, ctx):
        seen.append(threading.get_ident())
        return ok_result(request, offering)

    with Broker(slow_policy(0), ledger=f"sqlite:///{tmp_path / 'l.db'}",
                providers={"mock": MockProvider.with_handler(handler)}) as b:
        b.generate("x")
        b.generate("x")
        assert b._thread is None  # no hop to another thread
    assert seen == [threading.get_ident()] * 2


def test_concurrent_threads_all_get_their_images(tmp_path):
    with Broker(slow_policy(0.2), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: b.generate(f"cat {i}"), range(16)))
        assert b._thread is not None  # contention moved the loop to a thread of its own
        assert len({r.request_id for r in results}) == 16 and all(r.images for r in results)
        assert b.generate("after").images  # and it keeps serving
    with sqlite3.connect(tmp_path / "l.db") as conn:
        assert conn.execute("select status, count(*) from calls group by status").fetchall() == [("ok", 17)]


def test_a_thread_with_its_own_running_loop_can_call_it(tmp_path):
    async def notebook_cell():
        with Broker(slow_policy(0), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            return b.generate("x")  # a blocking call from inside a running loop, as in Jupyter

    assert asyncio.run(notebook_cell()).images


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_ctrl_c_cancels_the_call_and_records_it(tmp_path):
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    with Broker(slow_policy(30), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            b.generate("x")
        assert b.generate  # the broker is still usable
    with sqlite3.connect(tmp_path / "l.db") as conn:
        assert conn.execute("select status from calls").fetchall() == [("cancelled",)]
        assert conn.execute("select error_type from attempts").fetchall() == [("CancelledError",)]
