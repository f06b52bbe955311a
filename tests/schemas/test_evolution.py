"""Yesterday's bytes must decode with today's types (every later field has a default)."""

import msgspec

from schemas import codec
from schemas.inference import Accepted, StreamEnd, StreamError, TokenChunk
from schemas.workers import WorkerInfo

# A v1 GenerateRequest as the first release wrote it: only the fields of the spec's StreamPredictRequest.
V1_REQUEST = msgspec.msgpack.encode(
    {
        "trace_id": "gen-1",
        "model_id": "m",
        "prompt": "hi",
        "adapter": "",
        "priority": 0,
        "generation": {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.95, "repetition_penalty": 1.0},
        "metadata": {"trace_id": "t", "tenant": "x", "player_id": "p", "locale": "zh-CN"},
        "worker_hint": "",
    }
)


def test_a_v1_generate_request_decodes_with_defaults_for_newer_fields() -> None:
    req = codec.request_decoder.decode(V1_REQUEST)
    assert req.generation.max_new_tokens == 8
    assert req.generation.seed is None and req.generation.stop == []
    assert req.metadata.player_id == "p" and req.deadline_ms == 0 and req.messages is None


def test_a_minimal_request_from_a_direct_publisher_decodes() -> None:
    req = codec.request_decoder.decode(msgspec.msgpack.encode({"trace_id": "t1", "model_id": "m", "prompt": "x"}))
    assert req.generation.temperature == 0.7 and req.priority == 0


def test_unknown_fields_from_a_newer_publisher_are_ignored() -> None:
    data = msgspec.msgpack.encode({"trace_id": "t1", "model_id": "m", "prompt": "x", "future_field": 1})
    assert codec.request_decoder.decode(data).prompt == "x"


def test_reply_union_round_trips_every_variant() -> None:
    replies = [
        Accepted(trace_id="t", worker_id="w", prompt_tokens=3),
        TokenChunk(trace_id="t", chunk="ab", index=0, token_count=4),
        StreamEnd(trace_id="t", finish_reason="stop", prompt_tokens=3, completion_tokens=4, chunks=1),
        StreamError(trace_id="t", code="MODEL_NOT_FOUND", message="nope"),  # type: ignore[arg-type]
    ]
    for reply in replies:
        assert codec.reply_decoder.decode(codec.encode(reply)) == reply


def test_a_v1_token_chunk_without_newer_fields_decodes() -> None:
    old = msgspec.msgpack.encode({"type": "chunk", "trace_id": "t", "chunk": "x", "index": 2, "end_of_stream": False})
    chunk = codec.reply_decoder.decode(old)
    assert isinstance(chunk, TokenChunk) and chunk.index == 2 and chunk.finish_reason is None


def test_a_v1_worker_heartbeat_decodes() -> None:
    old = msgspec.msgpack.encode(
        {
            "worker_id": "w",
            "engine": "transformers",
            "device": "cpu",
            "models": [{"model_id": "m", "status": "ready", "engine": "transformers"}],
            "slots_total": 4,
        }
    )
    info = codec.worker_decoder.decode(old)
    assert isinstance(info, WorkerInfo) and info.slots_busy == 0 and not info.draining


def test_a_stream_end_from_a_worker_without_cached_tokens_decodes_with_zero() -> None:
    old = msgspec.msgpack.encode(
        {
            "type": "end",
            "trace_id": "t",
            "finish_reason": "stop",
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "chunks": 1,
        }
    )
    end = codec.reply_decoder.decode(old)
    assert isinstance(end, StreamEnd) and end.cached_tokens == 0 and end.prompt_tokens == 3
