"""`JobService`: the training API verbs over the job records (records.py): start, status, list, cancel, pause,
resume.

Used in-process by the gateway (so status and list work while every trainer is busy or down) and served
on NATS request/reply by the trainers (`subjects.training_api_subject(verb)`, queue group
`subjects.TRAINING_API_GROUP`) for direct publishers. The record in the KV bucket is the source of
truth; every change is a compare-and-set on its revision (`JobRecords.mutate`), so the API and the trainer
that owns a job never overwrite each other.

State changes: start -> queued; trainer: queued -> running -> completed | failed | paused (pause) |
queued (trainer shut down); cancel: queued | running | paused -> cancelled; pause: queued -> paused,
running -> (control "pause", the trainer checkpoints) -> paused; resume: paused -> queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas import subjects
from schemas.errors import CyError, ErrorCode, ErrorDetail, invalid
from schemas.training import (
    API_VERBS,
    FINISHED,
    ErrorReply,
    HyperParams,
    JobRef,
    JobReply,
    ListJobs,
    ListReply,
    StartTraining,
    TrainingJob,
    TrainingReply,
)
from services import jetstream
from services.models.registry import Registry
from services.training import datasets, holders
from services.training.dataset_store import DatasetStore
from services.training.paths import Roots, confine
from services.training.records import JobRecords, now_ms

log = structlog.get_logger()

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
ACTIVE = frozenset({"queued", "running", "paused"})
# A claim whose job record does not exist yet counts as active this long (its `start` is still running).
CLAIM_GRACE_MS = 60_000
# How long `pause` waits for the trainer to checkpoint and confirm before it answers anyway.
PAUSE_WAIT_S = 30.0


def finished(job: TrainingJob, verb: str) -> CyError:
    """Cancel/pause/resume of a finished job: a 400 INVALID_REQUEST (TRAINING_JOB_RUNNING means the opposite)."""
    return CyError(
        ErrorCode.INVALID_REQUEST,
        f"Training job '{job.job_id}' is already {job.status}; it cannot be {verb}",
        details=[ErrorDetail(type="job_finished", field="jobId", description=f"the job is {job.status}")],
    )


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


def derive_adapter_name(output_path: Path, job_id: str) -> str:
    name = _NAME_CHARS.sub("-", output_path.name).strip("-_")[:64]
    return name or job_id


class JobService:
    """The API verbs. `records` is the record store they write through (the trainer serving them on NATS passes
    its own, whose events carry its id); `datasets` holds the uploaded datasets a job may name."""

    def __init__(
        self,
        records: JobRecords,
        registry: Registry,
        roots: Roots,
        datasets: DatasetStore,
        *,
        pause_wait: float = PAUSE_WAIT_S,
    ) -> None:
        self.records = records
        self.registry = registry
        self.roots = roots
        self.datasets = datasets
        self.pause_wait = pause_wait
        self._claims: KeyValue | None = None

    async def get(self, job_id: str) -> TrainingJob:
        """The status verb. Raises CyError(TRAINING_JOB_NOT_FOUND)."""
        return await self.records.get(job_id)

    # --- verbs ---------------------------------------------------------------------------------
    async def start(self, req: StartTraining) -> TrainingJob:
        """Validate and queue. Raises CyError: MODEL_NOT_FOUND (404), INVALID_REQUEST (400: bad path, bad
        dataset naming its row and field), DATASET_NOT_FOUND (404: unknown datasetId, or one deleted while the
        job was being started: the job is then recorded as failed), TRAINING_JOB_RUNNING (400: an active job
        already writes this outputDir or trains this adapter), INSUFFICIENT_RESOURCES (503: queue full)."""
        model_id = self._resolve_model(req.base_model)
        if bool(req.dataset_path) == bool(req.dataset_id):
            field = "datasetId" if req.dataset_id else "datasetPath"
            raise invalid(field, "give either datasetPath (a file) or datasetId (an uploaded dataset), not both")
        dataset_file = confine(self.roots.datasets, req.dataset_path, "datasetPath") if req.dataset_path else None
        output_path = confine(self.roots.outputs, req.output_dir, "outputDir")
        if output_path == self.roots.outputs:
            raise invalid("outputDir", "must name a directory inside the outputs root, not the root itself")
        if output_path.exists() and not output_path.is_dir():
            raise invalid("outputDir", f"'{req.output_dir}' exists and is not a directory")
        if dataset_file is not None:
            rows, digest = len(await asyncio.to_thread(datasets.load, dataset_file)), ""
        else:  # validated when it was uploaded
            stored = await self.datasets.info(req.dataset_id, field="datasetId")
            rows, digest = stored.rows, stored.digest
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        adapter_name = req.adapter_name or derive_adapter_name(output_path, job_id)
        if adapter_name == "default" or self.registry.resolve(adapter_name) is not None:
            # Adapters are selectable as OpenAI `model` names: they must not shadow a model id or alias.
            raise invalid(
                "adapterName" if req.adapter_name else "outputDir",
                f"adapter name '{adapter_name}' is taken by a model id or the alias 'default'; choose another",
            )
        out_key = f"out.{_digest(str(output_path))}"
        out_revision = await self._claim(
            out_key, job_id, "outputDir", lambda o: f"writes to outputDir '{o.output_dir}'"
        )
        try:
            await self._claim(
                f"adapter.{_digest(model_id, adapter_name)}",
                job_id,
                "adapterName",
                lambda o: f"trains adapter '{adapter_name}' for '{model_id}'",
            )
        except CyError:
            # Hand the outputDir back at once (unless someone took it over meanwhile).
            with contextlib.suppress(Exception):
                assert self._claims is not None
                await self._claims.delete(out_key, last=out_revision)
            raise
        job = TrainingJob(
            job_id=job_id,
            status="queued",
            base_model=req.base_model,
            model_id=model_id,
            dataset_path=req.dataset_path,
            output_dir=req.output_dir,
            dataset_file=str(dataset_file or ""),
            dataset_id=req.dataset_id,
            dataset_digest=digest,
            output_path=str(output_path),
            adapter_name=adapter_name,
            hyper_params=req.hyper_params or HyperParams(),
            lora_config=req.lora_config,
            created_ms=now_ms(),
            updated_ms=now_ms(),
            message="Training job has been queued",
            ticket=1,
            train_rows=rows,
        )
        await self.records.create(job)
        if req.dataset_id:
            await self._keep_dataset(job)
        await self.records.event(job, "queued", f"{rows} rows; adapter '{adapter_name}' for model '{model_id}'")
        try:
            await self.records.enqueue(job)
        except CyError as exc:
            error = exc
            await self.records.mutate(job_id, lambda j: _fail(j, error))
            raise
        log.info("training_job_queued", job_id=job_id, model_id=model_id, adapter=adapter_name, rows=rows)
        return job

    async def _keep_dataset(self, job: TrainingJob) -> None:
        """Fail the new job at once when its dataset is being deleted or already gone (the race with a delete:
        holders.py). Raises CyError(DATASET_NOT_FOUND)."""
        assert self._claims is not None  # `_claim` opened it
        try:
            await holders.wait_dataset_kept(self._claims, self.datasets, job.dataset_id)
        except CyError as exc:
            error = exc
            await self.records.mutate(job.job_id, lambda j: _fail(j, error))
            raise

    def _resolve_model(self, base_model: str) -> str:
        resolved = self.registry.resolve(base_model)
        if resolved is not None:
            return resolved[0]
        as_path = Path(base_model).expanduser()
        for model_id, spec in self.registry.models.items():
            if spec.name == base_model:
                return model_id
            if as_path.is_absolute() and as_path.resolve() == Path(spec.model_path).resolve():
                return model_id
        known = ", ".join(sorted(self.registry.models))
        raise CyError(
            ErrorCode.MODEL_NOT_FOUND,
            f"Invalid baseModel: {base_model}",
            details=[
                ErrorDetail(
                    type="model_not_found",
                    field="baseModel",
                    description=f"Model '{base_model}' is not configured (known: {known}); "
                    "give a registry model id, its name or its modelPath",
                )
            ],
        )

    async def _claim(self, key: str, job_id: str, field: str, what: Callable[[TrainingJob], str]) -> int:
        """Atomically make `job_id` the one job allowed to write an output folder / train an adapter name.
        A claim held by an active job refuses with TRAINING_JOB_RUNNING; one whose job has finished (or never
        got its record, after CLAIM_GRACE_MS) is taken over by compare-and-set. Claims are never released:
        they go stale when their job ends, so a crash can never leave a name locked."""
        if self._claims is None:  # only `start` needs the claims bucket
            self._claims = await jetstream.ensure_bucket(self.records.js, subjects.TRAINING_CLAIMS_BUCKET)
        claims = self._claims
        value = f"{job_id} {now_ms()}".encode()
        for _ in range(20):
            try:
                return int(await claims.create(key, value))
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await claims.get(key)
            except KeyNotFoundError:
                continue
            holder, _, since = (entry.value or b"").decode().partition(" ")
            try:
                other: TrainingJob | None = await self.get(holder)
            except CyError:
                other = None
            young = since.isdigit() and now_ms() - int(since) < CLAIM_GRACE_MS
            if (other is not None and other.status in ACTIVE) or (other is None and young):
                doing = f"({other.status}) already {what(other)}" if other else f"(starting) already claims {field}"
                raise CyError(
                    ErrorCode.TRAINING_JOB_RUNNING,
                    f"Training job '{holder}' {doing}",
                    details=[ErrorDetail(type="job_running", field=field, description=f"job {holder} is active")],
                )
            try:
                return int(await claims.update(key, value, last=entry.revision))
            except KeyWrongLastSequenceError:
                continue
        raise CyError(ErrorCode.INTERNAL_ERROR, f"could not claim {field}; try again", retryable=True)

    async def list(self, query: ListJobs) -> tuple[list[TrainingJob], int]:
        jobs = [j for j in await self.records.all_jobs() if not query.status or j.status == query.status]
        jobs.sort(key=lambda j: (j.created_ms, j.job_id), reverse=True)
        return jobs[query.offset : query.offset + query.limit], len(jobs)

    async def cancel(self, job_id: str) -> TrainingJob:
        """Raises TRAINING_JOB_NOT_FOUND, INVALID_REQUEST (already finished)."""
        was: list[str] = []

        def change(job: TrainingJob) -> TrainingJob:
            if job.status in FINISHED:
                raise finished(job, "cancelled")
            was[:] = [job.status]
            job.control = "cancel" if job.status == "running" else ""
            job.status = "cancelled"
            job.completed_ms = now_ms()
            job.message = "Training job has been cancelled"
            return job

        job = await self.records.mutate(job_id, change)
        if was == ["running"]:
            # The owning trainer publishes the "cancelled" event once its loop has stopped, so that it
            # comes after the job's last step event.
            await self.records.signal(job_id, "cancel")
        else:
            await self.records.event(job, "cancelled", f"cancelled while {was[0]}", job.progress)
        return job

    async def pause(self, job_id: str) -> TrainingJob:
        """Queued -> paused at once; running -> checkpoint, then paused (waits up to `pause_wait` for the
        trainer). Raises TRAINING_JOB_NOT_FOUND, INVALID_REQUEST (already finished)."""

        def change(job: TrainingJob) -> TrainingJob | None:
            if job.status in FINISHED:
                raise finished(job, "paused")
            if job.status == "paused" or job.control == "pause":
                return None
            if job.status == "queued":
                job.status, job.message = "paused", "Training job has been paused before it started"
            else:
                job.control, job.message = "pause", "Pause requested; the job pauses after its current step"
            return job

        before = await self.get(job_id)
        job = await self.records.mutate(job_id, change)
        if job.status == "paused":
            if before.status != "paused":
                await self.records.event(job, "paused", job.message, job.progress)
            return job
        if before.control != "pause":
            await self.records.signal(job_id, "pause")
            await self.records.event(job, "pause_requested", job.message, job.progress)
        deadline = time.monotonic() + self.pause_wait
        while job.status == "running" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            job = await self.get(job_id)
        return job

    async def resume(self, job_id: str) -> TrainingJob:
        """Paused -> queued (continues from its checkpoint). Raises TRAINING_JOB_NOT_FOUND,
        TRAINING_JOB_RUNNING (running), INVALID_REQUEST (queued or finished)."""

        def change(job: TrainingJob) -> TrainingJob:
            if job.status == "running":
                if job.control == "pause":  # the pause has not happened yet: call it off
                    job.control, job.message = "", "Pause called off; the job keeps running"
                    return job
                raise CyError(
                    ErrorCode.TRAINING_JOB_RUNNING,
                    f"Training job '{job_id}' is running; only a paused job can be resumed",
                    details=[ErrorDetail(type="job_running", field="jobId", description="the job is running")],
                )
            if job.status != "paused":
                if job.status in FINISHED:
                    raise finished(job, "resumed")
                raise invalid("jobId", f"job '{job_id}' is {job.status}, not paused")
            job.status, job.control, job.ticket = "queued", "", job.ticket + 1
            job.message = "Training job has been resumed and queued"
            return job

        job = await self.records.mutate(job_id, change)
        if job.status == "queued":
            await self.records.event(job, "queued", job.message, job.progress)
            await self.records.enqueue(job)
        return job

    # --- NATS request/reply (the trainers serve it through services/discovery.py) ----------------
    async def handle(self, verb: str, data: bytes) -> TrainingReply:
        """One API request (msgpack) -> its reply; never raises."""
        try:
            kind = API_VERBS.get(verb)
            if kind is None:
                raise invalid("verb", f"unknown verb '{verb}' (one of {', '.join(API_VERBS)})")
            try:
                request = msgspec.msgpack.decode(data or msgspec.msgpack.encode({}), type=kind)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise invalid("body", str(exc)) from exc
            match request:
                case StartTraining():
                    return JobReply(job=await self.start(request), message="Training job has been queued")
                case ListJobs():
                    jobs, total = await self.list(request)
                    return ListReply(jobs=jobs, total=total, limit=request.limit, offset=request.offset)
                case JobRef():
                    action = {"status": self.get, "cancel": self.cancel, "pause": self.pause, "resume": self.resume}
                    job = await action[verb](request.job_id)
                    return JobReply(job=job, message=job.message)
        except CyError as exc:
            return ErrorReply(error=exc.body)
        except Exception:
            log.exception("training_api_failed", verb=verb)
            return ErrorReply(error=CyError(ErrorCode.INTERNAL_ERROR, "internal error in the training service").body)
        raise AssertionError("unreachable")


def _fail(job: TrainingJob, exc: CyError) -> TrainingJob:
    job.status, job.error, job.message, job.completed_ms = "failed", exc.body, exc.body.message, now_ms()
    return job
