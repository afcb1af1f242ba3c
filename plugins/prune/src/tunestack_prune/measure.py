"""Parameters, MACs and CPU latency of a model, before and after pruning.

MACs come from torch-pruning's op counter (``tp.utils.count_ops_and_params``) on one sequence of
``tokens`` tokens, with two additions it lacks: GPT-2's ``Conv1D`` layers (it would skip them) and
the attention matmuls (Q·Kᵀ and softmax·V, which run inside SDPA and no module sees), counted
analytically as ``2 × layers × heads × head_dim × tokens²``.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
import warnings
from typing import Any

import torch

from tunestack_prune.surgery import dims_of


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv1d_hook(module: Any, inputs: Any, output: Any) -> None:
    x = inputs[0]
    tokens = x.numel() // x.shape[-1]
    module.__flops__ += int(tokens * module.weight.shape[0] * module.weight.shape[1] + module.weight.shape[1])


def example_ids(model: Any, tokens: int, batch: int = 1) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 1000) or 1000)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, tokens), generator=generator)
    return ids.to(device)


def count_macs(model: Any, tokens: int) -> dict[str, int]:
    """MACs of one forward pass over a single sequence of ``tokens`` tokens."""
    import torch_pruning as tp
    from torch_pruning.utils import op_counter

    try:
        from transformers.pytorch_utils import Conv1D

        op_counter.CUSTOM_MODULES_MAPPING[Conv1D] = _conv1d_hook
    except ImportError:  # pragma: no cover - transformers always has it
        pass
    ids = example_ids(model, tokens)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    training = model.training
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        layers_macs, _ = tp.utils.count_ops_and_params(model, inputs)
    model.train(training)
    dims = dims_of(model)
    attention = 2 * dims.layers * dims.heads * dims.head_dim * tokens * tokens
    return {"macs": int(layers_macs) + attention, "macs_attention": attention}


@torch.no_grad()
def latency_ms(model: Any, tokens: int, batch: int, warmup: int = 1, repeats: int = 3) -> float:
    """Median wall time of one forward pass (eval mode), in milliseconds, on the model's device."""
    ids = example_ids(model, tokens, batch)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    training = model.training
    model.eval()
    cuda = ids.device.type == "cuda"
    try:
        for _ in range(warmup):
            model(**inputs)
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(ids.device)
            start = time.perf_counter()
            model(**inputs)
            if cuda:
                torch.cuda.synchronize(ids.device)
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(training)
    return round(float(statistics.median(times)), 3)


def measure(model: Any, tokens: int, latency_batches: list[int] | None) -> dict[str, Any]:
    """Parameters, MACs and (unless ``latency_batches`` is None) latency per batch size."""
    out: dict[str, Any] = {"params": count_params(model)}
    out.update(count_macs(model, tokens))
    if latency_batches:
        for size in latency_batches:
            out[f"latency_ms_b{size}"] = latency_ms(model, tokens, size)
    return out
