"""``ia3``: (IA)^3 — learned vectors that rescale keys, values and feed-forward activations.

A third-party method plugin: it lives outside tunestack's tree and imports only
``tunestack.api``. peft does the module surgery; this file tells tunestack what the method needs,
what it produces, and how its part of the model is saved and rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunestack.api import (
    Contract,
    Field,
    Method,
    MethodSpec,
    ModelHandle,
    Options,
    Problem,
    Saved,
    StageContext,
    StagePlan,
    TransformRecord,
    ValidationContext,
    hookimpl,
)

TASK_TYPES = {
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "causal-lm": "CAUSAL_LM",
}


class IA3Options(Options):
    target_modules: list[str] | None = Field(
        None, description="modules whose outputs are rescaled; default: peft's choice for the architecture"
    )
    feedforward_modules: list[str] | None = Field(
        None, description="which of target_modules are feed-forward (rescaled at their input)"
    )
    merge: bool = Field(False, description="fold the vectors into the weights at the end of the stage")


def contract(options: IA3Options) -> Contract:
    """Unmerged (IA)^3 leaves peft modules in the model; merged, nothing remains."""
    return Contract(
        phases=frozenset({"prepare", "train", "compress"} if options.merge else {"prepare", "train"}),
        requires=frozenset({"float-weights"}),
        conflicts=frozenset({"adapters"}),
        produces=frozenset() if options.merge else frozenset({"adapters", "structural"}),
        reasons={
            "float-weights": "(IA)^3 scales floating-point weights",
            "adapters": "merge the earlier adapter first (merge = true)",
        },
    )


class IA3(Method[IA3Options]):
    @hookimpl
    def tunestack_validate_stage(self, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
        problems = []
        if not stage.trains:
            problems.append(Problem(self.slot.path, "ia3 learns its vectors by training: give the stage epochs > 0"))
        targets, feedforward = self.options.target_modules, self.options.feedforward_modules
        if feedforward and not targets:
            problems.append(Problem(f"{self.slot.path}.feedforward_modules", "set target_modules too"))
        elif feedforward and targets and not set(feedforward) <= set(targets):
            problems.append(Problem(f"{self.slot.path}.feedforward_modules", "must be a subset of target_modules"))
        return problems

    @hookimpl
    def tunestack_prepare(self, model: ModelHandle, ctx: StageContext) -> None:
        from peft import IA3Config, get_peft_model

        config = IA3Config(
            task_type=TASK_TYPES[model.task.name],
            target_modules=self.options.target_modules,
            feedforward_modules=self.options.feedforward_modules,
        )
        model.model = get_peft_model(model.model, config)
        model.record_transform(self)
        trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.model.parameters())
        ctx.report(self, "trainable_params", trainable)
        ctx.report(self, "trainable_fraction", trainable / total)

    @hookimpl
    def tunestack_compress(self, model: ModelHandle, ctx: StageContext) -> None:
        if self.options.merge:
            model.model = model.model.merge_and_unload()
            model.drop_transform(self)

    @hookimpl
    def tunestack_save(self, model: Any, folder: Path, record: TransformRecord) -> Saved:
        """A plain peft adapter folder; the base goes back to core as an ordinary HF model."""
        model.save_pretrained(str(folder))
        return Saved(model=model.unload())

    @hookimpl
    def tunestack_rebuild(self, model: Any, folder: Path, record: TransformRecord) -> Any:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder))


@hookimpl
def tunestack_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="ia3",
            options=IA3Options,
            factory=IA3,
            contract=contract,
            description="(IA)^3: learned rescaling of keys, values and feed-forward activations (peft)",
        )
    )
