"""The OpenAPI documents of both apps: every registered route is described, every error response uses the
app's error schema, and both documents and docs pages are served without credentials."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest
from quart import Quart

from gateway.api_v1 import openapi as rest_openapi
from gateway.api_v1.app import create_api_app
from gateway.core import GatewayCore
from gateway.openai import openapi as lite_openapi
from gateway.openai.app import create_lite_app
from gateway.settings import GatewaySettings
from services.models.registry import Registry
from tests.helpers import API_KEY

# Probes whose non-200 answer is their own body, not an error: a load balancer reads it.
PROBE_BODIES = {
    ("/api/v1/health", "get", "503"),
    ("/api/v1/health/details", "get", "503"),
    ("/api/v1/health/ready", "get", "503"),
    ("/ready", "get", "503"),
}
_ANY_PARAM = re.compile(r"<[^>]*>|\{[^}]*\}")


@pytest.fixture(scope="module")
def apps(registry: Registry) -> dict[str, Quart]:
    core = GatewayCore(GatewaySettings(api_key=API_KEY, gateway_api_token="lite-token"), registry=registry)
    return {"rest": create_api_app(core), "lite": create_lite_app(core)}


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(_ANY_PARAM.sub("{}", path), method.upper()) for path, item in doc["paths"].items() for method in item}


def registered(app: Quart) -> set[tuple[str, str]]:
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                out.add((_ANY_PARAM.sub("{}", rule.rule), method))
    return out


@pytest.mark.parametrize(
    ("name", "build"), [("rest", rest_openapi.build_document), ("lite", lite_openapi.build_document)]
)
def test_every_registered_route_is_documented_and_nothing_else(apps: dict[str, Quart], name: str, build: Any) -> None:
    doc = build()
    assert registered(apps[name]) == documented(doc)


@pytest.mark.parametrize(
    ("build", "error_schema"),
    [(rest_openapi.build_document, "ErrorEnvelope"), (lite_openapi.build_document, "OpenAIError")],
)
def test_every_error_response_uses_the_apps_error_schema(build: Any, error_schema: str) -> None:
    doc = build()
    secured_default = doc["security"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            statuses = op["responses"]
            assert "500" in statuses, (path, method)
            if op.get("security", secured_default) and {} not in op.get("security", secured_default):
                assert "401" in statuses, (path, method)
            if "requestBody" in op:
                assert {"400", "413"} <= set(statuses), (path, method)
                if set(op["requestBody"]["content"]) == {"application/json"}:  # other media types: 415
                    assert "415" in statuses, (path, method)
            for status, response in statuses.items():
                if int(status) < 400 or (path, method, status) in PROBE_BODIES:
                    continue
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{error_schema}"}, (path, method, status)
    # Every reference resolves to a generated component.
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', msgspec.json.encode(doc).decode()))
    assert refs <= set(doc["components"]["schemas"])


def test_the_rest_error_schema_is_the_spec_envelope() -> None:
    schemas = rest_openapi.build_document()["components"]["schemas"]
    assert set(schemas["ErrorInfo"]["required"]) == {"code", "message", "details"}
    assert schemas["ErrorDetail"]["properties"].keys() == {"type", "field", "description"}
    assert "INVALID_REQUEST" in schemas["ErrorCode"]["enum"]


def test_the_lite_error_schema_is_openais_shape() -> None:
    info = lite_openapi.build_document()["components"]["schemas"]["OpenAIErrorInfo"]
    assert set(info["required"]) == {"message", "type", "param", "code"}


async def test_the_rest_document_and_docs_page_are_served_without_the_api_key(apps: dict[str, Quart]) -> None:
    client = apps["rest"].test_client()
    response = await client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    assert msgspec.json.decode(await response.get_data()) == msgspec.json.decode(
        msgspec.json.encode(rest_openapi.build_document())
    )
    page = await client.get("/api/v1/docs")
    assert page.status_code == 200 and page.content_type.startswith("text/html")
    assert 'data-spec="/api/v1/openapi.json"' in (await page.get_data(as_text=True))
    # Everything else still needs the key.
    assert (await client.get("/api/v1/models")).status_code == 401


async def test_the_lite_document_and_docs_page_are_served_without_a_token(apps: dict[str, Quart]) -> None:
    client = apps["lite"].test_client()
    for path in ("/openapi.json", "/v1/openapi.json"):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert msgspec.json.decode(await response.get_data())["openapi"] == "3.1.0"
    page = await client.get("/docs")
    assert page.status_code == 200 and 'data-spec="/openapi.json"' in (await page.get_data(as_text=True))
    assert (await client.get("/v1/models")).status_code == 401
