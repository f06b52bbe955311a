"""`cy chat` (an interactive conversation, streamed) and `cy complete` (one completion)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console

from gateway.cli.client import Client
from gateway.cli.config import config_of
from gateway.cli.errors import CliError

err = Console(stderr=True, highlight=False)

Model = Annotated[str, typer.Option("--model", "-m", help="Model id (`default`: the registry default).")]
Adapter = Annotated[str | None, typer.Option(help="LoRA adapter name (a trained job's adapterName).")]
Temperature = Annotated[float | None, typer.Option(min=0, max=2, help="Sampling temperature (0 = greedy).")]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", min=1, help="Most tokens to generate.")]
TopP = Annotated[float | None, typer.Option(min=0, max=1, help="Nucleus sampling.")]
Seed = Annotated[int | None, typer.Option(help="Same seed + same input = same output.")]


class Api(StrEnum):
    openai = "openai"
    rest = "rest"


def _write(text: str) -> None:
    # Model text goes to stdout as it is: no markup, no wrapping, so it pipes cleanly.
    sys.stdout.write(text)
    sys.stdout.flush()


def _generation(
    temperature: float | None, max_tokens: int | None, top_p: float | None, seed: int | None
) -> dict[str, Any]:
    given = {"temperature": temperature, "maxNewTokens": max_tokens, "topP": top_p, "seed": seed}
    return {k: v for k, v in given.items() if v is not None}


def _rest_body(prompt: str, model: str, adapter: str | None, generation: dict[str, Any], raw: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"modelId": model, "prompt": prompt}
    if adapter:
        body["adapter"] = adapter
    if generation:
        body["generation"] = generation
    if raw:
        body["rawPrompt"] = True
    return body


def stream_rest(client: Client, body: dict[str, Any]) -> Iterator[str]:
    """The text chunks of /api/v1/inference/stream. Raises CliError."""
    for event in client.events("POST", "/inference/stream", json_body=body):
        for choice in event.json().get("choices", []):
            if choice.get("text"):
                yield choice["text"]


def stream_openai(client: Client, body: dict[str, Any]) -> Iterator[str]:
    """The content deltas of /v1/chat/completions with `stream: true`. Raises CliError."""
    for event in client.events("POST", "/chat/completions", json_body={**body, "stream": True}):
        for choice in event.json().get("choices", []):
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content


def _openai_body(
    model: str,
    adapter: str | None,
    temperature: float | None,
    max_tokens: int | None,
    top_p: float | None,
    seed: int | None,
) -> dict[str, Any]:
    # The OpenAI API names an adapter as the model.
    body: dict[str, Any] = {"model": adapter or model}
    for key, value in (("temperature", temperature), ("max_tokens", max_tokens), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            body[key] = value
    return body


def _read_line(prompt: str) -> str | None:
    """One line from the user; None at end of input."""
    if sys.stdin.isatty():
        try:
            return err.input(prompt)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def chat(
    ctx: typer.Context,
    model: Model = "default",
    adapter: Adapter = None,
    temperature: Temperature = None,
    max_tokens: MaxTokens = None,
    top_p: TopP = None,
    seed: Seed = None,
    system: Annotated[str | None, typer.Option(help="System prompt (openai API only).")] = None,
    api: Annotated[
        Api, typer.Option(help="openai: /v1/chat/completions, keeps the conversation; rest: /api/v1, one turn each.")
    ] = Api.openai,
) -> None:
    """Chat with a model, answers streamed as they are generated. Reads lines from stdin until end of input
    or `/exit`; `/reset` forgets the conversation."""
    config = config_of(ctx)
    if system and api is Api.rest:
        raise typer.BadParameter(
            "--system needs --api openai (the REST API takes one user turn)", param_hint="--system"
        )
    interactive = sys.stdin.isatty()
    if interactive:
        err.print(
            f"[dim]{model}{'+' + adapter if adapter else ''} via {api.value} · /exit to quit, /reset to forget[/]"
        )
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    client = Client.openai(config) if api is Api.openai else Client.api(config)
    with client:
        while True:
            line = _read_line("[bold cyan]you>[/] ")
            if line is None or line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
            if line.strip() == "/reset":
                history = history[:1] if system else []
                err.print("[dim]conversation forgotten[/]")
                continue
            if api is Api.openai:
                history.append({"role": "user", "content": line})
                body = _openai_body(model, adapter, temperature, max_tokens, top_p, seed)
                chunks = stream_openai(client, {**body, "messages": history})
            else:
                generation = _generation(temperature, max_tokens, top_p, seed)
                chunks = stream_rest(client, _rest_body(line, model, adapter, generation, raw=False))
            answer: list[str] = []
            try:
                for chunk in chunks:
                    answer.append(chunk)
                    _write(chunk)
            except CliError as exc:
                if api is Api.openai:
                    history.pop()  # the turn failed: the next one starts from the last good state
                if not interactive:
                    raise
                _write("\n")
                exc.show()  # at the prompt an error ends the turn, not the session
                continue
            _write("\n")
            if api is Api.openai:
                history.append({"role": "assistant", "content": "".join(answer)})


def complete(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt; `-` reads it from stdin.")],
    model: Model = "default",
    adapter: Adapter = None,
    temperature: Temperature = None,
    max_tokens: MaxTokens = None,
    top_p: TopP = None,
    seed: Seed = None,
    raw: Annotated[bool, typer.Option(help="Send the prompt as raw text, not through the chat template.")] = False,
    stream: Annotated[bool, typer.Option(help="Print the text as it is generated.")] = True,
) -> None:
    """One completion of PROMPT through /api/v1, printed to stdout."""
    if prompt == "-":
        prompt = sys.stdin.read()
    body = _rest_body(prompt, model, adapter, _generation(temperature, max_tokens, top_p, seed), raw)
    with Client.api(config_of(ctx)) as client:
        if stream:
            for chunk in stream_rest(client, body):
                _write(chunk)
        else:
            data = client.post("/inference", body)
            _write("".join(c.get("text", "") for c in data.get("choices", [])))
    _write("\n")
