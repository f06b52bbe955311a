"""The training job records in the jobs KV bucket, their events and the work queue: what the API verbs
(jobs.py) and the trainer that owns a job both write through.

The record is the source of truth; every change is a compare-and-set on its revision (`mutate`), so the API and
the trainer that owns a job never overwrite each other.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas import codec, subjects
from schemas.errors import CyError, ErrorCode, ErrorDetail
from schemas.training import EventKind, Progress, QueueTicket, TrainingControl, TrainingEvent, TrainingJob, job_decoder
from services import jetstream, kv_scan

log = structlog.get_logger()

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def now_ms() -> int:
    return int(time.time() * 1000)


def not_found(job_id: str) -> CyError:
    return CyError(
        ErrorCode.TRAINING_JOB_NOT_FOUND,
        f"Training job '{job_id}' does not exist",
        details=[ErrorDetail(type="job_not_found", field="jobId", description=f"no job with id '{job_id}'")],
    )


class JobRecords:
    """Job records, events and queue tickets over one NATS connection. `trainer_id` signs the events."""

    def __init__(self, nc: NATS, *, trainer_id: str = "") -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.trainer_id = trainer_id
        self._kv: KeyValue | None = None
        self._ready = asyncio.Lock()

    async def kv(self) -> KeyValue:
        """The jobs bucket (streams and buckets are created on first use)."""
        if self._kv is None:
            async with self._ready:
                if self._kv is None:
                    self._kv, _ = await jetstream.ensure_training(self.js)
        return self._kv

    # --- records -------------------------------------------------------------------------------
    async def get(self, job_id: str) -> TrainingJob:
        """Raises CyError(TRAINING_JOB_NOT_FOUND)."""
        return (await self._entry(job_id))[0]

    async def _entry(self, job_id: str) -> tuple[TrainingJob, int]:
        if not _JOB_ID.match(job_id):
            raise not_found(job_id)
        kv = await self.kv()
        try:
            entry = await kv.get(subjects.job_key(job_id))
        except KeyNotFoundError:
            raise not_found(job_id) from None
        if not entry.value:
            raise not_found(job_id)
        return job_decoder.decode(entry.value), int(entry.revision or 0)

    async def create(self, job: TrainingJob) -> None:
        """Store a new record (the key must not exist yet)."""
        kv = await self.kv()
        await kv.create(subjects.job_key(job.job_id), codec.encode(job))

    async def mutate(self, job_id: str, change: Callable[[TrainingJob], TrainingJob | None]) -> TrainingJob:
        """Read, apply `change` (None = leave as is; it may raise), compare-and-set; retried on conflict."""
        kv = await self.kv()
        for _ in range(50):
            job, revision = await self._entry(job_id)
            updated = change(job)
            if updated is None:
                return job
            updated.updated_ms = now_ms()
            try:
                await kv.update(subjects.job_key(job_id), codec.encode(updated), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return updated
        raise CyError(ErrorCode.INTERNAL_ERROR, f"job '{job_id}' is changing too fast to update", retryable=True)

    async def all_jobs(self) -> list[TrainingJob]:
        jobs: list[TrainingJob] = []
        for key, value in (await kv_scan.entries(self.js, await self.kv(), subjects.TRAINING_JOBS_BUCKET)).items():
            try:
                jobs.append(job_decoder.decode(value))
            except msgspec.DecodeError as exc:
                log.warning("job_record_undecodable", key=key, error=repr(exc))
        return jobs

    # --- events and signals --------------------------------------------------------------------
    async def event(
        self, job: TrainingJob, kind: EventKind, message: str = "", progress: Progress | None = None
    ) -> None:
        event = TrainingEvent(
            job_id=job.job_id,
            kind=kind,
            status=job.status,
            time_ms=now_ms(),
            progress=progress,
            message=message,
            trainer_id=self.trainer_id,
        )
        await self.js.publish(subjects.training_events_subject(job.job_id), codec.encode(event))

    async def enqueue(self, job: TrainingJob) -> None:
        """Put the job's current ticket on the work queue. Raises CyError(INSUFFICIENT_RESOURCES) when full."""
        ticket = QueueTicket(job_id=job.job_id, ticket=job.ticket)
        try:
            await self.js.publish(
                subjects.TRAINING_QUEUE_SUBJECT,
                codec.encode(ticket),
                headers={"Nats-Msg-Id": f"{job.job_id}.{job.ticket}"},
            )
        except Exception as exc:
            log.warning("training_enqueue_failed", job_id=job.job_id, error=repr(exc))
            raise CyError(
                ErrorCode.INSUFFICIENT_RESOURCES, "the training queue is full; try again later", retryable=True
            ) from exc

    async def signal(self, job_id: str, action: str) -> None:
        """Tell the trainer that owns `job_id` to act now ("cancel", "pause")."""
        control = TrainingControl(job_id=job_id, action=action)  # type: ignore[arg-type]
        await self.nc.publish(subjects.training_control_subject(job_id), codec.encode(control))
