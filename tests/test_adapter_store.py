"""Adapters through the JetStream object store: a trainer and a worker with no disk in common."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import msgspec
import nats
import pytest
from nats.js.errors import (
    KeyDeletedError,
    KeyNotFoundError,
    NotFoundError,
    ObjectDeletedError,
    ObjectNotFoundError,
)

from schemas import codec, subjects
from schemas.inference import ChatMessage, GenerateRequest, GenerationParams
from schemas.training import AdapterRecord, HyperParams, LoraConfig, StartTraining
from services import adapter_store, jetstream
from services.engine.worker import Worker
from services.models.registry import Registry
from services.trainer.worker import Trainer
from services.training.paths import Roots
from tests.helpers import NatsServer, running_gateway, running_worker, wait_until
from tests.trainer.helpers import (
    ACK_WAIT_S,
    ANSWER,
    FAST_LORA,
    QUESTION,
    TrainerProcess,
    events_of,
    job_service,
    roots_for,
    running_trainer,
    teach_rows,
    trainer_settings,
    unique,
    varied_rows,
    wait_finished,
    wait_job,
    write_jsonl,
)

GREEDY = GenerationParams(temperature=0, max_new_tokens=12)


async def answer(worker: Worker, adapter: str) -> str:
    engine = worker.engine
    ids = engine.encode(
        GenerateRequest(trace_id="t", model_id="tiny", messages=[ChatMessage(role="user", content=QUESTION)])
    )
    out: list[int] = []
    async for step in engine.generate(ids, GREEDY, adapter):
        out.extend(step.token_ids)
    return str(engine.tokenizer.decode(out, skip_special_tokens=True))


async def test_packed_folders_round_trip_with_their_digest_and_a_wrong_digest_is_refused(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "adapter_config.json").write_text('{"r": 8}')
    (source / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 1000)
    nc = await nats.connect(nats_server.url)
    try:
        store = await jetstream.ensure_adapter_files(nc.jetstream())
        model = unique("model")
        name, digest, size = await adapter_store.upload_adapter(store, model, "one", source)
        again = adapter_store.pack(source)
        again.close()
        assert again.digest == digest and size > 256_000  # deterministic: same files, same digest
        got = await adapter_store.fetch_adapter(store, name, digest, tmp_path / "cache" / "one")
        assert (got / "sub" / "weights.bin").read_bytes() == (source / "sub" / "weights.bin").read_bytes()
        with pytest.raises(ValueError, match="sha256"):
            await adapter_store.fetch_adapter(store, name, "0" * 64, tmp_path / "cache" / "two")
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["one"]  # no half-written folder
        with pytest.raises(FileNotFoundError):
            await adapter_store.fetch_adapter(store, "adapters/none.tar", "", tmp_path / "cache" / "three")

        # A checkpoint folder travels under its own name and lands beside the trainer's other checkpoints.
        checkpoint = tmp_path / "out" / "checkpoints" / "step-000007"
        shutil.copytree(source, checkpoint)
        job = unique("job")
        await adapter_store.upload_checkpoint(store, job, checkpoint)
        elsewhere = tmp_path / "other-machine" / "checkpoints"
        assert await adapter_store.fetch_checkpoint(store, job, elsewhere) == "step-000007"
        assert (elsewhere / "step-000007" / "adapter_config.json").read_text() == '{"r": 8}'
        assert [p.name for p in elsewhere.iterdir()] == ["step-000007"]
        assert await adapter_store.fetch_checkpoint(store, unique("job"), elsewhere) is None
    finally:
        await nc.drain()


async def test_an_adapter_trained_on_one_machine_is_served_by_name_from_another_and_deleted_everywhere(
    nats_server: NatsServer, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two "machines": the trainer's data folder, and the worker's; they share only NATS.
    trainer_roots: Roots = roots_for(tmp_path / "trainer-data")
    worker_data = tmp_path / "worker-data"
    name = unique("remote-bot")
    request = StartTraining(
        base_model="tiny",
        output_dir=unique("out"),
        dataset_path=write_jsonl(trainer_roots, teach_rows()),
        hyper_params=msgspec.convert(
            {"batch_size": 4, "learning_rate": 1e-2, "epochs": 40, "max_seq_length": 64, "save_steps": 20},
            HyperParams,
        ),
        lora_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["all-linear"]),
        adapter_name=name,
    )
    async with (
        job_service(nats_server.url, registry, trainer_roots) as jobs,
        running_trainer(nats_server.url, registry, trainer_roots),
    ):
        job = await jobs.start(request)
        done = await wait_finished(jobs, job.job_id, timeout=300)
        assert done.status == "completed", done
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await js.key_value(subjects.ADAPTERS_BUCKET)
        record = msgspec.msgpack.decode((await kv.get(subjects.adapter_key("tiny", name))).value or b"")
        assert record["object"] == subjects.adapter_object("tiny", name, record["digest"]) and record["size"] > 0
        store = await js.object_store(subjects.ADAPTER_FILES_BUCKET)
        # The checkpoint uploaded at step 20 was for resuming elsewhere; the job is over, so it is gone.
        with pytest.raises((ObjectNotFoundError, ObjectDeletedError)):
            await store.get(subjects.checkpoint_object(job.job_id))
        # Not even the trainer's disk is left: whatever the worker serves came through the object store.
        shutil.rmtree(trainer_roots.outputs)

        monkeypatch.setenv("CY_LLM_DATA_DIR", str(worker_data))
        async with running_worker(nats_server.url, registry, "tiny", worker_id=unique("remote-w"), slots=4) as worker:
            cache = worker_data / "adapter-cache" / f"{subjects.adapter_key('tiny', name)}-{record['digest'][:16]}"
            assert (cache / "adapter_model.safetensors").is_file()
            assert worker.engine.has_adapter(name)
            taught, base = await answer(worker, name), await answer(worker, "")
            print(f"\nadapter: {taught!r}\nbase:    {base!r}")
            assert taught.startswith(ANSWER) and taught != base

            deleted = await adapter_store.delete_adapter(js, "tiny", name)
            assert deleted is not None and deleted.object == record["object"]
            await wait_until(lambda: not worker.engine.has_adapter(name), timeout=10)
            await wait_until(lambda: not cache.exists(), timeout=10)
            with pytest.raises((ObjectNotFoundError, ObjectDeletedError)):
                await store.get(record["object"])
            assert await adapter_store.delete_adapter(js, "tiny", name) is None
    finally:
        await nc.drain()


async def test_delete_route_removes_the_record_and_the_files_and_404s_after(
    nats_server: NatsServer, registry: Registry, tmp_path: Path
) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    name = unique("doomed")
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        store = await jetstream.ensure_adapter_files(js)
        kv = await jetstream.ensure_adapters_bucket(js)
        obj, digest, size = await adapter_store.upload_adapter(store, "tiny", name, folder)
        record = AdapterRecord(
            model_id="tiny", name=name, path="/elsewhere", job_id="job-1", object=obj, digest=digest, size=size
        )
        await kv.put(subjects.adapter_key("tiny", name), codec.encode(record))
        async with running_gateway(nats_server.url, registry) as gw, gw.client() as client:
            r = await client.delete(f"/api/v1/adapters/{name}")
            assert r.status_code == 200, r.text
            assert r.json() == {"name": name, "deleted": [{"modelId": "tiny", "jobId": "job-1", "object": obj}]}
            with pytest.raises((KeyNotFoundError, KeyDeletedError)):
                await kv.get(subjects.adapter_key("tiny", name))
            with pytest.raises((ObjectNotFoundError, ObjectDeletedError)):
                await store.get(obj)
            again = await client.delete(f"/api/v1/adapters/{name}")
            assert again.status_code == 404 and again.json()["error"]["code"] == "MODEL_NOT_FOUND"
    finally:
        await nc.drain()


def two_machines(root: Path) -> tuple[Roots, Roots, StartTraining]:
    """Two trainers' folders (no shared disk; the dataset copied to both) and a job that checkpoints every 5 steps."""
    first, second = roots_for(root / "first"), roots_for(root / "second")
    dataset = write_jsonl(first, varied_rows(16))
    shutil.copy(first.datasets / dataset, second.datasets / dataset)
    request = StartTraining(
        base_model="tiny",
        output_dir=unique("out"),
        dataset_path=dataset,
        hyper_params=msgspec.convert(
            {"batch_size": 4, "learning_rate": 1e-2, "epochs": 10, "max_seq_length": 64, "save_steps": 5}, HyperParams
        ),
        lora_config=FAST_LORA,
    )
    return first, second, request


async def event_steps(nats_url: str, job_id: str) -> list[tuple[str, int]]:
    """(kind, step) of every event the job has published so far."""
    return [(e.kind, e.progress.step if e.progress else -1) for e in await events_of(nats_url, job_id)]


async def test_a_paused_job_resumes_on_a_trainer_without_its_disk_from_the_uploaded_checkpoint(
    nats_server: NatsServer, registry: Registry, tmp_path: Path
) -> None:
    first, second, request = two_machines(tmp_path)
    async with job_service(nats_server.url, registry, first) as jobs:
        trainer = Trainer(trainer_settings(nats_server.url, first), registry=registry)
        await trainer.start()  # not `running_trainer`: that one cancels the jobs it leaves unfinished
        try:
            job = await jobs.start(request)
            await wait_job(jobs, job.job_id, lambda j: j.checkpoint_step >= 5)
            await jobs.pause(job.job_id)
            paused = await wait_job(jobs, job.job_id, lambda j: j.status == "paused")
        finally:
            await trainer.stop()
        shutil.rmtree(first.outputs)  # the first machine is gone
        async with running_trainer(nats_server.url, registry, second):
            await jobs.resume(job.job_id)
            done = await wait_finished(jobs, job.job_id, timeout=300)
    assert done.status == "completed" and done.progress.step == done.progress.total_steps == 40, done
    kinds = await event_steps(nats_server.url, job.job_id)
    # The second trainer continued from the checkpoint the first one saved when pausing, not from step 0.
    assert ("resumed", paused.checkpoint_step) in kinds and paused.checkpoint_step > 0, kinds
    assert (second.outputs / request.output_dir / "adapter" / "adapter_model.safetensors").is_file()


async def test_a_trainer_killed_mid_job_is_succeeded_by_one_without_its_disk_from_the_uploaded_checkpoint(
    nats_server: NatsServer, registry: Registry, registry_file: Path, tmp_path: Path
) -> None:
    first, second, request = two_machines(tmp_path)
    nc = await nats.connect(nats_server.url)
    try:
        async with job_service(nats_server.url, registry, first) as jobs:
            doomed = TrainerProcess(nats_server.url, registry_file, first, unique("doomed"))
            try:
                job = await jobs.start(request)

                async def uploaded() -> bool:
                    with contextlib.suppress(ObjectNotFoundError, ObjectDeletedError, NotFoundError):
                        store = await nc.jetstream().object_store(subjects.ADAPTER_FILES_BUCKET)
                        await store.get_info(subjects.checkpoint_object(job.job_id))
                        return (await jobs.get(job.job_id)).progress.step > 5
                    return False

                for _ in range(2400):
                    if await uploaded():
                        break
                    assert doomed.proc.poll() is None, doomed.stderr_tail()
                    await asyncio.sleep(0.05)
            finally:
                doomed.kill()  # SIGKILL mid-job: no pause, no drain
            killed_at = await jobs.get(job.job_id)
            assert killed_at.status == "running" and killed_at.progress.step < 40, killed_at
            shutil.rmtree(first.outputs)  # the first machine is gone with its disk
            async with running_trainer(nats_server.url, registry, second):
                done = await wait_finished(jobs, job.job_id, timeout=300 + ACK_WAIT_S)
    finally:
        await nc.drain()
    kinds = await event_steps(nats_server.url, job.job_id)
    assert done.status == "completed" and done.progress.step == done.progress.total_steps == 40, done
    assert done.restarts == 1, done
    # The heir continued from a checkpoint the dead trainer had uploaded, not from step 0.
    resumed = [step for kind, step in kinds if kind == "resumed"]
    assert resumed and resumed[0] >= 5, kinds
    assert (second.outputs / request.output_dir / "adapter" / "adapter_model.safetensors").is_file()
