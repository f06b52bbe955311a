"""Gateway configuration: one frozen object read once from the environment."""

from __future__ import annotations

import os
from typing import Annotated

import msgspec

from services.runtime import NatsSettings, load_settings


class GatewaySettings(NatsSettings, frozen=True, kw_only=True):
    """CY_LLM_<FIELD> variables; `gateway_api_token` is also read from GATEWAY_API_TOKEN (the spec's name)."""

    api_key: str = ""
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    lite_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    gateway_api_token: str = ""
    # Seconds a request may wait in the queue for a worker before 503.
    queue_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # Seconds a request that arrives during a NATS outage waits for the link (and the workers) to come back.
    nats_wait: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    # Hard limit on one request end to end.
    request_timeout: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    # Cache-aware routing (gateway/session_router.py): a session's requests (metadata.session_id or
    # tenant + playerId; OpenAI prompt_cache_key or user) go to the worker that served its last one; a hinted
    # request no worker picks up within affinity_wait seconds goes to the shared queue. Off: every request
    # goes to the shared queue (the first free worker takes it).
    session_routing: bool = True
    affinity_wait: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    queue_max_size: Annotated[int, msgspec.Meta(ge=1)] = 1000
    # Requests a direct publisher may have queued per model and tier (the excess is refused at publish, to
    # that publisher only); publishers share a queue of queue_max_size apart from the HTTP clients' one.
    publisher_max_pending: Annotated[int, msgspec.Meta(ge=1)] = 64
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1_048_576
    # Body limit of dataset uploads (POST /api/v1/datasets, POST /v1/files) instead of max_body_bytes.
    max_dataset_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 50 * 1024 * 1024
    # On SIGTERM: seconds open requests get to finish while new ones are refused with 503.
    drain_timeout: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    # Per client (API key / bearer token / address); 0 disables a limit. Requests per minute are counted
    # across every gateway in NATS KV (per process while NATS is unavailable, or with rate_limit_shared
    # off); concurrent requests per gateway process (gateway/ratelimit.py).
    rate_limit_per_minute: Annotated[int, msgspec.Meta(ge=0)] = 1200
    rate_limit_concurrent: Annotated[int, msgspec.Meta(ge=0)] = 64
    rate_limit_shared: bool = True
    # Generations one tenant (metadata.tenant) / one player (tenant + playerId) may have open at once, per
    # gateway process; the excess gets 429 RATE_LIMITED with Retry-After (gateway/players.py). 0 = no limit.
    tenant_max_concurrent: Annotated[int, msgspec.Meta(ge=0)] = 0
    player_max_concurrent: Annotated[int, msgspec.Meta(ge=0)] = 0
    # SSE comment sent while a stream waits (queue, long prefill) so proxies and clients keep it open.
    keepalive_interval: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    # Seconds a stored /v1/responses response (and so the conversation a later `previous_response_id` continues)
    # is kept in NATS KV after it was written: 30 days, as OpenAI keeps them.
    responses_ttl: Annotated[float, msgspec.Meta(gt=0)] = 30 * 24 * 3600.0
    # Roots that training `datasetPath` / `outputDir` must lie in ("" = <data dir>/datasets, /outputs).
    # Same variables as the trainer's: CY_LLM_DATASETS_DIR, CY_LLM_OUTPUTS_DIR.
    datasets_dir: str = ""
    outputs_dir: str = ""


def load_gateway_settings(env: dict[str, str] | None = None) -> GatewaySettings:
    env = dict(os.environ if env is None else env)
    if env.get("GATEWAY_API_TOKEN") and not env.get("CY_LLM_GATEWAY_API_TOKEN"):
        env["CY_LLM_GATEWAY_API_TOKEN"] = env["GATEWAY_API_TOKEN"]
    return load_settings(GatewaySettings, env=env)
