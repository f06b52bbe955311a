"""MessagePack codec for everything on NATS: encoders and decoders are built once and reused."""

from __future__ import annotations

import msgspec

from schemas.inference import GenerateRequest, Reply
from schemas.workers import WorkerInfo

_encoder = msgspec.msgpack.Encoder()

encode = _encoder.encode

request_decoder = msgspec.msgpack.Decoder(GenerateRequest)
reply_decoder = msgspec.msgpack.Decoder(Reply)
worker_decoder = msgspec.msgpack.Decoder(WorkerInfo)

DecodeError = msgspec.DecodeError
ValidationError = msgspec.ValidationError
