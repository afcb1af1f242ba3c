"""``kd``: knowledge distillation from a teacher into the stage's model (the student).

The loss of every training step becomes
``alpha * task + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))``, plus optional
hidden-state and attention-map terms. It lives entirely in a ``tunestack_train_step`` wrapper
around the default step: core knows nothing about distillation.

The teacher is the stage's input model (default), an earlier stage of the run, a finished run
folder or a Hugging Face model folder; it runs in eval mode under ``torch.no_grad()`` and is never
saved. With ``student = { from_teacher = true, keep_layers = [...] }`` the student is built in
``prepare`` from the teacher's chosen layers (DistilBERT-style); it stays a plain Hugging Face
model that core saves and reloads with the stock class.

Nothing heavy is imported here: torch lives in :mod:`tunestack_kd.runtime` and friends.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import field_validator

from tunestack.api import (
    Contract,
    Field,
    Method,
    MethodSpec,
    ModelHandle,
    Options,
    Problem,
    StageContext,
    StagePlan,
    StepContext,
    StepOutput,
    ValidationContext,
    hookimpl,
)
from tunestack_kd.sources import (
    TeacherNotFound,
    TeacherRef,
    depth,
    folder_labels,
    heads,
    read_json,
    resolve_teacher,
    stack_tokenizer_dir,
    tokenizer_vocab,
    vocab_mismatch,
)

if TYPE_CHECKING:
    from tunestack_kd.runtime import Distiller

__all__ = ["KD", "KDOptions", "StudentOptions", "contract"]


class StudentOptions(Options):
    from_teacher: bool = Field(
        True,
        description="start the student from the teacher's weights (with teacher = 'input' that is the "
        "stage's model); false: from the stage's own model",
    )
    keep_layers: list[int] | None = Field(
        None,
        min_length=1,
        description="transformer layers to keep, in order (e.g. [0, 2, 4]); default: all of them",
    )

    @field_validator("keep_layers")
    @classmethod
    def _non_negative(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(i < 0 for i in value):
            raise ValueError(f"layer indices start at 0, got {value}")
        return value


class KDOptions(Options):
    teacher: str = Field(
        "input",
        description="'input' (the stage's input model), 'stage:NAME' (an earlier stage of this run), a "
        "tunestack run folder or a Hugging Face model folder; relative to the stack file",
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the task loss; 1 - alpha goes to the KL term")
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="softmax temperature T of the KL term")
    hidden_weight: float = Field(
        0.0, ge=0.0, description="weight of the hidden-state MSE (a learned projection when widths differ)"
    )
    attention_weight: float = Field(
        0.0, ge=0.0, description="weight of the attention-map loss (needs equal head counts)"
    )
    attention_loss: Literal["mse", "kl"] = Field(
        "mse", description="distance between attention maps: mean squared error or KL per query row"
    )
    layer_map: list[tuple[int, int]] | None = Field(
        None,
        description="[student layer, teacher layer] pairs for the hidden/attention terms; default: the "
        "kept layers, one to one for equal depths, else evenly spaced",
    )
    student: StudentOptions | None = Field(
        None, description="build the student from the teacher's layers; default: the stage's model is the student"
    )
    cache_teacher: bool = Field(
        False, description="cache the teacher's logits per example (keyed by input ids) across epochs"
    )
    cache_max_mb: float = Field(
        1024.0, gt=0, description="memory cap of the logit cache (CPU); examples beyond it are recomputed"
    )

    @field_validator("layer_map")
    @classmethod
    def _pairs_non_negative(cls, value: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if value is not None and any(i < 0 or j < 0 for i, j in value):
            raise ValueError(f"layer indices start at 0, got {[list(p) for p in value]}")
        return value


REASONS = {
    "adapters": "the student is built by copying layers of a plain model: merge adapters first, or put "
    "lora/adapter after kd so they train the student",
}


def contract(options: KDOptions) -> Contract:
    """Trains only; building a student changes shapes (``structural``)."""
    if options.student is not None:
        return Contract(
            phases=frozenset({"prepare", "train"}),
            requires=frozenset({"float-weights"}),
            conflicts=frozenset({"adapters"}),
            produces=frozenset({"structural"}),
            reasons=REASONS,
        )
    return Contract(phases=frozenset({"prepare", "train"}), requires=frozenset({"float-weights"}))


class KD(Method[KDOptions]):
    def __init__(self, options: KDOptions, slot: Any) -> None:
        super().__init__(options, slot)
        self.distiller: Distiller | None = None
        self.input_snapshot: Any = None  # the stage's input model, copied before any method's prepare

    @property
    def wants_input_snapshot(self) -> bool:
        return self.options.teacher == "input" and self.uses_teacher

    @property
    def uses_teacher(self) -> bool:
        o = self.options
        return o.alpha < 1.0 or o.hidden_weight > 0 or o.attention_weight > 0

    # -- validation (no torch) -------------------------------------------------------------------

    @hookimpl
    def tunestack_validate_stage(self, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
        o = self.options
        path = self.slot.path
        problems: list[Problem] = []
        if not stage.trains:
            problems.append(
                Problem(path, "kd only acts while training, but this stage has epochs = 0 (set epochs >= 1)")
            )
        if o.layer_map is not None and not (o.hidden_weight > 0 or o.attention_weight > 0):
            problems.append(
                Problem(
                    f"{path}.layer_map",
                    "only used by the hidden/attention terms: set hidden_weight or attention_weight",
                )
            )
        if o.cache_teacher and (o.hidden_weight > 0 or o.attention_weight > 0):
            problems.append(
                Problem(
                    f"{path}.cache_teacher",
                    "only logits are cached; with hidden_weight or attention_weight the teacher runs every step anyway",
                )
            )
        if o.student is not None and o.student.keep_layers is not None:
            keep = o.student.keep_layers
            repeated = sorted({i for i in keep if keep.count(i) > 1})
            if repeated:
                problems.append(Problem(f"{path}.student.keep_layers", f"layers must be unique; repeated: {repeated}"))

        ref: TeacherRef | None = None
        try:
            ref = resolve_teacher(o.teacher, ctx.base_dir)
        except TeacherNotFound as error:
            problems.append(Problem(f"{path}.teacher", str(error)))

        # the input model's config.json is only known for sure before any structural stage
        input_config = ctx.model_config if (stage.index == 0 or "structural" not in stage.tags_before) else None
        teacher_config: Any = None
        if ref is not None:
            if ref.kind == "input":
                teacher_config = input_config
            elif ref.kind == "stage":
                problems += self._stage_teacher_problems(ref, stage, ctx)
            else:
                teacher_config = read_json(ref.model_dir / "config.json") if ref.model_dir else None
                problems += self._external_teacher_problems(ref, ctx)

        from_teacher = o.student is not None and o.student.from_teacher and ref is not None and ref.kind != "input"
        if from_teacher:
            student_config = teacher_config if ref is not None and ref.kind in {"run", "folder"} else None
        else:
            student_config = input_config
        student_depth = depth(student_config)
        if o.student is not None and o.student.keep_layers is not None:
            out = [i for i in o.student.keep_layers if student_depth is not None and i >= student_depth]
            if out and student_depth is not None:
                whose = "the teacher" if from_teacher else "the model"
                problems.append(
                    Problem(
                        f"{path}.student.keep_layers",
                        f"{whose} has {student_depth} layers (0..{student_depth - 1}); cannot keep {out}",
                    )
                )
            student_depth = len(o.student.keep_layers)
        teacher_depth = depth(teacher_config)
        if o.layer_map is not None:
            for i, j in o.layer_map:
                if student_depth is not None and i >= student_depth:
                    problems.append(
                        Problem(f"{path}.layer_map", f"student layer {i} does not exist ({student_depth} layers)")
                    )
                if teacher_depth is not None and j >= teacher_depth:
                    problems.append(
                        Problem(f"{path}.layer_map", f"teacher layer {j} does not exist ({teacher_depth} layers)")
                    )
        if o.attention_weight > 0:
            student_heads, teacher_heads = heads(student_config), heads(teacher_config)
            if student_heads is not None and teacher_heads is not None and student_heads != teacher_heads:
                problems.append(
                    Problem(
                        f"{path}.attention_weight",
                        f"attention maps need the same number of heads: student {student_heads}, teacher "
                        f"{teacher_heads}; set attention_weight = 0 (hidden_weight works across widths)",
                    )
                )
        return problems

    def _stage_teacher_problems(self, ref: TeacherRef, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
        names = [s.name for s in (ctx.stack.stage or []) if s is not None]
        earlier = names[: stage.index]
        if ref.stage not in earlier:
            listing = ", ".join(earlier) or "none"
            return [
                Problem(
                    f"{self.slot.path}.teacher",
                    f"'{ref.text}' must name an earlier stage of this file (earlier stages: {listing})",
                )
            ]
        return []

    def _external_teacher_problems(self, ref: TeacherRef, ctx: ValidationContext) -> list[Problem]:
        path = f"{self.slot.path}.teacher"
        problems = []
        teacher_labels: list[str] | None = None
        if ref.kind == "run" and ref.path is not None:
            manifest = read_json(ref.path / "manifest.json") or {}
            task = manifest.get("task")
            if task and task != ctx.task:
                problems.append(Problem(path, f"the teacher run {ref.path} was trained for '{task}', not '{ctx.task}'"))
            if isinstance(manifest.get("labels"), list):
                teacher_labels = [str(x) for x in manifest["labels"]]
        elif ref.model_dir is not None:
            teacher_labels = folder_labels(ref.model_dir)
        wanted = ctx.stack.data.labels
        if wanted and teacher_labels and ctx.task != "causal-lm" and sorted(wanted) != sorted(teacher_labels):
            problems.append(
                Problem(
                    path,
                    f"the teacher predicts labels {teacher_labels} but data.labels is {list(wanted)}; "
                    "distillation needs the same label space",
                )
            )
        teacher_tok = tokenizer_vocab(ref.model_dir)
        student_tok = tokenizer_vocab(stack_tokenizer_dir(ctx.stack.model, ctx.base_dir))
        if teacher_tok is not None and student_tok is not None and teacher_tok[0] != student_tok[0]:
            mismatch = vocab_mismatch(teacher_tok[1], student_tok[1])
            if mismatch:
                problems.append(
                    Problem(
                        path,
                        f"the teacher's tokenizer differs from the stack's ({mismatch}); distillation "
                        "compares outputs position by position and needs the same tokenizer",
                    )
                )
        return problems

    # -- lifecycle -------------------------------------------------------------------------------

    @hookimpl
    def tunestack_prepare(self, model: ModelHandle, ctx: StageContext) -> None:
        from tunestack_kd.runtime import Distiller

        distiller = Distiller(self)
        distiller.prepare(model, ctx)
        self.distiller = distiller

    @hookimpl(wrapper=True)
    def tunestack_train_step(self, model: Any, batch: Any, ctx: StepContext) -> Generator[None, StepOutput, StepOutput]:
        distiller = self.distiller
        if distiller is None:
            return (yield)
        distiller.before_step(model, ctx)
        result = yield
        return distiller.after_step(batch, result)

    @hookimpl
    def tunestack_compress(self, model: ModelHandle, ctx: StageContext) -> None:
        """Not a compression: releases the teacher and the forward hooks once training is over."""
        if self.distiller is not None:
            self.distiller.close(ctx)
            self.distiller = None


@hookimpl(wrapper=True)
def tunestack_prepare(model: ModelHandle, ctx: StageContext) -> Generator[None, None, None]:
    """Copy the stage's input model before any method prepares it, for kd entries whose teacher is
    'input' (so ``prune -> kd`` or ``lora -> kd`` in one stage still distil from the untouched input).

    A plugin-module hook, not a method's: it sees every stage and does nothing in stages without
    such a kd entry.
    """
    waiting = [m.instance for m in ctx.stage.methods if isinstance(m.instance, KD) and m.instance.wants_input_snapshot]
    if waiting:
        import copy

        snapshot = copy.deepcopy(model.model)
        for instance in waiting:
            instance.input_snapshot = snapshot
    try:
        return (yield)
    finally:
        for instance in waiting:
            instance.input_snapshot = None


@hookimpl
def tunestack_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="kd",
            options=KDOptions,
            factory=KD,
            contract=contract,
            description="knowledge distillation: soft-label KL with temperature, optional hidden-state and "
            "attention losses; student built from the teacher's layers",
            examples=(
                '[[stage.stack]]\nmethod = "kd"\nalpha = 0.5\ntemperature = 2.0\n'
                "student = { from_teacher = true, keep_layers = [0, 2, 4] }",
            ),
        )
    )
