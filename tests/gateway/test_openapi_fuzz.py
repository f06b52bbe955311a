"""Schemathesis fuzzing of both APIs, driven by the documents the running gateway serves.

Per operation, `EXAMPLES` positive cases (bodies and parameters the schema allows) and `EXAMPLES` negative ones
(that it forbids) go to the real hypercorn server with the tiny-model worker behind it. Every answer must be
no 5xx (503 is allowed only where documented: the probes when nothing serves the model), documented
(status code, content type, JSON body matching the response schema), and every 4xx must carry the app's
error shape. Generation is derandomized (same cases every run) and never shrinks, so the run is bounded.

Costs are capped where the schema allows expensive work: token budgets (`maxNewTokens`, `max_tokens`) are
clamped to a few tokens, uploads (datasets, files) to a few KiB, /training/start always names a model that
does not exist and /v1/fine_tuning/jobs a training file that does not exist, so a generated body is decoded
and checked in full but never queues a real job.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.api_v1.protocol import ErrorEnvelope
from gateway.openai.protocol import OpenAIError
from tests.helpers import API_KEY, Gateway

# Overridable to hunt for bugs: CY_LLM_FUZZ_EXAMPLES=200 CY_LLM_FUZZ_RANDOM=1 pytest tests/gateway/test_openapi_fuzz.py
EXAMPLES = int(os.environ.get("CY_LLM_FUZZ_EXAMPLES", "25"))
DERANDOMIZE = os.environ.get("CY_LLM_FUZZ_RANDOM", "") != "1"
MAX_TOKENS = 4
NO_SUCH_MODEL = "fuzz-no-such-model"
NO_SUCH_FILE = "ds-" + "0" * 24  # a well-formed dataset id that was never uploaded
MAX_UPLOAD = 4096
SERVED = "tiny"  # the session's tiny-model worker
# Their 503 is a documented answer (nothing serves the default model here), not a failure.
PROBES = {"/ready", "/api/v1/health", "/api/v1/health/details", "/api/v1/health/ready"}
# `tools` and `response_format` are typed, but random JSON Schemas in them mostly measure grammar compilation.
_REFUSED_UNLESS_OFF = (
    *("logit_bias", "tools", "functions", "function_call"),
    *("response_format", "audio", "modalities", "prediction", "reasoning_effort", "verbosity"),
    *("web_search_options", "moderation", "store", "best_of", "suffix", "prompt_cache_options"),
    # /v1/responses: the same, plus `text` (a JSON Schema) and `previous_response_id` (a random one is a 404).
    *("tool_choice", "include", "truncation", "top_logprobs", "reasoning", "background", "background_options"),
    *("conversation", "context_management", "prompt", "image", "access_programs", "text", "previous_response_id"),
)
_TOKEN_FIELDS = ("maxNewTokens", "max_tokens", "max_completion_tokens", "max_output_tokens")


def _clamp_tokens(value: Any) -> None:
    """Clamp every token budget in a JSON body (nested `generation` included) to MAX_TOKENS."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in _TOKEN_FIELDS and isinstance(item, int) and not isinstance(item, bool) and item > MAX_TOKENS:
                value[key] = MAX_TOKENS
            else:
                _clamp_tokens(item)


@schemathesis.serializer("application/jsonl")
def _jsonl(ctx: Any, value: Any) -> bytes:
    """The REST dataset upload's raw JSONL body (a string in the schema; anything else in a negative case)."""
    if isinstance(value, bytes):
        return value
    return value.encode() if isinstance(value, str) else json.dumps(value).encode()


def _clamp_upload(case: Any) -> None:
    """Keep generated upload bodies (a raw body, or a multipart body's parts) under MAX_UPLOAD bytes."""
    if isinstance(case.body, (str, bytes)):
        case.body = case.body[:MAX_UPLOAD]
    elif isinstance(case.body, list) and len(json.dumps(case.body)) > MAX_UPLOAD:
        case.body = case.body[:2]
    elif isinstance(case.body, dict):
        for key, part in case.body.items():
            if isinstance(part, (str, bytes)):
                case.body[key] = part[:MAX_UPLOAD]


def _tame(case: Any, serve: bool) -> None:
    """Cap the case's cost; with `serve`, point a generation at the served model so that it gets past the
    model lookup (a random model name is only ever a 404)."""
    _clamp_tokens(case.body)
    if case.operation.method == "post" and case.operation.path in ("/api/v1/datasets", "/v1/files"):
        _clamp_upload(case)
        return
    if not isinstance(case.body, dict):
        return
    if case.operation.path.endswith("/training/start"):
        case.body["baseModel"] = NO_SUCH_MODEL
    elif case.operation.path == "/v1/fine_tuning/jobs":
        # Past the model lookup when served, then refused at the training file (400): never a real job.
        if isinstance(case.body.get("training_file"), str):
            case.body["training_file"] = NO_SUCH_FILE
        if serve:
            case.body["model"] = SERVED
    elif serve and case.operation.method == "post":
        case.body.pop("adapter", None)
        if "/api/v1/" in case.operation.path:
            case.body["modelId"] = SERVED
            generation = case.body.get("generation")
            if isinstance(generation, dict):
                generation.setdefault("maxNewTokens", MAX_TOKENS)
            else:
                case.body["generation"] = {"maxNewTokens": MAX_TOKENS}
        else:
            case.body["model"] = SERVED
            if case.operation.path == "/v1/responses":
                case.body.setdefault("max_output_tokens", MAX_TOKENS)
                if not isinstance(case.body.get("input"), str):
                    case.body["input"] = "fuzz"
            elif "max_completion_tokens" not in case.body:
                case.body.setdefault("max_tokens", MAX_TOKENS)
            # Loosely typed (`Any`) fields hold random values, which the gateway rightly refuses with a 400:
            # leave them out so that served cases reach the worker.
            for key in _REFUSED_UNLESS_OFF:
                case.body.pop(key, None)
            if "prompt" in case.body and not isinstance(case.body["prompt"], str):
                case.body["prompt"] = "fuzz"


@dataclass
class Report:
    cases: Counter[str] = field(default_factory=Counter)  # per operation
    statuses: Counter[str] = field(default_factory=Counter)  # per status class: 2xx, 4xx, 5xx
    seconds: float = 0.0

    def line(self, api: str) -> str:
        classes = ", ".join(f"{n} {k}" for k, n in sorted(self.statuses.items()))
        return (
            f"fuzz {api}: {sum(self.cases.values())} cases over {len(self.cases)} operations ({classes}) "
            f"in {self.seconds:.1f}s"
        )


def fuzz(schema_url: str, base_url: str, headers: dict[str, str], error_type: type[msgspec.Struct]) -> Report:
    """Fuzz every operation of the document at `schema_url` (schemathesis leaves out the document's own
    route), positive then negative cases."""
    started = time.monotonic()
    schema = schemathesis.openapi.from_url(schema_url, timeout=30)
    report = Report()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run_operation(operation, mode, base_url, headers, error_type, report)
    report.seconds = time.monotonic() - started
    return report


# not_a_server_error is asserted in `run_operation` instead: the probes answer a documented 503 with their body.
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


def run_operation(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    headers: dict[str, str],
    error_type: type[msgspec.Struct],
    report: Report,
) -> None:
    label = f"{operation.method.upper()} {operation.path}"

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=DERANDOMIZE,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case: Any) -> None:
        _tame(case, serve=mode is GenerationMode.POSITIVE and report.cases[label] % 2 == 0)
        response = case.call(base_url=base_url, headers=headers, timeout=60)
        status = response.status_code
        report.cases[label] += 1
        report.statuses[f"{status // 100}xx"] += 1
        # The schema's own (headers here are ours: a negative case that drops a required header gets it back).
        case.validate_response(response, checks=CHECKS, headers=headers)
        assert status < 500 or (status == 503 and operation.path in PROBES), (label, status, response.text[:500])
        if 400 <= status < 500:
            # Must decode strictly as the app's error shape (the REST envelope's `code` is an ErrorCode).
            msgspec.json.decode(response.content, type=error_type)

    try:
        one()
    except hypothesis.errors.Unsatisfiable:
        pass  # no negative case exists for an operation without parameters or body


def operations(doc_url: str, headers: dict[str, str]) -> set[str]:
    doc = httpx.get(doc_url, headers=headers).json()
    own = httpx.URL(doc_url).path
    return {f"{m.upper()} {path}" for path, item in doc["paths"].items() for m in item if path != own}


async def test_the_rest_api_survives_schemathesis(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"{gateway.api_url}/api/v1/openapi.json"
    headers = {"X-API-Key": API_KEY}
    report = await asyncio.to_thread(fuzz, url, gateway.api_url, headers, ErrorEnvelope)
    with capsys.disabled():
        print("\n" + report.line("/api/v1"))
    assert set(report.cases) == await asyncio.to_thread(operations, url, headers)
    assert report.statuses["2xx"] > 0 and report.statuses["4xx"] > 0


async def test_the_openai_api_survives_schemathesis(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    assert gateway.lite_url is not None
    base = gateway.lite_url.removesuffix("/v1")
    url = f"{base}/openapi.json"
    headers = {"Authorization": "Bearer fuzz"}
    report = await asyncio.to_thread(fuzz, url, base, headers, OpenAIError)
    with capsys.disabled():
        print("\n" + report.line("/v1"))
    assert set(report.cases) == await asyncio.to_thread(operations, url, headers)
    assert report.statuses["2xx"] > 0 and report.statuses["4xx"] > 0
