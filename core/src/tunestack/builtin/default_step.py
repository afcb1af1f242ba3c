"""The default training step: the model's own loss. Methods wrap it to add terms (KD)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunestack.context import StepContext, StepOutput
from tunestack.hookspecs import hookimpl


@hookimpl(trylast=True)
def tunestack_train_step(model: Any, batch: Mapping[str, Any], ctx: StepContext) -> StepOutput:
    outputs = model(**batch)
    if getattr(outputs, "loss", None) is None:
        raise ValueError("the model returned no loss: does the batch carry 'labels'?")
    return StepOutput(loss=outputs.loss, outputs=outputs)
