"""The benchmark rows: one stack per method, on the packaged MiniLM, same data, seed and length.

Each row is a function of the settings (full or quick) returning a stack dict. Rows that start
from another row's run (teacher, compression of the fine-tuned model) name it in ``needs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Settings:
    sst2_train: int = 8000
    sst2_epochs: int = 2
    conll_train: int = 4000
    conll_epochs: int = 2
    seed: int = 0
    latency_repeats: int = 20


FULL = Settings()
QUICK = Settings(sst2_train=2000, sst2_epochs=1, conll_train=1000, conll_epochs=1, latency_repeats=10)


@dataclass
class Row:
    name: str
    task: str
    group: str  # which table it belongs to
    needs: tuple[str, ...] = ()
    stack: Any = None  # callable(settings, runs: dict[str, Path]) -> dict
    target: str = ""
    quick: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def sst2_base(s: Settings, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "seed": s.seed,
        "model": {"source": "minilm", "task": "sequence-classification"},
        "data": {
            "train": str(DATA / "sst2" / "train.tsv"),
            "eval": str(DATA / "sst2" / "dev.tsv"),
            "text": "sentence",
            "label": "label",
            "max_train_examples": s.sst2_train,
            "max_length": 64,
        },
        "train": {
            "epochs": s.sst2_epochs,
            "batch_size": 32,
            "learning_rate": 5e-5,
            "warmup_ratio": 0.06,
            "log_every": 25,
        },
        "eval": {
            "batch_size": 128,
            "latency_batch_sizes": [1, 32],
            "latency_repeats": s.latency_repeats,
            "latency_warmup": 3,
        },
    }


def conll_base(s: Settings, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "seed": s.seed,
        "model": {"source": "minilm", "task": "token-classification"},
        "data": {
            "train": str(DATA / "conll2003" / "train.txt"),
            "eval": str(DATA / "conll2003" / "test.txt"),
            "max_train_examples": s.conll_train,
            "max_length": 128,
        },
        "train": {
            "epochs": s.conll_epochs,
            "batch_size": 32,
            "learning_rate": 1e-4,
            "warmup_ratio": 0.06,
            "log_every": 25,
        },
        "eval": {
            "batch_size": 128,
            "latency_batch_sizes": [1, 32],
            "latency_repeats": s.latency_repeats,
            "latency_warmup": 3,
        },
    }


def with_stack(base: dict[str, Any], methods: list[dict[str, Any]], **train: Any) -> dict[str, Any]:
    stack = dict(base)
    stack["train"] = {**base["train"], **train}
    stack["stack"] = methods
    return stack


def from_run(base: dict[str, Any], run: Path, stages: list[dict[str, Any]]) -> dict[str, Any]:
    stack = dict(base)
    stack["model"] = {"source": str(run), "task": base["model"]["task"]}
    stack["stage"] = stages
    return stack


VERBALIZERS = {"0": ["negative", "bad", "terrible"], "1": ["positive", "good", "great"]}
TEMPLATE = "Review: {text} Sentiment: {label}"

ROWS: list[Row] = [
    Row(
        "sst2-full-ft",
        "sst2",
        "adaptation",
        stack=lambda s, r: with_stack(sst2_base(s, "sst2-full-ft"), []),
        target="baseline",
    ),
    Row(
        "sst2-lora",
        "sst2",
        "adaptation",
        stack=lambda s, r: with_stack(sst2_base(s, "sst2-lora"), [{"method": "lora", "r": 8}], learning_rate=5e-4),
        target="retention >= 99%",
    ),
    Row(
        "sst2-adapter-houlsby",
        "sst2",
        "adaptation",
        stack=lambda s, r: with_stack(
            sst2_base(s, "sst2-adapter-houlsby"), [{"method": "adapter", "variant": "houlsby"}], learning_rate=1e-3
        ),
        target="retention >= 99%",
    ),
    Row(
        "sst2-adapter-pfeiffer",
        "sst2",
        "adaptation",
        stack=lambda s, r: with_stack(
            sst2_base(s, "sst2-adapter-pfeiffer"), [{"method": "adapter", "variant": "pfeiffer"}], learning_rate=1e-3
        ),
        target="retention >= 99%",
    ),
    Row(
        "sst2-prefix",
        "sst2",
        "adaptation",
        stack=lambda s, r: with_stack(
            sst2_base(s, "sst2-prefix"), [{"method": "prefix", "mode": "prefix"}], learning_rate=1e-2
        ),
        target="retention >= 97%",
    ),
    Row(
        "sst2-bitfit",
        "sst2",
        "adaptation",
        stack=lambda s, r: with_stack(
            sst2_base(s, "sst2-bitfit"), [{"method": "freeze", "bitfit": True}], learning_rate=1e-3
        ),
        target="retention >= 98%",
    ),
    Row(
        "sst2-prompt-zeroshot",
        "sst2",
        "prompt",
        stack=lambda s, r: with_stack(
            sst2_base(s, "sst2-prompt-zeroshot"),
            [{"method": "prompt", "template": TEMPLATE, "verbalizers": VERBALIZERS}],
            epochs=0,
        ),
        target=">= 15 points above majority (50.9%)",
    ),
    Row(
        "sst2-prompt-16shot",
        "sst2",
        "prompt",
        stack=lambda s, r: with_stack(
            sst2_base(s, "sst2-prompt-16shot"),
            [{"method": "prompt", "template": TEMPLATE, "verbalizers": VERBALIZERS, "shots": 16}],
            epochs=0,
        ),
        target="above zero-shot",
    ),
    Row(
        "sst2-int8-dynamic",
        "sst2",
        "compression",
        needs=("sst2-full-ft",),
        stack=lambda s, r: from_run(
            sst2_base(s, "sst2-int8-dynamic"),
            r["sst2-full-ft"],
            [{"name": "int8", "epochs": 0, "stack": [{"method": "int8", "mode": "dynamic"}]}],
        ),
        target="<= 0.5 pt loss, >= 1.6x at b1 and b32",
    ),
    Row(
        "sst2-int8-static",
        "sst2",
        "compression",
        needs=("sst2-full-ft",),
        stack=lambda s, r: from_run(
            sst2_base(s, "sst2-int8-static"),
            r["sst2-full-ft"],
            [{"name": "int8", "epochs": 0, "stack": [{"method": "int8", "mode": "static"}]}],
        ),
        target="<= 0.5 pt loss, >= 1.6x at b1 and b32",
    ),
    Row(
        "sst2-prune40-only",
        "sst2",
        "compression",
        needs=("sst2-full-ft",),
        stack=lambda s, r: from_run(
            sst2_base(s, "sst2-prune40-only"),
            r["sst2-full-ft"],
            [{"name": "prune", "epochs": 0, "stack": [{"method": "prune", "ratio": 0.4}]}],
        ),
        target="(no recovery)",
    ),
    Row(
        "sst2-prune40-kd",
        "sst2",
        "compression",
        needs=("sst2-full-ft",),
        stack=lambda s, r: from_run(
            sst2_base(s, "sst2-prune40-kd"),
            r["sst2-full-ft"],
            [
                {
                    "name": "prune-recover",
                    "learning_rate": 1e-4,
                    "stack": [
                        {"method": "kd", "teacher": "input"},
                        {"method": "prune", "ratio": 0.4, "importance": "taylor"},
                    ],
                },
            ],
        ),
        target=">= 98% kept, >= 1.5x",
    ),
    Row(
        "sst2-student-nokd",
        "sst2",
        "distillation",
        needs=("sst2-full-ft",),
        stack=lambda s, r: from_run(
            sst2_base(s, "sst2-student-nokd"),
            r["sst2-full-ft"],
            [
                {
                    "name": "student",
                    "learning_rate": 1e-4,
                    "stack": [
                        {"method": "kd", "alpha": 1.0, "student": {"from_teacher": True, "keep_layers": [0, 2, 4]}}
                    ],
                },
            ],
        ),
        target="(KD must beat this)",
    ),
    Row(
        "sst2-kd-student",
        "sst2",
        "distillation",
        needs=("sst2-full-ft",),
        stack=lambda s, r: from_run(
            sst2_base(s, "sst2-kd-student"),
            r["sst2-full-ft"],
            [
                {
                    "name": "student",
                    "learning_rate": 1e-4,
                    "stack": [
                        {
                            "method": "kd",
                            "alpha": 0.5,
                            "temperature": 2.0,
                            "student": {"from_teacher": True, "keep_layers": [0, 2, 4]},
                        }
                    ],
                },
            ],
        ),
        target=">= 97% of teacher at >= 1.8x",
    ),
    Row(
        "sst2-stack-lora-prune-int8",
        "sst2",
        "stacks",
        needs=("sst2-full-ft",),
        stack=lambda s, r: {
            **sst2_base(s, "sst2-stack-lora-prune-int8"),
            "stage": [
                {"name": "adapt", "learning_rate": 5e-4, "stack": [{"method": "lora", "r": 8, "merge": True}]},
                {
                    "name": "shrink",
                    "learning_rate": 1e-4,
                    "stack": [
                        {"method": "kd", "teacher": str(r["sst2-full-ft"])},
                        {"method": "prune", "ratio": 0.4, "importance": "taylor"},
                    ],
                },
                {"name": "quantize", "epochs": 0, "stack": [{"method": "int8", "mode": "dynamic"}]},
            ],
        },
        target=">= 96% kept, >= 2.5x, file <= 0.35x",
    ),
    Row(
        "sst2-stack-kd-lora-int8",
        "sst2",
        "stacks",
        needs=("sst2-full-ft",),
        stack=lambda s, r: from_run(
            sst2_base(s, "sst2-stack-kd-lora-int8"),
            r["sst2-full-ft"],
            [
                {
                    "name": "student",
                    "learning_rate": 1e-4,
                    "stack": [{"method": "kd", "student": {"from_teacher": True, "keep_layers": [0, 2, 4]}}],
                },
                {"name": "adapt", "learning_rate": 5e-4, "stack": [{"method": "lora", "r": 8, "merge": True}]},
                {"name": "quantize", "epochs": 0, "stack": [{"method": "int8", "mode": "dynamic"}]},
            ],
        ),
        target="(reported)",
    ),
    Row(
        "conll-full-ft",
        "conll",
        "conll",
        stack=lambda s, r: with_stack(conll_base(s, "conll-full-ft"), []),
        target="baseline",
    ),
    Row(
        "conll-lora",
        "conll",
        "conll",
        stack=lambda s, r: with_stack(conll_base(s, "conll-lora"), [{"method": "lora", "r": 8}], learning_rate=1e-3),
        target="F1 retention >= 98%",
    ),
    Row(
        "conll-adapter",
        "conll",
        "conll",
        stack=lambda s, r: with_stack(
            conll_base(s, "conll-adapter"), [{"method": "adapter", "variant": "pfeiffer"}], learning_rate=1e-3
        ),
        target="F1 retention >= 98%",
    ),
    Row(
        "conll-int8-dynamic",
        "conll",
        "conll",
        needs=("conll-full-ft",),
        stack=lambda s, r: from_run(
            conll_base(s, "conll-int8-dynamic"),
            r["conll-full-ft"],
            [{"name": "int8", "epochs": 0, "stack": [{"method": "int8", "mode": "dynamic"}]}],
        ),
        target="(reported)",
    ),
]


def _prompt_row(shots: int, seed: int) -> Row:
    name = f"sst2-prompt-k{shots}-s{seed}"
    method = {"method": "prompt", "template": TEMPLATE, "verbalizers": VERBALIZERS, "shots": shots, "shot_seed": seed}
    return Row(
        name,
        "sst2",
        "prompt-sweep",
        stack=lambda s, r: with_stack(sst2_base(s, name), [method], epochs=0),
        target="accuracy rises with k",
    )


ROWS += [_prompt_row(k, seed) for k in (4, 16, 64) for seed in (0, 1, 2)]

QUICK_ROWS = {
    "sst2-full-ft",
    "sst2-lora",
    "sst2-bitfit",
    "sst2-prompt-zeroshot",
    "sst2-int8-dynamic",
    "sst2-kd-student",
    "conll-full-ft",
}
