"""Parameters, size on disk and CPU latency for every evaluation, as a plugin."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunestack.hookspecs import hookimpl

if TYPE_CHECKING:
    from tunestack.context import EvalContext, ModelHandle


@hookimpl
def tunestack_evaluate(model: ModelHandle, ctx: EvalContext) -> dict[str, Any]:
    import torch

    from tunestack import artifacts, measure

    metrics: dict[str, Any] = {"params_total": measure.count_parameters(model.model)}
    if ctx.trainable_params is not None:
        metrics["params_trainable"] = ctx.trainable_params
    if ctx.model_dir is not None:
        metrics["size_mb"] = round(artifacts.weights_size(ctx.model_dir) / 1e6, 3)
        metrics["folder_mb"] = round(artifacts.folder_size(ctx.model_dir) / 1e6, 3)
    settings = ctx.settings
    if settings.latency and ctx.examples:
        tokens = settings.latency_tokens or ctx.max_length
        device = measure.model_device(model.model)
        metrics["latency_threads"] = torch.get_num_threads()
        metrics["latency_tokens"] = tokens
        metrics["latency_device"] = device.type
        for size in settings.latency_batch_sizes:
            batch = measure.fixed_length_batch(ctx.task, model.tokenizer, ctx.examples, model.labels, size, tokens)
            batch = {k: v.to(device) for k, v in batch.items()}
            metrics[f"latency_ms_b{size}"] = round(
                measure.latency_ms(model.model, batch, settings.latency_warmup, settings.latency_repeats), 3
            )
    return metrics
