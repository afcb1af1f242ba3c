"""Framework overhead: a hand-written peft + torch LoRA loop against tunestack's lora stage.

Both train the packaged MiniLM with LoRA r=8 on the same SST-2 examples in the same order, with
the same optimizer, schedule, batch and length, in the same process, interleaved (hand, tunestack,
hand, tunestack) so machine noise hits both. Step times come from each loop's own clock; the
ratio of medians is reported.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rows import DATA, sst2_base, with_stack


def sst2_examples(count: int, seed: int) -> list[tuple[str, int]]:
    lines = (DATA / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rows = [(line.split("\t")[0].strip(), int(line.split("\t")[1])) for line in lines]
    keep = sorted(random.Random(seed).sample(range(len(rows)), count))
    return [rows[i] for i in keep]


def hand_loop(steps: int, batch_size: int, seed: int, examples: list[tuple[str, int]]) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    from tunestack.engine import epoch_order  # the same data order as tunestack's engine
    from tunestack.sources import packaged_model_dir

    torch.manual_seed(seed)
    folder = packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.05))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=round(0.06 * steps), num_training_steps=steps)
    texts = [t for t, _ in examples]
    labels = [y for _, y in examples]
    encoded = tokenizer(texts, truncation=True, max_length=64)
    order = epoch_order(len(texts), seed, 0, 0, 1)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        index = order[step * batch_size : (step + 1) * batch_size]
        batch = tokenizer.pad(
            {
                "input_ids": [encoded["input_ids"][i] for i in index],
                "attention_mask": [encoded["attention_mask"][i] for i in index],
                "token_type_ids": [encoded["token_type_ids"][i] for i in index],
            },
            return_tensors="pt",
        )
        batch["labels"] = torch.tensor([labels[i] for i in index])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def tunestack_loop(steps: int, batch_size: int, seed: int, train_examples: int, out: Path) -> list[float]:
    import tunestack

    settings_stack = with_stack(
        sst2_base(_settings(train_examples, seed), "overhead-lora"),
        [{"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05}],
        learning_rate=5e-4,
        max_steps=steps,
        log_every=1,
        batch_size=batch_size,
    )
    settings_stack["data"].pop("eval")
    settings_stack["eval"] = {"latency": False, "verify_reload": False}
    result = tunestack.run(settings_stack, out=out, force=True)
    events = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    return [e["step_seconds"] for e in events if e["event"] == "train"]


def _settings(train_examples: int, seed: int) -> Any:
    from rows import Settings

    return Settings(sst2_train=train_examples, seed=seed)


def measure(out: Path, steps: int = 40, rounds: int = 2, batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    examples = sst2_examples(8000, seed)
    hand: list[float] = []
    ours: list[float] = []
    skip = 3  # warm-up steps left out of both
    for _ in range(rounds):
        hand += hand_loop(steps, batch_size, seed, examples)[skip:]
        ours += tunestack_loop(steps, batch_size, seed, 8000, out)[skip:]
    hand_median = statistics.median(hand)
    ours_median = statistics.median(ours)
    return {
        "hand_step_ms": round(hand_median * 1000, 2),
        "tunestack_step_ms": round(ours_median * 1000, 2),
        "ratio": round(ours_median / hand_median, 4),
        "steps_timed": len(hand),
        "batch": batch_size,
        "max_length": 64,
    }


def gemm_peak_gflops(size: int = 1024, repeats: int = 30) -> float:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9
