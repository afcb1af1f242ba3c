"""Runs a validated plan: stage by stage, hooks in stack order, artifacts verified on reload.

Each stage: load its input model -> transform examples -> prepare -> train -> compress -> save ->
reload and compare outputs -> evaluate -> gate. Finished stages are checkpointed in the run folder,
so ``--resume`` skips them and continues a stage from its last training checkpoint.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack import __version__
from tunestack.context import (
    EvalContext,
    ModelHandle,
    StageContext,
    StageData,
    StagePlan,
)
from tunestack.data import Example
from tunestack.errors import DataError, Interrupted, PluginError, RunFailed, TunestackError
from tunestack.plugins import PluginHost, culprit, default_host
from tunestack.rundir import RunFolder, disk_error, write_json_atomic
from tunestack.validation import StackPlan, load_plan

RELOAD_TOLERANCE = 1e-4
STAGE_FILE = "stage.json"


@dataclass
class RunResult:
    """What ``tunestack.run`` returns: where the run is and what it measured."""

    run_dir: Path
    name: str
    status: str
    metrics: dict[str, Any]
    stages: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    def stage_metrics(self, name: str) -> dict[str, Any]:
        for stage in self.stages:
            if stage["name"] == name:
                return dict(stage["metrics"])
        raise KeyError(name)


def run(
    stack: str | Path | dict[str, Any],
    *,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
    force: bool = False,
    host: PluginHost | None = None,
    progress: bool = False,
    base_dir: Path | None = None,
) -> RunResult:
    """Validate and run a stack file (or dict); return the finished run's result."""
    host = host or default_host()
    plan = load_plan(stack, host, overrides, base_dir=base_dir)
    return Runner(plan, host, Path(out) if out is not None else Path("runs"), resume, force, progress).execute()


class Runner:
    def __init__(self, plan: StackPlan, host: PluginHost, out: Path, resume: bool, force: bool, progress: bool) -> None:
        self.plan = plan
        self.host = host
        self.out = out
        self.resume = resume
        self.force = force
        self.progress = progress
        self.stack = plan.stack

    # -- the run -----------------------------------------------------------------------------

    def execute(self) -> RunResult:
        from tunestack.quiet import silence_import_noise

        silence_import_noise()
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from tunestack.runlog import RunLog

        # cpu=True lets Accelerate see a torchrun/accelerate multi-process launch on CPU-only machines
        self.accelerator = Accelerator(
            mixed_precision=_precision(self.stack.train.mixed_precision, torch), cpu=not torch.cuda.is_available()
        )
        main = self.accelerator.is_main_process
        self.folder = RunFolder(self.out / self.plan.name, self.resume, self.force, main)
        # only the main process checks and prepares the folder; the others would see it half made
        resuming = self.folder.begin() if main else self.resume
        self.accelerator.wait_for_everyone()
        self.root = self.folder.partial
        self.log = RunLog(self.root / "log.jsonl", enabled=main)
        self.started = time.time()
        set_seed(self.stack.seed)
        try:
            if main and not resuming:
                self._write_stack_files()
            self.log.event("start", name=self.plan.name, resume=resuming, stages=[s.name for s in self.plan.stages])
            self.task = self.host.tasks[self.stack.model.task].factory()
            self._read_data()
            records = self._run_stages()
            return self._finish(records)
        except KeyboardInterrupt:
            self.folder.mark_incomplete("interrupted")
            self.log.event("interrupted")
            raise Interrupted(
                f"interrupted; the unfinished run is kept in {self.root}; run again with --resume to continue"
            ) from None
        except GateFailed:
            raise  # the run folder is finished and holds the last stage that passed
        except TunestackError as error:
            self.folder.mark_incomplete(f"{type(error).__name__}: {str(error).splitlines()[0]}")
            self.log.event("failed", error=str(error))
            raise
        except Exception as error:
            self.folder.mark_incomplete(f"{type(error).__name__}: {error}")
            self.log.event("failed", error=f"{type(error).__name__}: {error}")
            raise
        finally:
            self.log.close()

    def _run_stages(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        handle: ModelHandle | None = None
        previous: dict[str, Any] | None = None
        for stage in self.plan.stages:
            stage_dir = self.root / "stages" / stage.folder_name
            done = stage_dir / STAGE_FILE
            if done.is_file():
                record = json.loads(done.read_text(encoding="utf-8"))
                records.append(record)
                previous = record
                handle = None
                self.log.event("stage-skipped", stage=stage.name, reason="finished before resume")
                continue
            if handle is None:
                handle = self._input_model(stage, previous, stage_dir)
            record, handle = self._run_stage(stage, handle, stage_dir, previous)
            records.append(record)
            if record["status"] != "ok":
                break
            previous = record
        return records

    # -- inputs ------------------------------------------------------------------------------

    def _read_data(self) -> None:
        settings = self.stack.data
        self.data_files: list[dict[str, Any]] = []
        self.train_examples: list[Example] = []
        self.eval_examples: list[Example] = []
        for split in ("train", "eval"):
            value = getattr(settings, split)
            if value is None:
                continue
            path = self._path(value)
            examples = self.task.read(path, settings)
            from tunestack.provenance import sha256

            self.data_files.append(
                {"split": split, "path": str(path), "sha256": sha256(path), "examples": len(examples)}
            )
            if split == "train":
                if settings.max_train_examples and len(examples) > settings.max_train_examples:
                    keep = sorted(
                        random.Random(self.stack.seed).sample(range(len(examples)), settings.max_train_examples)
                    )
                    examples = [examples[i] for i in keep]
                self.train_examples = examples
            else:
                if settings.max_eval_examples:
                    examples = examples[: settings.max_eval_examples]
                self.eval_examples = examples
        self.labels = self._labels()
        if self.task.has_labels:
            if not self.labels:
                raise DataError("no labels: give data.train, or list them in data.labels")
            self.task.check_labels(self.train_examples, self.labels, "train")
            self.task.check_labels(self.eval_examples, self.labels, "eval")

    def _labels(self) -> list[str]:
        if self.plan.source is not None and self.plan.source.kind == "run" and self.plan.source.path is not None:
            from tunestack.artifacts import read_meta

            return list(read_meta(self.plan.source.path / "model").get("labels", []))
        examples = self.train_examples or self.eval_examples
        return self.task.label_set(examples, self.stack.data)

    def _input_model(self, stage: StagePlan, previous: dict[str, Any] | None, stage_dir: Path) -> ModelHandle:
        from tunestack.artifacts import load_model

        if previous is not None:
            return load_model(self.root / "stages" / previous["folder"] / "model", self.host)
        return self._fresh_model(stage)

    def _fresh_model(self, stage: StagePlan) -> ModelHandle:
        from tunestack.artifacts import load_model
        from tunestack.models import (
            build_from_config,
            fit_tokenizer,
            load_pretrained,
            load_tokenizer,
            tokenizer_source,
        )

        settings = self.stack.model
        source = self.plan.source
        assert source is not None
        if source.kind == "run" and source.path is not None:
            return load_model(source.path / "model", self.host, trust_remote_code=settings.trust_remote_code)
        with self.host.activated([m.instance for m in stage.methods]):
            chosen = self.host.hook.tunestack_model_class(stage=stage, task=self.task.name)
        class_name = chosen or self.host.tasks[self.task.name].auto_class
        kwargs = self.task.model_kwargs(self.labels) if class_name == self.task.auto_class else {}
        tokenizer = load_tokenizer(
            tokenizer_source(source, settings.tokenizer, self.plan.base_dir), settings.trust_remote_code
        )
        if source.kind == "config":
            import torch

            torch.manual_seed(self.stack.seed)
            model = build_from_config(dict(settings.config or {}), class_name, kwargs)
        else:
            where = source.model_dir if source.model_dir is not None else source.text
            model = load_pretrained(where, class_name, kwargs, settings.trust_remote_code)
        fit_tokenizer(model, tokenizer)
        return ModelHandle(
            model=model,
            tokenizer=tokenizer,
            task=self.task,
            labels=self.labels,
            auto_class=class_name,
            tags=self.plan.initial_tags,
            trust_remote_code=settings.trust_remote_code,
        )

    # -- one stage ---------------------------------------------------------------------------

    def _run_stage(
        self, stage: StagePlan, handle: ModelHandle, stage_dir: Path, previous: dict[str, Any] | None
    ) -> tuple[dict[str, Any], ModelHandle]:
        from tunestack import engine

        accelerator = self.accelerator
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.log.event("stage-start", stage=stage.name)
        started = time.perf_counter()
        instances = [m.instance for m in stage.methods]
        data = StageData(None, None, self._batch_maker(handle), stage.train.batch_size)
        ctx = StageContext(
            stage=stage,
            stack=self.stack,
            run_dir=self.root,
            seed=self.stack.seed,
            data=data,
            device=accelerator.device,
            accelerator=accelerator,
            tokenizer=handle.tokenizer,
            base_dir=self.plan.base_dir,
        )
        baseline = None
        if stage.gate is not None and previous is None and stage.gate.min_retention is not None:
            baseline = self._evaluate(handle, None, None, [])
        with self.host.activated(instances):
            data.train_examples = self._transform(handle, self.train_examples, "train", ctx)
            data.eval_examples = self._transform(handle, self.eval_examples, "eval", ctx)
            handle.model.to(accelerator.device)
            self._call("tunestack_prepare", stage, model=handle, ctx=ctx)
            trained: engine.TrainResult | None = None
            truncated = 0
            if stage.trains:
                encoded = handle.task.encode(
                    data.train_examples, handle.tokenizer, handle.labels, self.stack.data.max_length
                )
                truncated = encoded.truncated
                if truncated:
                    self.log.event(
                        "truncated",
                        stage=stage.name,
                        examples=truncated,
                        max_length=self.stack.data.max_length,
                    )
                trained = engine.train(
                    handle,
                    ctx,
                    encoded.features,
                    self.host.hook,
                    stage_dir,
                    self.log,
                    resume=self.resume,
                    progress=self.progress,
                )
            self._call("tunestack_compress", stage, model=handle, ctx=ctx)
            handle.tags = stage.tags_after
            produced = {m.slot.key: sorted(m.contract.produces) for m in stage.methods}
            for transform in handle.transforms:  # later methods can tell, e.g., which records are adapters
                transform.tags = produced.get(transform.slot.key, transform.tags)
            reloaded, diff = self._save_and_verify(handle, stage, stage_dir, data)
            eval_examples = self._transform(reloaded, self.eval_examples, "eval", None, stage_only=False)
            metrics = self._evaluate(reloaded, stage_dir / "model", trained, eval_examples, stage)
        shutil.rmtree(stage_dir / engine.CHECKPOINT_DIR, ignore_errors=True)
        gate = self._gate(stage, metrics, previous, baseline)
        record = {
            "name": stage.name,
            "index": stage.index,
            "folder": stage.folder_name,
            "status": "ok" if gate is None or gate["passed"] else "gate-failed",
            "methods": [self._method_record(m, ctx) for m in stage.methods],
            "train": stage.train.model_dump(mode="json") if stage.trains else None,
            "training": _training_record(trained, truncated),
            "metrics": metrics,
            "reload_max_abs_diff": diff,
            "tags_after": sorted(stage.tags_after),
            "transforms": [r.to_json() for r in reloaded.transforms],
            "gate": gate,
            "seconds": round(time.perf_counter() - started, 2),
        }
        self.log.event("stage-end", stage=stage.name, status=record["status"], metrics=_scalars(metrics))
        if accelerator.is_main_process:
            write_json_atomic(stage_dir / STAGE_FILE, record)
        accelerator.wait_for_everyone()
        return record, reloaded

    def _transform(
        self,
        handle: ModelHandle,
        examples: list[Example],
        split: str,
        ctx: StageContext | None,
        stage_only: bool = True,
    ) -> list[Example]:
        """Apply the input model's recorded transforms, then (during a stage) the stage's methods."""
        from tunestack.artifacts import instantiate

        items = [e.with_() for e in examples]
        if not items:
            return items
        for record in handle.transforms:
            hook = self.host.scoped_hook(instantiate(record, self.host))
            hook.tunestack_transform_examples(examples=items, split=split, ctx=ctx, record=record)
        if ctx is not None and stage_only:
            self.host.hook.tunestack_transform_examples(examples=items, split=split, ctx=ctx, record=None)
        return items

    def _batch_maker(self, handle: ModelHandle) -> Any:
        task = handle.task
        max_length = self.stack.data.max_length

        def make(examples: list[Example], batch_size: int, shuffle: bool, seed: int) -> Any:
            order = list(range(len(examples)))
            if shuffle:
                random.Random(seed).shuffle(order)
            features = task.encode([examples[i] for i in order], handle.tokenizer, handle.labels, max_length).features
            return task.batches(features, handle.tokenizer, batch_size, self.accelerator.device)

        return make

    def _save_and_verify(
        self, handle: ModelHandle, stage: StagePlan, stage_dir: Path, data: StageData
    ) -> tuple[ModelHandle, float | None]:
        import torch

        from tunestack.artifacts import load_model, save_model

        handle.model.eval()
        handle.model.to("cpu")
        probe_source = data.eval_examples or data.train_examples or []
        probe_examples = probe_source[: self.stack.eval.probe_examples]
        probe = None
        reference = None
        if probe_examples and self.stack.eval.verify_reload:
            features = handle.task.encode(
                probe_examples, handle.tokenizer, handle.labels, self.stack.data.max_length
            ).features
            probe = handle.task.collate(features, handle.tokenizer)
            reference = handle.task.outputs(handle.model, probe)
        target = stage_dir / "model"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            tmp = stage_dir / "model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            self._guarded(stage, "tunestack_save", lambda: save_model(handle, tmp, self.host))
            tmp.rename(target)
        self.accelerator.wait_for_everyone()
        reloaded = self._guarded(stage, "tunestack_rebuild", lambda: load_model(target, self.host))
        diff = None
        if probe is not None and reference is not None:
            got = handle.task.outputs(reloaded.model, probe)
            if got.shape != reference.shape:
                raise RunFailed(
                    f"stage '{stage.name}': the reloaded model gives outputs of shape {tuple(got.shape)}, "
                    f"not {tuple(reference.shape)}"
                )
            diff = float((got - reference).abs().max()) if reference.numel() else 0.0
            if not torch.isfinite(torch.tensor(diff)) or diff > RELOAD_TOLERANCE:
                raise RunFailed(
                    f"stage '{stage.name}': the saved model does not reproduce the trained one "
                    f"(max abs difference {diff:.3g} > {RELOAD_TOLERANCE}); the artifact is in {target}"
                )
        return reloaded, diff

    def _evaluate(
        self,
        handle: ModelHandle,
        model_dir: Path | None,
        trained: Any,
        examples: list[Example],
        stage: StagePlan | None = None,
    ) -> dict[str, Any]:
        import torch

        ctx = EvalContext(
            task=handle.task,
            examples=examples,
            make_batches=lambda ex, size: self._batch_maker(handle)(ex, size, False, 0),
            settings=self.stack.eval,
            model_dir=model_dir,
            max_length=self.stack.data.max_length,
            trainable_params=trained.trainable_params if trained is not None else 0,
            device=torch.device("cpu"),
        )
        return evaluate_handle(self.host, handle, ctx, [m.instance for m in stage.methods] if stage else [])

    def _gate(
        self,
        stage: StagePlan,
        metrics: dict[str, Any],
        previous: dict[str, Any] | None,
        baseline: dict[str, Any] | None,
    ) -> dict[str, Any] | None:
        gate = stage.gate
        if gate is None:
            return None
        if gate.metric not in metrics:
            raise RunFailed(
                f"{stage.path}.gate.metric: '{gate.metric}' is not among the stage's metrics "
                f"({', '.join(sorted(k for k, v in metrics.items() if isinstance(v, int | float)))})"
            )
        value = float(metrics[gate.metric])
        reference_metrics = previous["metrics"] if previous is not None else baseline
        reference = (
            float(reference_metrics[gate.metric]) if reference_metrics and gate.metric in reference_metrics else None
        )
        retention = None
        passed = True
        if gate.min_retention is not None and reference is not None:
            if gate.higher_is_better:
                retention = value / reference if reference else float("inf")
            else:
                retention = reference / value if value else float("inf")
            passed = retention >= gate.min_retention
        if gate.min_value is not None:
            passed = passed and (value >= gate.min_value if gate.higher_is_better else value <= gate.min_value)
        result = {
            "metric": gate.metric,
            "value": value,
            "reference": reference,
            "retention": retention,
            "min_retention": gate.min_retention,
            "min_value": gate.min_value,
            "passed": passed,
        }
        self.log.event("gate", stage=stage.name, **result)
        return result

    def _method_record(self, method: Any, ctx: StageContext) -> dict[str, Any]:
        info = self.host.method_plugin[method.name]
        return {
            "slot": method.slot.path,
            "key": method.slot.key,
            "method": method.name,
            "plugin": info.name,
            "distribution": info.distribution,
            "version": info.version,
            "options": method.options.model_dump(mode="json"),
            "contract": method.contract.model_dump(mode="json"),
            "reports": ctx.reports.get(method.slot.key, {}),
        }

    # -- hooks with failure attribution --------------------------------------------------------

    def _call(self, name: str, stage: StagePlan, **kwargs: Any) -> Any:
        return self._guarded(stage, name, lambda: getattr(self.host.hook, name)(**kwargs))

    def _guarded(self, stage: StagePlan, name: str, call: Any) -> Any:
        try:
            return call()
        except TunestackError:
            raise
        except Exception as error:
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                raise disk_error(error, self.root) from None
            who = culprit(self.host, error, [m.instance for m in stage.methods])
            raise PluginError(
                f"{who} failed in {name} (stage '{stage.name}'): {type(error).__name__}: {error}"
            ) from error

    # -- the end -----------------------------------------------------------------------------

    def _write_stack_files(self) -> None:
        from tunestack.stack import dump_toml

        if self.plan.source_path is not None:
            shutil.copyfile(self.plan.source_path, self.root / "stack.toml")
        (self.root / "stack.resolved.toml").write_text(dump_toml(self.plan.resolved()), encoding="utf-8")

    def _finish(self, records: list[dict[str, Any]]) -> RunResult:
        from tunestack.provenance import environment

        passed = [r for r in records if r["status"] == "ok"]
        failed = [r for r in records if r["status"] != "ok"]
        final = passed[-1] if passed else None
        status = "complete" if not failed else "gate-failed"
        main = self.accelerator.is_main_process
        if main and final is not None:
            source = self.root / "stages" / final["folder"] / "model"
            target = self.root / "model"
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target)
        metrics = {
            "final": final["metrics"] if final else {},
            "stages": {r["name"]: r["metrics"] for r in records},
        }
        manifest = {
            "format": 1,
            "tunestack": __version__,
            "name": self.plan.name,
            "status": status,
            "task": self.stack.model.task,
            "labels": self.labels,
            "seed": self.stack.seed,
            "model_source": self.stack.model.source if self.stack.model.config is None else "config",
            "stack_file": str(self.plan.source_path) if self.plan.source_path else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "processes": self.accelerator.num_processes,
            "environment": environment(),
            "plugins": [
                {"name": p.name, "distribution": p.distribution, "version": p.version, "error": p.error}
                for p in self.host.plugins
            ],
            "data": self.data_files,
            "stages": records,
            "final_stage": final["name"] if final else None,
            "final_tags": final["tags_after"] if final else sorted(self.plan.initial_tags),
        }
        self.folder.write_json("metrics.json", metrics)
        self.folder.write_json("manifest.json", manifest)
        self.log.event("end", status=status)
        self.accelerator.wait_for_everyone()
        run_dir = self.folder.finish()
        self.accelerator.wait_for_everyone()
        result = RunResult(run_dir, self.plan.name, status, metrics["final"], records, manifest)
        if failed:
            gate = failed[0]["gate"]
            raise GateFailed(result, failed[0]["name"], gate)
        return result

    def _path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.plan.base_dir / path


class GateFailed(RunFailed):
    """A stage lost more than its gate allows; the run folder keeps the previous stage's model."""

    def __init__(self, result: RunResult, stage: str, gate: dict[str, Any]) -> None:
        self.result = result
        kept = result.manifest.get("final_stage")
        retention = gate.get("retention")
        detail = (
            f"retention {retention:.4f} < {gate['min_retention']}"
            if retention is not None
            else (f"{gate['value']:.4f} below {gate['min_value']}")
        )
        super().__init__(
            f"stage '{stage}' failed its gate on {gate['metric']} ({detail}); "
            + (f"{result.run_dir}/model holds stage '{kept}'" if kept else "no stage passed")
        )


def evaluate_handle(
    host: PluginHost, handle: ModelHandle, ctx: EvalContext, instances: Sequence[object] = ()
) -> dict[str, Any]:
    """Call every ``tunestack_evaluate`` implementation on its own and merge their metrics.

    Plugin modules' keys stay as they are; method instances' keys are prefixed with their slot
    key. A plugin that raises is reported under ``errors`` and the others still report.
    """
    slot_keys = {f"method-{id(i)}": i.slot.key for i in instances if hasattr(i, "slot")}
    metrics: dict[str, Any] = {}
    owner: dict[str, str] = {}
    errors: dict[str, str] = {}
    kwargs = {"model": handle, "ctx": ctx}
    for impl in reversed(host.hook.tunestack_evaluate.get_hookimpls()):
        try:
            result = impl.function(*[kwargs[name] for name in impl.argnames])
        except Exception as error:
            label = slot_keys.get(impl.plugin_name, impl.plugin_name)
            errors[label] = f"{type(error).__name__}: {error}"
            continue
        if not result:
            continue
        prefix = slot_keys.get(impl.plugin_name)
        for key, value in result.items():
            name = f"{prefix}.{key}" if prefix else key
            if name in metrics:
                raise PluginError(f"metric '{name}' is reported by both '{owner[name]}' and '{impl.plugin_name}'")
            metrics[name] = value
            owner[name] = impl.plugin_name
    if errors:
        metrics["errors"] = errors
    return metrics


def _precision(setting: str, torch: Any) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return setting


def _training_record(trained: Any, truncated: int) -> dict[str, Any] | None:
    if trained is None:
        return None
    return {
        "steps": trained.steps,
        "seconds": round(trained.seconds, 3),
        "examples_per_s": round(trained.examples_per_s, 3),
        "tokens_per_s": round(trained.tokens_per_s, 3),
        "final_loss": trained.final_loss,
        "trainable_params": trained.trainable_params,
        "total_params": trained.total_params,
        "resumed_from_step": trained.resumed_from_step,
        "truncated_examples": truncated,
        "history": trained.history,
    }


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
