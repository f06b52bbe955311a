"""A dataset delete racing a training start (services/training/holders.py): `start` creates its job record, then
waits out a delete in progress, so a job never queues on a dataset that is gone. The delete in progress is played
by hand (its marker in the claims bucket) to hold the moment still; real nats-server and JobService."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js.kv import KeyValue

from schemas import subjects
from schemas.errors import CyError, ErrorCode
from schemas.training import StartTraining, TrainingJob
from services import jetstream
from services.models.registry import Registry
from services.training import holders
from services.training.jobs import JobService
from services.training.records import now_ms
from tests.helpers import NatsServer
from tests.trainer.helpers import job_service, roots_for, teach_rows, unique


@pytest.fixture
async def jobs(nats_server: NatsServer, registry: Registry, tmp_path: Path) -> AsyncIterator[JobService]:
    async with job_service(nats_server.url, registry, roots_for(tmp_path)) as service:
        yield service


async def upload_and_mark_deleting(jobs: JobService) -> tuple[str, KeyValue]:
    data = b"".join(json.dumps(row).encode() + b"\n" for row in teach_rows(2))
    dataset_id = (await jobs.datasets.put(data, "a.jsonl")).dataset_id
    claims = await jetstream.ensure_bucket(jobs.records.js, subjects.TRAINING_CLAIMS_BUCKET)
    await claims.put(holders.deleting_key(dataset_id), f"delete {now_ms()}".encode())
    return dataset_id, claims


def start(jobs: JobService, dataset_id: str) -> asyncio.Task[TrainingJob]:
    return asyncio.create_task(
        jobs.start(StartTraining(base_model="tiny", output_dir=unique("out"), dataset_id=dataset_id))
    )


async def test_a_start_that_meets_a_delete_in_progress_fails_once_the_dataset_is_gone(jobs: JobService) -> None:
    dataset_id, claims = await upload_and_mark_deleting(jobs)
    starting = start(jobs, dataset_id)
    await asyncio.sleep(0.5)
    assert not starting.done()  # its record exists; it waits for the delete to finish
    await jobs.datasets.delete(dataset_id)
    await claims.delete(holders.deleting_key(dataset_id))
    with pytest.raises(CyError) as gone:
        await starting
    assert gone.value.code is ErrorCode.DATASET_NOT_FOUND
    left = [j for j in await jobs.records.all_jobs() if j.dataset_id == dataset_id]
    assert [j.status for j in left] == ["failed"]  # never queued: no trainer will fetch a dataset that is gone
    assert left[0].error is not None and left[0].error.code is ErrorCode.DATASET_NOT_FOUND


async def test_a_start_that_meets_a_refused_delete_queues_its_job(jobs: JobService) -> None:
    dataset_id, claims = await upload_and_mark_deleting(jobs)
    starting = start(jobs, dataset_id)
    await asyncio.sleep(0.5)
    assert not starting.done()
    await claims.delete(holders.deleting_key(dataset_id))  # the delete saw the job and answered 409
    job = await starting
    try:
        assert job.status == "queued"
    finally:
        await jobs.cancel(job.job_id)


async def test_a_delete_while_another_is_in_progress_gets_409_and_a_stale_marker_is_taken_over(
    jobs: JobService,
) -> None:
    dataset_id, claims = await upload_and_mark_deleting(jobs)
    with pytest.raises(CyError) as busy:
        await holders.delete_dataset(jobs.records, jobs.datasets, dataset_id, "id")
    assert busy.value.code is ErrorCode.RESOURCE_IN_USE and busy.value.status == 409
    assert (await jobs.datasets.info(dataset_id)).dataset_id == dataset_id
    await claims.put(holders.deleting_key(dataset_id), b"delete 0")  # left by a gateway that died mid-delete
    assert (await holders.delete_dataset(jobs.records, jobs.datasets, dataset_id, "id")).dataset_id == dataset_id
    with pytest.raises(CyError) as gone:
        await jobs.datasets.info(dataset_id)
    assert gone.value.code is ErrorCode.DATASET_NOT_FOUND
