"""/v1/files and /v1/fine_tuning/jobs with the official openai SDK: upload, fine-tune on the tiny model for real,
read the events, then chat with `fine_tuned_model`."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from services.models.registry import Registry
from services.trainer.worker import Trainer
from tests.gateway.conftest import sdk
from tests.helpers import Gateway, NatsServer
from tests.trainer.helpers import ANSWER, QUESTION, roots_for, running_trainer, unique

CHAT_ROWS = [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}] * 4


@pytest.fixture
async def client(gw: Gateway) -> AsyncIterator[AsyncOpenAI]:
    async with sdk(gw.lite_url) as c:
        yield c


@pytest.fixture
async def trainer(nats_server: NatsServer, registry: Registry, tmp_path: Path) -> AsyncIterator[Trainer]:
    # Its own disk: the file reaches it through the object store only.
    async with running_trainer(nats_server.url, registry, roots_for(tmp_path / "trainer")) as t:
        yield t


def jsonl(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


async def test_the_sdk_uploads_fine_tunes_and_chats_with_the_fine_tuned_model(
    client: AsyncOpenAI, trainer: Trainer
) -> None:
    data = jsonl(CHAT_ROWS)
    uploaded = await client.files.create(file=("password.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert uploaded.object == "file" and uploaded.purpose == "fine-tune" and uploaded.status == "processed"
    assert uploaded.bytes == len(data) and uploaded.filename == "password.jsonl"
    assert (await client.files.retrieve(uploaded.id)).id == uploaded.id
    assert uploaded.id in [f.id for f in (await client.files.list()).data]
    assert (await client.files.content(uploaded.id)).content == data

    suffix = unique("pw")
    job = await client.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        suffix=suffix,
        hyperparameters={"n_epochs": 40, "batch_size": 4, "learning_rate_multiplier": 50},
    )
    assert job.object == "fine_tuning.job" and job.status == "queued" and job.fine_tuned_model is None
    assert job.training_file == uploaded.id and job.model == "tiny"
    assert job.hyperparameters.n_epochs == 40 and job.hyperparameters.learning_rate_multiplier == 50
    assert job.id in [j.id for j in (await client.fine_tuning.jobs.list(limit=100)).data]

    for _ in range(1200):
        job = await client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        await asyncio.sleep(0.1)
    assert job.status == "succeeded", job
    assert job.fine_tuned_model and suffix in job.fine_tuned_model and job.finished_at

    events = (await client.fine_tuning.jobs.list_events(job.id, limit=100)).data
    assert events[0].message == "Training job has completed"  # newest first
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 40 and metrics[0].data["step"] == 40  # type: ignore[index]
    page = await client.fine_tuning.jobs.list_events(job.id, limit=2, after=events[0].id)
    assert [e.id for e in page.data] == [e.id for e in events[1:3]]

    model = job.fine_tuned_model
    for _ in range(100):
        if model in [m.id for m in (await client.models.list()).data]:
            break
        await asyncio.sleep(0.1)
    reply = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12
    )
    # The default LoRA settings (q/v only, rank 64, alpha 16) learn the distinctive word in 40 steps; the
    # exact sentence needs /api/v1's loraConfig (tests/gateway/test_training_api.py).
    assert "purple" in (reply.choices[0].message.content or ""), reply
    base = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12
    )
    assert "purple" not in (base.choices[0].message.content or "")


async def test_sdk_errors_are_openai_shaped(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve("ds-" + "0" * 24)
    with pytest.raises(openai.NotFoundError):
        await client.fine_tuning.jobs.retrieve("job-nope")
    with pytest.raises(openai.BadRequestError) as bad_file:
        await client.fine_tuning.jobs.create(model="tiny", training_file="ds-" + "0" * 24)
    assert bad_file.value.param == "training_file"
    with pytest.raises(openai.BadRequestError) as bad_row:
        await client.files.create(file=("bad.jsonl", io.BytesIO(b'{"messages": []}\n')), purpose="fine-tune")
    assert bad_row.value.param == "file[row 1].messages" and "row 1" in bad_row.value.message
    with pytest.raises(openai.BadRequestError) as bad_purpose:
        await client.files.create(file=("a.jsonl", io.BytesIO(jsonl(CHAT_ROWS))), purpose="assistants")
    assert bad_purpose.value.param == "purpose"
    uploaded = await client.files.create(file=("a.jsonl", io.BytesIO(jsonl(CHAT_ROWS))), purpose="fine-tune")
    deleted = await client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        await client.files.delete(uploaded.id)


async def test_a_queued_fine_tuning_job_can_be_cancelled(client: AsyncOpenAI) -> None:
    uploaded = await client.files.create(file=("a.jsonl", io.BytesIO(jsonl(CHAT_ROWS))), purpose="fine-tune")
    job = await client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)  # no trainer running
    cancelled = await client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    messages = [e.message for e in (await client.fine_tuning.jobs.list_events(job.id)).data]
    assert messages[0].startswith("cancelled"), messages


async def test_deleting_a_file_that_a_queued_fine_tuning_job_uses_is_a_409_conflict_until_it_is_cancelled(
    client: AsyncOpenAI,
) -> None:
    uploaded = await client.files.create(file=("a.jsonl", io.BytesIO(jsonl(CHAT_ROWS))), purpose="fine-tune")
    job = await client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)  # no trainer running
    try:
        with pytest.raises(openai.ConflictError) as conflict:
            await client.files.delete(uploaded.id)
        assert conflict.value.status_code == 409 and conflict.value.code == "resource_in_use"
        error = conflict.value.response.json()["error"]
        assert job.id in error["message"] and uploaded.id in error["message"]
        assert error == {
            "message": error["message"],
            "type": "invalid_request_error",
            "param": "file_id",
            "code": "resource_in_use",
        }
    finally:
        await client.fine_tuning.jobs.cancel(job.id)
    assert (await client.files.delete(uploaded.id)).deleted
