"""A trainer process killed with SIGKILL mid-job: its status says so within seconds, an idle trainer takes it over
within seconds, and the next trainer resumes from the last checkpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec

from schemas.training import TRAINER_SILENT_S, HyperParams, StartTraining, TrainingEvent, TrainingJob
from services.models.registry import Registry
from services.trainer.settings import TrainerSettings
from services.training.jobs import JobService
from services.training.paths import Roots
from tests.helpers import NatsServer, running_gateway
from tests.trainer.helpers import (
    ACK_WAIT_S,
    FAST_LORA,
    TrainerProcess,
    events_of,
    job_service,
    roots_for,
    running_trainer,
    unique,
    varied_rows,
    wait_finished,
    wait_job,
    write_jsonl,
)

# What a deployment gets (the other tests here share the session's queue consumer, at ACK_WAIT_S).
DEFAULT_ACK_WAIT_S = TrainerSettings().trainer_ack_wait

STEPS = 40
SAVE_STEPS = 10


def request(dataset: str) -> StartTraining:
    return StartTraining(
        base_model="tiny",
        output_dir=unique("out"),
        dataset_path=dataset,
        # Dropout 0 and a fixed seed: the run is deterministic, so a resumed run can be compared step by step.
        hyper_params=msgspec.convert(
            {
                "batch_size": 4,
                "learning_rate": 5e-3,
                "epochs": STEPS // 4,
                "max_seq_length": 64,
                "save_steps": SAVE_STEPS,
                "eval_split": 0,
            },
            HyperParams,
        ),
        lora_config=FAST_LORA,
    )


def losses(events: list[TrainingEvent]) -> dict[int, float]:
    return {e.progress.step: e.progress.loss or 0.0 for e in events if e.kind == "step" and e.progress}


async def test_a_trainer_killed_mid_job_leaves_it_to_the_next_which_resumes_to_the_same_step_count(
    nats_server: NatsServer, registry: Registry, registry_file: Path, jobs: JobService, roots: Roots
) -> None:
    dataset = write_jsonl(roots, varied_rows(16))

    # The uninterrupted run, for comparison.
    async with running_trainer(nats_server.url, registry, roots):
        reference = await jobs.start(request(dataset))
        assert (await wait_finished(jobs, reference.job_id)).status == "completed"
    expected = losses(await events_of(nats_server.url, reference.job_id))
    assert sorted(expected) == list(range(1, STEPS + 1))

    doomed = TrainerProcess(nats_server.url, registry_file, roots, unique("doomed"))
    try:
        job = await jobs.start(request(dataset))
        checkpoint = roots.outputs / job.output_dir / "checkpoints" / f"step-{SAVE_STEPS:06d}"
        for _ in range(1200):
            record = await jobs.get(job.job_id)
            if checkpoint.exists() and record.progress.step > SAVE_STEPS:
                break
            assert doomed.proc.poll() is None, doomed.stderr_tail()
            await asyncio.sleep(0.05)
        doomed.kill()
    finally:
        doomed.kill()
    killed_at = await jobs.get(job.job_id)
    assert killed_at.status == "running" and killed_at.progress.step < STEPS, killed_at
    saved = max(int(p.name[5:]) for p in checkpoint.parent.glob("step-*"))

    async with running_trainer(nats_server.url, registry, roots) as heir:
        done = await wait_finished(jobs, job.job_id, timeout=60 + ACK_WAIT_S)
        assert heir.current_job is None
    assert done.status == "completed", done.message
    assert done.progress.step == done.progress.total_steps == STEPS
    assert (done.attempt, done.restarts, done.owner) == (2, 1, "")
    assert done.progress.elapsed_s >= killed_at.progress.elapsed_s

    events = await events_of(nats_server.url, job.job_id)
    resumed = next(i for i, e in enumerate(events) if e.kind == "resumed")
    assert f"continuing from the checkpoint at step {saved}" in events[resumed].message
    after = [e.progress.step for e in events[resumed:] if e.kind == "step" and e.progress]
    assert after == list(range(saved + 1, STEPS + 1))  # nothing skipped, nothing beyond the total
    # Weights, optimizer, schedule and data order all came back: the loss curve continues as if never killed.
    got = losses(events[resumed:])
    for step in range(saved + 1, STEPS + 1):
        assert abs(got[step] - expected[step]) < 1e-4, (step, got[step], expected[step])
    assert events[-1].kind == "completed"


async def test_a_job_cancelled_after_its_trainer_was_killed_still_ends_with_a_cancelled_event(
    nats_server: NatsServer, registry: Registry, registry_file: Path, jobs: JobService, roots: Roots
) -> None:
    doomed = TrainerProcess(nats_server.url, registry_file, roots, unique("doomed"))
    try:
        job = await jobs.start(request(write_jsonl(roots, varied_rows(16))))
        for _ in range(1200):
            if (await jobs.get(job.job_id)).progress.step >= 2:
                break
            assert doomed.proc.poll() is None, doomed.stderr_tail()
            await asyncio.sleep(0.05)
    finally:
        doomed.kill()
    assert (await jobs.cancel(job.job_id)).status == "cancelled"
    async with running_trainer(nats_server.url, registry, roots):  # it gets the dead trainer's ticket
        deadline = asyncio.get_running_loop().time() + ACK_WAIT_S + 30
        while True:
            events = await events_of(nats_server.url, job.job_id)
            if (events and events[-1].kind == "cancelled") or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
    assert events[-1].kind == "cancelled" and [e.kind for e in events].count("cancelled") == 1, events[-3:]
    assert (await jobs.get(job.job_id)).status == "cancelled"


async def start_on_doomed_trainer(
    jobs: JobService, roots: Roots, doomed: TrainerProcess, trainer_id: str
) -> TrainingJob:
    """Start a job and wait until `doomed` trains it (a few steps done)."""
    job = await jobs.start(request(write_jsonl(roots, varied_rows(16))))
    for _ in range(1200):
        record = await jobs.get(job.job_id)
        if record.owner == trainer_id and record.progress.step >= 2:
            return record
        assert doomed.proc.poll() is None, doomed.stderr_tail()
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the doomed trainer never trained: {record}")


async def test_a_killed_trainers_job_says_within_3_s_that_its_trainer_is_gone_while_no_other_trainer_runs(
    tmp_path: Path, registry: Registry, registry_file: Path
) -> None:
    server = NatsServer(tmp_path / "nats").start()  # its own queue consumer, at the default ack wait
    roots = roots_for(tmp_path)
    doomed_id = unique("doomed")
    doomed = TrainerProcess(server.url, registry_file, roots, doomed_id, ack_wait=None)
    try:
        async with (
            job_service(server.url, registry, roots) as jobs,
            running_gateway(
                server.url, registry, datasets_dir=str(roots.datasets), outputs_dir=str(roots.outputs)
            ) as gw,
            gw.client() as client,
        ):
            job = await start_on_doomed_trainer(jobs, roots, doomed, doomed_id)
            alive = (await client.get(f"/api/v1/training/status/{job.job_id}")).json()
            assert (alive["status"], alive["trainerId"], alive["trainerAlive"]) == ("running", doomed_id, True)
            assert "stalledSinceSeconds" not in alive

            doomed.kill()
            killed = asyncio.get_running_loop().time()
            while True:
                status = (await client.get(f"/api/v1/training/status/{job.job_id}")).json()
                if not status["trainerAlive"]:
                    break
                assert asyncio.get_running_loop().time() - killed < 10, status
                await asyncio.sleep(0.1)
            noticed = asyncio.get_running_loop().time() - killed
            assert noticed <= TRAINER_SILENT_S + 0.5, noticed  # 1 s heartbeats, silent after 3
            assert status["status"] == "running" and status["trainerId"] == doomed_id
            assert status["stalledSinceSeconds"] >= TRAINER_SILENT_S
            assert f"its trainer {doomed_id} stopped sending heartbeats" in status["message"]
            assert "when a free trainer takes it over" in status["message"]

            # A trainer that comes later takes it (the message waits in the queue) and the status is live again.
            async with running_trainer(server.url, registry, roots, trainer_ack_wait=DEFAULT_ACK_WAIT_S) as heir:
                await wait_job(jobs, job.job_id, lambda j: j.owner == heir.trainer_id, timeout=30)
                status = (await client.get(f"/api/v1/training/status/{job.job_id}")).json()
                assert (status["trainerId"], status["trainerAlive"]) == (heir.trainer_id, True)
                assert "stalledSinceSeconds" not in status
    finally:
        doomed.kill()
        server.stop()


async def test_an_idle_trainer_takes_over_a_killed_trainers_job_within_5_s(
    tmp_path: Path, registry: Registry, registry_file: Path
) -> None:
    server = NatsServer(tmp_path / "nats").start()  # its own queue consumer, at the default ack wait
    roots = roots_for(tmp_path)
    doomed_id = unique("doomed")
    doomed = TrainerProcess(server.url, registry_file, roots, doomed_id, ack_wait=None)
    try:
        async with job_service(server.url, registry, roots) as jobs:
            job = await start_on_doomed_trainer(jobs, roots, doomed, doomed_id)
            async with running_trainer(server.url, registry, roots, trainer_ack_wait=DEFAULT_ACK_WAIT_S) as heir:
                doomed.kill()
                killed = asyncio.get_running_loop().time()
                taken = await wait_job(jobs, job.job_id, lambda j: j.owner == heir.trainer_id, timeout=60)
                took = asyncio.get_running_loop().time() - killed
                assert took <= 5.0, took
                assert (taken.status, taken.attempt, taken.restarts) == ("running", 2, 1)
                done = await wait_finished(jobs, job.job_id, timeout=120)
                assert done.status == "completed" and done.progress.step == STEPS, done.message
    finally:
        doomed.kill()
        server.stop()
