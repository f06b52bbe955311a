"""Stored /v1/responses records: the bytes a gateway wrote must decode with a later gateway's types."""

import msgspec

from schemas import codec
from schemas.responses import Item, StoredResponse, response_decoder

# A record with only the fields the first version requires: every later field must have a default.
V1_RECORD = msgspec.msgpack.encode(
    {
        "id": "resp_" + "a" * 32,
        "created_at": 1_800_000_000,
        "completed_at": 1_800_000_001,
        "model": "default",
        "status": "completed",
        "conversation": [{"id": "msg_1", "role": "user", "content": ["Hi"]}],
        "output": {"id": "msg_2", "role": "assistant", "content": ["Hello"]},
        "input_tokens": 3,
        "output_tokens": 1,
    }
)


def test_a_minimal_stored_response_decodes_with_defaults_for_the_other_fields() -> None:
    record = response_decoder.decode(V1_RECORD)
    assert record.output.content == ["Hello"] and record.conversation[0].role == "user"
    assert record.instructions is None and record.metadata == {} and record.text_format == {}
    assert record.session == "" and record.tool_choice == "auto" and record.parallel_tool_calls


def test_a_stored_response_round_trips_and_ignores_fields_from_a_newer_gateway() -> None:
    record = StoredResponse(
        id="resp_" + "b" * 32,
        created_at=1,
        completed_at=2,
        model="tiny",
        status="incomplete",
        incomplete_reason="max_output_tokens",
        conversation=[Item(id="msg_1", role="developer", content=["Be brief.", "Really."])],
        output=Item(id="msg_2", role="assistant", content=["Ok"]),
        input_tokens=5,
        output_tokens=1,
        text_format={"type": "json_object"},
        metadata={"tenant": "t"},
    )
    assert response_decoder.decode(codec.encode(record)) == record
    newer = msgspec.msgpack.encode({**msgspec.to_builtins(record), "future_field": [1, 2]})
    assert response_decoder.decode(newer) == record
