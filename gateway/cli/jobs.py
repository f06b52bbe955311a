"""`cy jobs ls|status|pause|resume|cancel|events`, and following a job's events with a live progress bar."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from gateway.cli.client import Client
from gateway.cli.config import config_of
from gateway.cli.errors import CliError

app = typer.Typer(help="LoRA training jobs: list, inspect, pause, resume, cancel, events.", no_args_is_help=True)
console = Console(highlight=False)

JobId = Annotated[str, typer.Argument(help="The job id (job-…).")]
STATUSES = ("queued", "running", "paused", "completed", "failed", "cancelled")
_COLOURS = {"completed": "green", "running": "cyan", "queued": "yellow", "paused": "yellow", "failed": "red"}
# A follow that loses its connection picks up after the last event it saw, this many times in a row.
_RECONNECTS = 5


def coloured(status: str) -> str:
    return f"[{_COLOURS.get(status, 'dim')}]{escape(status)}[/]"


def _num(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def event_line(event: dict[str, Any]) -> str:
    """One event as a log line (markup-safe)."""
    p = event.get("progress") or {}
    parts = [f"[dim]{escape(str(event.get('time', '')))}[/]", f"[bold]{escape(str(event.get('kind', '')))}[/]"]
    if p:
        parts.append(f"{p.get('currentStep', 0)}/{p.get('totalSteps', 0)} epoch {p.get('currentEpoch', 0)}")
        if p.get("currentStep"):  # before the first step the loss is a placeholder
            parts.append(f"loss {_num(p.get('loss'))}")
        if p.get("evalLoss") is not None:
            parts.append(f"eval {_num(p['evalLoss'])}")
        if p.get("tokensPerSecond") is not None:
            parts.append(f"{_num(p['tokensPerSecond'], '.0f')} tok/s")
    if event.get("message"):
        parts.append(escape(str(event["message"])))
    return " ".join(parts)


def stream_events(client: Client, job_id: str, *, follow: bool) -> Any:
    """The job's events (decoded), replayed then (with `follow`) live until the job ends. A dropped connection
    is resumed after the last event seen (`Last-Event-ID`). Raises CliError."""
    last_id: str | None = None
    failures = 0
    while True:
        headers = {"Last-Event-ID": last_id} if last_id else None
        params = {"follow": "true" if follow else "false"}
        try:
            for event in client.events("GET", f"/training/events/{job_id}", params=params, headers=headers):
                failures = 0
                last_id = event.id or last_id
                yield event.json()
            return
        except CliError as exc:
            # Only a transport failure mid-follow is worth a retry; an API error (unknown job) is final.
            failures += 1
            if exc.status is not None or not follow or failures > _RECONNECTS:
                raise
            console.print(f"[yellow]connection lost ({escape(exc.message)}), reconnecting…[/]")
            time.sleep(min(2**failures * 0.25, 5))


def _eta(p: dict[str, Any], elapsed: float | None) -> float | None:
    step, total = p.get("currentStep") or 0, p.get("totalSteps") or 0
    if not step or not total or elapsed is None:
        return None
    return elapsed / step * max(total - step, 0)


def follow_job(client: Client, job_id: str) -> dict[str, Any]:
    """Show the job's progress live (a bar with step/total, loss, eval loss, tokens/s, ETA) until it ends;
    returns its final status record. Raises CliError(JOB_FAILED) when it failed or was cancelled."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]} · eval {task.fields[eval]} · {task.fields[tps]} tok/s · ETA {task.fields[eta]}"
        ),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task(job_id, total=None, loss="-", eval="-", tps="-", eta="-")
        for event in stream_events(client, job_id, follow=True):
            kind = event.get("kind", "")
            p = event.get("progress") or {}
            if p:
                fields: dict[str, Any] = {
                    "loss": _num(p.get("loss")),
                    "eta": _duration(_eta(p, event.get("elapsedTimeSeconds"))),
                }
                if p.get("evalLoss") is not None:
                    fields["eval"] = _num(p["evalLoss"])
                if p.get("tokensPerSecond") is not None:
                    fields["tps"] = _num(p["tokensPerSecond"], ".0f")
                progress.update(task, completed=p.get("currentStep", 0), total=p.get("totalSteps") or None, **fields)
            progress.update(task, description=f"{job_id} {kind}")
            if kind != "step":  # steps live in the bar; everything else is worth a line
                progress.console.print(event_line(event))
    job: dict[str, Any] = client.get(f"/training/status/{job_id}")
    status = job.get("status", "")
    elapsed = _duration(job.get("elapsedTimeSeconds"))
    if status == "completed":
        console.print(
            f"[green]completed[/] in {elapsed}: adapter [bold]{escape(str(job.get('adapterName', '')))}[/] "
            f"in {escape(str(job.get('outputDir', '')))}"
        )
    elif status in ("failed", "cancelled"):
        error = job.get("error") or {}
        reason = error.get("message") or job.get("message") or status
        raise CliError(f"job {job_id} {status}: {reason}", code=str(error.get("code") or f"JOB_{status.upper()}"))
    return job


# --- commands ----------------------------------------------------------------------------------
@app.command("ls")
def list_jobs(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help=f"Only jobs in this state: {', '.join(STATUSES)}.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Training jobs, newest first."""
    if status is not None and status not in STATUSES:
        raise typer.BadParameter(f"'{status}' is not one of {', '.join(STATUSES)}", param_hint="--status")
    with Client.api(config_of(ctx)) as client:
        data = client.get("/training/list", status=status, limit=limit, offset=offset)
    jobs = data.get("jobs", [])
    table = Table(title=f"Training jobs ({len(jobs)} of {data.get('total', len(jobs))})")
    for column in ("job", "status", "base model", "adapter", "created", "completed"):
        table.add_column(column, no_wrap=column == "job")
    for job in jobs:
        table.add_row(
            escape(str(job.get("jobId", ""))),
            coloured(str(job.get("status", ""))),
            escape(str(job.get("baseModel", ""))),
            escape(str(job.get("adapterName") or "")),
            escape(str(job.get("createdAt") or "")),
            escape(str(job.get("completedAt") or "")),
        )
    console.print(table)


@app.command("status")
def job_status(
    ctx: typer.Context,
    job_id: JobId,
    follow: Annotated[bool, typer.Option(help="Show live progress until the job ends.")] = False,
) -> None:
    """One job's state and progress."""
    with Client.api(config_of(ctx)) as client:
        if follow:
            follow_job(client, job_id)
            return
        job = client.get(f"/training/status/{job_id}")
    p = job.get("progress") or {}
    table = Table(title=f"Job {escape(job_id)}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows: list[tuple[str, str]] = [
        ("status", coloured(str(job.get("status", "")))),
        ("step", f"{p.get('currentStep', 0)}/{p.get('totalSteps', 0)} (epoch {p.get('currentEpoch', 0)})"),
        ("loss", _num(p.get("loss"))),
        ("eval loss", _num(p.get("evalLoss"))),
        ("learning rate", _num(p.get("learningRate"), ".2e")),
        ("tokens/s", _num(p.get("tokensPerSecond"), ".0f")),
        ("elapsed", _duration(job.get("elapsedTimeSeconds"))),
        ("ETA", _duration(job.get("estimatedTimeRemainingSeconds"))),
    ]
    for key, label in (
        ("baseModel", "base model"),
        ("adapterName", "adapter"),
        ("datasetPath", "dataset"),
        ("outputDir", "output dir"),
        ("checkpointStep", "checkpoint step"),
        ("attempt", "attempt"),
        ("createdAt", "created"),
        ("startedAt", "started"),
        ("completedAt", "completed"),
        ("message", "message"),
    ):
        if job.get(key) not in (None, ""):
            rows.append((label, escape(str(job[key]))))
    if job.get("error"):
        rows.append(
            ("error", f"[red]{escape(str(job['error'].get('message', '')))}[/] ({job['error'].get('code', '')})")
        )
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _control(ctx: typer.Context, verb: str, job_id: str) -> None:
    with Client.api(config_of(ctx)) as client:
        job = client.post(f"/training/{verb}/{job_id}")
    message = f" · {escape(str(job['message']))}" if job.get("message") else ""
    console.print(
        f"{escape(job_id)}: {coloured(str(job.get('status', '')))} at step {job.get('currentStep', 0)}{message}"
    )


@app.command()
def pause(ctx: typer.Context, job_id: JobId) -> None:
    """Checkpoint the job and stop it (a queued job is paused at once)."""
    _control(ctx, "pause", job_id)


@app.command()
def resume(ctx: typer.Context, job_id: JobId) -> None:
    """Queue a paused job again; it continues from its checkpoint."""
    _control(ctx, "resume", job_id)


@app.command()
def cancel(ctx: typer.Context, job_id: JobId) -> None:
    """Stop the job for good (within one step)."""
    _control(ctx, "cancel", job_id)


@app.command()
def events(
    ctx: typer.Context,
    job_id: JobId,
    follow: Annotated[bool, typer.Option(help="Keep printing new events until the job ends.")] = False,
) -> None:
    """The job's events (queued, started, step, eval, checkpoint, …), one line each."""
    with Client.api(config_of(ctx)) as client:
        for event in stream_events(client, job_id, follow=follow):
            console.print(event_line(event))
