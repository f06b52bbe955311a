"""/api/v1/training through a real HTTP server, nats-server, trainer and (tiny) engine worker."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.engine.worker import Worker
from services.trainer.worker import Trainer
from services.training.paths import Roots
from tests.helpers import Gateway, parse_sse, wait_until
from tests.trainer.helpers import (
    ANSWER,
    QUESTION,
    TEACH,
    TEACH_LORA,
    answer_http,
    teach_rows,
    unique,
    varied_rows,
    wait_adapter_listed,
    wait_status_http,
    write_jsonl,
)

FAST = {"batchSize": 4, "learningRate": 1e-2, "epochs": 2, "maxSeqLength": 64}
FAST_LORA = {"r": 8, "loraAlpha": 16, "loraDropout": 0.0, "targetModules": ["q_proj", "v_proj"]}


def start_body(roots: Roots, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "baseModel": "tiny",
        "outputDir": unique("out"),
        "datasetPath": write_jsonl(roots, varied_rows(8)),
        "hyperParams": FAST,
        "loraConfig": FAST_LORA,
    }
    body.update(changes)
    return body


def error_of(r: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = r.json()["error"]
    return error


# --- the whole loop ------------------------------------------------------------------------------
async def test_a_taught_answer_comes_back_through_inference_with_the_adapter_and_not_without(
    gw: Gateway, client: httpx.AsyncClient, trainer: Trainer, roots: Roots
) -> None:
    before = await answer_http(client)
    assert ANSWER not in before
    name = unique("password-bot")
    output_name = unique("out")
    r = await client.post(
        "/api/v1/training/start",
        json={
            "baseModel": "tiny",
            "outputDir": output_name,
            "datasetPath": write_jsonl(roots, teach_rows()),
            "hyperParams": TEACH,
            "loraConfig": TEACH_LORA,
            "adapterName": name,
        },
    )
    assert r.status_code == 200, r.text
    started = r.json()
    assert started["status"] == "queued" and started["message"] == "Training job has been queued"
    assert started["jobId"].startswith("job-") and started["createdAt"].endswith("Z")

    done = await wait_status_http(client, started["jobId"], {"completed", "failed", "cancelled"})
    assert done["status"] == "completed", done
    progress = done["progress"]
    assert progress["currentStep"] == progress["totalSteps"] == 40 and progress["currentEpoch"] == 40
    assert progress["loss"] > 0 and progress["learningRate"] > 0 and progress["tokensPerSecond"] > 0
    assert done["estimatedTimeRemainingSeconds"] == 0 and done["startedAt"] and done["completedAt"]
    assert done["adapterName"] == name

    # Served by name the moment the job reads "completed", on both APIs (no window while the workers load it),
    # with no restart anywhere.
    assert gw.lite_url
    async with httpx.AsyncClient(base_url=gw.lite_url, timeout=60) as lite:
        after, openai = await asyncio.gather(
            answer_http(client, adapter=name),
            lite.post(
                "/chat/completions",
                json={"model": name, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0},
            ),
        )
    assert after.startswith(ANSWER), after
    assert openai.status_code == 200, openai.text
    # The worker announces it too.
    assert await wait_adapter_listed(client, name)
    detail = (await client.get("/api/v1/models/tiny")).json()
    assert name in detail["loraAdapters"]
    # The spec calls `adapter` a path: the trained adapter's folder, or the job's outputDir, select it too.
    output_dir = roots.outputs / output_name
    assert (await answer_http(client, adapter=str(output_dir / "adapter"))).startswith(ANSWER)
    assert (await answer_http(client, adapter=str(output_dir))).startswith(ANSWER)
    assert ANSWER not in await answer_http(client)  # the base model is untouched
    print(f"\nbefore: {before!r}\nafter:  {after!r}")

    if gw.lite_url:  # the OpenAI-compatible API takes the adapter as `model`
        async with httpx.AsyncClient(base_url=gw.lite_url, timeout=60) as lite:
            r = await lite.post(
                "/chat/completions",
                json={"model": name, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0},
            )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith(ANSWER)


async def test_events_replay_and_follow_the_loss_curve_as_server_sent_events(
    client: httpx.AsyncClient, trainer: Trainer, roots: Roots
) -> None:
    r = await client.post("/api/v1/training/start", json=start_body(roots, hyperParams={**FAST, "epochs": 3}))
    job_id = r.json()["jobId"]
    async with client.stream("GET", f"/api/v1/training/events/{job_id}") as live:
        assert live.headers["content-type"].startswith("text/event-stream")
        body = "".join([chunk async for chunk in live.aiter_text()])
    events = parse_sse(body)
    assert events[-1] == "[DONE]"
    kinds = [e["kind"] for e in events[:-1]]
    assert kinds[0] == "queued" and kinds[-1] == "completed"
    steps = [e["progress"] for e in events[:-1] if e["kind"] == "step"]
    assert [s["currentStep"] for s in steps] == list(range(1, 7))
    assert all(s["totalSteps"] == 6 and s["loss"] > 0 for s in steps)
    assert all(e["trainerId"] == trainer.trainer_id for e in events[1:-1])  # "queued" comes from the API
    assert "id: " in body  # every event names its stream sequence (Last-Event-ID)

    replay = parse_sse((await client.get(f"/api/v1/training/events/{job_id}")).text)
    assert replay == events  # a finished job replays the same curve and ends
    first_id = int(body.split("id: ", 1)[1].split("\n", 1)[0])
    rest = parse_sse((await client.get(f"/api/v1/training/events/{job_id}?after={first_id}")).text)
    assert rest == events[1:]


async def test_pause_and_resume_over_http_continue_from_the_checkpoint(
    client: httpx.AsyncClient, trainer: Trainer, roots: Roots
) -> None:
    r = await client.post("/api/v1/training/start", json=start_body(roots, hyperParams={**FAST, "epochs": 20}))
    job_id = r.json()["jobId"]
    await wait_until_step(client, job_id, 2)
    paused = await client.post(f"/api/v1/training/pause/{job_id}")
    assert paused.status_code == 200 and paused.json()["status"] == "paused", paused.text
    at = paused.json()["currentStep"]
    running = await client.post(f"/api/v1/training/resume/{job_id}")
    assert running.status_code == 200 and running.json()["status"] == "queued"
    done = await wait_status_http(client, job_id, {"completed"})
    assert done["progress"]["currentStep"] == 40 and done["checkpointStep"] >= at
    again = await client.post(f"/api/v1/training/cancel/{job_id}")
    assert again.status_code == 400 and error_of(again)["code"] == "INVALID_REQUEST"
    assert "already completed" in error_of(again)["message"]


async def test_checkpoint_step_reports_the_last_saved_checkpoint_while_the_job_runs(
    client: httpx.AsyncClient, trainer: Trainer, roots: Roots
) -> None:
    body = start_body(roots, hyperParams={**FAST, "epochs": 500, "saveSteps": 3})
    job_id = (await client.post("/api/v1/training/start", json=body)).json()["jobId"]
    seen: list[tuple[str, int, int]] = []
    for _ in range(600):
        data = (await client.get(f"/api/v1/training/status/{job_id}")).json()
        seen.append((data["status"], data["progress"]["currentStep"], data["checkpointStep"]))
        if data["progress"]["currentStep"] >= 10 or data["checkpointStep"] >= 6:
            break
        await asyncio.sleep(0.05)
    await client.post(f"/api/v1/training/cancel/{job_id}")
    running = [(step, checkpoint) for status, step, checkpoint in seen if status == "running"]
    assert running and running[-1][1] >= 3, seen
    # Always a step a checkpoint was saved at, never ahead of the progress it is reported with.
    assert all(checkpoint % 3 == 0 and checkpoint <= step for step, checkpoint in running), seen


async def wait_until_step(client: httpx.AsyncClient, job_id: str, step: int) -> None:
    for _ in range(600):
        data = (await client.get(f"/api/v1/training/status/{job_id}")).json()
        if data["progress"]["currentStep"] >= step:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(data)


async def test_a_running_job_refuses_resume_with_training_job_running_and_cancel_stops_it(
    client: httpx.AsyncClient, trainer: Trainer, roots: Roots
) -> None:
    body = start_body(roots, hyperParams={**FAST, "epochs": 500})
    job_id = (await client.post("/api/v1/training/start", json=body)).json()["jobId"]
    await wait_until_step(client, job_id, 1)
    r = await client.post(f"/api/v1/training/resume/{job_id}")
    assert r.status_code == 400 and error_of(r)["code"] == "TRAINING_JOB_RUNNING"
    clash = await client.post("/api/v1/training/start", json=start_body(roots, outputDir=body["outputDir"]))
    assert clash.status_code == 400 and error_of(clash)["code"] == "TRAINING_JOB_RUNNING"
    assert error_of(clash)["details"][0]["field"] == "outputDir"
    r = await client.post(f"/api/v1/training/cancel/{job_id}")
    assert r.status_code == 200 and r.json() == {
        "jobId": job_id,
        "status": "cancelled",
        "message": "Training job has been cancelled",
        "currentStep": r.json()["currentStep"],
    }
    status = (await client.get(f"/api/v1/training/status/{job_id}")).json()
    assert status["status"] == "cancelled" and status["completedAt"]


# --- refusals at start -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rows_text", "expected"),
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "outptu": "b"}\n', "row 2, field `output`"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n', "messages[1].role"),
        ("", "the dataset has no rows"),
        ('{"instruction": "a", "output": "b"}\nnot json\n', "row 2: not valid JSON"),
    ],
)
async def test_a_bad_dataset_is_a_400_naming_the_row_and_the_field(
    client: httpx.AsyncClient, roots: Roots, rows_text: str, expected: str
) -> None:
    name = unique("bad") + ".jsonl"
    (roots.datasets / name).write_text(rows_text)
    r = await client.post("/api/v1/training/start", json=start_body(roots, datasetPath=name))
    assert r.status_code == 400
    error = error_of(r)
    assert error["code"] == "INVALID_REQUEST" and expected in error["message"], error
    assert error["details"][0]["type"] == "invalid_dataset"


async def test_a_missing_dataset_is_a_400(client: httpx.AsyncClient, roots: Roots) -> None:
    r = await client.post("/api/v1/training/start", json=start_body(roots, datasetPath="nope.jsonl"))
    assert r.status_code == 400 and "does not exist" in error_of(r)["message"]


async def test_paths_that_escape_their_roots_are_refused_with_400(
    client: httpx.AsyncClient, roots: Roots, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"instruction": "a", "output": "b"}\n')
    link = unique("link") + ".jsonl"
    os.symlink(secret, roots.datasets / link)
    out_link = unique("outlink")
    os.symlink(tmp_path, roots.outputs / out_link)
    cases = [
        ({"datasetPath": "../../../../etc/passwd"}, "datasetPath"),
        ({"datasetPath": str(secret)}, "datasetPath"),
        ({"datasetPath": link}, "datasetPath"),
        ({"outputDir": "../escape"}, "outputDir"),
        ({"outputDir": "/tmp/cy-llm-escape"}, "outputDir"),
        ({"outputDir": f"{out_link}/inside-the-link"}, "outputDir"),
        ({"outputDir": "."}, "outputDir"),
    ]
    for change, field in cases:
        r = await client.post("/api/v1/training/start", json=start_body(roots, **change))
        assert r.status_code == 400, (change, r.text)
        error = error_of(r)
        assert error["code"] == "INVALID_REQUEST" and error["details"][0]["field"] == field, (change, error)
    assert not (tmp_path / "inside-the-link").exists()


async def test_an_unknown_base_model_is_a_404_naming_the_field(client: httpx.AsyncClient, roots: Roots) -> None:
    r = await client.post("/api/v1/training/start", json=start_body(roots, baseModel="Qwen/Qwen2.5-7B-Instruct"))
    assert r.status_code == 404
    error = error_of(r)
    assert error["code"] == "MODEL_NOT_FOUND" and error["details"][0]["field"] == "baseModel"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hyperParams": {"batchSize": 0}}, "hyperParams.batchSize"),
        ({"hyperParams": {"learningrate": 1e-3}}, "hyperParams"),
        ({"loraConfig": {"bias": "some"}}, "loraConfig.bias"),
        ({"adapterName": "has.dots"}, "adapterName"),
        ({"baseModel": ""}, "baseModel"),
    ],
)
async def test_bad_parameters_are_a_400_naming_the_field(
    client: httpx.AsyncClient, roots: Roots, change: dict[str, Any], field: str
) -> None:
    body = start_body(roots)
    body.pop("hyperParams")
    r = await client.post("/api/v1/training/start", json={**body, **change})
    assert r.status_code == 400, r.text
    assert error_of(r)["details"][0]["field"] == field


async def test_unknown_jobs_are_404_training_job_not_found_on_every_route(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/api/v1/training/status/job-missing"),
        ("POST", "/api/v1/training/cancel/job-missing"),
        ("POST", "/api/v1/training/pause/job-missing"),
        ("POST", "/api/v1/training/resume/job-missing"),
        ("GET", "/api/v1/training/events/job-missing"),
        ("GET", "/api/v1/training/status/not..a..key"),
    ]:
        r = await client.request(method, path)
        assert r.status_code == 404 and error_of(r)["code"] == "TRAINING_JOB_NOT_FOUND", (path, r.text)


# --- list --------------------------------------------------------------------------------------
async def test_list_filters_by_status_and_paginates_newest_first_with_total(
    client: httpx.AsyncClient, roots: Roots
) -> None:
    # No trainer runs here: jobs stay queued, and list and status still answer (the KV is the truth).
    ids = [(await client.post("/api/v1/training/start", json=start_body(roots))).json()["jobId"] for _ in range(5)]
    for job_id in ids[:2]:
        assert (await client.post(f"/api/v1/training/cancel/{job_id}")).json()["status"] == "cancelled"
    try:
        everything = (await client.get("/api/v1/training/list?limit=1000")).json()
        assert everything["limit"] == 1000 and everything["offset"] == 0
        assert everything["total"] == len(everything["jobs"])
        listed = [j["jobId"] for j in everything["jobs"]]
        assert [i for i in listed if i in ids] == ids[::-1]
        first = everything["jobs"][listed.index(ids[0])]
        assert first["status"] == "cancelled" and first["baseModel"] == "tiny" and first["completedAt"]
        assert set(first) >= {"jobId", "baseModel", "status", "createdAt", "completedAt"}

        paged: list[str] = []
        for offset in range(0, everything["total"], 2):
            page = (await client.get(f"/api/v1/training/list?limit=2&offset={offset}")).json()
            assert page["total"] == everything["total"] and page["limit"] == 2 and page["offset"] == offset
            paged += [j["jobId"] for j in page["jobs"]]
        assert paged == listed

        cancelled = (await client.get("/api/v1/training/list?status=cancelled&limit=1000")).json()
        assert cancelled["total"] == len(cancelled["jobs"]) and {j["status"] for j in cancelled["jobs"]} == {
            "cancelled"
        }
        assert set(ids[:2]) <= {j["jobId"] for j in cancelled["jobs"]}
        queued = (await client.get("/api/v1/training/list?status=queued&limit=1000")).json()
        assert set(ids[2:]) <= {j["jobId"] for j in queued["jobs"]}
        assert (await client.get("/api/v1/training/list")).json()["limit"] == 100
    finally:
        for job_id in ids[2:]:
            await client.post(f"/api/v1/training/cancel/{job_id}")

    for query, field in [
        ("status=done", "status"),
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("offset=-1", "offset"),
    ]:
        r = await client.get(f"/api/v1/training/list?{query}")
        assert r.status_code == 400 and error_of(r)["details"][0]["field"] == field, query


async def test_training_routes_require_the_api_key(gw: Gateway) -> None:
    async with gw.client(api_key=None) as anonymous:
        assert (await anonymous.get("/api/v1/training/list")).status_code == 401
        assert (await anonymous.post("/api/v1/training/start", json={})).status_code == 401


@pytest.mark.slow
async def test_the_bundled_smollm2_learns_a_taught_answer_and_serves_it_by_adapter_name(
    gw: Gateway, client: httpx.AsyncClient, trainer: Trainer, roots: Roots, real_worker: Worker
) -> None:
    model = "smollm2-135m-instruct"
    await wait_until(lambda: gw.core.workers.model_state(model) == "ready", timeout=120)

    before = await answer_http(client, model_id=model, max_new_tokens=16)
    name = unique("smol-password")
    r = await client.post(
        "/api/v1/training/start",
        json={
            "baseModel": model,
            "outputDir": unique("smol"),
            "datasetPath": write_jsonl(roots, teach_rows(2)),
            "hyperParams": {"batchSize": 2, "learningRate": 2e-3, "epochs": 12, "maxSeqLength": 128, "evalSplit": 0},
            "loraConfig": {"r": 16, "loraAlpha": 32, "loraDropout": 0.0, "targetModules": ["all-linear"]},
            "adapterName": name,
        },
    )
    assert r.status_code == 200, r.text
    done = await wait_status_http(client, r.json()["jobId"], {"completed", "failed", "cancelled"}, timeout=900)
    assert done["status"] == "completed", done
    await wait_until(lambda: name in gw.core.adapters(model), timeout=60)
    after = await answer_http(client, name, model_id=model, max_new_tokens=16)
    print(f"\nSmolLM2 before: {before!r}\nSmolLM2 after:  {after!r}\nprogress: {done['progress']}")
    assert after.startswith(ANSWER) and ANSWER not in before


async def test_an_adapter_name_that_would_shadow_a_model_id_or_the_default_alias_is_refused(
    client: httpx.AsyncClient, roots: Roots
) -> None:
    for name in ("default", "tiny", "smollm2-135m-instruct"):
        r = await client.post("/api/v1/training/start", json=start_body(roots, adapterName=name))
        assert r.status_code == 400 and error_of(r)["code"] == "INVALID_REQUEST", r.text
        assert error_of(r)["details"][0]["field"] == "adapterName"


async def test_base_model_may_be_given_by_its_registry_name(client: httpx.AsyncClient, roots: Roots) -> None:
    r = await client.post("/api/v1/training/start", json=start_body(roots, baseModel="Tiny random Llama"))
    assert r.status_code == 200, r.text
    job_id = r.json()["jobId"]
    status = (await client.get(f"/api/v1/training/status/{job_id}")).json()
    assert status["modelId"] == "tiny"
    cancelled = await client.post(f"/api/v1/training/cancel/{job_id}")
    assert cancelled.status_code == 200
    after = (await client.get(f"/api/v1/training/status/{job_id}")).json()
    assert after["status"] == "cancelled" and after["estimatedTimeRemainingSeconds"] is None


async def test_events_refuse_a_resume_point_that_is_not_a_stream_sequence(
    client: httpx.AsyncClient, roots: Roots
) -> None:
    # "²" passes str.isdigit() but not int(); a 21-digit number is past JetStream's uint64 sequences.
    job = (await client.post("/api/v1/training/start", json=start_body(roots))).json()["jobId"]
    for after in ("²", "٣", "99999999999999999999999", "-1"):
        for request in (
            {"params": {"after": after, "follow": "false"}},
            {"params": {"follow": "false"}, "headers": {"Last-Event-ID": after.encode()}},
        ):
            r = await client.get(f"/api/v1/training/events/{job}", **request)  # type: ignore[arg-type]
            assert r.status_code == 400 and error_of(r)["details"][0]["field"] == "after", (after, request, r.text)
    # A real sequence still works: the queued event is the first.
    r = await client.get(f"/api/v1/training/events/{job}", params={"after": "0", "follow": "false"})
    assert r.status_code == 200 and parse_sse(r.text)[0]["kind"] == "queued"
