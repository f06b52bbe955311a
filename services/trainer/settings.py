"""The trainer's one config object, read from CY_LLM_* variables (docs/training.md)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from services.runtime import NatsSettings


class TrainerSettings(NatsSettings, frozen=True, kw_only=True):
    """CY_LLM_<FIELD> variables (see docs/training.md)."""

    trainer_id: str = ""
    datasets_dir: str = ""
    outputs_dir: str = ""
    # Seconds without an in-progress ack (sent every second) after which a job is handed to another trainer:
    # how long a dead trainer's job waits for a free one. Every trainer on a NATS server shares this value
    # (one queue consumer); it covers NATS outages shorter than that (docs/training.md).
    trainer_ack_wait: Annotated[float, msgspec.Meta(ge=1.0, le=3600.0)] = 4.0
    trainer_device: str = "auto"
    # torch CPU threads while training (0 = torch's default: one per core). On a CPU shared with other
    # busy processes fewer threads than cores can be much faster (spinning OpenMP threads get preempted).
    trainer_threads: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    # A job whose trainers died this many times (a job that kills its trainer) fails instead of looping.
    trainer_max_restarts: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    # On SIGTERM: seconds to checkpoint the running job and hand it back to the queue.
    trainer_drain_timeout: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    # Prometheus /metrics of this trainer: the first free port from metrics_port (0 = off; services/metrics.py).
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9400
