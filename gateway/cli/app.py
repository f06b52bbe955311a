"""The `cy` typer app: global options (where the gateway is), `models`, `status`, and the command groups."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gateway.cli import chat, jobs, train
from gateway.cli.client import Client
from gateway.cli.config import config_of, config_path, load
from gateway.cli.errors import CliError

app = typer.Typer(
    name="cy",
    help="Command-line client of the CY-LLM gateway: chat, completions, models, health and LoRA training jobs.",
    no_args_is_help=True,
    # Errors are CliErrors printed as one line; anything else is a bug and keeps its plain traceback.
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(highlight=False)


@app.callback()
def configure(
    ctx: typer.Context,
    url: Annotated[
        str | None, typer.Option(help="/api/v1 base URL (else $CY_LLM_URL, the config file, http://127.0.0.1:8080).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="X-API-Key (else $CY_LLM_API_KEY, the config file, .data/api_key).")
    ] = None,
    openai_url: Annotated[
        str | None,
        typer.Option(help="OpenAI-compatible base URL for `chat` (else $CY_LLM_OPENAI_URL, URL's host:8000/v1)."),
    ] = None,
) -> None:
    """Config file: ~/.config/cy-llm/config.toml ($CY_LLM_CONFIG to use another) with keys url, api_key,
    openai_url, openai_token, timeout."""
    ctx.obj = load(url=url, api_key=api_key, openai_url=openai_url)


@app.command()
def models(ctx: typer.Context) -> None:
    """The registry's models with their live state, engine and LoRA adapters."""
    with Client.api(config_of(ctx)) as client:
        data = client.get("/models")
    table = Table(title="Models")
    for column in ("id", "name", "engine", "status", "max len", "adapters"):
        table.add_column(column)
    colours = {"ready": "green", "loading": "yellow", "failed": "red"}
    for m in data.get("models", []):
        status = str(m.get("status", ""))
        table.add_row(
            str(m.get("id", "")),
            str(m.get("name", "")),
            str(m.get("engine", "")),
            f"[{colours.get(status, 'dim')}]{status}[/]",
            str(m.get("maxModelLen", "")),
            ", ".join(m.get("loraAdapters", [])),
        )
    console.print(table)


def _status_colour(status: str) -> str:
    return {"UP": "green", "ready": "green", "DEGRADED": "yellow", "STARTING": "yellow", "loading": "yellow"}.get(
        status, "red"
    )


def _details(name: str, details: dict[str, Any]) -> str:
    if name == "coordinator":
        w, q = details.get("workers", {}), details.get("queue", {})
        return (
            f"workers {w.get('healthy', 0)}/{w.get('total', 0)} healthy ({w.get('unhealthy', 0)} unhealthy) · "
            f"queue {q.get('pendingTasks', '?')}/{q.get('maxSize', '?')}"
        )
    if name == "gateway":
        return f"up {details.get('uptime', '?')} since {details.get('startTime', '?')}"
    if name == "nats":
        return f"latency {details.get('latencyMs', '?')} ms · connected {details.get('connected', '?')}"
    return ", ".join(f"{k} {v}" for k, v in details.items())


@app.command()
def status(ctx: typer.Context) -> None:
    """The gateway's health: components, workers, queue and each model's state. Exit status 1 when DOWN."""
    with Client.api(config_of(ctx)) as client:
        # 503 is the health answer for DOWN, with the same body: show it rather than call it an error.
        data = client.request("GET", "/health/details", ok=(503,))
    overall = str(data.get("status", "?"))
    table = Table(title=f"CY-LLM {config_of(ctx).url}: [{_status_colour(overall)}]{overall}[/]")
    for column in ("component", "status", "details"):
        table.add_column(column)
    for name, component in data.get("components", {}).items():
        state = str(component.get("status", "?"))
        table.add_row(name, f"[{_status_colour(state)}]{state}[/]", _details(name, component.get("details", {})))
    for model_id, state in data.get("models", {}).items():  # UP needs one of them ready
        table.add_row(f"model {model_id}", f"[{_status_colour(state)}]{state}[/]", "")
    console.print(table)
    if overall == "DOWN":
        raise typer.Exit(1)


@app.command("config")
def show_config(ctx: typer.Context) -> None:
    """The effective configuration (keys masked) and where the config file is read from."""
    config = config_of(ctx)

    def mask(secret: str) -> str:
        return "(none)" if not secret else secret[:4] + "…" if len(secret) > 8 else "****"

    table = Table(title="cy configuration", show_header=False)
    table.add_row("config file", f"{config_path()}{'' if config_path().exists() else ' (absent)'}")
    table.add_row("url", config.url)
    table.add_row("api key", mask(config.api_key))
    table.add_row("openai url", config.openai_url)
    table.add_row("openai token", mask(config.openai_token))
    table.add_row("timeout", f"{config.timeout:g} s")
    console.print(table)


app.command()(chat.chat)
app.command()(chat.complete)
app.add_typer(train.app, name="train")
app.add_typer(jobs.app, name="jobs")


def main() -> None:
    """The `cy` console script: usage errors exit 2 (typer), API and connection errors print one line and
    exit 1, Ctrl-C exits 130; none of them shows a traceback."""
    try:
        app()
    except CliError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
