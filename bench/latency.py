"""A side-by-side latency pass over the final models of every row, in one process.

Each round times every model once per batch size, in turn, so a slow minute of a shared machine
hits all rows alike; the median over rounds is reported. Inputs: real SST-2 dev (or CoNLL test)
texts, exactly ``tokens`` tokens each, the same batch for every model of a task.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch


def side_by_side(rows: dict[str, Any], rounds: int = 15, repeats: int = 3, warmup: int = 3) -> dict[str, Any]:
    import tunestack
    from tunestack.measure import fixed_length_batch, latency_ms

    models: dict[str, Any] = {}
    batches: dict[tuple[str, int], Any] = {}
    for name, row in rows.items():
        run_dir = Path(row["run_dir"])
        if not run_dir.exists():
            continue
        loaded = tunestack.load(run_dir)
        tokens = 64 if row["task"] == "sst2" else 128
        path = loaded.resolved.get("data", {}).get("eval")
        examples = loaded.transform(loaded.handle.task.read(Path(path), _settings(loaded))[:64], "eval")
        for size in (1, 32):
            batches[(name, size)] = fixed_length_batch(
                loaded.handle.task, loaded.tokenizer, examples, loaded.labels, size, tokens
            )
        models[name] = loaded.model.eval()
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in batches}
    with torch.no_grad():
        for (name, _size), batch in batches.items():
            latency_ms(models[name], batch, warmup, 1)
        for _ in range(rounds):
            for (name, size), batch in batches.items():
                samples[(name, size)].append(latency_ms(models[name], batch, 0, repeats))
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "rounds": rounds, "repeats": repeats, "rows": {}}
    for (name, size), values in samples.items():
        result["rows"].setdefault(name, {})[f"b{size}"] = round(statistics.median(values), 3)
    return result


def _settings(loaded: Any) -> Any:
    from tunestack.stack import DataSettings

    data = loaded.resolved.get("data", {})
    return DataSettings.model_validate({k: v for k, v in data.items() if k in DataSettings.model_fields})
