"""What active training jobs hold: the uploaded dataset a job trains from and the adapter name it trains into,
read from the job records (the jobs KV bucket, the source of truth), so that deleting either while a queued,
running or paused job needs it is refused with 409 RESOURCE_IN_USE naming those jobs.

A dataset delete and a `start` naming that dataset may run at the same moment (in two gateways). Each writes
before it reads: the delete puts a marker in the claims bucket (`dataset.<id>`) and then reads the job records;
`start` creates its job record and then reads the marker (`wait_dataset_kept`), waiting out a delete in progress
before it checks that the dataset is still there. Either the delete sees the new job (409), or `start` sees the
delete (the job fails at once and `start` answers DATASET_NOT_FOUND): a job never queues on a deleted dataset.
Adapter names need no such care: a job that starts training into a name just deleted writes it anew when done.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas import subjects
from schemas.errors import CyError, ErrorCode, ErrorDetail, in_use
from schemas.training import FINISHED, TrainingJob
from services import jetstream
from services.training.dataset_store import DatasetInfo, DatasetStore
from services.training.records import JobRecords, now_ms

# A delete marker older than this was left by a gateway that died mid-delete: ignored, taken over.
DELETE_GRACE_MS = 30_000
# How long `start` waits for a delete in progress to finish (a delete takes milliseconds).
DELETE_WAIT_S = 10.0


def deleting_key(dataset_id: str) -> str:
    """The claims-bucket key of a delete of `dataset_id` in progress (value `delete <ms>`)."""
    return f"dataset.{dataset_id}"


async def _active(records: JobRecords, holds: Callable[[TrainingJob], bool]) -> list[TrainingJob]:
    jobs = [j for j in await records.all_jobs() if j.status not in FINISHED and holds(j)]
    return sorted(jobs, key=lambda j: j.job_id)


def _refusal(what: str, field: str, jobs: list[TrainingJob], doing: str) -> CyError:
    ids = ", ".join(j.job_id for j in jobs)
    return in_use(
        field,
        f"{what} is in use by training job(s) {ids}; cancel them or wait until they end",
        [f"training job {j.job_id} ({j.status}) {doing}" for j in jobs],
    )


async def refuse_if_trained_into(records: JobRecords, name: str) -> None:
    """Raises CyError(RESOURCE_IN_USE) when an active job trains adapter `name` (for any base model)."""
    jobs = await _active(records, lambda j: j.adapter_name == name)
    if jobs:
        raise _refusal(f"Adapter '{name}'", "name", jobs, "trains into it")


async def delete_dataset(records: JobRecords, datasets: DatasetStore, dataset_id: str, field: str) -> DatasetInfo:
    """Delete an uploaded dataset unless an active job trains from it. Raises CyError: DATASET_NOT_FOUND,
    RESOURCE_IN_USE (409: a job uses it, or another request is deleting it right now)."""
    await datasets.info(dataset_id, field=field)
    claims = await jetstream.ensure_bucket(records.js, subjects.TRAINING_CLAIMS_BUCKET)
    key = deleting_key(dataset_id)
    busy = in_use(field, f"Dataset '{dataset_id}' is being deleted by another request", ["being deleted"])
    revision = await _mark(claims, key, busy)
    try:
        jobs = await _active(records, lambda j: j.dataset_id == dataset_id)
        if jobs:
            raise _refusal(f"Dataset '{dataset_id}'", field, jobs, "trains from it")
        return await datasets.delete(dataset_id, field=field)
    finally:
        with contextlib.suppress(Exception):  # a marker left behind goes stale after DELETE_GRACE_MS
            await claims.delete(key, last=revision)


async def _mark(claims: KeyValue, key: str, busy: CyError) -> int:
    """Put this delete's marker (compare-and-set, as `JobService._claim` does); `busy` when another is young."""
    value = f"delete {now_ms()}".encode()
    for _ in range(5):
        try:
            return int(await claims.create(key, value))
        except KeyWrongLastSequenceError:
            pass
        try:
            entry = await claims.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            continue
        if _young(entry.value):
            raise busy
        try:
            return int(await claims.update(key, value, last=entry.revision))
        except KeyWrongLastSequenceError:
            continue
    raise busy


def _young(value: bytes | None) -> bool:
    since = (value or b"").decode().rpartition(" ")[2]
    return since.isdigit() and now_ms() - int(since) < DELETE_GRACE_MS


async def _being_deleted(claims: KeyValue, dataset_id: str) -> bool:
    try:
        entry = await claims.get(deleting_key(dataset_id))
    except (KeyNotFoundError, KeyDeletedError):
        return False
    return _young(entry.value)


async def wait_dataset_kept(claims: KeyValue, datasets: DatasetStore, dataset_id: str) -> None:
    """For `start`, once its job record exists: wait out a delete of the dataset in progress, then check that the
    dataset is still there. Raises CyError(DATASET_NOT_FOUND)."""
    deadline = time.monotonic() + DELETE_WAIT_S
    while await _being_deleted(claims, dataset_id):
        if time.monotonic() > deadline:
            raise CyError(
                ErrorCode.DATASET_NOT_FOUND,
                f"Dataset '{dataset_id}' is being deleted",
                details=[ErrorDetail(type="dataset_not_found", field="datasetId", description="being deleted")],
            )
        await asyncio.sleep(0.05)
    await datasets.info(dataset_id, field="datasetId")
