"""The training loop: Accelerate for devices and processes, the ``train_step`` hook for the loss.

Core owns the mechanics (data order, accumulation, clipping, optimizer, schedule, checkpoints,
NaN checks, interruption); plugins own what a step computes.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunestack.context import ModelHandle, StageContext, StepContext, StepOutput
from tunestack.errors import Interrupted, RunFailed
from tunestack.runlog import RunLog

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainResult:
    steps: int
    trainable_params: int
    total_params: int
    examples_per_s: float
    tokens_per_s: float
    seconds: float
    final_loss: float | None
    resumed_from_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class InterruptFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and stops.

    A second signal interrupts at once (the previous periodic checkpoint is kept).
    """

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextmanager
    def installed(self) -> Iterator[InterruptFlag]:
        previous: dict[signal.Signals, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            if self.signal is not None:
                raise KeyboardInterrupt
            self.signal = signum

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: rely on KeyboardInterrupt
            previous.clear()
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def epoch_order(count: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """The example order of one epoch: a seeded permutation, sharded across processes."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    usable = (count // world) * world if world > 1 else count
    return order[:usable][rank::world]


def train(
    handle: ModelHandle,
    ctx: StageContext,
    features: list[dict[str, Any]],
    hook: Any,
    stage_dir: Path,
    log: RunLog,
    resume: bool,
    progress: bool,
) -> TrainResult:
    settings = ctx.stage.train
    accelerator = ctx.accelerator
    task = handle.task
    tokenizer = handle.tokenizer
    model = handle.model
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_count = sum(p.numel() for p in trainable)
    total_count = sum(p.numel() for p in model.parameters())
    params = trainable + [p for p in ctx.extra_parameters if p.requires_grad]
    if not params:
        raise RunFailed(f"stage '{ctx.stage.name}' trains but no parameter requires a gradient (everything is frozen)")
    if not features:
        raise RunFailed(f"stage '{ctx.stage.name}' trains but there is no training data (set data.train)")

    optimizer = _optimizer(params, settings)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch = math.ceil(len(epoch_order(len(features), 0, 0, rank, world)) / settings.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / settings.gradient_accumulation_steps)
    total_steps = steps_per_epoch * settings.epochs
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps) if settings.epochs > 0 else settings.max_steps
    epochs = settings.epochs if settings.epochs > 0 else math.ceil(total_steps / max(steps_per_epoch, 1))
    warmup = settings.warmup_steps or round(settings.warmup_ratio * total_steps)
    scheduler = _scheduler(optimizer, settings.scheduler, warmup, total_steps)

    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    checkpoint = stage_dir / CHECKPOINT_DIR
    step, start_epoch, skip_micro = 0, 0, 0
    if resume and (checkpoint / "progress.json").is_file():
        step, start_epoch, skip_micro = _load_checkpoint(
            checkpoint, accelerator.unwrap_model(prepared_model), ctx, optimizer
        )
        for _ in range(step):
            scheduler.step()
        log.event("resume", stage=ctx.stage.name, step=step, epoch=start_epoch)
    resumed_from = step

    bar = _progress_bar(total_steps, step, ctx.stage.name, progress and accelerator.is_main_process)
    started = time.perf_counter()
    seen_examples = seen_tokens = 0
    last_loss: float | None = None
    history: list[dict[str, float]] = []
    running: list[float] = []
    flag = InterruptFlag()
    accumulation = settings.gradient_accumulation_steps
    step_started = time.perf_counter()
    with flag.installed():
        for epoch in range(start_epoch, epochs):
            order = epoch_order(len(features), ctx.seed, epoch, rank, world)
            micro_batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
            first = skip_micro if epoch == start_epoch else 0
            for micro in range(first, len(micro_batches)):
                if step >= total_steps:
                    break
                if micro % accumulation == 0:
                    step_started = time.perf_counter()
                batch = task.collate([features[i] for i in micro_batches[micro]], tokenizer)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = (micro + 1) % accumulation == 0 or micro == len(micro_batches) - 1
                step_ctx = StepContext(step=step, micro_step=micro, epoch=epoch, stage=ctx)
                context = nullcontext() if sync or world == 1 else accelerator.no_sync(prepared_model)
                with context, accelerator.autocast():
                    output = hook.tunestack_train_step(model=prepared_model, batch=batch, ctx=step_ctx)
                    if not isinstance(output, StepOutput):
                        raise RunFailed("no plugin computed a training step (is the default-step plugin disabled?)")
                    loss = output.loss
                    _check_finite(loss, accelerator, step, epoch, ctx, checkpoint)
                    group = min(accumulation, len(micro_batches) - (micro // accumulation) * accumulation)
                    accelerator.backward(loss / group)
                running.append(float(loss.detach()))
                seen_examples += len(micro_batches[micro])
                seen_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                if not sync:
                    continue
                if world > 1:  # parameters outside the model are not under DDP: average their gradients here
                    for param in ctx.extra_parameters:
                        if param.grad is not None:
                            param.grad = accelerator.reduce(param.grad, reduction="mean")
                if settings.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_seconds = time.perf_counter() - step_started
                step += 1
                last_loss = sum(running) / len(running)
                running = []
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                if step % settings.log_every == 0 or step == total_steps:
                    entry = {
                        "step": step,
                        "epoch": epoch,
                        "loss": last_loss,
                        "lr": scheduler.get_last_lr()[0],
                    }
                    entry.update(output.logs)
                    history.append(entry)
                    log.event("train", stage=ctx.stage.name, step_seconds=round(step_seconds, 6), **entry)
                at_epoch_end = micro == len(micro_batches) - 1
                periodic = settings.checkpoint_every is not None and step % settings.checkpoint_every == 0
                if flag.signal is not None or periodic or (at_epoch_end and settings.checkpoint_every is None):
                    next_epoch, next_micro = (epoch + 1, 0) if at_epoch_end else (epoch, micro + 1)
                    _save_checkpoint(
                        checkpoint,
                        accelerator,
                        accelerator.unwrap_model(prepared_model),
                        ctx,
                        optimizer,
                        step,
                        next_epoch,
                        next_micro,
                    )
                if flag.signal is not None:
                    name = signal.Signals(flag.signal).name
                    log.event("interrupted", stage=ctx.stage.name, step=step, signal=name)
                    raise Interrupted(
                        f"{name} received: stopped at step {step} of stage '{ctx.stage.name}'; "
                        f"checkpoint kept in {checkpoint}; run again with --resume to continue"
                    )
            if step >= total_steps:
                break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    handle.model = accelerator.unwrap_model(prepared_model)
    handle.model.eval()
    return TrainResult(
        steps=step,
        trainable_params=trainable_count,
        total_params=total_count,
        examples_per_s=seen_examples * world / seconds if seconds > 0 else 0.0,
        tokens_per_s=seen_tokens * world / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        final_loss=last_loss,
        resumed_from_step=resumed_from,
        history=history,
    )


def _optimizer(params: list[Any], settings: Any) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def _scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    kind = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[name]
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=max(total, 1))


def _progress_bar(total: int, initial: int, name: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=f"train {name}", unit="step", leave=False, dynamic_ncols=True, disable=None
    )


def _check_finite(loss: Any, accelerator: Any, step: int, epoch: int, ctx: StageContext, checkpoint: Path) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise RunFailed("the training step must return a scalar tensor loss")
    bad = not bool(torch.isfinite(loss.detach()))
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if bad else 0.0], device=accelerator.device)
        bad = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    if bad:
        kept = (
            f"the last good checkpoint is kept in {checkpoint}"
            if (checkpoint / "progress.json").exists()
            else ("no checkpoint had been written yet")
        )
        raise RunFailed(
            f"the loss became {float(loss.detach())} at step {step} (epoch {epoch}) of stage '{ctx.stage.name}'; "
            f"{kept}. Lower the learning rate or check the data."
        )


def _save_checkpoint(
    folder: Path,
    accelerator: Any,
    model: Any,
    ctx: StageContext,
    optimizer: Any,
    step: int,
    epoch: int,
    micro: int,
) -> None:
    """Atomically replace the stage checkpoint: trainable tensors, optimizer, RNG, position."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    extra = {f"extra.{i}": p.detach().cpu().contiguous() for i, p in enumerate(ctx.extra_parameters)}
    if extra:
        save_file(extra, str(tmp / "extra.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{index}"] = state
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "progress.json").write_text(json.dumps({"step": step, "epoch": epoch, "micro": micro}) + "\n")
    if folder.exists():
        _rmtree(folder)
    tmp.rename(folder)


def _load_checkpoint(folder: Path, model: Any, ctx: StageContext, optimizer: Any) -> tuple[int, int, int]:
    from safetensors.torch import load_file

    progress = json.loads((folder / "progress.json").read_text())
    trainable = load_file(str(folder / "trainable.safetensors"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != names:
        raise RunFailed(
            f"the checkpoint in {folder} does not match the model being resumed "
            "(did the stack change?); start over with --force"
        )
    model.load_state_dict(trainable, strict=False)
    if (folder / "extra.safetensors").exists():
        extra = load_file(str(folder / "extra.safetensors"))
        with torch.no_grad():
            for i, p in enumerate(ctx.extra_parameters):
                p.copy_(extra[f"extra.{i}"])
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
        if states:
            torch.cuda.set_rng_state_all(states)
    return int(progress["step"]), int(progress["epoch"]), int(progress["micro"])


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
