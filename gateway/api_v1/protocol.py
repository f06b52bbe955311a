"""JSON bodies of /api/v1 (camelCase, as in the spec): the requests the routes decode and the responses they send."""

from __future__ import annotations

import functools
import operator
import types
from typing import Annotated, Any, Literal

import msgspec

from gateway.workers import ModelState
from schemas.errors import ErrorCode, ErrorDetail
from schemas.inference import GenerationParams, Metadata
from schemas.training import EventKind, HyperParams, JobStatus, LoraConfig, StartTraining

_ID = Annotated[str, msgspec.Meta(max_length=256)]


class GenerationBody(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=32768)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.95
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] = 1.0
    # Extensions beyond the spec (documented in the README).
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    seed: int | None = None
    stop: list[str] = []

    def to_params(self) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop,
        )


class MetadataBody(msgspec.Struct, kw_only=True):
    """The spec's examples spell these camelCase and its field table snake_case: both are accepted."""

    trace_id: _ID = msgspec.field(default="", name="traceId")
    tenant: _ID = ""
    player_id: _ID = msgspec.field(default="", name="playerId")
    locale: Annotated[str, msgspec.Meta(max_length=64)] = ""
    trace_id_snake: _ID = msgspec.field(default="", name="trace_id")
    player_id_snake: _ID = msgspec.field(default="", name="player_id")
    # Extension: the conversation this request continues (cache-aware routing; default: tenant + playerId).
    session_id: _ID = msgspec.field(default="", name="sessionId")
    session_id_snake: _ID = msgspec.field(default="", name="session_id")

    def to_wire(self) -> Metadata:
        return Metadata(
            trace_id=self.trace_id or self.trace_id_snake,
            tenant=self.tenant,
            player_id=self.player_id or self.player_id_snake,
            locale=self.locale,
            session_id=self.session_id or self.session_id_snake,
        )


class InferenceBody(msgspec.Struct, kw_only=True, rename="camel"):
    model_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    prompt: Annotated[str, msgspec.Meta(min_length=1)]
    adapter: _ID = ""
    generation: GenerationBody | None = None
    metadata: MetadataBody | None = None
    # Extensions: queue priority (>0 high, 0 normal, <0 low), a preferred worker, and raw prompts.
    priority: Annotated[int, msgspec.Meta(ge=-100, le=100)] = 0
    worker_hint: _ID = ""
    # By default the prompt is sent as one user turn through the model's chat template.
    raw_prompt: bool = False


# --- /training request bodies: camelCase twins derived from the snake_case wire structs (the spec's gRPC
# names), so that defaults and limits are written once ------------------------------------------------
def _camel(cls: type[msgspec.Struct], swap: dict[Any, Any]) -> type[msgspec.Struct]:
    """`cls` with camelCase names (nested structs swapped through `swap`), rejecting unknown fields."""

    def swapped(tp: Any) -> Any:
        if isinstance(tp, types.UnionType):
            return functools.reduce(operator.or_, [swapped(a) for a in tp.__args__])
        return swap.get(tp, tp)

    fields: list[tuple[Any, ...]] = []
    for f in msgspec.structs.fields(cls):
        if f.default is not msgspec.NODEFAULT:
            fields.append((f.name, swapped(f.type), f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, swapped(f.type), msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, swapped(f.type)))
    return msgspec.defstruct(f"{cls.__name__}Body", fields, kw_only=True, rename="camel", forbid_unknown_fields=True)


HyperParamsBody = _camel(HyperParams, {})
LoraConfigBody = _camel(LoraConfig, {})
StartBody = _camel(StartTraining, {HyperParams: HyperParamsBody, LoraConfig: LoraConfigBody})


# --- Response shapes ------------------------------------------------------------------------------------
# The routes build these bodies as dicts; these structs describe them for the OpenAPI document
# (gateway/api_v1/openapi.py) and tests/gateway/test_openapi_fuzz.py checks live responses against them.
# A field typed `X | UnsetType` is left out of the body when it has no value.


class ErrorInfo(msgspec.Struct, kw_only=True):
    code: ErrorCode
    message: str
    details: list[ErrorDetail]


class ErrorEnvelope(msgspec.Struct, kw_only=True):
    """The spec's error envelope, used by every /api/v1 error (also SSE error events)."""

    error: ErrorInfo


class InferenceChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None


class TokenUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Extension: of prompt_tokens, those the engine took from its prefix cache (0 for an engine without one).
    cached_tokens: int = msgspec.field(default=0, name="cachedTokens")


class InferenceResponse(msgspec.Struct, kw_only=True):
    id: str
    model_id: str = msgspec.field(name="modelId")
    object: Literal["text_completion"]
    created: int
    choices: list[InferenceChoice]
    usage: TokenUsage


class InferenceChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | msgspec.UnsetType = msgspec.UNSET
    offset: int


class InferenceChunk(msgspec.Struct, kw_only=True):
    """One SSE event of /inference/stream and /inference/streamWithMetadata."""

    id: str
    object: Literal["text_completion.chunk"]
    created: int
    model: str
    choices: list[InferenceChunkChoice]


# UP: a model can be served. STARTING (503): NATS is up but no worker has a model ready yet (loading, failed or
# none running). DEGRADED: the gateway is draining. DOWN (503): NATS is unreachable.
HealthStatus = Literal["UP", "STARTING", "DEGRADED", "DOWN"]


class Health(msgspec.Struct, kw_only=True):
    status: HealthStatus
    components: dict[str, str]
    models: dict[str, ModelState]
    timestamp: str


class GatewayDetails(msgspec.Struct, kw_only=True, rename="camel"):
    start_time: str
    uptime: str


class GatewayComponent(msgspec.Struct, kw_only=True):
    status: Literal["UP", "DRAINING"]
    details: GatewayDetails


class WorkerCounts(msgspec.Struct, kw_only=True):
    total: int
    healthy: int
    unhealthy: int


class QueueState(msgspec.Struct, kw_only=True, rename="camel"):
    pending_tasks: int | None
    max_size: int


class CoordinatorDetails(msgspec.Struct, kw_only=True):
    workers: WorkerCounts
    queue: QueueState


class CoordinatorComponent(msgspec.Struct, kw_only=True):
    status: Literal["UP", "DOWN"]
    details: CoordinatorDetails


class NatsDetails(msgspec.Struct, kw_only=True, rename="camel"):
    latency_ms: int | None
    connected: bool


class NatsComponent(msgspec.Struct, kw_only=True):
    status: Literal["UP", "DOWN"]
    details: NatsDetails


class HealthComponents(msgspec.Struct, kw_only=True):
    gateway: GatewayComponent
    coordinator: CoordinatorComponent
    nats: NatsComponent


class HealthDetails(msgspec.Struct, kw_only=True):
    status: HealthStatus
    components: HealthComponents
    models: dict[str, ModelState]
    timestamp: str


class Liveness(msgspec.Struct, kw_only=True):
    status: Literal["UP"]


class Readiness(msgspec.Struct, kw_only=True, rename="camel", omit_defaults=True):
    """Whether the registry's default model can be served now."""

    status: Literal["READY", "NOT_READY"]
    model_id: str
    # A ModelState, or "draining" / "disconnected" (NATS unreachable) when the gateway cannot take work.
    model_status: str
    # Why not (only when NOT_READY).
    reason: str = ""


class ModelSummary(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    name: str
    engine: str
    status: str
    capabilities: list[str]
    max_model_len: int
    lora_adapters: list[str] | msgspec.UnsetType = msgspec.UNSET


class ModelList(msgspec.Struct, kw_only=True):
    models: list[ModelSummary]


class ModelConfig(msgspec.Struct, kw_only=True, rename="camel"):
    max_model_len: int
    gpu_memory_utilization: float
    tensor_parallel_size: int
    dtype: str


class ModelDetail(ModelSummary, kw_only=True, rename="camel"):
    model_path: str
    config: ModelConfig


class PlayerCancelBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /inference/cancel: every in-flight request of `playerId` in `tenant`, or of the whole `tenant` without
    `playerId` (at least one of them). Like the inference metadata, `player_id` is accepted too."""

    tenant: _ID = ""
    player_id: _ID = msgspec.field(default="", name="playerId")
    player_id_snake: _ID = msgspec.field(default="", name="player_id")


class PlayersCancelled(msgspec.Struct, kw_only=True, rename="camel"):
    """The answer to POST /inference/cancel. `cancelled` counts the requests this gateway had open; those of other
    gateways and of direct NATS publishers end too, uncounted."""

    tenant: str
    player_id: str | None
    cancelled: int


class DeletedAdapter(msgspec.Struct, kw_only=True, rename="camel"):
    model_id: str
    job_id: str
    object: str


class AdapterDeleted(msgspec.Struct, kw_only=True, rename="camel"):
    """The answer to DELETE /adapters/{name}: the records deleted, one per base model that had it."""

    name: str
    deleted: list[DeletedAdapter]


class TrainingStarted(msgspec.Struct, kw_only=True, rename="camel"):
    job_id: str
    status: JobStatus
    message: str
    created_at: str | None


class ProgressView(msgspec.Struct, kw_only=True, rename="camel"):
    current_epoch: int
    current_step: int
    total_steps: int
    loss: float | None
    learning_rate: float | None
    eval_loss: float | msgspec.UnsetType = msgspec.UNSET
    tokens_per_second: float | msgspec.UnsetType = msgspec.UNSET


class JobError(msgspec.Struct, kw_only=True):
    code: ErrorCode
    message: str


class TrainingStatus(msgspec.Struct, kw_only=True, rename="camel"):
    job_id: str
    status: JobStatus
    progress: ProgressView
    elapsed_time_seconds: int
    estimated_time_remaining_seconds: int | None
    created_at: str | None
    started_at: str | None
    completed_at: str | None
    base_model: str
    model_id: str
    adapter_name: str
    dataset_path: str
    dataset_id: str | None
    output_dir: str
    message: str
    checkpoint_step: int
    attempt: int
    # Running jobs only: the trainer that owns it, and whether it still sends heartbeats (every second); when
    # not, for how long it has been silent (it was killed or cut off; the job waits for another trainer).
    trainer_id: str | msgspec.UnsetType = msgspec.UNSET
    trainer_alive: bool | msgspec.UnsetType = msgspec.UNSET
    stalled_since_seconds: int | msgspec.UnsetType = msgspec.UNSET
    error: JobError | msgspec.UnsetType = msgspec.UNSET


class JobSummary(msgspec.Struct, kw_only=True, rename="camel"):
    job_id: str
    base_model: str
    status: JobStatus
    created_at: str | None
    completed_at: str | None
    adapter_name: str


class TrainingJobList(msgspec.Struct, kw_only=True):
    jobs: list[JobSummary]
    total: int
    limit: int
    offset: int


class JobChange(msgspec.Struct, kw_only=True, rename="camel"):
    """The answer to cancel, pause and resume."""

    job_id: str
    status: JobStatus
    message: str
    current_step: int


class TrainingEventView(msgspec.Struct, kw_only=True, rename="camel"):
    """One SSE event of /training/events/{jobId} (its `id:` is the event's stream sequence)."""

    job_id: str
    kind: EventKind
    status: JobStatus
    time: str | None
    time_ms: int
    progress: ProgressView | msgspec.UnsetType = msgspec.UNSET
    elapsed_time_seconds: float | msgspec.UnsetType = msgspec.UNSET
    message: str | msgspec.UnsetType = msgspec.UNSET
    trainer_id: str | msgspec.UnsetType = msgspec.UNSET


# --- /datasets ------------------------------------------------------------------------------------------
# Dataset rows as services/training/datasets.py validates them (documentation of the upload body only).


class AlpacaRow(msgspec.Struct, kw_only=True):
    """An Alpaca row: `instruction` (+ optional `input`) is the prompt, `output` the answer to learn."""

    instruction: Annotated[str, msgspec.Meta(min_length=1)]
    output: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | msgspec.UnsetType = msgspec.UNSET
    system: str | msgspec.UnsetType = msgspec.UNSET


class ChatRowMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRow(msgspec.Struct, kw_only=True):
    """A chat row: at least one `assistant` message (with non-empty content) to learn from."""

    messages: Annotated[list[ChatRowMessage], msgspec.Meta(min_length=1)]


class Dataset(msgspec.Struct, kw_only=True, rename="camel"):
    """An uploaded dataset (`digest` is the object store's `SHA-256=<base64url>`)."""

    id: str
    object: Literal["dataset"]
    name: str
    format: Literal["jsonl", "json"]
    rows: int
    bytes: int
    digest: str
    created_at: str | None


class DatasetList(msgspec.Struct, kw_only=True):
    datasets: list[Dataset]
    total: int


class DatasetDeleted(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["dataset"]
    deleted: bool
