"""``int8``: post-training INT8 quantization on CPU with real int8 kernels.

Acts in ``compress`` (after training, in stack order: a ``lora`` with ``merge = true`` earlier in the
stage has already folded its adapter in). Linear layers (and GPT-2's ``Conv1D``, treated as a
transposed linear) become int8 modules, optionally the embeddings too:

* ``backend = "fbgemm"``: ``torch.ao.quantization.quantize_dynamic`` modules (dynamic) or packed
  fbgemm weights with calibrated activation ranges (static);
* ``backend = "torchao"``: torchao ``Int8Tensor`` weights (``Int8DynamicActivationInt8WeightConfig`` /
  ``Int8StaticActivationInt8WeightConfig``), optionally ``torch.compile``;
* ``backend = "neural-compressor"``: neural-compressor 3.x calibrates (PT2E prepare/convert); its
  scales go into fbgemm int8 modules, which run and save without pickles;
* ``backend = "auto"``: times the eager candidates on a calibration batch and keeps the fastest.

``max_output_change`` makes it accuracy-aware: each module is quantized alone, the change of the
model's outputs on the calibration batches is measured, and modules over the limit stay fp32.

The int8 weights, scales and zero points are stored as safetensors + JSON in the transform folder and
restored on reload without calibration. Nothing heavy is imported here (see :mod:`tunestack_int8.runtime`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

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

__all__ = ["CONTRACT", "Int8", "Int8Options"]

Backend = Literal["auto", "torchao", "fbgemm", "neural-compressor"]
ModuleType = Literal["linear", "embedding"]

FLOAT_REASON = "INT8 quantizes float weights; this model's weights are already quantized"
ADAPTERS_REASON = "merge adapters first (e.g. lora merge = true); adapters that cannot merge must not precede int8"
AFTER_REASON = "nothing structural after INT8: weights are no longer float"

CONTRACT = Contract(
    phases=frozenset({"compress"}),
    requires=frozenset({"float-weights"}),
    conflicts=frozenset({"adapters"}),
    produces=frozenset({"quantized"}),
    removes=frozenset({"float-weights"}),
    forbids_after=frozenset({"structural", "quantized"}),
    reasons={
        "float-weights": FLOAT_REASON,
        "adapters": ADAPTERS_REASON,
        "structural": AFTER_REASON,
        "quantized": "INT8 weights are no longer float: quantize once, at the end",
    },
)


class Int8Options(Options):
    mode: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="'dynamic': activations are quantized on the fly at every call; 'static': their ranges "
        "are calibrated once on the stage's data (calibration_batches)",
    )
    backend: Backend = Field(
        "auto",
        description="'fbgemm' (torch.ao quantized modules), 'torchao' (Int8Tensor weights), 'neural-compressor' "
        "(INC 3.x calibrates, fbgemm kernels run), or 'auto': time the eager candidates (fbgemm, torchao) "
        "on a calibration batch and keep the fastest",
    )
    modules: list[ModuleType] = Field(
        ["linear"],
        description="module types to quantize: 'linear' (nn.Linear and GPT-2's Conv1D) and/or 'embedding' "
        "(8-bit rows, fbgemm embedding_byte kernel: the embeddings are half of a MiniLM's weights)",
    )
    calibration_batches: int = Field(
        8,
        ge=1,
        le=1000,
        description="batches of the stage's training data (evaluation data when there is none) used for "
        "static ranges, neural-compressor's calibration, max_output_change and the latency report",
    )
    max_output_change: float | None = Field(
        None,
        gt=0,
        description="accuracy-aware: quantize module by module and keep in fp32 every module that alone changes "
        "the outputs on the calibration batches by more than this (relative L2: ||q - f|| / ||f|| of the "
        "logits); the report lists the modules kept in fp32",
    )
    quantize_head: bool = Field(
        False, description="quantize the task head too (classifier/score); weights tied to embeddings never are"
    )
    exclude: list[str] = Field(
        [], description="glob patterns of module names to keep in fp32 (e.g. '*.output.dense', 'bert.pooler.*')"
    )
    compile: bool = Field(
        False,
        description="torchao only: torch.compile the quantized model (fused int8 kernels, about 2x faster on "
        "AVX-512 VNNI CPUs, but the first call of every input shape costs tens of seconds); also on reload",
    )

    @field_validator("modules")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one module type: 'linear' and/or 'embedding'")
        return sorted(set(value), key=value.index)


class Int8(Method[Int8Options]):
    # -- planning (no torch) -------------------------------------------------------------------

    @hookimpl
    def tunestack_validate_stage(self, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
        return validate(self, stage, ctx)

    # -- lifecycle -----------------------------------------------------------------------------

    @hookimpl
    def tunestack_compress(self, model: ModelHandle, ctx: StageContext) -> None:
        from tunestack_int8 import runtime

        runtime.compress(self, model, ctx)

    @hookimpl
    def tunestack_save(self, model: Any, folder: Path, record: TransformRecord) -> Saved:
        from tunestack_int8 import runtime

        return runtime.save(model, folder, record)

    @hookimpl
    def tunestack_rebuild(self, model: Any, folder: Path, record: TransformRecord) -> Any:
        from tunestack_int8 import runtime

        return runtime.rebuild(model, folder, record, compile_model=self.options.compile)


def validate(method: Int8, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
    problems: list[Problem] = []
    path = method.slot.path
    options = method.options
    if "embedding" in options.modules and options.backend == "neural-compressor":
        problems.append(
            Problem(
                f"{path}.modules",
                "neural-compressor 3.x has no int8 embedding kernel on CPU (its PT2E quantizer covers linear "
                "layers only); drop 'embedding', or use backend 'fbgemm', 'torchao' or 'auto' (embeddings "
                "then use fbgemm's 8-bit embedding_byte kernel)",
            )
        )
    if options.compile and options.backend != "torchao":
        problems.append(
            Problem(
                f"{path}.compile",
                f"torch.compile applies to backend = 'torchao' only (got '{options.backend}'): fbgemm's "
                "quantized modules already run int8 kernels eagerly",
            )
        )
    data = ctx.stack.data
    needs_data = (
        options.mode == "static"
        or options.backend in ("auto", "neural-compressor")
        or options.max_output_change is not None
    )
    if needs_data and data.train is None and data.eval is None:
        why = (
            "static quantization calibrates activation ranges"
            if options.mode == "static"
            else "it measures the model on calibration batches"
        )
        problems.append(Problem(f"{path}.mode", f"{why}: give data.train (or data.eval)"))
    problems.extend(_later_training(method, ctx))
    return problems


def _later_training(method: Int8, ctx: ValidationContext) -> list[Problem]:
    """A later stage that trains would train int8 weights: refuse it with the reason."""
    stages = ctx.stack.stage or []
    problems = []
    for index, stage in enumerate(stages):
        if index <= method.slot.stage_index:
            continue
        train = stage.training(ctx.stack.train)
        if train.epochs > 0 or (train.max_steps or 0) > 0:
            problems.append(
                Problem(
                    f"stage[{index}].epochs",
                    f"stage '{stage.name}' trains the model that int8 ({method.slot.path}) quantized: int8 "
                    "weights do not train; train before int8 (set epochs = 0 here, or move int8 to the last stage)",
                )
            )
    return problems


@hookimpl
def tunestack_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="int8",
            options=Int8Options,
            factory=Int8,
            contract=CONTRACT,
            description="post-training INT8 quantization on CPU (dynamic or static) with real int8 kernels: "
            "fbgemm, torchao or neural-compressor calibration; accuracy-aware fp32 fallback",
            examples=(
                '[[stack]]\nmethod = "int8"\nmode = "dynamic"',
                '[[stack]]\nmethod = "int8"\nmode = "static"\nbackend = "fbgemm"\ncalibration_batches = 8\n'
                "max_output_change = 0.02",
            ),
        )
    )
