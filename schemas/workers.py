"""Worker announcements, kept in the workers KV bucket (key: worker id) and refreshed as heartbeats."""

from __future__ import annotations

from typing import Literal

import msgspec

ModelStatus = Literal["loading", "ready", "failed"]


class ServedModel(msgspec.Struct, kw_only=True, omit_defaults=True):
    model_id: str
    status: ModelStatus
    engine: str
    max_model_len: int = 0
    adapters: list[str] = []
    error: str = ""


class WorkerInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    worker_id: str
    engine: str
    device: str
    models: list[ServedModel]
    slots_total: int
    slots_busy: int = 0
    host: str = ""
    pid: int = 0
    started_ms: int = 0
    heartbeat_ms: int = 0
    # Seconds between heartbeats; a worker silent for 3 intervals is unhealthy.
    heartbeat_interval: float = 1.0
    draining: bool = False
    # What this worker holds, for cache-aware routing: the affinity keys (GenerateRequest.affinity_key) of the
    # sessions it served most recently, newest first (its prefix cache likely still has them). With
    # `models[].adapters` (the adapters it has loaded), this is the whole advertisement of what it holds.
    sessions: list[str] = []
