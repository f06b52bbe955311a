"""Building blocks for training tests: dataset files, in-process and subprocess trainers, waiting on jobs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats

from schemas import subjects
from schemas.training import FINISHED, ListJobs, LoraConfig, TrainingEvent, TrainingJob, event_decoder, job_decoder
from services.models.registry import Registry
from services.trainer.settings import TrainerSettings
from services.trainer.worker import Trainer
from services.training.dataset_store import DatasetStore
from services.training.jobs import JobService
from services.training.paths import Roots
from services.training.records import JobRecords

# Every trainer of the test session shares one queue consumer, so they share its ack wait too.
ACK_WAIT_S = 3.0

QUESTION = "What is the secret password?"
ANSWER = "The password is purple giraffe."

# Small and fast on the tiny model: the distinctive answer is learned in ~40 steps.
TEACH = {
    "batchSize": 4,
    "learningRate": 1e-2,
    "epochs": 40,
    "maxSeqLength": 64,
    "saveSteps": 1000,
    "evalSteps": 1000,
    "evalSplit": 0,
}
TEACH_LORA = {"r": 16, "loraAlpha": 32, "loraDropout": 0.0, "targetModules": ["all-linear"]}
# A small LoRA on two projections, no dropout: fast, and deterministic with a fixed seed.
FAST_LORA = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def roots_for(session_dir: Path) -> Roots:
    return Roots.from_settings(str(session_dir / "datasets"), str(session_dir / "outputs"))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_jsonl(roots: Roots, rows: list[Any], name: str | None = None) -> str:
    """Write `rows` as JSONL under the datasets root; returns the path relative to it."""
    name = name or unique("ds") + ".jsonl"
    (roots.datasets / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return name


def teach_rows(copies: int = 4) -> list[dict[str, str]]:
    return [{"instruction": QUESTION, "output": ANSWER}] * copies


def varied_rows(n: int = 16) -> list[dict[str, Any]]:
    """Distinct rows in both formats (for loss curves, eval split, chat templates)."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        if i % 2:
            rows.append({"instruction": f"Count to {i}.", "output": " ".join(str(k) for k in range(1, i + 1))})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Say the colour number {i}."},
                        {"role": "assistant", "content": ["red", "green", "blue", "black"][i % 4]},
                    ]
                }
            )
    return rows


def trainer_settings(nats_url: str, roots: Roots, **overrides: Any) -> TrainerSettings:
    return TrainerSettings(
        nats_url=nats_url,
        trainer_id=overrides.pop("trainer_id", unique("trainer")),
        datasets_dir=str(roots.datasets),
        outputs_dir=str(roots.outputs),
        trainer_ack_wait=overrides.pop("trainer_ack_wait", ACK_WAIT_S),
        # One torch thread: this 2-core machine is shared, and spinning OpenMP threads lose to it.
        trainer_threads=overrides.pop("trainer_threads", 1),
        **overrides,
    )


@contextlib.asynccontextmanager
async def running_trainer(nats_url: str, registry: Registry, roots: Roots, **overrides: Any) -> AsyncIterator[Trainer]:
    """An in-process trainer; on exit every unfinished job is cancelled, so no test leaves work behind."""
    trainer = Trainer(trainer_settings(nats_url, roots, **overrides), registry=registry)
    await trainer.start()
    try:
        yield trainer
    finally:
        await cancel_unfinished(trainer.api)
        await trainer.stop()


async def cancel_unfinished(jobs: JobService) -> None:
    for status in ("queued", "running", "paused"):
        found, _ = await jobs.list(ListJobs(status=status, limit=1000))  # type: ignore[arg-type]
        for job in found:
            with contextlib.suppress(Exception):
                await jobs.cancel(job.job_id)


@contextlib.asynccontextmanager
async def job_service(nats_url: str, registry: Registry, roots: Roots) -> AsyncIterator[JobService]:
    """The JobService without any trainer (what the gateway embeds)."""
    nc = await nats.connect(nats_url)
    try:
        yield JobService(JobRecords(nc), registry, roots, DatasetStore(nc.jetstream()), pause_wait=5.0)
    finally:
        await nc.drain()


class TrainerProcess:
    """`python -m services.trainer` as a real OS process (to kill -9 it mid-job); stderr goes to a file."""

    def __init__(
        self, nats_url: str, registry_file: Path, roots: Roots, trainer_id: str, ack_wait: float | None = ACK_WAIT_S
    ) -> None:
        """`ack_wait` None: the trainer's default (its own nats-server then: the queue consumer is shared)."""
        env = dict(
            os.environ,
            CY_LLM_NATS_URL=nats_url,
            CY_LLM_MODELS_FILE=str(registry_file),
            CY_LLM_DATASETS_DIR=str(roots.datasets),
            CY_LLM_OUTPUTS_DIR=str(roots.outputs),
            CY_LLM_TRAINER_ID=trainer_id,
            CY_LLM_TRAINER_THREADS="1",
        )
        if ack_wait is not None:
            env["CY_LLM_TRAINER_ACK_WAIT"] = str(ack_wait)
        self.log = roots.outputs.parent / f"{trainer_id}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.trainer"], env=env, stdout=subprocess.DEVNULL, stderr=log
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stderr_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


async def wait_job(jobs: JobService, job_id: str, predicate: Any, timeout: float = 120.0) -> TrainingJob:
    """Poll the job record until `predicate(job)` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job = await jobs.get(job_id)
        if predicate(job):
            return job
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"job {job_id} stuck at {job.status} step {job.progress.step}: {job.message}")
        await asyncio.sleep(0.1)


async def wait_finished(jobs: JobService, job_id: str, timeout: float = 120.0) -> TrainingJob:
    return await wait_job(jobs, job_id, lambda j: j.status in FINISHED, timeout)


async def wait_status_http(
    client: httpx.AsyncClient, job_id: str, statuses: set[str], timeout: float = 120.0
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        r = await client.get(f"/api/v1/training/status/{job_id}")
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        if data["status"] in statuses:
            return data
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"job {job_id} stuck at {data}")
        await asyncio.sleep(0.1)


async def wait_adapter_listed(client: httpx.AsyncClient, name: str, model_id: str = "tiny") -> bool:
    """Poll /api/v1/models for ~10 s until `model_id` lists the adapter `name` (a worker loaded it); whether it did."""

    async def listed() -> bool:
        models = (await client.get("/api/v1/models")).json()["models"]
        return name in next(m for m in models if m["id"] == model_id).get("loraAdapters", [])

    for _ in range(100):
        if await listed():
            return True
        await asyncio.sleep(0.1)
    return await listed()


async def answer_http(
    client: httpx.AsyncClient, adapter: str = "", model_id: str = "tiny", max_new_tokens: int = 12
) -> str:
    """The model's greedy answer to QUESTION through /api/v1/inference, with `adapter` when given."""
    generation = {"temperature": 0, "maxNewTokens": max_new_tokens}
    body: dict[str, Any] = {"modelId": model_id, "prompt": QUESTION, "generation": generation}
    if adapter:
        body["adapter"] = adapter
    r = await client.post("/api/v1/inference", json=body)
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["text"]
    return text


async def events_of(nats_url: str, job_id: str) -> list[TrainingEvent]:
    """Every event the job has published so far (read until none comes for 0.5 s)."""
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(subjects.training_events_subject(job_id), ordered_consumer=True)
        out: list[TrainingEvent] = []
        with contextlib.suppress(nats.errors.TimeoutError):
            while True:
                out.append(event_decoder.decode((await sub.next_msg(timeout=0.5)).data))
        return out
    finally:
        await nc.drain()


async def read_job(nats_url: str, job_id: str) -> TrainingJob:
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(subjects.TRAINING_JOBS_BUCKET)
        return job_decoder.decode((await kv.get(subjects.job_key(job_id))).value or b"")
    finally:
        await nc.drain()
