"""Requests that break before a route sees them (bytes that are not UTF-8, JSON nested past the recursion
limit, a body that is not sent as JSON, request heads the HTTP server refuses, paths with `//`): each gets a
4xx in the API's own error shape, through the real hypercorn server, and no request text reaches the logs."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import structlog

from tests.helpers import API_KEY, Gateway

API_ROUTES = ["/inference", "/inference/stream", "/inference/streamWithMetadata", "/training/start"]
LITE_ROUTES = ["/chat/completions", "/completions"]
DEEP = 5000


def marker() -> str:
    return f"SECRET-PROMPT-{uuid.uuid4().hex}"


def assert_spec_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"code", "message", "details"} and error["code"] == "INVALID_REQUEST", error
    return error


def assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", error
    return error


def assert_logs_hold_no(secret: str, events: list[dict[str, Any]]) -> None:
    assert not [e for e in events if e.get("log_level") in ("error", "critical")], events
    assert secret not in repr(events)


# --- item 1: invalid UTF-8 --------------------------------------------------------------------------
@pytest.mark.parametrize("route", API_ROUTES)
async def test_invalid_utf8_in_a_rest_body_is_a_400_in_the_spec_envelope_and_stays_out_of_the_logs(
    gateway: Gateway, route: str
) -> None:
    secret = marker()
    field = b'"datasetPath"' if route == "/training/start" else b'"prompt"'
    data = b"{" + field + b': "' + secret.encode() + b' \xff\xfe"}'
    async with gateway.client() as client:
        with structlog.testing.capture_logs() as events:
            r = await client.post(f"/api/v1{route}", content=data, headers={"content-type": "application/json"})
    error = assert_spec_error(r, 400)
    assert "UTF-8" in error["message"] and error["details"][0]["type"] == "malformed_json", error
    assert secret not in r.text
    assert_logs_hold_no(secret, events)


@pytest.mark.parametrize("route", LITE_ROUTES)
async def test_invalid_utf8_in_an_openai_body_is_a_400_invalid_request_error_and_stays_out_of_the_logs(
    gateway: Gateway, route: str
) -> None:
    secret = marker()
    data = (
        b'{"model": "default", "prompt": "'
        if route == "/completions"
        else b'{"model": "default", "messages": [{"role": "user", "content": "'
    )
    data += secret.encode() + b" \xc3\x28" + (b'"}' if route == "/completions" else b'"}]}')
    async with httpx.AsyncClient(base_url=str(gateway.lite_url), timeout=60) as client:
        with structlog.testing.capture_logs() as events:
            r = await client.post(route, content=data, headers={"content-type": "application/json"})
    error = assert_openai_error(r, 400)
    assert error["code"] == "invalid_json" and "UTF-8" in error["message"], error
    assert secret not in r.text
    assert_logs_hold_no(secret, events)


# --- item 2: nesting past the recursion limit in untyped fields --------------------------------------
def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/completions", '{"prompt": %s}'),
        ("/completions", '{"prompt": "hi", "logit_bias": %s}'),
        ("/chat/completions", '{"messages": [{"role": "user", "content": "hi", "function_call": %s}]}'),
        (  # tools are typed; the untyped part is a function's parameters schema
            "/chat/completions",
            '{"messages": [{"role": "user", "content": "hi"}], "tools": '
            '[{"type": "function", "function": {"name": "f", "parameters": {"a": %s}}}]}',
        ),
        (  # response_format is typed now; the untyped part is its JSON schema
            "/chat/completions",
            '{"messages": [{"role": "user", "content": "JSON"}], "response_format": '
            '{"type": "json_schema", "json_schema": {"name": "x", "schema": {"a": %s}}}}',
        ),
    ],
)
async def test_json_nested_past_the_recursion_limit_in_any_untyped_openai_field_is_a_400(
    gateway: Gateway, route: str, body: str
) -> None:
    async with httpx.AsyncClient(base_url=str(gateway.lite_url), timeout=60) as client:
        with structlog.testing.capture_logs() as events:
            r = await client.post(route, content=body % nested(DEEP), headers={"content-type": "application/json"})
    error = assert_openai_error(r, 400)
    assert error["code"] == "invalid_json" and "nested" in error["message"], error
    assert_logs_hold_no("[[[[", events)


async def test_json_nested_past_the_recursion_limit_in_a_rest_body_is_a_400(gateway: Gateway) -> None:
    async with gateway.client() as client:
        for route in API_ROUTES:
            r = await client.post(f"/api/v1{route}", content=f'{{"prompt": {nested(DEEP)}}}')
            assert_spec_error(r, 400)


# --- issue 19 item 10: a body that is not sent as JSON --------------------------------------------------
NOT_JSON = ["text/plain", "application/x-www-form-urlencoded", "application/xml; charset=utf-8"]
# Bodies that would pass (or fail late) if the Content-Type were ignored: the refusal must come first.
REST_JSON = json.dumps({"modelId": "tiny", "prompt": "Hello", "generation": {"temperature": 0, "maxNewTokens": 2}})
LITE_JSON = json.dumps({"model": "default", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2})


@pytest.mark.parametrize("content_type", NOT_JSON)
@pytest.mark.parametrize("route", API_ROUTES)
async def test_a_rest_body_sent_as_another_media_type_is_a_415_naming_the_content_type(
    gateway: Gateway, route: str, content_type: str
) -> None:
    async with gateway.client() as client:
        r = await client.post(f"/api/v1{route}", content=REST_JSON, headers={"content-type": content_type})
    error = assert_spec_error(r, 415)
    assert error["details"][0]["type"] == "unsupported_media_type", error
    assert error["details"][0]["field"] == "Content-Type", error
    assert content_type.split(";")[0] in error["message"] and "application/json" in error["message"], error


@pytest.mark.parametrize("content_type", NOT_JSON)
@pytest.mark.parametrize("route", [*LITE_ROUTES, "/fine_tuning/jobs"])
async def test_an_openai_body_sent_as_another_media_type_is_a_415_in_openais_error_shape(
    gateway: Gateway, route: str, content_type: str
) -> None:
    body = (
        json.dumps({"model": "default", "prompt": "Hello", "max_tokens": 2}) if route == "/completions" else LITE_JSON
    )
    async with httpx.AsyncClient(base_url=str(gateway.lite_url), timeout=60) as client:
        r = await client.post(route, content=body, headers={"content-type": content_type})
    error = assert_openai_error(r, 415)
    assert (error["code"], error["param"]) == ("unsupported_media_type", "Content-Type"), error
    assert r.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON", None])
async def test_json_with_parameters_any_case_or_no_content_type_at_all_is_served_on_both_faces(
    gateway: Gateway, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    async with gateway.client() as client:
        rest = await client.post("/api/v1/inference", content=REST_JSON, headers=headers)
    async with httpx.AsyncClient(base_url=str(gateway.lite_url), timeout=60) as client:
        lite = await client.post("/chat/completions", content=LITE_JSON, headers=headers)
    assert rest.status_code == 200, rest.text
    assert lite.status_code == 200, lite.text


# --- item 6: what the HTTP server layer refuses -----------------------------------------------------
async def raw_exchange(url: str, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `head` (a request without a body) over a fresh TCP connection to the server behind `url`;
    returns (status, headers, body) of the first response."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(head)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(1 << 20), 10)
        while b"\r\n\r\n" not in raw:
            more = await asyncio.wait_for(reader.read(1 << 20), 10)
            if not more:
                break
            raw += more
        status_line, _, rest = raw.partition(b"\r\n")
        header_block, _, body = rest.partition(b"\r\n\r\n")
        headers = {}
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            headers[name.decode().strip().lower()] = value.decode().strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            more = await asyncio.wait_for(reader.read(1 << 20), 10)
            if not more:
                break
            body += more
        return int(status_line.split()[1]), headers, body
    finally:
        writer.close()


def request_head(target: str, auth: str, extra: bytes = b"") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode() + extra + b"Connection: close\r\n\r\n"


def servers(gateway: Gateway) -> list[tuple[str, str, str]]:
    """(base URL, auth header, API shape) for the two apps."""
    return [
        (gateway.api_url, f"X-API-Key: {API_KEY}", "spec"),
        (str(gateway.lite_url), "Authorization: Bearer unused", "openai"),
    ]


def assert_shape(shape: str, status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body)
    error: dict[str, Any] = json.loads(body)["error"]
    if shape == "spec":
        assert set(error) == {"code", "message", "details"} and error["code"] == "INVALID_REQUEST", error
    else:
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


async def test_request_headers_over_the_limit_get_431_in_each_apis_error_shape(gateway: Gateway) -> None:
    for url, auth, shape in servers(gateway):
        huge = b"X-Filler: " + b"a" * 64 * 1024 + b"\r\n"
        status, headers, body = await raw_exchange(url, request_head("/health", auth, huge))
        assert status == 431, (status, headers, body)
        error = assert_shape(shape, status, headers, body)
        assert "header" in error["message"].lower()


async def test_a_nul_byte_in_a_header_value_gets_400_in_each_apis_error_shape(gateway: Gateway) -> None:
    for url, auth, shape in servers(gateway):
        status, headers, body = await raw_exchange(url, request_head("/health", auth, b"X-Bad: a\x00b\r\n"))
        assert status == 400, (status, headers, body)
        assert_shape(shape, status, headers, body)


@pytest.mark.parametrize(
    "target", ["//api/v1/inference", "/api/v1//inference", "/api//v1/inference", "//v1/chat/completions"]
)
async def test_a_path_with_a_double_slash_is_a_404_in_each_apis_error_shape_not_a_redirect(
    gateway: Gateway, target: str
) -> None:
    # Sent as typed: a client library might normalise the path before the server could see it.
    body = b'{"modelId": "tiny", "model": "default", "prompt": "hi"}'
    for url, auth, shape in servers(gateway):
        head = (
            f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        status, headers, reply = await raw_exchange(url, head.encode() + body)
        assert status == 404 and "location" not in headers, (url, status, headers, reply)
        error = assert_shape(shape, status, headers, reply)
        assert target in error["message"], error
