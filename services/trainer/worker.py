"""The trainer service: pulls one job at a time from the JetStream work queue and trains it.

While a job runs the trainer acks its queue message "in progress" and stamps the job record (`heartbeat_ms`)
every second (TRAINER_HEARTBEAT_S), so no other trainer sees the job and its status shows a live trainer; if
this process dies the status says so within TRAINER_SILENT_S, the message is delivered again `ack_wait` (4 s)
after the last in-progress ack, and the next free trainer resumes the job from its last checkpoint. Ownership
is fenced by the job record: every write is a compare-and-set that checks `owner`, so a trainer that lost its
job (it stalled past `ack_wait` and another one took over) notices at its next write (a heartbeat at the
latest) and stops without touching the files again.

The trainer also answers the training API verbs (`JobService`, services/training/jobs.py) on NATS for direct
publishers.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.object_store import ObjectStore

from schemas import codec, subjects
from schemas.errors import CyError, ErrorCode
from schemas.training import (
    TRAINER_HEARTBEAT_S,
    AdapterRecord,
    EffectiveLora,
    EventKind,
    Progress,
    TrainingJob,
    adapter_decoder,
    control_decoder,
    ticket_decoder,
)
from services import adapter_store, jetstream
from services.discovery import add_training_service
from services.metrics import MetricsServer, TrainerMetrics
from services.metrics import serve as serve_metrics
from services.models.files import ensure_model
from services.models.registry import Registry, load_registry
from services.runtime import Tasks, close_nats, connect_nats, raise_if_cancelled
from services.trainer import loop
from services.trainer.settings import TrainerSettings
from services.training.dataset_store import DatasetStore
from services.training.jobs import JobService
from services.training.paths import Roots, confine
from services.training.records import JobRecords, now_ms

log = structlog.get_logger()

# Progress is written to the job record at most this often (every event still goes to the stream).
PROGRESS_WRITE_INTERVAL_S = 0.5
# Folder (under the datasets root) of the copies of uploaded datasets, named `<id>-<digest>.<format>`.
DATASETS_CACHE = ".uploaded"


class _Bridge:
    """The training thread's view of the job (`loop.Control`); everything crosses threads here."""

    def __init__(self, trainer: Trainer, job: TrainingJob) -> None:
        self.job = job
        self.request: loop.Request | None = None
        self.reports: asyncio.Queue[tuple[EventKind, Progress, str] | None] = asyncio.Queue()
        self.output_path: Path | None = None  # known once the job's plan is made
        self._loop = asyncio.get_running_loop()
        self._trainer = trainer

    def requested(self) -> loop.Request | None:
        return self.request

    def ask(self, request: loop.Request) -> None:
        # "lost" and "cancel" win over "pause"/"stop": never checkpoint into a directory we no longer own.
        if self.request not in ("lost", "cancel"):
            self.request = request

    def report(self, kind: EventKind, progress: Progress, message: str = "") -> None:
        snapshot = msgspec.structs.replace(progress)
        self._loop.call_soon_threadsafe(self.reports.put_nowait, (kind, snapshot, message))


class Trainer:
    """`async with Trainer(settings) as t: ...`; `stop()` checkpoints the running job and requeues it."""

    def __init__(self, settings: TrainerSettings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.trainer_id = settings.trainer_id or f"trainer-{socket.gethostname()}-{os.getpid()}"
        self.registry = registry or load_registry()
        self.roots = Roots.from_settings(settings.datasets_dir, settings.outputs_dir)
        self.nc: NATS | None = None
        self.records: JobRecords
        self.datasets: DatasetStore
        self.api: JobService
        self._files: ObjectStore
        self._bridge: _Bridge | None = None
        self._tasks = Tasks()
        self._stopping = False
        self._stopped = asyncio.Event()
        self.metrics = TrainerMetrics(self.trainer_id, lambda: self.current_job)
        self._metrics_server: MetricsServer | None = None

    @property
    def current_job(self) -> str | None:
        return self._bridge.job.job_id if self._bridge else None

    async def __aenter__(self) -> Trainer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        structlog.contextvars.bind_contextvars(trainer_id=self.trainer_id)
        self.nc = await connect_nats(
            self.settings, name=f"cy-trainer-{self.trainer_id}", role="trainer", reconnected=self._reensure
        )
        js = self.nc.jetstream()
        self.records = JobRecords(self.nc, trainer_id=self.trainer_id)
        self.datasets = DatasetStore(js)
        self.api = JobService(self.records, self.registry, self.roots, self.datasets)
        await self.records.kv()
        _, self._adapters = await jetstream.ensure_training(js)
        self._files = await jetstream.ensure_adapter_files(js)
        await jetstream.ensure_training_consumer(js, self.settings.trainer_ack_wait)
        self._queue = await js.pull_subscribe_bind(
            durable=subjects.TRAINING_QUEUE_CONSUMER, stream=subjects.TRAINING_QUEUE_STREAM
        )
        self._metrics_server = serve_metrics(
            self.metrics.registry, self.settings.metrics_host, self.settings.metrics_port
        )
        # The training API verbs, registered as the NATS micro service `cy-llm-training` (discovery.py).
        await add_training_service(
            self.nc,
            self.api.handle,
            trainer_id=self.trainer_id,
            metrics_url=self._metrics_server.url if self._metrics_server else "",
        )
        await self.nc.subscribe(subjects.TRAINING_CONTROL_ALL, cb=self._on_control)
        self._tasks.spawn(self._pull_loop(), name="pull")
        log.info("trainer_ready", datasets=str(self.roots.datasets), outputs=str(self.roots.outputs))

    async def _reensure(self) -> None:
        """After a reconnect: the server may have come back without its store; re-create what we use."""
        assert self.nc is not None
        js = self.nc.jetstream()
        await jetstream.ensure_training_after_reconnect(js)
        await jetstream.ensure_training_consumer(js, self.settings.trainer_ack_wait)
        self._files = await jetstream.ensure_adapter_files(js)

    async def stop(self) -> None:
        """Checkpoint and requeue the running job (bounded by trainer_drain_timeout), then disconnect.
        Idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self._bridge is not None:
            self._bridge.ask("stop")
        await self._tasks.close(timeout=self.settings.trainer_drain_timeout)
        if self.nc is not None and not self.nc.is_closed:
            # A pull answered after its fetch gave up (a 408, or a job: delivered again later) would hold
            # drain() for its whole timeout: drop the pull subscription first.
            try:
                await self._queue.unsubscribe()
            except Exception:
                pass
        await close_nats(self.nc)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.close)
        self._stopped.set()
        log.info("trainer_stopped")

    # --- queue ---------------------------------------------------------------------------------
    async def _pull_loop(self) -> None:
        while not self._stopping:
            try:
                msgs = await self._queue.fetch(1, timeout=1.0)
            except (TimeoutError, NatsTimeoutError):
                continue
            except Exception as exc:
                log.warning("training_pull_failed", error=repr(exc))
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                if self._stopping:
                    await msg.nak()
                    continue
                try:
                    await self._take(msg)
                except Exception:  # the trainer keeps serving whatever one job did
                    log.exception("training_job_crashed")

    async def _take(self, msg: Msg) -> None:
        try:
            ticket = ticket_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("training_ticket_undecodable", error=repr(exc))
            await msg.term()
            return
        try:
            job = await self.records.get(ticket.job_id)
        except CyError:
            await msg.ack()
            return
        if ticket.ticket != job.ticket or job.status not in ("queued", "running"):
            log.info("training_ticket_stale", job_id=job.job_id, status=job.status)
            if job.status == "cancelled" and job.control == "cancel" and ticket.ticket == job.ticket:
                # Cancelled while running, and its trainer never acked the ticket: that trainer died before it
                # could write the job's last event, so it falls to us.
                await self.records.event(
                    job, "cancelled", "cancelled while running; its trainer had stopped", job.progress
                )
            await msg.ack()
            return
        if job.status == "running" and job.restarts >= self.settings.trainer_max_restarts:
            error = CyError(
                ErrorCode.INTERNAL_ERROR, f"gave up after {job.attempt} attempts: its trainers kept dying mid-job"
            )
            await self._finish_failed(job.job_id, error, force=True)
            await msg.ack()
            return
        claimed = await self.records.mutate(job.job_id, lambda j: self._claim(j, ticket.ticket))
        if claimed.owner != self.trainer_id or claimed.status != "running":
            await msg.ack()
            return
        structlog.contextvars.bind_contextvars(job_id=job.job_id)
        try:
            await self._run(claimed, msg)
        finally:
            structlog.contextvars.unbind_contextvars("job_id")

    def _claim(self, job: TrainingJob, ticket: int) -> TrainingJob | None:
        if job.ticket != ticket or job.status not in ("queued", "running"):
            return None
        if job.status == "running":  # its trainer died or stalled past the ack wait
            job.restarts += 1
        job.status, job.owner, job.attempt = "running", self.trainer_id, job.attempt + 1
        job.started_ms, job.heartbeat_ms = job.started_ms or now_ms(), now_ms()
        job.message = "Training job is running"
        return job

    # --- one job -------------------------------------------------------------------------------
    async def _run(self, job: TrainingJob, msg: Msg) -> None:
        bridge = self._bridge = _Bridge(self, job)
        if job.control:
            bridge.ask(job.control)  # a pause asked for before a dead trainer could act on it
        keepalive = self._tasks.spawn(self._keep_alive(msg, bridge), name="keepalive")
        pump = self._tasks.spawn(self._pump(bridge), name="progress")
        outcome: loop.Outcome | None = None
        error: CyError | None = None
        try:
            fetched = await self._fetch_dataset(job)
            plan = await asyncio.to_thread(self._plan, job, fetched)
            bridge.output_path = plan.output_path
            await self._fetch_checkpoint(job, plan.output_path)
            outcome = await asyncio.to_thread(loop.run, plan, bridge)
        except CyError as exc:
            error = exc
        except (MemoryError, RuntimeError) as exc:
            error = loop.wire_error(exc)
            log.exception("training_failed")
        except Exception as exc:
            error = CyError(ErrorCode.INTERNAL_ERROR, f"training failed: {type(exc).__name__}: {exc}")
            log.exception("training_failed")
        finally:
            bridge.reports.put_nowait(None)
            await pump
            self.metrics.job_done(job.job_id)
            keepalive.cancel()
            self._bridge = None
        if bridge.request == "lost":
            log.warning("training_job_lost", job_id=job.job_id)
            return  # another trainer owns the job and its message now
        if error is not None or (outcome is not None and outcome.result in ("completed", "cancelled")):
            await self._forget_checkpoint(job.job_id)
        if error is not None:
            await self._finish_failed(job.job_id, error)
            await msg.ack()
            return
        assert outcome is not None
        await self._finish(job, outcome, msg)

    async def _fetch_dataset(self, job: TrainingJob) -> Path | None:
        """An uploaded dataset, copied from the object store into this trainer's own datasets folder (no disk
        is shared with the gateway); None for a `datasetPath` job. Raises CyError."""
        if not job.dataset_id:
            return None
        return await self.datasets.fetch(job.dataset_id, job.dataset_digest, self.roots.datasets / DATASETS_CACHE)

    def _plan(self, job: TrainingJob, fetched: Path | None = None) -> loop.Plan:
        """Resolve the model and re-check the paths against this trainer's roots. Raises CyError."""
        spec = self.registry.models.get(job.model_id)
        if spec is None:
            raise CyError(ErrorCode.MODEL_NOT_FOUND, f"model '{job.model_id}' is not in this trainer's registry")
        try:
            model_path = ensure_model(spec)
        except FileNotFoundError as exc:
            raise CyError(ErrorCode.MODEL_NOT_READY, str(exc)) from exc
        return loop.Plan(
            job_id=job.job_id,
            model_path=str(model_path),
            max_model_len=spec.max_model_len,
            dataset_file=fetched or confine(self.roots.datasets, job.dataset_path, "datasetPath"),
            output_path=confine(self.roots.outputs, job.output_dir, "outputDir"),
            hp=job.hyper_params,
            lora=EffectiveLora.merge(job.hyper_params, job.lora_config),
            attempt=job.attempt,
            elapsed_s=job.progress.elapsed_s,
            device=self.settings.trainer_device,
            threads=self.settings.trainer_threads,
        )

    async def _keep_alive(self, msg: Msg, bridge: _Bridge) -> None:
        """In-progress acks (the queue keeps the job from other trainers) and the record's heartbeat (its
        status shows a live trainer); a heartbeat refused because the job changed hands is obeyed at once."""
        interval = min(TRAINER_HEARTBEAT_S, self.settings.trainer_ack_wait / 3)

        def beat(job: TrainingJob) -> TrainingJob | None:
            if job.owner != self.trainer_id or job.status != "running":
                return None
            job.heartbeat_ms = now_ms()
            return job

        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
                self._obey(bridge, await self.records.mutate(bridge.job.job_id, beat))
            except Exception as exc:  # disconnected: keep trying, the client reconnects
                log.warning("training_keepalive_failed", error=repr(exc))
            # The job's end cancels this task; nats-py's wait_for can swallow that cancel (services/runtime.py),
            # and this loop then beat on until the trainer's drain ran out (60 s at every stop after a job).
            raise_if_cancelled()

    async def _pump(self, bridge: _Bridge) -> None:
        """Reports from the training thread -> events stream, and (throttled) -> the job record."""
        loop_time = asyncio.get_running_loop().time
        last_write = 0.0
        while True:
            item = await bridge.reports.get()
            if item is None:
                return
            kind, progress, message = item
            if kind == "checkpoint" and bridge.output_path is not None:
                # Awaited here, so the checkpoint a stopping trainer saves is uploaded before the job is requeued.
                await self._upload_checkpoint(bridge.job.job_id, bridge.output_path, progress.step)
            try:
                self.metrics.observe_progress(bridge.job.job_id, kind, progress.step, progress.elapsed_s, progress.loss)
                await self.records.event(bridge.job, kind, message, progress)
                # Not throttled: every event but "step", so a saved checkpoint shows in the record at once.
                if kind != "step" or loop_time() - last_write >= PROGRESS_WRITE_INTERVAL_S:
                    last_write = loop_time()
                    # These events' step is the last checkpoint's (loop.Control.report).
                    checkpoint = progress.step if kind in ("checkpoint", "started", "resumed") else None
                    await self._write_progress(bridge, progress, message if kind != "step" else "", checkpoint)
            except Exception as exc:
                log.warning("training_progress_failed", error=repr(exc))

    async def _write_progress(
        self, bridge: _Bridge, progress: Progress, message: str, checkpoint_step: int | None
    ) -> None:
        def change(job: TrainingJob) -> TrainingJob | None:
            if job.owner != self.trainer_id or job.status != "running":
                return None
            job.progress = progress
            if checkpoint_step is not None:
                job.checkpoint_step = checkpoint_step
            if message:
                job.message = message
            return job

        job = await self.records.mutate(bridge.job.job_id, change)
        self._obey(bridge, job)

    def _obey(self, bridge: _Bridge, job: TrainingJob) -> None:
        if job.status == "cancelled":
            bridge.ask("cancel")
        elif job.owner != self.trainer_id or job.status != "running":
            bridge.ask("lost")
        elif job.control:
            bridge.ask(job.control)

    async def _on_control(self, msg: Msg) -> None:
        bridge = self._bridge
        if bridge is None or subjects.job_of_control(msg.subject) != bridge.job.job_id:
            return
        try:
            control_decoder.decode(msg.data)
            self._obey(bridge, await self.records.get(bridge.job.job_id))
        except Exception as exc:
            log.warning("training_control_failed", error=repr(exc))

    # --- endings -------------------------------------------------------------------------------
    async def _finish(self, job: TrainingJob, outcome: loop.Outcome, msg: Msg) -> None:
        result = outcome.result
        if result == "cancelled":
            await msg.ack()
            record = await self.records.get(job.job_id)
            await self.records.event(
                record, "cancelled", f"cancelled while running, after step {outcome.progress.step}", outcome.progress
            )
            log.info("training_job_cancelled", step=outcome.progress.step)
            return
        if result == "completed" and outcome.adapter_path is not None:
            await self._register_adapter(job, outcome.adapter_path)
        status, kind, message = {
            "completed": ("completed", "completed", "Training job has completed"),
            "paused": ("paused", "paused", f"Training job has been paused at step {outcome.checkpoint_step}"),
            "stopped": ("queued", "requeued", "The trainer shut down; the job waits for the next trainer"),
        }[result]

        def change(record: TrainingJob) -> TrainingJob | None:
            if record.owner != self.trainer_id or record.status != "running":
                return None
            record.status, record.message, record.progress = status, message, outcome.progress  # type: ignore[assignment]
            record.checkpoint_step, record.control = outcome.checkpoint_step, ""
            record.train_rows, record.eval_rows = outcome.train_rows, outcome.eval_rows
            if status == "completed":
                record.completed_ms = now_ms()
            if status != "running":
                record.owner = ""
            return record

        record = await self.records.mutate(job.job_id, change)
        if record.status == status:
            await self.records.event(record, kind, message, outcome.progress)  # type: ignore[arg-type]
        if result == "stopped":
            await msg.nak()
        else:
            await msg.ack()
        log.info("training_job_" + kind, step=outcome.progress.step, total=outcome.progress.total_steps)

    async def _register_adapter(self, job: TrainingJob, path: Path) -> None:
        """Upload the adapter's files to the object store, then register it (workers fetch it from there)."""
        key = subjects.adapter_key(job.model_id, job.adapter_name)
        obj, digest, size = await adapter_store.upload_adapter(self._files, job.model_id, job.adapter_name, path)
        try:
            previous = adapter_decoder.decode((await self._adapters.get(key)).value or b"")
        except (KeyNotFoundError, KeyDeletedError, msgspec.DecodeError, msgspec.ValidationError):
            previous = None
        record = AdapterRecord(
            model_id=job.model_id,
            name=job.adapter_name,
            path=str(path),
            job_id=job.job_id,
            created_ms=now_ms(),
            object=obj,
            digest=digest,
            size=size,
        )
        await self._adapters.put(key, codec.encode(record))
        if previous is not None and previous.object and previous.object != obj:
            await adapter_store.delete(self._files, previous.object)  # the version this one replaces
        log.info("adapter_registered", model_id=job.model_id, adapter=job.adapter_name, path=str(path), object=obj)

    # --- checkpoints in the object store (resume on a trainer without this one's disk) -------------
    async def _upload_checkpoint(self, job_id: str, output_path: Path, step: int) -> None:
        folder = output_path / loop.CHECKPOINTS / f"step-{step:06d}"
        try:
            await adapter_store.upload_checkpoint(self._files, job_id, folder)
        except Exception as exc:  # the local checkpoint still serves a resume on this trainer
            log.warning("checkpoint_upload_failed", checkpoint=folder.name, error=repr(exc))

    async def _fetch_checkpoint(self, job: TrainingJob, output_path: Path) -> None:
        """A job that was checkpointed elsewhere: fetch that checkpoint unless this disk already has it."""
        if not job.checkpoint_step:
            return
        local = output_path / loop.CHECKPOINTS / f"step-{job.checkpoint_step:06d}"
        if (local / loop.STATE_FILE).exists():
            return
        try:
            await adapter_store.fetch_checkpoint(self._files, job.job_id, output_path / loop.CHECKPOINTS)
        except Exception as exc:  # then it starts from whatever this disk has (or step 0)
            log.warning("checkpoint_fetch_failed", error=repr(exc))

    async def _forget_checkpoint(self, job_id: str) -> None:
        try:
            await adapter_store.delete(self._files, subjects.checkpoint_object(job_id))
        except Exception as exc:
            log.warning("checkpoint_delete_failed", error=repr(exc))

    async def _finish_failed(self, job_id: str, error: CyError, *, force: bool = False) -> None:
        """Fail the job this trainer owns (`force`: whoever owned it, for a job nobody can finish)."""

        def change(record: TrainingJob) -> TrainingJob | None:
            if record.status not in ("running", "queued") or not (force or record.owner == self.trainer_id):
                return None
            record.status, record.error, record.message = "failed", error.body, error.body.message
            record.completed_ms, record.owner, record.control = now_ms(), "", ""
            return record

        record = await self.records.mutate(job_id, change)
        if record.status == "failed":
            await self.records.event(record, "failed", error.body.message, record.progress)
        log.warning("training_job_failed", job_id=job_id, code=error.code.value, error=error.body.message)
