"""Training jobs end to end on NATS: a real trainer, a real nats-server, the tiny model."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest

from schemas import codec, subjects
from schemas.errors import ErrorCode
from schemas.training import (
    AdapterRecord,
    ErrorReply,
    HyperParams,
    JobReply,
    ListJobs,
    ListReply,
    LoraConfig,
    StartTraining,
    TrainingJob,
    adapter_decoder,
    reply_decoder,
)
from services.models.registry import Registry
from services.trainer.worker import Trainer
from services.training.jobs import JobService
from services.training.paths import Roots
from tests.helpers import NatsServer
from tests.trainer.helpers import (
    FAST_LORA,
    events_of,
    running_trainer,
    trainer_settings,
    unique,
    varied_rows,
    wait_finished,
    wait_job,
    write_jsonl,
)


def request(roots: Roots, rows: list[object] | None = None, **hp: object) -> StartTraining:
    params = {"batch_size": 4, "learning_rate": 1e-2, "epochs": 2, "max_seq_length": 64, **hp}
    return StartTraining(
        base_model="tiny",
        output_dir=unique("out"),
        dataset_path=write_jsonl(roots, rows or varied_rows(16)),
        hyper_params=msgspec.convert(params, HyperParams),
        lora_config=FAST_LORA,
    )


async def test_a_job_trains_checkpoints_evaluates_and_registers_its_adapter_as_loss_falls(
    nats_server: NatsServer, jobs: JobService, trainer: Trainer, roots: Roots
) -> None:
    req = request(roots, eval_split=0.25, epochs=4, save_steps=4, eval_steps=3)
    job = await jobs.start(req)
    assert job.status == "queued" and job.train_rows == 16
    done = await wait_finished(jobs, job.job_id)
    assert done.status == "completed", done.message
    # 16 rows, 4 held out -> 12 train rows -> 3 steps per epoch x 4 epochs.
    assert (done.progress.step, done.progress.total_steps, done.progress.epoch) == (12, 12, 4)
    assert (done.train_rows, done.eval_rows) == (12, 4)
    assert done.progress.eval_loss is not None and done.progress.tokens_per_second
    assert done.progress.elapsed_s > 0 and done.progress.eta_s == 0
    assert done.started_ms >= done.created_ms and done.completed_ms >= done.started_ms

    events = await events_of(nats_server.url, job.job_id)
    kinds = [e.kind for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "completed"
    steps = [e.progress for e in events if e.kind == "step" and e.progress]
    assert [p.step for p in steps] == list(range(1, 13))
    losses = [p.loss or 0.0 for p in steps]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert [e.progress.step for e in events if e.kind == "checkpoint" and e.progress] == [4, 8]
    assert [e.progress.step for e in events if e.kind == "eval" and e.progress] == [3, 6, 9, 12]

    adapter_dir = roots.outputs / req.output_dir / "adapter"
    assert (adapter_dir / "adapter_config.json").exists()
    kv = await jobs.records.js.key_value(subjects.ADAPTERS_BUCKET)
    record = adapter_decoder.decode((await kv.get(subjects.adapter_key("tiny", job.adapter_name))).value or b"")
    # The files travel through the object store too (the record names the object and its sha256).
    assert record.object and len(record.digest) == 64 and record.size > 0
    assert record == AdapterRecord(
        model_id="tiny",
        name=req.output_dir,
        path=str(adapter_dir),
        job_id=job.job_id,
        created_ms=record.created_ms,
        object=record.object,
        digest=record.digest,
        size=record.size,
    )


async def test_cancel_stops_a_running_job_within_one_step_and_frees_the_trainer(
    nats_server: NatsServer, jobs: JobService, trainer: Trainer, roots: Roots
) -> None:
    job = await jobs.start(request(roots, epochs=500))
    await wait_job(jobs, job.job_id, lambda j: j.progress.step >= 2)
    cancelled = await jobs.cancel(job.job_id)
    assert cancelled.status == "cancelled" and cancelled.completed_ms
    await wait_job(jobs, job.job_id, lambda j: trainer.current_job is None, timeout=10)
    for _ in range(100):  # the trainer publishes "cancelled" once its loop has stopped
        events = await events_of(nats_server.url, job.job_id)
        if events[-1].kind == "cancelled":
            break
        await asyncio.sleep(0.1)
    # "cancelled" is the job's last event: no step is reported after it, and at most the step that was
    # running when the cancel came was finished.
    assert events[-1].kind == "cancelled" and [e.kind for e in events].count("cancelled") == 1, events[-3:]
    after_cancel = [e for e in events if e.kind == "step" and e.time_ms > cancelled.completed_ms]
    assert len(after_cancel) <= 1, after_cancel
    assert (await jobs.get(job.job_id)).status == "cancelled"  # the trainer never writes over a cancel
    # The trainer is free: the next job runs.
    nxt = await jobs.start(request(roots, epochs=1))
    assert (await wait_finished(jobs, nxt.job_id)).status == "completed"


async def test_a_queued_job_cancelled_before_any_trainer_runs_is_skipped(
    nats_server: NatsServer, registry: Registry, jobs: JobService, roots: Roots
) -> None:
    job = await jobs.start(request(roots))
    assert (await jobs.cancel(job.job_id)).status == "cancelled"
    async with running_trainer(nats_server.url, registry, roots) as t:
        later = await jobs.start(request(roots, epochs=1))
        assert (await wait_finished(jobs, later.job_id)).status == "completed"
        assert t.current_job is None
    record = await jobs.get(job.job_id)
    assert record.status == "cancelled" and record.attempt == 0 and record.progress.step == 0


async def test_pause_checkpoints_and_resume_continues_from_that_step_to_the_same_total(
    nats_server: NatsServer, jobs: JobService, trainer: Trainer, roots: Roots
) -> None:
    job = await jobs.start(request(roots, epochs=10, save_steps=1000))
    await wait_job(jobs, job.job_id, lambda j: j.progress.step >= 3)
    paused = await jobs.pause(job.job_id)
    assert paused.status == "paused", paused.message
    at = paused.checkpoint_step
    assert at == paused.progress.step >= 3 and paused.owner == ""
    assert (roots.outputs / job.output_dir / "checkpoints" / f"step-{at:06d}").is_dir()
    await asyncio.sleep(0.5)
    assert (await jobs.get(job.job_id)).progress.step == at  # paused means nothing runs
    assert (await jobs.pause(job.job_id)).status == "paused"  # pausing again changes nothing

    resumed = await jobs.resume(job.job_id)
    assert resumed.status == "queued"
    done = await wait_finished(jobs, job.job_id)
    assert done.status == "completed" and done.progress.step == done.progress.total_steps == 40
    events = await events_of(nats_server.url, job.job_id)
    kinds = [e.kind for e in events]
    assert ["pause_requested", "checkpoint", "paused", "queued", "resumed"] == [
        k for k in kinds if k in ("pause_requested", "checkpoint", "paused", "queued", "resumed")
    ][1:]
    resumed_event = next(e for e in events if e.kind == "resumed")
    assert f"checkpoint at step {at}" in resumed_event.message
    steps = [e.progress.step for e in events if e.kind == "step" and e.progress]
    assert steps == list(range(1, 41))  # no step done twice, none skipped


async def test_resume_refuses_running_queued_and_finished_jobs(jobs: JobService, roots: Roots) -> None:
    from schemas.errors import CyError

    job = await jobs.start(request(roots))
    with pytest.raises(CyError) as info:
        await jobs.resume(job.job_id)
    assert info.value.code == ErrorCode.INVALID_REQUEST and "queued, not paused" in info.value.body.message
    await jobs.cancel(job.job_id)
    with pytest.raises(CyError) as info:
        await jobs.resume(job.job_id)
    assert info.value.code == ErrorCode.INVALID_REQUEST and "already cancelled" in info.value.body.message


async def test_a_dataset_broken_after_start_fails_the_job_and_the_trainer_keeps_serving(
    nats_server: NatsServer, registry: Registry, jobs: JobService, roots: Roots
) -> None:
    job = await jobs.start(request(roots))
    (roots.datasets / job.dataset_path).write_text('{"instruction": "fine", "output": "x"}\n{"instruction": 1}\n')
    async with running_trainer(nats_server.url, registry, roots) as t:
        failed = await wait_finished(jobs, job.job_id)
        assert failed.status == "failed"
        assert failed.error is not None and failed.error.code == ErrorCode.INVALID_REQUEST
        assert "row 2, field `instruction`: must be a string" in failed.message
        nxt = await jobs.start(request(roots, epochs=1))
        assert (await wait_finished(jobs, nxt.job_id)).status == "completed"
        assert t.current_job is None
    events = await events_of(nats_server.url, job.job_id)
    assert events[-1].kind == "failed" and "row 2" in events[-1].message


async def test_direct_nats_publishers_use_the_training_service_verbs(
    nats_server: NatsServer, trainer: Trainer, roots: Roots
) -> None:
    nc = await nats.connect(nats_server.url)
    try:

        async def call(verb: str, body: object) -> object:
            msg = await nc.request(subjects.training_api_subject(verb), msgspec.msgpack.encode(body), timeout=10)
            return reply_decoder.decode(msg.data)

        req = msgspec.to_builtins(request(roots, epochs=1))
        started = await call("start", req)
        assert isinstance(started, JobReply) and started.job.status == "queued"
        status = await call("status", {"job_id": started.job.job_id})
        assert isinstance(status, JobReply) and status.job.job_id == started.job.job_id
        listed = await call("list", {"limit": 1})
        assert isinstance(listed, ListReply) and listed.total >= 1 and len(listed.jobs) == 1
        missing = await call("status", {"job_id": "job-nope"})
        assert isinstance(missing, ErrorReply) and missing.error.code == ErrorCode.TRAINING_JOB_NOT_FOUND
        escape = await call("start", {**req, "dataset_path": "../../etc/passwd"})
        assert isinstance(escape, ErrorReply) and escape.error.code == ErrorCode.INVALID_REQUEST
        assert escape.error.details[0].field == "datasetPath"
        garbage = await call("start", {"base_model": 3})
        assert isinstance(garbage, ErrorReply) and garbage.error.code == ErrorCode.INVALID_REQUEST
    finally:
        await nc.drain()


async def test_list_reads_the_bucket_newest_first_with_filter_and_total_while_no_trainer_runs(
    jobs: JobService, roots: Roots
) -> None:
    mine = [await jobs.start(request(roots)) for _ in range(5)]
    for job in mine[:2]:
        await jobs.cancel(job.job_id)
    ids = [j.job_id for j in mine]
    everything, total = await jobs.list(ListJobs(limit=1000))
    assert total == len(everything)
    order = [j.job_id for j in everything if j.job_id in ids]
    assert order == ids[::-1]  # newest first
    pages: list[str] = []
    for offset in range(0, total, 2):
        page, page_total = await jobs.list(ListJobs(limit=2, offset=offset))
        assert page_total == total and len(page) <= 2
        pages.extend(j.job_id for j in page)
    assert pages == [j.job_id for j in everything]
    cancelled, n_cancelled = await jobs.list(ListJobs(status="cancelled", limit=1000))
    assert all(j.status == "cancelled" for j in cancelled) and n_cancelled == len(cancelled)
    assert set(ids[:2]) <= {j.job_id for j in cancelled}
    queued, _ = await jobs.list(ListJobs(status="queued", limit=1000))
    assert set(ids[2:]) <= {j.job_id for j in queued}
    for job in mine[2:]:
        await jobs.cancel(job.job_id)


def test_a_v1_job_record_decodes_with_defaults_for_newer_fields() -> None:
    from schemas.training import job_decoder

    old = msgspec.msgpack.encode(
        {
            "job_id": "job-1",
            "status": "queued",
            "base_model": "m",
            "model_id": "m",
            "dataset_path": "d.jsonl",
            "output_dir": "o",
        }
    )
    job = job_decoder.decode(old)
    assert job.hyper_params.batch_size == 4 and job.hyper_params.learning_rate == 2e-4
    assert job.lora_config is None and job.progress.step == 0 and job.control == ""
    assert codec.encode(job)  # and it encodes again


def test_lora_config_wins_over_the_hyper_params_copies() -> None:
    from schemas.training import EffectiveLora

    hp = HyperParams(lora_rank=64, lora_alpha=16, lora_dropout=0.05)
    assert EffectiveLora.merge(hp, None).r == 64
    merged = EffectiveLora.merge(hp, LoraConfig(r=8, lora_dropout=0.0, target_modules=["q_proj"], bias="lora_only"))
    assert (merged.r, merged.lora_alpha, merged.lora_dropout, merged.target_modules, merged.bias) == (
        8,
        16,
        0.0,
        ["q_proj"],
        "lora_only",
    )


async def test_a_trainer_that_shuts_down_checkpoints_and_requeues_its_job_for_the_next_one(
    nats_server: NatsServer, registry: Registry, jobs: JobService, roots: Roots
) -> None:
    job = await jobs.start(request(roots, epochs=10, save_steps=1000))
    first = Trainer(trainer_settings(nats_url=nats_server.url, roots=roots), registry=registry)
    await first.start()
    await wait_job(jobs, job.job_id, lambda j: j.progress.step >= 3)
    await first.stop()  # what SIGTERM does
    requeued = await jobs.get(job.job_id)
    assert requeued.status == "queued" and requeued.owner == "" and requeued.checkpoint_step >= 3
    async with running_trainer(nats_server.url, registry, roots):
        done = await wait_finished(jobs, job.job_id)
    assert done.status == "completed" and done.progress.step == 40
    assert (done.attempt, done.restarts) == (2, 0)  # a handover, not a crash
    kinds = [e.kind for e in await events_of(nats_server.url, job.job_id)]
    assert "requeued" in kinds and kinds.index("requeued") < kinds.index("resumed")


async def test_a_job_whose_trainers_keep_dying_fails_instead_of_looping(
    nats_server: NatsServer, registry: Registry, jobs: JobService, roots: Roots
) -> None:
    job = await jobs.start(request(roots))

    def ghost_owned(record: TrainingJob) -> TrainingJob:
        record.status, record.owner, record.attempt, record.restarts = "running", "ghost", 2, 1
        return record

    await jobs.records.mutate(job.job_id, ghost_owned)  # as if its trainers had died twice
    async with running_trainer(nats_server.url, registry, roots, trainer_max_restarts=1):
        failed = await wait_finished(jobs, job.job_id)
    assert failed.status == "failed" and "kept dying" in failed.message


async def test_target_modules_the_model_lacks_fail_the_job_with_a_message_naming_the_field(
    jobs: JobService, trainer: Trainer, roots: Roots
) -> None:
    req = msgspec.structs.replace(request(roots), lora_config=LoraConfig(target_modules=["nope_proj"]))
    failed = await wait_finished(jobs, (await jobs.start(req)).job_id)
    assert failed.status == "failed" and "loraConfig.targetModules" in failed.message
    assert failed.error is not None and failed.error.code == ErrorCode.INVALID_REQUEST


async def test_concurrent_starts_for_one_adapter_name_let_exactly_one_job_through(
    jobs: JobService, roots: Roots
) -> None:
    name = unique("race")
    requests = [msgspec.structs.replace(request(roots), adapter_name=name) for _ in range(6)]
    results = await asyncio.gather(*(jobs.start(r) for r in requests), return_exceptions=True)
    started = [r for r in results if isinstance(r, TrainingJob)]
    refused = [r for r in results if not isinstance(r, TrainingJob)]
    assert len(started) == 1, results
    assert all(getattr(e, "code", None) == ErrorCode.TRAINING_JOB_RUNNING for e in refused), refused
    assert all(e.body.details[0].field == "adapterName" for e in refused)  # type: ignore[union-attr]
    # A refused start does not keep the outputDir it asked for: another adapter can use it at once.
    loser = next(r for r, res in zip(requests, results, strict=True) if not isinstance(res, TrainingJob))
    other = await jobs.start(msgspec.structs.replace(loser, adapter_name=unique("other")))
    assert other.output_dir == loser.output_dir
    await jobs.cancel(other.job_id)
    # Once that job has ended, the name is free again.
    await jobs.cancel(started[0].job_id)
    again = await jobs.start(msgspec.structs.replace(request(roots), adapter_name=name))
    assert again.status == "queued" and again.adapter_name == name
    await jobs.cancel(again.job_id)
