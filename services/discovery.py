"""NATS service discovery: engine workers and trainers register as NATS micro services (nats-py `nats.micro`).

`nats micro ls` / a request on `$SRV.PING`, `$SRV.INFO`, `$SRV.STATS` (optionally `.<name>` or `.<name>.<id>`)
then lists every running instance with its endpoints and request statistics:

- `cy-llm-worker`, one instance per engine worker; metadata: worker_id, model_id, engine, metrics_url.
  Endpoint `info` on `cy.v1.workers.<worker>.info`: the worker's `WorkerInfo` (msgpack), the same record
  as its heartbeat in the workers bucket, asked for directly.
- `cy-llm-training`, one instance per trainer; metadata: trainer_id, metrics_url. Endpoints `start`,
  `status`, `cancel`, `pause`, `resume`, `list` are the training API verbs (JobService) on `cy.v1.training.api.<verb>`
  in queue group `training-api` (one trainer answers each request), exactly the subjects and payloads they
  had before they were registered here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from schemas import codec, subjects
from schemas.training import API_VERBS
from schemas.workers import WorkerInfo

SERVICE_VERSION = "1.0.0"
WORKER_SERVICE = "cy-llm-worker"
TRAINING_SERVICE = "cy-llm-training"


async def add_worker_service(
    nc: NATS, info: Callable[[], WorkerInfo], *, model_id: str, metrics_url: str = ""
) -> Service:
    current = info()
    service = await add_service(
        nc,
        name=WORKER_SERVICE,
        version=SERVICE_VERSION,
        description="CY-LLM engine worker: pulls GenerateRequests for its model from the work queue",
        metadata={
            "worker_id": current.worker_id,
            "model_id": model_id,
            "engine": current.engine,
            "metrics_url": metrics_url,
        },
    )

    async def on_info(req: Request) -> None:
        if _wants_reply(req):
            await req.respond(codec.encode(info()))

    await service.add_endpoint(
        name="info",
        subject=subjects.worker_info_subject(current.worker_id),
        handler=on_info,
        metadata={"format": "msgpack", "schema": "schemas.workers.WorkerInfo"},
    )
    return service


async def add_training_service(
    nc: NATS, handle: Callable[[str, bytes], Awaitable[msgspec.Struct]], *, trainer_id: str, metrics_url: str = ""
) -> Service:
    """`handle(verb, request bytes)` answers one training API request and never raises (JobService.handle)."""
    service = await add_service(
        nc,
        name=TRAINING_SERVICE,
        version=SERVICE_VERSION,
        description="CY-LLM LoRA trainer: the TrainingService verbs; trains queued jobs one at a time",
        metadata={"trainer_id": trainer_id, "metrics_url": metrics_url},
        queue_group=subjects.TRAINING_API_GROUP,
    )
    for verb, body in API_VERBS.items():

        async def on_verb(req: Request, verb: str = verb) -> None:
            if _wants_reply(req):  # as before: a verb published without a reply subject is ignored
                await req.respond(codec.encode(await handle(verb, req.data)))

        await service.add_endpoint(
            name=verb,
            subject=subjects.training_api_subject(verb),
            handler=on_verb,
            metadata={"format": "msgpack", "request": f"schemas.training.{body.__name__}"},
        )
    return service


def _wants_reply(req: Request) -> bool:
    # nats-py's micro Request keeps the message private and has no accessor for its reply subject.
    return bool(req._msg.reply)
