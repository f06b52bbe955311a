"""JSON bodies of /api/v1 (camelCase, as in the spec)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.inference import GenerationParams, Metadata

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

    def to_wire(self) -> Metadata:
        return Metadata(
            trace_id=self.trace_id or self.trace_id_snake,
            tenant=self.tenant,
            player_id=self.player_id or self.player_id_snake,
            locale=self.locale,
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
