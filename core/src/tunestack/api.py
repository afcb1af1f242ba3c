"""The public API for plugin authors: everything a method plugin may import, in one place.

Names listed in ``__all__`` are stable; a test fails if one disappears. Importing this module does
not import torch.
"""

from __future__ import annotations

from pydantic import Field

from tunestack.context import (
    EvalContext,
    ExampleList,
    ModelHandle,
    PlannedMethod,
    StageContext,
    StageData,
    StagePlan,
    Stash,
    StashKey,
    StepContext,
    StepOutput,
    TransformRecord,
    ValidationContext,
)
from tunestack.data import Example
from tunestack.errors import DataError, ModelError, PluginError, Problem, RunFailed, UserError
from tunestack.hookspecs import hookimpl
from tunestack.methods import KNOWN_TAGS, PHASES, Contract, Method, MethodSpec, Options, Phase, Slot, TaskSpec
from tunestack.modelparts import (
    Layers,
    count_trainable,
    embedding_parameter_names,
    head_parameter_names,
    layer_of,
    transformer_layers,
)
from tunestack.saving import Saved

__all__ = [
    # declaring a method
    "hookimpl",
    "MethodSpec",
    "Method",
    "Options",
    "Field",
    "Contract",
    "Phase",
    "PHASES",
    "KNOWN_TAGS",
    "Slot",
    "TaskSpec",
    # what hooks receive and return
    "ModelHandle",
    "StageContext",
    "StageData",
    "StagePlan",
    "PlannedMethod",
    "StepContext",
    "StepOutput",
    "EvalContext",
    "ValidationContext",
    "TransformRecord",
    "Saved",
    "Example",
    "ExampleList",
    "Stash",
    "StashKey",
    # finding model parts across families
    "Layers",
    "transformer_layers",
    "head_parameter_names",
    "embedding_parameter_names",
    "layer_of",
    "count_trainable",
    # errors
    "Problem",
    "UserError",
    "DataError",
    "ModelError",
    "PluginError",
    "RunFailed",
]
