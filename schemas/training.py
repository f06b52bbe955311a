"""Training events: the job record kept in the jobs KV bucket, queue tickets, progress events, control
messages, and the request/reply messages of the training API verbs (JobService) on NATS.

Field names follow the spec's gRPC `TrainingService` messages (snake_case); the HTTP edge renames them
to the spec's camelCase. Every field added after v1 must have a default so older payloads keep
decoding (tests/schemas/test_evolution.py decodes v1 bytes).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.errors import ErrorBody

JobStatus = Literal["queued", "running", "paused", "completed", "failed", "cancelled"]
JOB_STATUSES: tuple[JobStatus, ...] = ("queued", "running", "paused", "completed", "failed", "cancelled")
# No trainer will touch a job in these states again.
FINISHED: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
# The trainer that owns a running job stamps its record (`heartbeat_ms`) this often; a record not stamped for
# TRAINER_SILENT_S means that trainer is dead or cut off (its job waits for another: docs/training.md).
TRAINER_HEARTBEAT_S = 1.0
TRAINER_SILENT_S = 3 * TRAINER_HEARTBEAT_S

# What a client may ask a running job to do (the trainer acts on it between two steps).
ControlAction = Literal["cancel", "pause"]

EventKind = Literal[
    "queued",  # accepted by `start`
    "started",  # a trainer took the job (first time)
    "resumed",  # a trainer took the job again and continues from a checkpoint (or from step 0)
    "step",  # one optimizer step done
    "eval",  # held-out loss measured
    "checkpoint",  # adapter + optimizer state saved
    "pause_requested",
    "paused",
    "requeued",  # the trainer shut down mid-job; the job waits for the next trainer
    "completed",
    "failed",
    "cancelled",
]
# The last event a job ever emits (an SSE `follow` ends after one of these).
TERMINAL_EVENTS: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

# Adapter names become peft module keys, which cannot contain ".".
_ADAPTER_NAME = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^([A-Za-z0-9][A-Za-z0-9_-]*)?$")]


class HyperParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The spec's `hyperParams` (defaults as in the spec) plus a few documented extensions."""

    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 4
    learning_rate: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 2e-4
    epochs: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    # Longer rows are truncated; capped at the base model's context length.
    max_seq_length: Annotated[int, msgspec.Meta(ge=8, le=1_048_576)] = 2048
    lora_rank: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    lora_alpha: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 16
    lora_dropout: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.05
    save_steps: Annotated[int, msgspec.Meta(ge=1)] = 100
    eval_steps: Annotated[int, msgspec.Meta(ge=1)] = 100
    # Extensions: share of rows held out for eval loss (0 = none), data-order/init seed, LR warm-up share.
    eval_split: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.05
    seed: int = 42
    warmup_ratio: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.0


class LoraConfig(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """The spec's `loraConfig`; a field set here wins over its copy in `hyperParams`."""

    r: Annotated[int, msgspec.Meta(ge=1, le=4096)] | None = None
    lora_alpha: Annotated[int, msgspec.Meta(ge=1, le=65536)] | None = None
    lora_dropout: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] | None = None
    # None: peft's default for the architecture (q_proj, v_proj for Llama). "all-linear" is accepted.
    target_modules: list[Annotated[str, msgspec.Meta(min_length=1, max_length=128)]] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"


class EffectiveLora(msgspec.Struct, kw_only=True, frozen=True):
    """The LoRA settings a job really uses (`loraConfig` merged over `hyperParams`)."""

    r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str] | None
    bias: str

    @classmethod
    def merge(cls, hp: HyperParams, lora: LoraConfig | None) -> EffectiveLora:
        lora = lora or LoraConfig()
        return cls(
            r=lora.r if lora.r is not None else hp.lora_rank,
            lora_alpha=lora.lora_alpha if lora.lora_alpha is not None else hp.lora_alpha,
            lora_dropout=lora.lora_dropout if lora.lora_dropout is not None else hp.lora_dropout,
            target_modules=lora.target_modules,
            bias=lora.bias,
        )


class Progress(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Where a job stands. `epoch` counts from 1; `step` is the number of optimizer steps done."""

    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    # Seconds of training (all attempts, queue and pause time excluded) and the estimate of what is left.
    elapsed_s: float = 0.0
    eta_s: float | None = None


class TrainingJob(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The job record: value of `subjects.TRAINING_JOBS_BUCKET` under key `job_id` (the source of truth).

    Written with compare-and-set on the KV revision, by the API (start/cancel/pause/resume) and by the
    trainer that owns the job (`owner`); a trainer whose write fails re-reads and obeys the record.
    """

    job_id: str
    status: JobStatus
    base_model: str  # as requested
    model_id: str  # the registry id it resolved to
    dataset_path: str  # as requested
    output_dir: str  # as requested
    dataset_file: str = ""  # resolved, inside the datasets root
    output_path: str = ""  # resolved, inside the outputs root
    adapter_name: str = ""
    hyper_params: HyperParams = msgspec.field(default_factory=HyperParams)
    lora_config: LoraConfig | None = None
    created_ms: int = 0
    started_ms: int = 0
    completed_ms: int = 0
    updated_ms: int = 0
    progress: Progress = msgspec.field(default_factory=Progress)
    message: str = ""
    error: ErrorBody | None = None
    # A pending request for the running job ("" when none).
    control: ControlAction | Literal[""] = ""
    owner: str = ""  # trainer id while running
    attempt: int = 0  # times a trainer took the job
    restarts: int = 0  # times a trainer took it over from one that died (or stalled) mid-job
    ticket: int = 0  # the queue ticket that may run the job; older tickets are stale
    checkpoint_step: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    # An uploaded dataset (object store) instead of `dataset_path`, and its digest when the job was started.
    dataset_id: str = ""
    dataset_digest: str = ""
    # While running: when its trainer last stamped the record (ms, that trainer's clock; TRAINER_HEARTBEAT_S).
    heartbeat_ms: int = 0

    def silent_s(self, now_ms: int) -> float | None:
        """Seconds since the owning trainer's last heartbeat, when that is past TRAINER_SILENT_S (the trainer
        is dead or cut off); None while it beats, for a job that is not running, or a record without any."""
        if self.status != "running" or not self.heartbeat_ms:
            return None
        silent = (now_ms - self.heartbeat_ms) / 1000
        return silent if silent > TRAINER_SILENT_S else None


class QueueTicket(msgspec.Struct, kw_only=True):
    """Body of a message on `subjects.TRAINING_QUEUE_SUBJECT`: "run job `job_id` if `ticket` is current"."""

    job_id: str
    ticket: int = 1


class TrainingEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Published on `subjects.training_events_subject(job_id)` (JetStream, replayable)."""

    job_id: str
    kind: EventKind
    status: JobStatus
    time_ms: int
    progress: Progress | None = None
    message: str = ""
    trainer_id: str = ""


class TrainingControl(msgspec.Struct, kw_only=True):
    """Published (core NATS) on `subjects.training_control_subject(job_id)` after the record was changed;
    it only wakes the owning trainer sooner: the record is what it obeys."""

    job_id: str
    action: ControlAction


class AdapterRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Value of `subjects.ADAPTERS_BUCKET` under `subjects.adapter_key(model_id, name)`."""

    model_id: str
    name: str
    path: str
    job_id: str = ""
    created_ms: int = 0
    # Where its files are in `subjects.ADAPTER_FILES_BUCKET` ("" for records written before the object
    # store, or by hand: workers then load `path`, which must be on their disk), and their sha256 (hex).
    object: str = ""
    digest: str = ""
    size: int = 0


# --- Training API verbs (JobService): request on `subjects.training_api_subject(verb)`, reply = TrainingReply
class StartTraining(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Verb `start` (the spec's TrainingRequest, plus `adapter_name`)."""

    base_model: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    output_dir: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    # One of the two: a file under the datasets root, or an uploaded dataset's id (/api/v1/datasets).
    dataset_path: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    hyper_params: HyperParams | None = None
    lora_config: LoraConfig | None = None
    adapter_name: _ADAPTER_NAME = ""
    dataset_id: Annotated[str, msgspec.Meta(max_length=64)] = ""


class JobRef(msgspec.Struct, kw_only=True):
    """Verbs `status`, `cancel`, `pause`, `resume`."""

    job_id: str


class ListJobs(msgspec.Struct, kw_only=True):
    """Verb `list`: newest first; `status` filters ("" = all)."""

    status: JobStatus | Literal[""] = ""
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


class JobReply(msgspec.Struct, tag="job", kw_only=True, omit_defaults=True):
    job: TrainingJob
    message: str = ""


class ListReply(msgspec.Struct, tag="list", kw_only=True):
    jobs: list[TrainingJob]
    total: int
    limit: int
    offset: int


class ErrorReply(msgspec.Struct, tag="error", kw_only=True):
    error: ErrorBody


TrainingReply = JobReply | ListReply | ErrorReply

API_VERBS: dict[str, type[msgspec.Struct]] = {
    "start": StartTraining,
    "status": JobRef,
    "cancel": JobRef,
    "pause": JobRef,
    "resume": JobRef,
    "list": ListJobs,
}


# Built once, reused (msgspec performance tips).
job_decoder = msgspec.msgpack.Decoder(TrainingJob)
ticket_decoder = msgspec.msgpack.Decoder(QueueTicket)
event_decoder = msgspec.msgpack.Decoder(TrainingEvent)
control_decoder = msgspec.msgpack.Decoder(TrainingControl)
adapter_decoder = msgspec.msgpack.Decoder(AdapterRecord)
reply_decoder = msgspec.msgpack.Decoder(TrainingReply)
