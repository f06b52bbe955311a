"""/api/v1/training: start, status, cancel, pause, resume, list, and the progress events (SSE).

The routes call the gateway core's JobService (services/training/jobs.py) in-process: the job record in the
JetStream KV bucket is the source of truth, so every route works while the trainers are busy or down.
The request bodies are in protocol.py (derived from the snake_case wire structs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy
from quart import Blueprint, Response, request

from gateway.api_v1 import protocol as p
from gateway.api_v1.errors import decode_body, envelope
from gateway.core import GatewayCore
from gateway.http_json import json_body, json_response
from gateway.sse import SSE_DONE, SSE_KEEPALIVE, sse_event, sse_response
from schemas import subjects
from schemas.errors import CyError, invalid
from schemas.training import (
    FINISHED,
    JOB_STATUSES,
    TERMINAL_EVENTS,
    ListJobs,
    Progress,
    StartTraining,
    TrainingEvent,
    TrainingJob,
    event_decoder,
)
from services.training.jobs import JobService
from services.training.records import now_ms

log = structlog.get_logger()


# --- JSON views --------------------------------------------------------------------------------
def iso(ms: int) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def progress_view(p: Progress) -> dict[str, Any]:
    out: dict[str, Any] = {
        "currentEpoch": p.epoch,
        "currentStep": p.step,
        "totalSteps": p.total_steps,
        "loss": p.loss,
        "learningRate": p.learning_rate,
    }
    if p.eval_loss is not None:
        out["evalLoss"] = p.eval_loss
    if p.tokens_per_second is not None:
        out["tokensPerSecond"] = p.tokens_per_second
    return out


def status_view(job: TrainingJob) -> dict[str, Any]:
    p = job.progress
    out: dict[str, Any] = {
        "jobId": job.job_id,
        "status": job.status,
        "progress": progress_view(p),
        "elapsedTimeSeconds": round(p.elapsed_s),
        # Only a running job has an ETA; a completed one has 0 left, the others none.
        "estimatedTimeRemainingSeconds": (
            0 if job.status == "completed" else None if job.status != "running" or p.eta_s is None else round(p.eta_s)
        ),
        "createdAt": iso(job.created_ms),
        "startedAt": iso(job.started_ms),
        "completedAt": iso(job.completed_ms),
        # Extensions beyond the spec.
        "baseModel": job.base_model,
        "modelId": job.model_id,
        "adapterName": job.adapter_name,
        "datasetPath": job.dataset_path,
        "datasetId": job.dataset_id or None,
        "outputDir": job.output_dir,
        "message": job.message,
        "checkpointStep": job.checkpoint_step,
        "attempt": job.attempt,
    }
    if job.status == "running":
        silent = job.silent_s(now_ms())
        out["trainerId"], out["trainerAlive"] = job.owner, silent is None
        if silent is not None:  # killed or cut off: the record still reads `running` until another trainer takes it
            out["stalledSinceSeconds"] = int(silent)
            out["message"] = (
                f"its trainer {job.owner} stopped sending heartbeats {int(silent)}s ago; the job resumes from "
                f"{f'the checkpoint at step {job.checkpoint_step}' if job.checkpoint_step else 'the start'} "
                "when a free trainer takes it over"
            )
    if job.error is not None:
        out["error"] = {"code": job.error.code.value, "message": job.error.message}
    return out


def summary_view(job: TrainingJob) -> dict[str, Any]:
    return {
        "jobId": job.job_id,
        "baseModel": job.base_model,
        "status": job.status,
        "createdAt": iso(job.created_ms),
        "completedAt": iso(job.completed_ms),
        "adapterName": job.adapter_name,
    }


def event_view(event: TrainingEvent) -> dict[str, Any]:
    out: dict[str, Any] = {
        "jobId": event.job_id,
        "kind": event.kind,
        "status": event.status,
        "time": iso(event.time_ms),
        "timeMs": event.time_ms,
    }
    if event.progress is not None:
        out["progress"] = progress_view(event.progress)
        out["elapsedTimeSeconds"] = round(event.progress.elapsed_s, 1)
    if event.message:
        out["message"] = event.message
    if event.trainer_id:
        out["trainerId"] = event.trainer_id
    return out


def short_view(job: TrainingJob) -> dict[str, Any]:
    return {"jobId": job.job_id, "status": job.status, "message": job.message, "currentStep": job.progress.step}


# --- query strings -----------------------------------------------------------------------------
def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(name, f"must be an integer, not '{raw}'") from None
    if not low <= value <= high:
        raise invalid(name, f"must be between {low} and {high}")
    return value


# JetStream stream sequences are uint64.
_MAX_SEQUENCE = 2**64 - 1


def _resume_point() -> int:
    """The stream sequence to resume after (`Last-Event-ID`, else `?after=`); 0 = from the start.

    Raises CyError(INVALID_REQUEST) before the response starts: a bad value found inside the SSE generator
    would cut the stream after a 200. `str.isdigit()` alone is not enough: it accepts "²", which `int` refuses.
    """
    raw = request.headers.get("Last-Event-ID") or request.args.get("after") or ""
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit()) or int(raw) >= _MAX_SEQUENCE:
        raise invalid("after", "Last-Event-ID / after must be an event id (a stream sequence) from this stream")
    return int(raw)


def _list_query() -> ListJobs:
    status = request.args.get("status", "")
    if status and status not in JOB_STATUSES:
        raise invalid("status", f"'{status}' is not one of {', '.join(JOB_STATUSES)}")
    return ListJobs(
        status=status,  # type: ignore[arg-type]
        limit=_int_arg("limit", 100, 1, 1000),
        offset=_int_arg("offset", 0, 0, 10**9),
    )


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("training", __name__)

    @bp.post("/training/start")
    async def start() -> Response:
        data = await json_body()
        body = decode_body(data, p.StartBody)
        req = msgspec.convert(body, StartTraining, from_attributes=True)
        try:
            job = await core.training.start(req)
        except CyError as exc:
            log.info("training_start_refused", code=exc.code.value, error=exc.body.message)
            raise
        return json_response(
            {"jobId": job.job_id, "status": job.status, "message": job.message, "createdAt": iso(job.created_ms)}
        )

    @bp.get("/training/status/<job_id>")
    async def status(job_id: str) -> Response:
        return json_response(status_view(await core.training.get(job_id)))

    @bp.post("/training/cancel/<job_id>")
    async def cancel(job_id: str) -> Response:
        return json_response(short_view(await core.training.cancel(job_id)))

    @bp.post("/training/pause/<job_id>")
    async def pause(job_id: str) -> Response:
        job = await core.training.pause(job_id)
        # 202: the pause was asked for but the trainer has not checkpointed yet (a long step).
        return json_response(short_view(job), status=200 if job.status == "paused" else 202)

    @bp.post("/training/resume/<job_id>")
    async def resume(job_id: str) -> Response:
        return json_response(short_view(await core.training.resume(job_id)))

    @bp.get("/training/list")
    async def list_jobs() -> Response:
        query = _list_query()
        jobs, total = await core.training.list(query)
        return json_response(
            {"jobs": [summary_view(j) for j in jobs], "total": total, "limit": query.limit, "offset": query.offset}
        )

    @bp.get("/training/events/<job_id>")
    async def events(job_id: str) -> Response:
        svc = core.training
        job = await svc.get(job_id)
        follow = request.args.get("follow", "true").lower() not in ("0", "false", "no")
        after = _resume_point()
        return sse_response(_events(core, svc, job, follow=follow and job.status not in FINISHED, after=after))

    return bp


async def _events(
    core: GatewayCore, svc: JobService, job: TrainingJob, *, follow: bool, after: int
) -> AsyncIterator[bytes]:
    """Replay the job's stored events (after stream sequence `after`), then, with `follow`, stream new
    ones until the job finishes. Each SSE event carries its stream sequence as `id:`. A gateway that shuts
    down ends the stream at once with a retryable error event (resume elsewhere with `Last-Event-ID`)."""
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    if after:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1)
    await svc.records.kv()  # the events stream exists
    sub = await core.js.subscribe(
        subjects.training_events_subject(job.job_id),
        stream=subjects.TRAINING_EVENTS_STREAM,
        ordered_consumer=True,
        config=config,
    )
    try:
        async with core.watching():
            pending = ((await sub.consumer_info()).num_pending or 0) + sub.delivered
            if not follow and pending == 0:
                yield SSE_DONE
                return
            while True:
                try:
                    msg = await sub.next_msg(timeout=core.settings.keepalive_interval)
                except (TimeoutError, NatsTimeoutError):
                    if follow and (await svc.get(job.job_id)).status in FINISHED:
                        follow = False  # finished without a terminal event we can see: drain what is stored
                        if (await sub.consumer_info()).num_pending == 0:
                            break
                    yield SSE_KEEPALIVE
                    continue
                event = event_decoder.decode(msg.data)
                seq = msg.metadata.sequence.stream
                yield f"id: {seq}\n".encode() + b"data: " + msgspec.json.encode(event_view(event)) + b"\n\n"
                if follow and event.kind in TERMINAL_EVENTS:
                    break
                if not follow and msg.metadata.num_pending == 0:
                    break
        yield SSE_DONE
    except CyError as exc:  # the gateway is shutting down
        yield sse_event(envelope(exc))
        yield SSE_DONE
    finally:
        try:
            await sub.unsubscribe()
        except Exception:
            pass
