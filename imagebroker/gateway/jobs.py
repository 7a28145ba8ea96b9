"""Async jobs (`Prefer: respond-async`): a generation answered at once with 202 and a job id, run by whichever
worker is free, and read back at `GET /v1/images/jobs/{id}` with the body the synchronous call would have had.
Jobs live in the ledger (`gateway_jobs`), so they survive a worker's restart: a job whose worker died is
queued again, and its call runs under the job's id as its idempotency key, so a call already served is not
paid for twice. Images are kept in the image store and read back from it by SHA-256, an edit's inputs too:
the job's row names them by hash (`stash_inputs`), never holds their bytes."""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from sqlalchemy import insert, select, update

from ..broker.ledger.schema import gateway_jobs
from ..broker.ledger.store import HOST, Ledger, _pid_alive
from ..errors import RequestError

INPUTS = "input_sha256s"   # the job fields' name for an edit's images (and MASK for its mask), by hash
MASK = "mask_sha256"


def stash_inputs(store: Any, body: dict[str, Any]) -> dict[str, Any]:
    """An edit's uploaded images and mask put in the image store; the job fields that name them."""
    named: dict[str, Any] = {INPUTS: [store.put(data) for data in body.get("images", ())]}
    if body.get("mask") is not None:
        named[MASK] = store.put(body["mask"])
    return named


def unstash_inputs(store: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """A job's fields with its edit inputs read back from the store (a RequestError if one is gone)."""
    shas, mask = fields.pop(INPUTS, None), fields.pop(MASK, None)
    if shas:
        fields["images"] = [_stored(store, sha) for sha in shas]
    if mask:
        fields["mask"] = _stored(store, mask)
    return fields


def _stored(store: Any, sha: str) -> bytes:
    data = store.get(sha)
    if data is None:
        raise RequestError(f"the edit's input {sha[:12]} is no longer in the image store")
    return data


def new_id() -> str:
    return f"job_{uuid.uuid4().hex}"


class JobQueue:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def submit(self, job: str, fields: dict[str, Any], key_name: str | None) -> None:
        with self.ledger.engine.begin() as conn:
            conn.execute(insert(gateway_jobs).values(id=job, key_name=key_name, status="queued",
                                                     request_json=json.dumps(fields), created_at=time.time()))

    def claim(self) -> tuple[str, dict[str, Any], str | None] | None:
        """The oldest queued job, now this process's; None when there is none (or another took it first)."""
        with self.ledger.engine.begin() as conn:
            row = conn.execute(select(gateway_jobs.c.id, gateway_jobs.c.request_json, gateway_jobs.c.key_name)
                               .where(gateway_jobs.c.status == "queued").order_by(gateway_jobs.c.created_at)
                               .limit(1)).first()
            if row is None:
                return None
            taken = conn.execute(update(gateway_jobs).where(gateway_jobs.c.id == row.id,
                                                            gateway_jobs.c.status == "queued")
                                 .values(status="running", worker=f"{HOST}:{os.getpid()}", started_at=time.time()))
        return (row.id, json.loads(row.request_json), row.key_name) if taken.rowcount else None

    def finish(self, job: str, http_status: int, body: dict[str, Any]) -> None:
        with self.ledger.engine.begin() as conn:
            conn.execute(update(gateway_jobs).where(gateway_jobs.c.id == job).values(
                status="done" if http_status == 200 else "failed", http_status=http_status,
                response_json=json.dumps(body), finished_at=time.time()))

    def get(self, job: str) -> dict[str, Any] | None:
        with self.ledger.engine.connect() as conn:
            row = conn.execute(select(gateway_jobs).where(gateway_jobs.c.id == job)).mappings().first()
        return None if row is None else dict(row)

    def requeue_orphans(self) -> int:
        """Jobs left `running` by a process of this host that is gone: queued again."""
        n = 0
        with self.ledger.engine.begin() as conn:
            running = conn.execute(select(gateway_jobs.c.id, gateway_jobs.c.worker)
                                   .where(gateway_jobs.c.status == "running")).all()
            for job, worker in running:
                host, _, pid = str(worker).rpartition(":")
                if host == HOST and pid.isdigit() and not _pid_alive(int(pid)):
                    n += conn.execute(update(gateway_jobs).where(gateway_jobs.c.id == job,
                                                                 gateway_jobs.c.status == "running")
                                      .values(status="queued", worker=None)).rowcount
        return n
