"""Fixed measurement protocols: parameter counts, size on disk and CPU latency.

Latency: inputs of ``tokens`` tokens built from real evaluation texts, ``warmup`` untimed calls,
then the median of ``repeats`` timed calls, with the torch thread count recorded.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch


def count_parameters(model: Any) -> int:
    """Parameters, including int8 weights that quantized modules keep packed outside ``parameters()``."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if hasattr(module, "_packed_params") and callable(getattr(module, "weight", None)):
            total += module.weight().numel()
            bias = module.bias() if callable(getattr(module, "bias", None)) else None
            total += bias.numel() if bias is not None else 0
    return total


def fixed_length_batch(
    task: Any, tokenizer: Any, examples: Sequence[Any], labels: Sequence[str], batch_size: int, tokens: int
) -> dict[str, torch.Tensor]:
    """``batch_size`` real examples, each cut or padded to exactly ``tokens`` tokens."""
    if not examples:
        raise ValueError("no examples to build a latency batch from")
    chosen = [examples[i % len(examples)] for i in range(batch_size)]
    features = task.encode(chosen, tokenizer, labels, tokens).features
    pad = tokenizer.pad_token_id or 0
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
    has_types = "token_type_ids" in features[0]
    if has_types:
        rows["token_type_ids"] = []
    for feature in features:
        ids = list(feature["input_ids"])[:tokens]
        fill = tokens - len(ids)
        rows["input_ids"].append(ids + [pad] * fill)
        rows["attention_mask"].append([1] * len(ids) + [0] * fill)
        if has_types:
            rows["token_type_ids"].append(list(feature["token_type_ids"])[:tokens] + [0] * fill)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in rows.items()}


@torch.no_grad()
def latency_ms(model: Any, batch: dict[str, torch.Tensor], warmup: int, repeats: int) -> float:
    """Median wall time of one forward pass, in milliseconds."""
    for _ in range(warmup):
        model(**batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def model_device(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
