"""Every hook tunestack calls, in lifecycle order. This module is the contract for plugin authors.

Two kinds of plugin object implement these hooks:

* a **plugin module** (the object an entry point in group ``tunestack`` names) implements the
  *registration* hooks and, rarely, cross-cutting lifecycle hooks that should see every stage;
* a **method instance** (built by the ``factory`` of a registered :class:`~tunestack.api.MethodSpec`,
  one per ``[[stack]]`` entry) implements the *lifecycle* hooks. Core registers the instances of a
  stage only while that stage runs, in reverse stack order, so pluggy (which calls the most recently
  registered implementation first) calls them in the order the stack file lists them.

Hook implementations may accept any subset of a spec's arguments (pluggy's opt-in arguments), so
arguments can be added later without breaking plugins. Never give an implementation argument a
default value: pluggy would silently not pass it.

Lifecycle of one stage::

    tunestack_validate_stage   (before torch is imported; every stage)
    tunestack_model_class      (only when the stage loads a fresh model source)
    tunestack_transform_examples  (train and eval examples, before tokenisation)
    tunestack_prepare          (stack order)
    tunestack_train_step       (every step, if the stage trains)
    tunestack_compress         (stack order)
    tunestack_save             (reverse order of recorded transforms)
    tunestack_rebuild          (stack order, when the artifact is reloaded and verified)
    tunestack_evaluate         (on the reloaded model)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # keep this module free of torch and click at import time
    import click

    from tunestack.context import (
        EvalContext,
        ExampleList,
        ModelHandle,
        StageContext,
        StagePlan,
        StepContext,
        StepOutput,
        TransformRecord,
        ValidationContext,
    )
    from tunestack.errors import Problem
    from tunestack.methods import MethodSpec, TaskSpec
    from tunestack.saving import Saved

PROJECT = "tunestack"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Registration hooks (plugin modules; called once when the plugin host starts)
# --------------------------------------------------------------------------------------------


@hookspec
def tunestack_register_methods(register: Callable[[MethodSpec], None]) -> None:
    """Declare the methods this plugin provides.

    Fires once, when the plugin host is created, for every loaded plugin module.

    :param register: call it once per method with a :class:`~tunestack.api.MethodSpec` (name,
        options model, factory, capability contract, description).
    :returns: nothing; the return value is ignored.

    Call semantics: collect. Core calls each plugin's implementation separately, so a malformed
    spec or a duplicate name marks only that plugin as broken and names it.

    .. versionadded:: 0.1
    """


@hookspec
def tunestack_register_tasks(register: Callable[[TaskSpec], None]) -> None:
    """Declare the tasks this plugin provides (``sequence-classification`` and others).

    Fires once, when the plugin host is created.

    :param register: call it once per task with a :class:`~tunestack.api.TaskSpec`.
    :returns: nothing.

    Call semantics: collect, each plugin separately (as for methods).

    .. versionadded:: 0.1
    """


@hookspec
def tunestack_register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``tunestack`` command line.

    Fires once, when the CLI starts.

    :param cli: the top-level click group; add commands with ``@cli.command()``.
    :returns: nothing.

    Call semantics: collect.

    .. versionadded:: 0.1
    """


# --------------------------------------------------------------------------------------------
# Planning hooks (method instances; before any weights are loaded)
# --------------------------------------------------------------------------------------------


@hookspec
def tunestack_validate_stage(stage: StagePlan, ctx: ValidationContext) -> Sequence[Problem] | None:
    """Report problems with a stage that only the method itself can see.

    Fires during validation, once per stage, with that stage's method instances registered.
    Torch has not been imported: use ``ctx.model_config`` (the model's ``config.json`` as a dict,
    when it can be read without loading weights) and the stage plan.

    :param stage: the resolved stage (name, training settings, method entries with options).
    :param ctx: the whole stack, the model's static description and the tags before the stage.
    :returns: a list of :class:`~tunestack.errors.Problem` (use ``self.slot.path`` plus the option
        name as the path), or ``None`` when all is well.

    Call semantics: collect; every problem from every implementation is reported together.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def tunestack_model_class(stage: StagePlan, task: str) -> str | None:
    """Choose the auto-class a fresh model source is loaded with.

    Fires before the first stage loads its model from ``[model].source`` (not when a stage starts
    from the previous stage's artifact). The task's default is used when every implementation
    returns ``None`` (for example, a prompt method that scores verbalizers with a causal LM
    returns ``"causal-lm"``).

    :param stage: the first stage's plan.
    :param task: the task name.
    :returns: one of ``"sequence-classification"``, ``"token-classification"``, ``"causal-lm"``,
        ``"masked-lm"``, ``"base"``, or ``None``.

    Call semantics: firstresult: stops at the first non-None result.

    .. versionadded:: 0.1
    """


# --------------------------------------------------------------------------------------------
# Lifecycle hooks (method instances of the running stage)
# --------------------------------------------------------------------------------------------


@hookspec
def tunestack_transform_examples(
    examples: ExampleList, split: str, ctx: StageContext | None, record: TransformRecord | None
) -> None:
    """Rewrite raw examples before tokenisation (templates, in-context examples).

    Fires once per split (``"train"``, ``"eval"``, and ``"predict"`` when a reloaded model
    predicts) before the examples are tokenised. Implementations that leave a transform record
    (see :meth:`ModelHandle.record_transform`) are called again at prediction time, so the
    reloaded model sees inputs formatted the same way.

    :param examples: a mutable list of task examples; replace items in place
        (``examples[:] = [...]``) so the next method in the stack sees the result.
    :param split: which split these examples belong to.
    :param ctx: the stage context, or ``None`` when a reloaded model formats inputs.
    :param record: ``None`` while the stage runs; when a reloaded model formats inputs, the
        method's transform record (``record.state`` holds what ``tunestack_prepare`` stored).
    :returns: nothing.

    Call semantics: chained in stack order through the mutable list.

    .. versionchanged:: 0.1 ``record`` added (opt-in: implementations may leave it out).

    .. versionadded:: 0.1
    """


@hookspec
def tunestack_prepare(model: ModelHandle, ctx: StageContext) -> None:
    """Change the model before the stage trains: wrap it, insert modules, prune, freeze.

    Fires once per stage, after the model and data are loaded, in stack order.

    :param model: the handle; replace ``model.model`` to wrap it, and call
        ``model.record_transform(self, state)`` when the change must be rebuilt on reload
        (inserted modules, wrappers). Plain weight changes need no record.
    :param ctx: the stage context: data (``ctx.data``), device, seed, ``ctx.stash`` for state,
        ``ctx.report(key, value)`` for facts that go into the manifest, and
        ``ctx.add_parameters(params)`` for extra trainable parameters that live outside the model.
    :returns: nothing.

    Call semantics: chained in stack order (each sees the previous method's result).

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def tunestack_train_step(model: Any, batch: Mapping[str, Any], ctx: StepContext) -> StepOutput | None:
    """Compute the loss of one training micro-batch.

    Fires for every micro-batch of a stage with ``epochs > 0``. Core does the backward pass,
    gradient accumulation, clipping, optimizer and scheduler steps.

    :param model: the (possibly Accelerate-wrapped) model in train mode.
    :param batch: tensors on ``ctx.device``: ``input_ids``, ``attention_mask``, ``labels``, …
    :param ctx: step index, epoch, the stage context, ``ctx.stash``.
    :returns: a :class:`~tunestack.api.StepOutput` (``loss`` and the model ``outputs``), or
        ``None`` to defer to the next implementation.

    Call semantics: firstresult. Core's default implementation (plugin ``default-step``,
    ``trylast``) returns ``model(**batch).loss``. To add a loss term (distillation), implement it
    with ``@hookimpl(wrapper=True)``: ``result = yield``, then return a new ``StepOutput``.

    .. versionadded:: 0.1
    """


@hookspec
def tunestack_compress(model: ModelHandle, ctx: StageContext) -> None:
    """Transform the trained model: merge adapters, prune, quantize.

    Fires once per stage after training (or right after prepare when ``epochs = 0``), in stack
    order.

    :param model: the handle; replace ``model.model`` as needed and keep transform records in
        step (``record_transform`` / ``drop_transform``).
    :param ctx: the stage context (calibration data: ``ctx.data.batches("train", n)``).
    :returns: nothing.

    Call semantics: chained in stack order.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def tunestack_save(model: Any, folder: Path, record: TransformRecord) -> Saved:
    """Store the part of the model this method's transform added, and peel it off.

    Fires while the stage's artifact is written, once per transform record, from the last
    record to the first. Only the instance that made the record is called.

    :param model: the model with every later transform already peeled off.
    :param folder: an empty folder reserved for this transform (inside the model folder).
    :param record: the transform record (``record.state`` is what the method stored in it).
    :returns: :class:`~tunestack.api.Saved`: the model without this transform, plus the
        state-dict keys of that model the method already stored itself (core leaves them out of
        the base weights file).

    Call semantics: targeted (one instance), in reverse record order.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def tunestack_rebuild(model: Any, folder: Path, record: TransformRecord) -> Any:
    """Re-apply a transform to a freshly loaded base model, from what ``tunestack_save`` stored.

    Fires when an artifact is loaded (``tunestack.load``, the next stage, ``eval``/``predict``),
    once per record, in record order. Must not need training data, calibration or network.

    :param model: the base model with the earlier transforms already rebuilt.
    :param folder: the folder ``tunestack_save`` wrote.
    :param record: the transform record.
    :returns: the model with this transform applied.

    Call semantics: targeted (one instance), in record order.

    .. versionadded:: 0.1
    """


@hookspec
def tunestack_evaluate(model: ModelHandle, ctx: EvalContext) -> Mapping[str, Any] | None:
    """Report metrics about the model.

    Fires after each stage's artifact has been reloaded and verified, and for ``tunestack eval``.
    Core's ``tasks`` plugin reports the task metrics (accuracy, F1, perplexity…) and ``measure``
    reports parameters, size on disk and CPU latency.

    :param model: the handle of the reloaded model, in eval mode.
    :param ctx: evaluation data (``ctx.batches()``), the task, the artifact folder.
    :returns: a mapping of metric name to value (numbers, or JSON-serialisable tables), or None.

    Call semantics: collect. Core stores method instances' keys under the method's slot key
    (``s0-1-prune.macs``); plugin modules' keys unprefixed; a clash is an error naming both.

    .. versionadded:: 0.1
    """
