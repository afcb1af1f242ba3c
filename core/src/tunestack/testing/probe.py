"""``echo``: a deterministic, no-op method that records every hook call.

The test double behind core's tests (installed as the ``tunestack-echo`` distribution) and the
conformance check (registered in-process when that distribution is absent). Every call is appended
to :data:`CALLS` as ``(hook, tag)``; the contract comes from the options, so tests can build any
ordering constraint without a real method.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from tunestack.api import (
    Contract,
    EvalContext,
    ExampleList,
    Field,
    Method,
    MethodSpec,
    ModelHandle,
    Options,
    Phase,
    Problem,
    Saved,
    StageContext,
    StagePlan,
    StepContext,
    StepOutput,
    TransformRecord,
    ValidationContext,
    hookimpl,
)

CALLS: list[tuple[str, str]] = []


class EchoOptions(Options):
    tag: str = Field("echo", description="label recorded with every call")
    phases: list[Phase] = Field(["prepare", "compress", "evaluate"], description="contract phases")
    requires: list[str] = Field([], description="contract: tags needed before")
    conflicts: list[str] = Field([], description="contract: tags that must not hold before")
    produces: list[str] = Field([], description="contract: tags produced")
    removes: list[str] = Field([], description="contract: tags removed")
    forbids_after: list[str] = Field([], description="contract: tags later methods may not produce")
    needs_training: bool = Field(False, description="contract: only valid in a stage that trains")
    transform: bool = Field(False, description="record a transform so save/rebuild fire")
    suffix: str | None = Field(None, description="append this to every input text")
    scale_loss: float = Field(1.0, description="multiply the training loss")
    nan_after_step: int | None = Field(None, description="make the loss NaN from this optimizer step on")
    fail_in: str | None = Field(None, description="raise RuntimeError inside this hook")
    metric: float | None = Field(None, description="report {'value': metric} when evaluating")
    problem: str | None = Field(None, description="report this validation problem")


def contract(options: EchoOptions) -> Contract:
    return Contract(
        phases=frozenset(options.phases),
        requires=frozenset(options.requires),
        conflicts=frozenset(options.conflicts),
        produces=frozenset(options.produces),
        removes=frozenset(options.removes),
        forbids_after=frozenset(options.forbids_after),
        needs_training=options.needs_training,
        reasons={tag: "echo says so" for tag in options.forbids_after},
    )


class Echo(Method[EchoOptions]):
    def _note(self, hook: str) -> None:
        CALLS.append((hook, self.options.tag))
        if self.options.fail_in == hook:
            raise RuntimeError(f"echo '{self.options.tag}' was told to fail in {hook}")

    @hookimpl
    def tunestack_validate_stage(self, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
        self._note("validate_stage")
        if self.options.problem:
            return [Problem(f"{self.slot.path}.problem", self.options.problem)]
        return []

    @hookimpl
    def tunestack_transform_examples(self, examples: ExampleList, split: str, ctx: StageContext | None) -> None:
        self._note(f"transform_examples:{split}")
        if self.options.suffix:
            examples[:] = [e.with_(text=(e.text or "") + self.options.suffix) for e in examples]

    @hookimpl
    def tunestack_prepare(self, model: ModelHandle, ctx: StageContext) -> None:
        self._note("prepare")
        if self.options.transform or self.options.suffix:
            model.record_transform(self, {"tag": self.options.tag})
        ctx.report(self, "prepared", True)

    @hookimpl(wrapper=True)
    def tunestack_train_step(self, model: Any, batch: Any, ctx: StepContext) -> Generator[None, StepOutput, StepOutput]:
        if ctx.micro_step == 0:
            self._note("train_step")
        result = yield
        if self.options.nan_after_step is not None and ctx.step >= self.options.nan_after_step:
            return StepOutput(loss=result.loss * float("nan"), outputs=result.outputs, logs=result.logs)
        if self.options.scale_loss != 1.0:
            return StepOutput(loss=result.loss * self.options.scale_loss, outputs=result.outputs, logs=result.logs)
        return result

    @hookimpl
    def tunestack_compress(self, model: ModelHandle, ctx: StageContext) -> None:
        self._note("compress")

    @hookimpl
    def tunestack_save(self, model: Any, folder: Path, record: TransformRecord) -> Saved:
        self._note("save")
        (folder / "echo.json").write_text(json.dumps({"tag": record.state.get("tag", "")}) + "\n", encoding="utf-8")
        return Saved(model=model)

    @hookimpl
    def tunestack_rebuild(self, model: Any, folder: Path, record: TransformRecord) -> Any:
        self._note("rebuild")
        if not (folder / "echo.json").is_file():
            raise FileNotFoundError(f"{folder}/echo.json is missing")
        return model

    @hookimpl
    def tunestack_evaluate(self, model: ModelHandle, ctx: EvalContext) -> dict[str, Any] | None:
        self._note("evaluate")
        return {"value": self.options.metric} if self.options.metric is not None else None


@hookimpl
def tunestack_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="echo",
            options=EchoOptions,
            factory=Echo,
            contract=contract,
            description="test double: records every hook call; contract set by its options",
        )
    )
