"""HTTP calls to the gateway and server-sent-event parsing. Every failure becomes a CliError: an API error
envelope (either API's shape, as a status or inside an SSE stream), a refused connection, a timeout."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.cli.config import Config
from gateway.cli.errors import CliError


@dataclass(frozen=True)
class SseEvent:
    data: str
    id: str | None = None

    @property
    def done(self) -> bool:
        return self.data == "[DONE]"

    def json(self) -> Any:
        try:
            return json.loads(self.data)
        except ValueError:
            raise CliError(
                f"the server sent an event that is not JSON: {self.data[:200]!r}", code="BAD_EVENT"
            ) from None


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    """Events from SSE lines (the text/event-stream framing: `data:` lines joined, `id:` kept, comments such
    as `: keep-alive` skipped, a blank line ends an event)."""
    data: list[str] = []
    event_id: str | None = None
    for line in lines:
        if not line:
            if data:
                yield SseEvent("\n".join(data), event_id)
            data, event_id = [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "id":
            event_id = value
    if data:
        yield SseEvent("\n".join(data), event_id)


def error_from_payload(payload: Any, status: int | None) -> CliError | None:
    """The CliError an error body describes: `/api/v1`'s `{"error": {"code", "message", "details"}}` or OpenAI's
    `{"error": {"message", "type", "param", "code"}}`; None when `payload` is not an error."""
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), dict):
        return None
    err = payload["error"]
    message = str(err.get("message") or "unknown error")
    details = err.get("details") or []
    fields = [str(d["field"]) for d in details if isinstance(d, dict) and d.get("field")]
    if fields and not any(f in message for f in fields):
        message += f" [{', '.join(fields)}]"
    if err.get("param") and str(err["param"]) not in message:
        message += f" [{err['param']}]"
    code = err.get("code") or err.get("type") or "ERROR"
    return CliError(message, code=str(code), status=status)


def _http_error(response: httpx.Response) -> CliError:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    return error_from_payload(payload, response.status_code) or CliError(
        response.text.strip()[:300] or response.reason_phrase, code="HTTP_ERROR", status=response.status_code
    )


@contextlib.contextmanager
def _translated(url: str) -> Iterator[None]:
    try:
        yield
    except httpx.ConnectError as exc:
        raise CliError(f"cannot connect to {url}: {exc}", code="CONNECTION_FAILED") from None
    except httpx.TimeoutException:
        raise CliError(f"{url} did not answer in time", code="TIMEOUT") from None
    except httpx.HTTPError as exc:
        raise CliError(f"{url}: {exc or type(exc).__name__}", code="CONNECTION_FAILED") from None


class Client:
    """One API's HTTP client. `Client.api(config)` is /api/v1 with `X-API-Key`; `Client.openai(config)` is
    the OpenAI-compatible /v1 with a bearer token (when one is configured)."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float) -> None:
        self.base_url = base_url
        # Connecting fails fast; reading waits up to `timeout` (a long prefill, a queued request).
        self.http = httpx.Client(
            base_url=base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0), trust_env=False
        )

    @classmethod
    def api(cls, config: Config) -> Client:
        headers = {"X-API-Key": config.api_key} if config.api_key else {}
        return cls(config.url + "/api/v1", headers, config.timeout)

    @classmethod
    def openai(cls, config: Config) -> Client:
        headers = {"Authorization": f"Bearer {config.openai_token}"} if config.openai_token else {}
        return cls(config.openai_url, headers, config.timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        ok: tuple[int, ...] = (),
    ) -> Any:
        """The JSON answer. Raises CliError on an error status (unless listed in `ok`) or a transport failure."""
        url = self.base_url + path
        with _translated(url):
            response = self.http.request(method, path, json=json_body, params=params)
        if response.status_code >= 400 and response.status_code not in ok:
            raise _http_error(response)
        try:
            return response.json()
        except ValueError:
            raise CliError(f"{url} answered with something that is not JSON", code="BAD_RESPONSE") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json_body=body)

    def events(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Iterator[SseEvent]:
        """The events of an SSE response, up to `[DONE]` (not included). Raises CliError on an error status,
        an error event (`data: {"error": ...}`) or a transport failure (also mid-stream)."""
        url = self.base_url + path
        with (
            _translated(url),
            self.http.stream(method, path, json=json_body, params=params, headers=headers) as response,
        ):
            if response.status_code >= 400:
                response.read()
                raise _http_error(response)
            for event in parse_sse(response.iter_lines()):
                if event.done:
                    return
                if event.data.startswith('{"error"'):
                    error = error_from_payload(event.json(), None)
                    if error is not None:
                        raise error
                yield event
