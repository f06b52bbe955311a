"""`cy`, the command-line client, as a real subprocess against a real gateway, engine worker and trainer."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from gateway.cli.client import SseEvent, error_from_payload, parse_sse
from services.trainer.worker import Trainer
from services.training.paths import Roots
from tests.helpers import API_KEY, Gateway
from tests.trainer.helpers import unique, varied_rows, write_jsonl

CY = Path(sys.executable).parent / "cy"
FAST = ["--batch-size", "4", "--learning-rate", "1e-2", "--max-seq-length", "64"]
FAST_LORA = ["--lora-rank", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--target-modules", "q_proj,v_proj"]
GREEDY = ["--model", "tiny", "--temperature", "0", "--max-tokens", "8"]


@dataclass
class Ran:
    rc: int
    out: str
    err: str


def cli_env(gw: Gateway | None, tmp: Path, **extra: str) -> dict[str, str]:
    """A clean environment: none of the developer's CY_LLM_* settings, no config file, no .data/api_key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CY_LLM_") and k != "GATEWAY_API_TOKEN"}
    env.update(COLUMNS="200", CY_LLM_CONFIG=str(tmp / "absent.toml"), CY_LLM_DATA_DIR=str(tmp / "data"))
    if gw is not None:
        env.update(CY_LLM_URL=gw.api_url, CY_LLM_API_KEY=API_KEY, CY_LLM_OPENAI_URL=gw.lite_url or "")
    env.update(extra)
    return env


async def start_cy(env: dict[str, str], *args: str, entry_point: bool = False) -> asyncio.subprocess.Process:
    # Run without blocking the event loop: the gateway under test lives in this process's loop.
    argv = [str(CY)] if entry_point else [sys.executable, "-m", "gateway.cli"]
    return await asyncio.create_subprocess_exec(
        *argv,
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process, stdin: str = "", timeout: float = 300) -> Ran:
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def cy(env: dict[str, str], *args: str, stdin: str = "", entry_point: bool = False) -> Ran:
    ran = await finish(await start_cy(env, *args, entry_point=entry_point), stdin)
    assert "Traceback" not in ran.err, ran.err
    return ran


async def rest_text(gw: Gateway, prompt: str) -> str:
    async with gw.client() as client:
        body = {"modelId": "tiny", "prompt": prompt, "generation": {"temperature": 0, "maxNewTokens": 8}}
        r = await client.post("/api/v1/inference", json=body)
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["text"]
    return text


async def chat_text(gw: Gateway, messages: list[dict[str, str]]) -> str:
    assert gw.lite_url
    async with httpx.AsyncClient(base_url=gw.lite_url, timeout=60) as lite:
        body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 8}
        r = await lite.post("/chat/completions", json=body)
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["message"]["content"]
    return text


# --- SSE parsing (no server) ---------------------------------------------------------------------
def test_sse_parser_joins_data_lines_keeps_ids_and_skips_comments() -> None:
    lines = [": keep-alive", "", "id: 7", 'data: {"a":', "data: 1}", "", "data: [DONE]", ""]
    events = list(parse_sse(iter(lines)))
    assert events == [SseEvent('{"a":\n1}', "7"), SseEvent("[DONE]")]
    assert events[0].json() == {"a": 1} and events[1].done


def test_both_error_shapes_become_a_message_and_a_code() -> None:
    spec = {
        "error": {"code": "INVALID_REQUEST", "message": "bad", "details": [{"type": "x", "field": "generation.topP"}]}
    }
    error = error_from_payload(spec, 400)
    assert error is not None and (error.code, error.status) == ("INVALID_REQUEST", 400)
    assert error.message == "bad [generation.topP]"
    openai = {"error": {"message": "out of range", "type": "invalid_request_error", "param": "top_p", "code": None}}
    error = error_from_payload(openai, 404)
    assert error is not None and error.code == "invalid_request_error" and error.message == "out of range [top_p]"
    assert error_from_payload({"choices": []}, None) is None


# --- inference ---------------------------------------------------------------------------------
async def test_complete_streams_the_same_text_the_api_returns(gw: Gateway, tmp_path: Path) -> None:
    env = cli_env(gw, tmp_path)
    expected = await rest_text(gw, "Name a colour.")
    streamed = await cy(env, "complete", "Name a colour.", *GREEDY)
    assert streamed.rc == 0, streamed.err
    assert streamed.out == expected + "\n" and expected
    whole = await cy(env, "complete", "Name a colour.", *GREEDY, "--no-stream")
    assert whole.rc == 0 and whole.out == streamed.out
    from_stdin = await cy(env, "complete", "-", *GREEDY, stdin="Name a colour.")
    assert from_stdin.out == streamed.out


async def test_chat_streams_answers_and_keeps_the_conversation(gw: Gateway, tmp_path: Path) -> None:
    first = await chat_text(gw, [{"role": "user", "content": "Hi there"}])
    second = await chat_text(
        gw,
        [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "What did I say?"},
        ],
    )
    ran = await cy(cli_env(gw, tmp_path), "chat", *GREEDY, stdin="Hi there\n\nWhat did I say?\n/exit\nnever sent\n")
    assert ran.rc == 0, ran.err
    # The second answer is the one the model gives with the first exchange in its context.
    assert ran.out == f"{first}\n{second}\n"


async def test_chat_over_the_rest_api_answers_each_line_and_ends_at_end_of_input(gw: Gateway, tmp_path: Path) -> None:
    expected = await rest_text(gw, "Hi there")
    ran = await cy(cli_env(gw, tmp_path), "chat", *GREEDY, "--api", "rest", stdin="Hi there\nHi there")
    assert ran.rc == 0, ran.err
    assert ran.out == f"{expected}\n{expected}\n"


# --- tables ------------------------------------------------------------------------------------
async def test_models_and_status_print_tables(gw: Gateway, tmp_path: Path) -> None:
    env = cli_env(gw, tmp_path)
    models = await cy(env, "models")
    assert models.rc == 0, models.err
    row = next(line for line in models.out.splitlines() if "Tiny random Llama" in line)
    assert "tiny" in row and "ready" in row and "transformers" in row and "256" in row
    assert "unavailable" in next(line for line in models.out.splitlines() if "never started" in line)

    status = await cy(env, "status", entry_point=True)
    assert status.rc == 0, status.err
    lines = status.out.splitlines()
    assert any(line.startswith("CY-LLM") or "CY-LLM" in line for line in lines)
    coordinator = next(line for line in lines if "coordinator" in line)
    assert "UP" in coordinator and "healthy" in coordinator and "queue" in coordinator
    assert any("nats" in line and "latency" in line for line in lines)
    assert any("gateway" in line and "uptime" not in line and "up " in line for line in lines)
    assert any("model tiny " in line and "ready" in line for line in lines), lines
    assert any("model unserved " in line and "unavailable" in line for line in lines), lines


# --- errors ------------------------------------------------------------------------------------
async def test_errors_print_the_envelope_message_and_code_without_a_traceback(gw: Gateway, tmp_path: Path) -> None:
    env = cli_env(gw, tmp_path)
    unknown = await cy(env, "complete", "hi", "--model", "no-such-model")
    assert unknown.rc == 1 and "MODEL_NOT_FOUND" in unknown.err and "HTTP 404" in unknown.err
    wrong_key = await cy(cli_env(gw, tmp_path, CY_LLM_API_KEY="wrong"), "models")
    assert wrong_key.rc == 1 and "UNAUTHORIZED" in wrong_key.err
    no_job = await cy(env, "jobs", "status", "job-nope")
    assert no_job.rc == 1 and "TRAINING_JOB_NOT_FOUND" in no_job.err
    refused = await cy(cli_env(None, tmp_path, CY_LLM_URL="http://127.0.0.1:9"), "status")
    assert (
        refused.rc == 1 and "cannot connect to http://127.0.0.1:9" in refused.err and "CONNECTION_FAILED" in refused.err
    )
    bad_chat = await cy(env, "chat", "--model", "no-such-model", stdin="hi\n")
    assert bad_chat.rc == 1 and "model_not_found" in bad_chat.err and "HTTP 404" in bad_chat.err
    usage = await cy(env, "complete")
    assert usage.rc == 2 and "Missing argument" in usage.err
    bad_value = await cy(env, "complete", "hi", "--temperature", "9")
    assert bad_value.rc == 2


async def test_the_config_file_supplies_url_and_key_and_refuses_unknown_keys(gw: Gateway, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'url = "{gw.api_url}"\napi_key = "{API_KEY}"\n')
    ran = await cy(cli_env(None, tmp_path, CY_LLM_CONFIG=str(config)), "models")
    assert ran.rc == 0 and "tiny" in ran.out, ran.err
    config.write_text(f'url = "{gw.api_url}"\napikey = "{API_KEY}"\n')
    typo = await cy(cli_env(None, tmp_path, CY_LLM_CONFIG=str(config)), "models")
    assert typo.rc == 1 and "unknown key(s) apikey" in typo.err and "CONFIG" in typo.err


async def test_the_api_key_comes_from_data_api_key_when_the_environment_has_none(gw: Gateway, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "api_key").write_text(API_KEY + "\n")
    ran = await cy(cli_env(None, tmp_path, CY_LLM_URL=gw.api_url), "models")
    assert ran.rc == 0 and "tiny" in ran.out, ran.err


# --- training ----------------------------------------------------------------------------------
async def test_train_start_follow_runs_a_job_to_completion_and_jobs_ls_lists_it(
    gw: Gateway, trainer: Trainer, roots: Roots, tmp_path: Path
) -> None:
    env = cli_env(gw, tmp_path)
    dataset = write_jsonl(roots, varied_rows(8))
    output = unique("cli-out")
    ran = await cy(
        env,
        "train", "start", "--base-model", "tiny", "--dataset", dataset, "--output-dir", output,
        "--epochs", "2", "--eval-split", "0.25", "--eval-steps", "2", *FAST, *FAST_LORA, "--follow",
        entry_point=True,
    )  # fmt: skip
    assert ran.rc == 0, ran.out + ran.err
    job_id = ran.out.split(":", 1)[0].strip()
    assert job_id.startswith("job-"), ran.out
    assert "completed in" in ran.out and f"adapter {output}" in ran.out
    lines = ran.out.splitlines()
    # Events other than steps are printed as lines above the bar: here the eval loss at steps 2 and 4.
    assert [line.split()[1] for line in lines[1:6]] == ["queued", "started", "eval", "eval", "completed"], ran.out
    assert " eval 2/4 epoch 1 loss " in lines[3] and " eval " in lines[3].split(" loss ")[1]
    bar = next(line for line in lines if line.startswith(f"{job_id} completed"))
    assert " 4/4 loss " in bar and " tok/s" in bar and "ETA 0:00" in bar and "eval -" not in bar
    listed = await cy(env, "jobs", "ls", "--status", "completed")
    assert listed.rc == 0, listed.err
    row = next(line for line in listed.out.splitlines() if job_id in line)
    assert "completed" in row and "tiny" in row and output in row

    status = await cy(env, "jobs", "status", job_id)
    assert status.rc == 0 and "completed" in status.out and "4/4" in status.out and dataset in status.out

    events = await cy(env, "jobs", "events", job_id)
    kinds = [line.split()[1] for line in events.out.splitlines()]
    assert kinds[0] == "queued" and kinds[-1] == "completed" and kinds.count("step") == 4 and kinds.count("eval") == 2

    again = await cy(env, "jobs", "cancel", job_id)
    assert again.rc == 1 and "INVALID_REQUEST" in again.err and "already completed" in again.err


async def test_pause_resume_cancel_and_a_follow_that_ends_non_zero_when_the_job_is_cancelled(
    gw: Gateway, trainer: Trainer, roots: Roots, tmp_path: Path
) -> None:
    env = cli_env(gw, tmp_path)
    dataset = write_jsonl(roots, varied_rows(8))
    started = await cy(
        env, "train", "start", "--base-model", "tiny", "--dataset", dataset, "--output-dir", unique("cli-out"),
        "--epochs", "500", *FAST, *FAST_LORA,
    )  # fmt: skip
    assert started.rc == 0, started.err
    job_id = started.out.split(":", 1)[0].strip()
    follower = await start_cy(env, "jobs", "status", job_id, "--follow")
    events = await start_cy(env, "jobs", "events", job_id, "--follow")

    async with gw.client() as client:
        for _ in range(600):
            job = (await client.get(f"/api/v1/training/status/{job_id}")).json()
            if job["progress"]["currentStep"] >= 2:
                break
            await asyncio.sleep(0.1)
    paused = await cy(env, "jobs", "pause", job_id)
    assert paused.rc == 0 and "paused" in paused.out, paused.err
    resumed = await cy(env, "jobs", "resume", job_id)
    assert resumed.rc == 0 and "queued" in resumed.out, resumed.err
    cancelled = await cy(env, "jobs", "cancel", job_id)
    assert cancelled.rc == 0 and "cancelled" in cancelled.out, cancelled.err

    followed = await finish(follower)
    assert followed.rc == 1 and f"job {job_id} cancelled" in followed.err, followed.out + followed.err
    assert " paused" in followed.out  # the live view printed the pause as it happened
    logged = await finish(events)
    assert logged.rc == 0, logged.err
    assert logged.out.splitlines()[-1].split()[1] == "cancelled"
