"""What ``prune`` does when its phase comes: merge adapters, plan, rank, cut, measure, report."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from tunestack.api import ModelError, ModelHandle, StageContext
from tunestack_prune.planning import (
    Dims,
    Target,
    UnsupportedModel,
    depgraph_unsupported,
    describe,
    layer_problems,
    plan,
    steps,
)

if TYPE_CHECKING:
    from tunestack_prune import Prune


def run(method: Prune, handle: ModelHandle, ctx: StageContext, phase: str) -> dict[str, Any]:
    """Prune ``handle.model`` in place as ``method.options`` say; report what happened."""
    from tunestack_prune import measure
    from tunestack_prune.surgery import dims_of

    options = method.options
    path = method.slot.path
    report = lambda key, value: ctx.report(method, key, value)  # noqa: E731
    report("phase", phase)
    merged = merge_adapters(method, handle, ctx) if options.merge_adapters else []
    if merged:
        report("merged_adapters", merged)
    model = handle.model
    check_plain(model, path)
    try:
        dims = dims_of(model)
    except UnsupportedModel as error:
        raise ModelError(f"{path}: {error}") from None
    target = resolve_target(method, dims)
    engine = choose_engine(method, dims, target)
    report("engine", engine)
    report("importance", options.importance)
    report("shape_before", dims.as_dict())
    tokens = ctx.stack.eval.latency_tokens or ctx.stack.data.max_length
    latency = list(ctx.stack.eval.latency_batch_sizes) if ctx.stack.eval.latency else None
    before = measure.measure(model, tokens, latency)
    batches: list[dict[str, Any]] = []
    if options.importance == "taylor":
        batches = list(ctx.data.batches("train", limit=options.calibration_batches))
        if not batches:
            raise ModelError(f"{path}.importance: taylor needs calibration batches, but the stage has no training data")
        report("calibration_batches", len(batches))
    plan_steps = steps(dims, target, options.iterative_steps)
    for step in plan_steps:
        prune_step(model, step, engine, options.importance, batches)
    after_dims = dims_of(model)
    check_consistent(model, after_dims, target, path)
    model.zero_grad(set_to_none=True)
    after = measure.measure(model, tokens, latency)
    report("shape_after", after_dims.as_dict())
    report("steps", [s.as_dict() for s in plan_steps])
    for key, value in before.items():
        report(f"{key}_before", value)
    for key, value in after.items():
        report(f"{key}_after", value)
    report("params_ratio", round(after["params"] / before["params"], 6))
    report("macs_ratio", round(after["macs"] / before["macs"], 6))
    if latency:
        report("latency_device", str(next(model.parameters()).device.type))
        report("latency_tokens", tokens)
    return {"macs_before": before["macs"], "tokens": tokens}


def prune_step(
    model: Any, target: Target, engine: str, importance: str, batches: list[dict[str, Any]]
) -> dict[str, Any]:
    from tunestack_prune.surgery import accumulate_grads, prune

    if engine == "depgraph":
        from tunestack_prune.depgraph import prune_depgraph

        return prune_depgraph(model, target, importance, lambda: accumulate_grads(model, batches))
    if importance == "taylor":
        accumulate_grads(model, batches)
    return prune(model, target, importance)


def resolve_target(method: Prune, dims: Dims) -> Target:
    """The planned shape, or a ModelError listing every problem (the checks validation runs)."""
    options = method.options
    target, problems = plan(dims, options.request())
    if not problems:
        problems += layer_problems(dims, target, options.untouched_layers(), options.layers_option())
    if problems:
        lines = [f"{method.slot.path}{'.' + option if option else ''}: {message}" for option, message in problems]
        raise ModelError("; ".join(lines))
    return target


def choose_engine(method: Prune, dims: Dims, target: Target) -> str:
    wanted = method.options.engine
    if wanted == "native":
        return "native"
    why = depgraph_unsupported(dims, target)
    if why is None and importlib.util.find_spec("torch_pruning") is None:
        why = "torch-pruning is not installed"
    if wanted == "depgraph" and why is not None:
        raise ModelError(f"{method.slot.path}.engine: depgraph cannot prune this model: {why}; use 'native' or 'auto'")
    return "depgraph" if why is None else "native"


def check_plain(model: Any, path: str) -> None:
    """Only a plain transformers model can be cut and saved as one."""
    from transformers import PreTrainedModel

    foreign = sorted(
        {
            f"{type(m).__name__} ({type(m).__module__.split('.')[0]})"
            for m in model.modules()
            if type(m).__module__.split(".")[0] not in ("transformers", "torch")
        }
    )
    if not isinstance(model, PreTrainedModel) or foreign:
        what = ", ".join(foreign[:4]) or type(model).__name__
        raise ModelError(
            f"{path}: prune needs a plain transformers model, but the model holds {what}: unmerged adapters or a "
            "wrapper; merge the adapters first (e.g. lora merge = true) or set merge_adapters = true"
        )


def check_consistent(model: Any, dims: Dims, target: Target, path: str) -> None:
    """Every attention module and the config agree on the new shape (what the stock class rebuilds)."""
    got = Target(dims.heads, dims.kv_heads, dims.head_dim, dims.ffn, dims.hidden)
    if got != target:
        raise ModelError(f"{path}: pruning produced {describe(got)}, not the planned {describe(target)}")
    base = model.base_model
    if dims.family == "bert":
        for layer in base.encoder.layer:
            sa = layer.attention.self
            ok = (
                sa.num_attention_heads == dims.heads
                and sa.attention_head_size == dims.head_dim
                and sa.all_head_size == dims.heads * dims.head_dim == dims.hidden
                and sa.query.out_features == dims.hidden
                and layer.intermediate.dense.out_features == dims.ffn
            )
            if not ok:
                raise ModelError(f"{path}: an attention module disagrees with the pruned config ({describe(target)})")
    elif dims.family == "gpt2":
        for block in base.h:
            a = block.attn
            ok = (
                a.num_heads == dims.heads
                and a.head_dim == dims.head_dim
                and a.split_size == dims.hidden
                and block.mlp.c_fc.nf == dims.ffn
            )
            if not ok:
                raise ModelError(f"{path}: an attention module disagrees with the pruned config ({describe(target)})")
    else:
        for layer in base.layers:
            a = layer.self_attn
            ok = (
                a.head_dim == dims.head_dim
                and a.num_key_value_groups == dims.heads // dims.kv_heads
                and a.q_proj.out_features == dims.heads * dims.head_dim
                and a.k_proj.out_features == dims.kv_heads * dims.head_dim
                and layer.mlp.gate_proj.out_features == dims.ffn
            )
            if not ok:
                raise ModelError(f"{path}: an attention module disagrees with the pruned config ({describe(target)})")


# -------------------------------------------------------------------------------------------------
# adapters
# -------------------------------------------------------------------------------------------------


def merge_adapters(method: Prune, handle: ModelHandle, ctx: StageContext) -> list[str]:
    """Fold every peft adapter into the weights and drop the transform records they left.

    Records dropped: those of this stage's methods whose contract produces ``adapters``, and those
    of earlier stages made by adapter methods (the ones with a ``merge`` option, like ``lora``).
    Every parameter trains again afterwards, as in a model loaded without adapters.
    """
    try:
        from peft import PeftModel
    except ImportError:  # no peft, no peft adapters
        return []
    wrappers = [m for m in handle.model.modules() if isinstance(m, PeftModel)]
    if not wrappers:
        return []
    path = method.slot.path
    for wrapper in wrappers:
        try:
            merged = wrapper.merge_and_unload()
        except (AttributeError, NotImplementedError, ValueError, TypeError) as error:
            kinds = ", ".join(sorted({str(c.peft_type) for c in wrapper.peft_config.values()}))
            raise ModelError(
                f"{path}.merge_adapters: cannot merge the {kinds} adapter into the weights: {error}"
            ) from None
        _replace(handle, wrapper, merged, path)
    producers = {
        m.slot.key for m in ctx.stage.methods if "adapters" in m.contract.produces and m.instance is not method
    }
    dropped = [
        r
        for r in handle.transforms
        if r.slot.key in producers or (r.slot.stage_index < ctx.stage.index and "merge" in r.options)
    ]
    handle.transforms = [r for r in handle.transforms if r not in dropped]
    for param in handle.model.parameters():
        param.requires_grad_(True)
    return [r.slot.path for r in dropped] or [type(w).__name__ for w in wrappers]


def _replace(handle: ModelHandle, old: Any, new: Any, path: str) -> None:
    if handle.model is old:
        handle.model = new
        return
    for parent in handle.model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise ModelError(f"{path}: cannot merge: the adapter model is no longer part of the stage's model")
