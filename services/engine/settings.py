"""The engine worker's one config object, read from CY_LLM_* variables (README, "Configuration")."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from services.engine.engines import EngineOptions
from services.runtime import NatsSettings


class WorkerSettings(NatsSettings, frozen=True, kw_only=True):
    """Read from CY_LLM_* variables (see README, "Configuration")."""

    worker_id: str = ""
    model: str = "default"
    engine: str = ""
    slots: Annotated[int, msgspec.Meta(ge=1, le=256)] = 32
    stream_chunk_size: Annotated[int, msgspec.Meta(ge=1, le=256)] = 4
    # Three missed beats and a gateway moves this worker's streams elsewhere (0.5 s: within 1.5 s).
    heartbeat_interval: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    drain_timeout: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    device: str = "auto"
    queue_max_size: Annotated[int, msgspec.Meta(ge=1)] = 1000
    # Requests a direct publisher may have queued per model and tier (its stream's per-subject limit).
    publisher_max_pending: Annotated[int, msgspec.Meta(ge=1)] = 64
    # Relative adapter paths in requests are read against the trainers' outputs root.
    outputs_dir: str = ""
    # Engine options (services/engine/engines.py EngineOptions; docs/engines.md).
    openvino_precision: Literal["int8", "exact"] = "int8"
    kv_cache_gb: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 2
    prefill_budget: Annotated[int, msgspec.Meta(ge=16, le=65536)] = 256
    engine_threads: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    # Prometheus /metrics of this worker: the first free port from metrics_port (0 = off; services/metrics.py).
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9400

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            openvino_precision=self.openvino_precision,
            kv_cache_gb=self.kv_cache_gb,
            prefill_budget=self.prefill_budget,
            engine_threads=self.engine_threads,
        )
