"""The LoRA training loop (transformers + peft), run in a thread by the trainer worker.

Deterministic data order (a seeded permutation per epoch) and checkpoints that hold the adapter weights,
optimizer, scheduler and RNG state let a job that stopped anywhere (pause, trainer shutdown, trainer
killed) continue from its last checkpoint and end with exactly the steps of an uninterrupted run.
The loop asks `Control.requested()` after every step, so cancel and pause act within one step.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog
import torch

from schemas.errors import CyError, ErrorCode
from schemas.training import EffectiveLora, EventKind, HyperParams, Progress
from services.trainer.encoding import IGNORE_INDEX, Encoded, encode
from services.training import datasets
from services.training.datasets import DatasetError

log = structlog.get_logger()

Request = Literal["cancel", "pause", "stop", "lost"]
Result = Literal["completed", "cancelled", "paused", "stopped", "lost"]

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
KEEP_CHECKPOINTS = 2
_STATE = STATE_FILE = "trainer_state.pt"


class Control(Protocol):
    """The worker's side of the loop (called from the training thread)."""

    def requested(self) -> Request | None:
        """What the job was asked to do since the last step (None: keep training)."""

    def report(self, kind: EventKind, progress: Progress, message: str = "") -> None:
        """Progress, eval, checkpoint and start/resume events. The `progress.step` of a "checkpoint" event
        is the step it saved; of a "started"/"resumed" event, the checkpoint it continues from (0: none)."""


@dataclass(frozen=True)
class Plan:
    job_id: str
    model_path: str
    max_model_len: int
    dataset_file: Path
    output_path: Path
    hp: HyperParams
    lora: EffectiveLora
    attempt: int = 1
    elapsed_s: float = 0.0  # training time of earlier attempts
    device: str = "auto"
    threads: int = 0  # torch CPU threads for this job (0: leave torch's setting)


@dataclass
class Outcome:
    result: Result
    progress: Progress
    adapter_path: Path | None = None
    checkpoint_step: int = 0
    train_rows: int = 0
    eval_rows: int = 0


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run(plan: Plan, control: Control) -> Outcome:
    """Train until done or asked to stop. Raises DatasetError for data problems found now (tokenization),
    other exceptions for everything else; the caller fails the job with them."""
    threads = torch.get_num_threads()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    state = _Run(plan, control)
    try:
        return state.run()
    finally:
        state.release()
        torch.set_num_threads(threads)


class _Run:
    def __init__(self, plan: Plan, control: Control) -> None:
        self.plan = plan
        self.control = control
        self.hp = plan.hp
        self.device = pick_device(plan.device)
        self.model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.progress = Progress(elapsed_s=plan.elapsed_s)
        self.checkpoint_step = 0
        # (seconds, tokens) of recent steps, for tokens/s and the ETA. The first step of a run (allocator
        # and kernel warm-up: 11x slower than the rest on a GPU) is dropped once a second one exists.
        self._window: deque[tuple[float, int]] = deque(maxlen=20)
        self._warmup_in_window = True
        self._segment_started = time.monotonic()

    def release(self) -> None:
        """Free the model and optimizer now (a cancelled job must give its memory back)."""
        self.model = self.optimizer = self.scheduler = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- setup ---------------------------------------------------------------------------------
    def run(self) -> Outcome:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        plan, hp = self.plan, self.hp
        tokenizer = AutoTokenizer.from_pretrained(plan.model_path)
        train, evals = self._prepare(tokenizer)
        if self._stop_request() == "cancel":
            return self._outcome("cancelled", train, evals)
        steps_per_epoch = math.ceil(len(train) / hp.batch_size)
        total = steps_per_epoch * hp.epochs
        self.progress.total_steps = total

        torch.manual_seed(hp.seed)
        dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        base: Any = AutoModelForCausalLM.from_pretrained(plan.model_path, dtype=dtype)
        base = base.to(self.device)
        self.model = self._wrap(base)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=0.0)
        warmup = int(total * hp.warmup_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _linear_schedule(warmup, total))

        step = self._restore()
        kind: EventKind = "resumed" if (plan.attempt > 1 or step) else "started"
        self.progress.step, self.progress.epoch = step, min(step // steps_per_epoch + 1, hp.epochs)
        self.progress.eta_s = None
        self.control.report(
            kind,
            self.progress,
            f"{len(train)} training rows, {len(evals)} held out; {total} steps"
            + (f"; continuing from the checkpoint at step {step}" if step else ""),
        )
        return self._train(step, total, steps_per_epoch, train, evals)

    def _prepare(self, tokenizer: Any) -> tuple[list[Encoded], list[Encoded]]:
        plan, hp = self.plan, self.hp
        examples = datasets.load(plan.dataset_file)
        max_len = min(hp.max_seq_length, plan.max_model_len)
        encoded: list[Encoded] = []
        for example in examples:
            item = encode(example, tokenizer, max_len)
            if item is not None:
                encoded.append(item)
        if not encoded:
            raise DatasetError(
                f"no row keeps any answer token within maxSeqLength={max_len}; raise maxSeqLength or shorten prompts"
            )
        order = list(range(len(encoded)))
        random.Random(hp.seed).shuffle(order)
        n_eval = int(len(encoded) * hp.eval_split)
        if n_eval >= len(encoded):
            n_eval = 0
        evals = [encoded[i] for i in order[:n_eval]]
        train = [encoded[i] for i in order[n_eval:]]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.skipped = len(examples) - len(encoded)
        return train, evals

    def _wrap(self, base: Any) -> Any:
        from peft import LoraConfig, get_peft_model

        lora = self.plan.lora
        target: Any = lora.target_modules
        if target == ["all-linear"]:
            target = "all-linear"
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=target,
            bias=lora.bias,  # type: ignore[arg-type]
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(base, config)
        except ValueError as exc:  # e.g. target modules that the model does not have
            from schemas.errors import invalid

            raise invalid("loraConfig.targetModules", str(exc)) from exc
        return model

    # --- checkpoints ---------------------------------------------------------------------------
    def _checkpoints(self) -> list[tuple[int, Path]]:
        root = self.plan.output_path / CHECKPOINTS
        found: list[tuple[int, Path]] = []
        if root.is_dir():
            for path in root.iterdir():
                if path.name.startswith("step-") and path.name[5:].isdigit() and (path / _STATE).exists():
                    found.append((int(path.name[5:]), path))
        return sorted(found)

    def _restore(self) -> int:
        """Load this job's latest checkpoint; checkpoints of other jobs in the same outputDir are removed."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        assert self.optimizer is not None and self.scheduler is not None
        for step, path in reversed(self._checkpoints()):
            try:
                state = torch.load(path / _STATE, map_location=self.device, weights_only=False)
            except Exception as exc:  # a torn write (killed while saving): try an older one
                log.warning("checkpoint_unreadable", path=str(path), error=repr(exc))
                continue
            if state.get("job_id") != self.plan.job_id or step > (self.progress.total_steps or step):
                shutil.rmtree(path, ignore_errors=True)
                continue
            set_peft_model_state_dict(self.model, load_file(str(path / "adapter_model.safetensors")))
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"].cpu())
            self.checkpoint_step = step
            self.progress.loss = state.get("loss")
            return step
        return 0

    def _save_checkpoint(self, step: int) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        root = self.plan.output_path / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        target = root / f"step-{step:06d}"
        tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        torch.save(
            {
                "job_id": self.plan.job_id,
                "step": step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "loss": self.progress.loss,
            },
            tmp / _STATE,
        )
        (tmp / "state.json").write_text(json.dumps({"job_id": self.plan.job_id, "step": step}))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        self.checkpoint_step = step
        for _, old in self._checkpoints()[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        self.control.report("checkpoint", self.progress, f"checkpoint saved at step {step}")

    def _save_adapter(self) -> Path:
        target = self.plan.output_path / ADAPTER
        tmp = self.plan.output_path / f".{ADAPTER}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target

    # --- the loop ------------------------------------------------------------------------------
    def _stop_request(self) -> Request | None:
        return self.control.requested()

    def _train(
        self, step: int, total: int, steps_per_epoch: int, train: list[Encoded], evals: list[Encoded]
    ) -> Outcome:
        assert self.optimizer is not None and self.scheduler is not None
        hp = self.hp
        self.model.train()
        while step < total:
            request = self._stop_request()
            if request is not None:
                return self._stop(request, step, train, evals)
            epoch = step // steps_per_epoch
            order = list(range(len(train)))
            random.Random(hp.seed * 1_000_003 + epoch).shuffle(order)
            offset = (step % steps_per_epoch) * hp.batch_size
            batch = [train[i] for i in order[offset : offset + hp.batch_size]]
            self._one_step(batch, step, epoch)
            step += 1
            if evals and step % hp.eval_steps == 0:
                self._evaluate(evals)
            if step % hp.save_steps == 0 and step < total:
                self._save_checkpoint(step)
        adapter = self._save_adapter()
        if evals and total % hp.eval_steps != 0:
            self._evaluate(evals)
        self.progress.eta_s = 0.0
        return self._outcome("completed", train, evals, adapter)

    def _one_step(self, batch: list[Encoded], step: int, epoch: int) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        started = time.monotonic()
        inputs = self._collate(batch)
        lr = float(self.optimizer.param_groups[0]["lr"])
        out = self.model(**inputs)
        loss = out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.monotonic() - started
        tokens = int(inputs["attention_mask"].sum())
        if self._warmup_in_window and len(self._window) == 1:
            self._window.popleft()
            self._warmup_in_window = False
        self._window.append((elapsed, tokens))
        spent = sum(t for t, _ in self._window)
        p = self.progress
        p.step, p.epoch = step + 1, epoch + 1
        p.loss, p.learning_rate = round(float(loss.detach()), 6), lr
        p.tokens_per_second = round(sum(n for _, n in self._window) / spent, 1) if spent else None
        p.elapsed_s = round(self.plan.elapsed_s + time.monotonic() - self._segment_started, 3)
        p.eta_s = round(spent / len(self._window) * (p.total_steps - p.step), 1)
        self.control.report("step", p)

    def _collate(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            mask[row, :n] = 1
        return {
            "input_ids": ids.to(self.device),
            "labels": labels.to(self.device),
            "attention_mask": mask.to(self.device),
        }

    @torch.no_grad()
    def _evaluate(self, evals: list[Encoded]) -> None:
        self.model.eval()
        total_loss, total_tokens = 0.0, 0
        for i in range(0, len(evals), self.hp.batch_size):
            batch = evals[i : i + self.hp.batch_size]
            inputs = self._collate(batch)
            tokens = sum(e.trained_tokens for e in batch)
            total_loss += float(self.model(**inputs).loss) * tokens
            total_tokens += tokens
        self.model.train()
        self.progress.eval_loss = round(total_loss / max(total_tokens, 1), 6)
        self.control.report("eval", self.progress)

    def _stop(self, request: Request, step: int, train: list[Encoded], evals: list[Encoded]) -> Outcome:
        if request in ("pause", "stop") and step > self.checkpoint_step:
            self._save_checkpoint(step)
        result: Result = {"cancel": "cancelled", "pause": "paused", "stop": "stopped", "lost": "lost"}[request]  # type: ignore[assignment]
        return self._outcome(result, train, evals)

    def _outcome(
        self, result: Result, train: list[Encoded], evals: list[Encoded], adapter: Path | None = None
    ) -> Outcome:
        return Outcome(
            result=result,
            progress=self.progress,
            adapter_path=adapter,
            checkpoint_step=self.checkpoint_step,
            train_rows=len(train),
            eval_rows=len(evals),
        )


def _linear_schedule(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def wire_error(exc: BaseException) -> CyError:
    """The one place where torch failures of a training job (what `run` raised) become wire errors."""
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return CyError(
            ErrorCode.INSUFFICIENT_RESOURCES,
            "training ran out of memory; lower batchSize or maxSeqLength",
            retryable=True,
        )
    return CyError(ErrorCode.INTERNAL_ERROR, f"training failed: {type(exc).__name__}: {exc}")
