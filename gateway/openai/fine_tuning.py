"""OpenAI's /v1/fine_tuning/jobs on the training jobs of /api/v1/training (same ids, same records).

A job created here trains a LoRA adapter named `ft-<suffix>-<hex>` (or `ft-<hex>`) into that folder of the
outputs root; `fine_tuned_model` is that name once the job has succeeded, usable as `model` in
/v1/chat/completions. Status mapping: queued -> queued, running -> running, completed -> succeeded,
failed -> failed, cancelled -> cancelled, paused -> paused (OpenAI's pause/resume; not in the SDK's type).
Hyperparameters: `n_epochs` -> epochs, `batch_size` -> batchSize, `learning_rate_multiplier` x 2e-4 (the
default learningRate) -> learningRate; "auto" keeps the /api/v1 default.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy
from quart import Blueprint, Response, request

from gateway.core import GatewayCore
from gateway.http_json import json_body, json_response
from gateway.openai.errors import bad_request, decode_request
from schemas import subjects
from schemas.errors import CyError, ErrorCode, ErrorDetail
from schemas.training import HyperParams, ListJobs, StartTraining, TrainingEvent, TrainingJob, event_decoder
from services.training.jobs import JobService

BASE_LEARNING_RATE = HyperParams().learning_rate
_STATUS = {"completed": "succeeded"}
_Auto = Literal["auto"]


class Hyperparameters(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    n_epochs: _Auto | Annotated[int, msgspec.Meta(ge=1, le=1000)] = "auto"
    batch_size: _Auto | Annotated[int, msgspec.Meta(ge=1, le=1024)] = "auto"
    learning_rate_multiplier: _Auto | Annotated[float, msgspec.Meta(gt=0, le=5000)] = "auto"


class Supervised(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    hyperparameters: Hyperparameters | None = None


class Method(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["supervised"] = "supervised"
    supervised: Supervised | None = None


class CreateJob(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The body of POST /v1/fine_tuning/jobs (the parameters this server implements)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    training_file: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: Annotated[str, msgspec.Meta(max_length=40, pattern=r"^[A-Za-z0-9_-]*$")] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    validation_file: None = None


def _hyper(job: TrainingJob) -> dict[str, Any]:
    hp = job.hyper_params
    return {
        "n_epochs": hp.epochs,
        "batch_size": hp.batch_size,
        "learning_rate_multiplier": round(hp.learning_rate / BASE_LEARNING_RATE, 6),
    }


def job_object(job: TrainingJob) -> dict[str, Any]:
    hyper = _hyper(job)
    p = job.progress
    error = None
    if job.error is not None:
        error = {"code": job.error.code.value, "message": job.error.message, "param": None}
    return {
        "id": job.job_id,
        "object": "fine_tuning.job",
        "created_at": job.created_ms // 1000,
        "error": error,
        "fine_tuned_model": job.adapter_name if job.status == "completed" else None,
        "finished_at": job.completed_ms // 1000 if job.completed_ms else None,
        "hyperparameters": hyper,
        "model": job.base_model,
        "organization_id": "cy-llm",
        "result_files": [],
        "seed": job.hyper_params.seed,
        "status": _STATUS.get(job.status, job.status),
        "trained_tokens": None,
        "training_file": job.dataset_id or job.dataset_path,
        "validation_file": None,
        "estimated_finish": int(time.time() + p.eta_s) if job.status == "running" and p.eta_s is not None else None,
        "integrations": [],
        "metadata": None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
    }


def event_object(event: TrainingEvent, seq: int) -> dict[str, Any]:
    p = event.progress
    data: dict[str, Any] | None = None
    message = event.message or f"Job {event.kind.replace('_', ' ')}"
    if event.kind == "step" and p is not None:
        data = {"step": p.step, "total_steps": p.total_steps, "train_loss": p.loss, "learning_rate": p.learning_rate}
        message = f"Step {p.step}/{p.total_steps}: training loss={p.loss if p.loss is not None else 'n/a'}"
    return {
        "id": f"ftevent-{seq}",
        "object": "fine_tuning.job.event",
        "created_at": event.time_ms // 1000,
        "level": "error" if event.kind == "failed" else "info",
        "message": message,
        "data": data,
        "type": "metrics" if data is not None else "message",
    }


def _start_request(body: CreateJob) -> StartTraining:
    hyper = body.hyperparameters
    if body.method is not None and body.method.supervised is not None:
        hyper = body.method.supervised.hyperparameters or hyper
    hyper = hyper or Hyperparameters()
    defaults = HyperParams()
    hp = HyperParams(
        epochs=defaults.epochs if hyper.n_epochs == "auto" else hyper.n_epochs,
        batch_size=defaults.batch_size if hyper.batch_size == "auto" else hyper.batch_size,
        learning_rate=(
            defaults.learning_rate
            if hyper.learning_rate_multiplier == "auto"
            else min(1.0, BASE_LEARNING_RATE * hyper.learning_rate_multiplier)
        ),
        seed=defaults.seed if body.seed is None else body.seed,
    )
    tag = uuid.uuid4().hex[:8]
    name = f"ft-{body.suffix}-{tag}" if body.suffix else f"ft-{tag}"
    return StartTraining(
        base_model=body.model, output_dir=name, dataset_id=body.training_file, hyper_params=hp, adapter_name=name
    )


def _int_arg(name: str, default: int, high: int) -> int:
    raw = request.args.get(name, "")
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= high:
        raise bad_request(name, f"Invalid value for '{name}': '{raw}' is not an integer between 1 and {high}.")
    return int(raw)


def _page(items: list[dict[str, Any]], after: str, limit: int) -> dict[str, Any]:
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("openai_fine_tuning", __name__)

    @bp.post("/fine_tuning/jobs")
    async def create() -> Response:
        data = await json_body()
        body = decode_request(data, CreateJob)
        try:
            job = await core.training.start(_start_request(body))
        except CyError as exc:
            raise _as_openai(exc) from None
        return json_response(job_object(job))

    @bp.get("/fine_tuning/jobs")
    async def list_jobs() -> Response:
        jobs, _ = await core.training.list(ListJobs(limit=1000))
        limit = _int_arg("limit", 20, 1000)
        return json_response(_page([job_object(j) for j in jobs], request.args.get("after", ""), limit))

    @bp.get("/fine_tuning/jobs/<job_id>")
    async def retrieve(job_id: str) -> Response:
        return json_response(job_object(await core.training.get(job_id)))

    @bp.post("/fine_tuning/jobs/<job_id>/cancel")
    async def cancel(job_id: str) -> Response:
        return json_response(job_object(await core.training.cancel(job_id)))

    @bp.post("/fine_tuning/jobs/<job_id>/pause")
    async def pause(job_id: str) -> Response:
        return json_response(job_object(await core.training.pause(job_id)))

    @bp.post("/fine_tuning/jobs/<job_id>/resume")
    async def resume(job_id: str) -> Response:
        return json_response(job_object(await core.training.resume(job_id)))

    @bp.get("/fine_tuning/jobs/<job_id>/events")
    async def events(job_id: str) -> Response:
        svc = core.training
        job = await svc.get(job_id)
        limit = _int_arg("limit", 20, 10_000)
        stored = await _stored_events(core, svc, job)
        newest_first = [event_object(e, seq) for seq, e in reversed(stored)]
        return json_response(_page(newest_first, request.args.get("after", ""), limit))

    return bp


def _as_openai(exc: CyError) -> CyError:
    """A start error in OpenAI's parameter names (training_file, suffix) instead of /api/v1's."""
    names = {"datasetId": "training_file", "adapterName": "suffix", "outputDir": "suffix", "baseModel": "model"}
    details = [msgspec.structs.replace(d, field=names.get(d.field, d.field)) for d in exc.body.details]
    if exc.code is ErrorCode.DATASET_NOT_FOUND:
        # OpenAI answers an unknown training_file with a 400 naming the parameter.
        return CyError(
            ErrorCode.INVALID_REQUEST,
            exc.body.message,
            details=[ErrorDetail(type="invalid_training_file", field="training_file", description=exc.body.message)],
        )
    return CyError(exc.code, exc.body.message, retryable=exc.body.retryable, details=details)


async def _stored_events(core: GatewayCore, svc: JobService, job: TrainingJob) -> list[tuple[int, TrainingEvent]]:
    """Every stored event of the job with its stream sequence, oldest first."""
    await svc.records.kv()  # the events stream exists
    sub = await core.js.subscribe(
        subjects.training_events_subject(job.job_id),
        stream=subjects.TRAINING_EVENTS_STREAM,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    out: list[tuple[int, TrainingEvent]] = []
    try:
        if ((await sub.consumer_info()).num_pending or 0) + sub.delivered == 0:
            return out
        while True:
            try:
                msg = await sub.next_msg(timeout=5)
            except (TimeoutError, NatsTimeoutError):
                break
            out.append((msg.metadata.sequence.stream, event_decoder.decode(msg.data)))
            if msg.metadata.num_pending == 0:
                break
    finally:
        try:
            await sub.unsubscribe()
        except Exception:
            pass
    return out
