"""`cy train start`: queue a LoRA fine-tuning job (and, with --follow, watch it to the end)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from gateway.cli.client import Client
from gateway.cli.config import config_of
from gateway.cli.jobs import follow_job

app = typer.Typer(help="LoRA fine-tuning.", no_args_is_help=True)
console = Console(highlight=False)

_HYPER = "Hyper-parameters (server defaults when omitted)"
_LORA = "LoRA"


def _opt(help_text: str, panel: str, **kwargs: Any) -> Any:
    return typer.Option(help=help_text, rich_help_panel=panel, **kwargs)


@app.command()
def start(
    ctx: typer.Context,
    base_model: Annotated[str, typer.Option(help="Registry model id, name or modelPath.")],
    dataset: Annotated[
        str, typer.Option(help=".json/.jsonl dataset, a path inside the server's CY_LLM_DATASETS_DIR (relative to it).")
    ],
    output_dir: Annotated[str, typer.Option(help="Output folder inside the server's CY_LLM_OUTPUTS_DIR.")],
    adapter_name: Annotated[
        str | None, typer.Option(help="Name the adapter is served by (default: from --output-dir).")
    ] = None,
    epochs: Annotated[int | None, _opt("Epochs (3).", _HYPER, min=1)] = None,
    batch_size: Annotated[int | None, _opt("Batch size (4).", _HYPER, min=1)] = None,
    learning_rate: Annotated[float | None, _opt("Learning rate (2e-4).", _HYPER)] = None,
    max_seq_length: Annotated[int | None, _opt("Longest tokenized row (2048).", _HYPER, min=1)] = None,
    save_steps: Annotated[int | None, _opt("Checkpoint every N steps (100).", _HYPER, min=1)] = None,
    eval_steps: Annotated[int | None, _opt("Eval loss every N steps (100).", _HYPER, min=1)] = None,
    eval_split: Annotated[float | None, _opt("Share of rows held out for the eval loss (0.05).", _HYPER)] = None,
    warmup_ratio: Annotated[float | None, _opt("Learning-rate warm-up share (0).", _HYPER)] = None,
    seed: Annotated[int | None, _opt("Seed (42).", _HYPER)] = None,
    lora_rank: Annotated[int | None, _opt("LoRA r (64).", _LORA, min=1)] = None,
    lora_alpha: Annotated[int | None, _opt("LoRA alpha (16).", _LORA, min=1)] = None,
    lora_dropout: Annotated[float | None, _opt("LoRA dropout (0.05).", _LORA)] = None,
    target_modules: Annotated[
        str | None, _opt("Comma-separated modules (q_proj,v_proj; all-linear); default: peft's choice.", _LORA)
    ] = None,
    follow: Annotated[
        bool, typer.Option(help="Show live progress until the job ends; exit 1 if it fails or is cancelled.")
    ] = False,
) -> None:
    """Queue a LoRA fine-tuning job and print its id."""
    hyper = {
        "epochs": epochs,
        "batchSize": batch_size,
        "learningRate": learning_rate,
        "maxSeqLength": max_seq_length,
        "saveSteps": save_steps,
        "evalSteps": eval_steps,
        "evalSplit": eval_split,
        "warmupRatio": warmup_ratio,
        "seed": seed,
    }
    lora: dict[str, Any] = {"r": lora_rank, "loraAlpha": lora_alpha, "loraDropout": lora_dropout}
    if target_modules:
        lora["targetModules"] = [m.strip() for m in target_modules.split(",") if m.strip()]
    body: dict[str, Any] = {"baseModel": base_model, "datasetPath": dataset, "outputDir": output_dir}
    if adapter_name:
        body["adapterName"] = adapter_name
    if given := {k: v for k, v in hyper.items() if v is not None}:
        body["hyperParams"] = given
    if given := {k: v for k, v in lora.items() if v is not None}:
        body["loraConfig"] = given
    with Client.api(config_of(ctx)) as client:
        job = client.post("/training/start", body)
        job_id = str(job.get("jobId", ""))
        console.print(f"{escape(job_id)}: {escape(str(job.get('status', '')))} · {escape(str(job.get('message', '')))}")
        if follow:
            follow_job(client, job_id)
