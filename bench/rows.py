"""The benchmark rows: one stack per method, on the packaged MiniLM, same data, seed and length.

Each row is a function of the settings (full or quick) returning a stack dict. Rows that start
from another row's run (teacher, compression of the fine-tuned model) name it in ``needs``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    repeats: str = ""  # the row this one runs again, to show the suite is reproducible


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
STUDENT = {"from_teacher": True, "keep_layers": [0, 2, 4]}
BASES = {"sst2": sst2_base, "conll": conll_base}


def single(task: str, name: str, group: str, methods: list[dict[str, Any]], target: str, **train: Any) -> Row:
    """A one-stage row on the packaged MiniLM."""
    return Row(name, task, group, stack=lambda s, r: with_stack(BASES[task](s, name), methods, **train), target=target)


def after(task: str, name: str, group: str, base: str, stages: list[dict[str, Any]], target: str) -> Row:
    """A row that starts from another row's finished run (compression of the fine-tuned model)."""
    return Row(
        name,
        task,
        group,
        needs=(base,),
        stack=lambda s, r: from_run(BASES[task](s, name), r[base], stages),
        target=target,
    )


def int8(mode: str) -> list[dict[str, Any]]:
    return [{"name": "int8", "epochs": 0, "stack": [{"method": "int8", "mode": mode}]}]


def _lora_prune_int8(s: Settings, runs: dict[str, Path]) -> dict[str, Any]:
    return {
        **sst2_base(s, "sst2-stack-lora-prune-int8"),
        "stage": [
            {"name": "adapt", "learning_rate": 5e-4, "stack": [{"method": "lora", "r": 8, "merge": True}]},
            {
                "name": "shrink",
                "learning_rate": 1e-4,
                "stack": [
                    {"method": "kd", "teacher": str(runs["sst2-full-ft"])},
                    {"method": "prune", "ratio": 0.4, "importance": "taylor"},
                ],
            },
            *int8("dynamic"),
        ],
    }


FT = "sst2-full-ft"
ROWS: list[Row] = [
    single("sst2", FT, "adaptation", [], "baseline"),
    single("sst2", "sst2-lora", "adaptation", [{"method": "lora", "r": 8}], "retention >= 99%", learning_rate=5e-4),
    single(
        "sst2",
        "sst2-adapter-houlsby",
        "adaptation",
        [{"method": "adapter", "variant": "houlsby"}],
        "retention >= 99%",
        learning_rate=1e-3,
    ),
    single(
        "sst2",
        "sst2-adapter-pfeiffer",
        "adaptation",
        [{"method": "adapter", "variant": "pfeiffer"}],
        "retention >= 99%",
        learning_rate=1e-3,
    ),
    single(
        "sst2",
        "sst2-prefix",
        "adaptation",
        [{"method": "prefix", "mode": "prefix", "projection": True}],
        "retention >= 97%",
        learning_rate=1e-2,
    ),
    single(
        "sst2",
        "sst2-bitfit",
        "adaptation",
        [{"method": "freeze", "bitfit": True}],
        "retention >= 98%",
        learning_rate=1e-3,
    ),
    single(
        "sst2",
        "sst2-prompt-zeroshot",
        "prompt",
        [{"method": "prompt", "template": TEMPLATE, "verbalizers": VERBALIZERS}],
        ">= 15 points above majority (50.9%)",
        epochs=0,
    ),
    single(
        "sst2",
        "sst2-prompt-16shot",
        "prompt",
        [{"method": "prompt", "template": TEMPLATE, "verbalizers": VERBALIZERS, "shots": 16}],
        "above zero-shot",
        epochs=0,
    ),
    after("sst2", "sst2-int8-dynamic", "compression", FT, int8("dynamic"), "<= 0.5 pt loss, >= 1.6x at b1 and b32"),
    after("sst2", "sst2-int8-static", "compression", FT, int8("static"), "<= 0.5 pt loss, >= 1.6x at b1 and b32"),
    after(
        "sst2",
        "sst2-int8-torchao-compiled",
        "compression",
        FT,
        [
            {
                "name": "int8",
                "epochs": 0,
                "stack": [{"method": "int8", "mode": "static", "backend": "torchao", "compile": True}],
            }
        ],
        "<= 0.5 pt loss, >= 1.6x at b1 and b32 (opt-in compiled kernels)",
    ),
    after(
        "sst2",
        "sst2-prune40-only",
        "compression",
        FT,
        [{"name": "prune", "epochs": 0, "stack": [{"method": "prune", "ratio": 0.4}]}],
        "(no recovery)",
    ),
    after(
        "sst2",
        "sst2-prune40-kd",
        "compression",
        FT,
        [
            {
                "name": "prune-recover",
                "learning_rate": 1e-4,
                "stack": [
                    {"method": "kd", "teacher": "input"},
                    {"method": "prune", "ratio": 0.4, "importance": "taylor"},
                ],
            }
        ],
        ">= 98% kept, >= 1.5x at b1 and b32",
    ),
    after(
        "sst2",
        "sst2-student-nokd",
        "distillation",
        FT,
        [{"name": "student", "learning_rate": 1e-4, "stack": [{"method": "kd", "alpha": 1.0, "student": STUDENT}]}],
        "(KD must beat this)",
    ),
    after(
        "sst2",
        "sst2-kd-student",
        "distillation",
        FT,
        [
            {
                "name": "student",
                "learning_rate": 1e-4,
                "stack": [{"method": "kd", "alpha": 0.5, "temperature": 2.0, "student": STUDENT}],
            }
        ],
        ">= 97% of teacher, >= 1.8x at b1 and b32, beats no-KD",
    ),
    Row(
        "sst2-stack-lora-prune-int8",
        "sst2",
        "stacks",
        needs=(FT,),
        stack=_lora_prune_int8,
        target=">= 96% kept, >= 2.5x at b1 and b32, file <= 0.35x",
    ),
    after(
        "sst2",
        "sst2-stack-kd-lora-int8",
        "stacks",
        FT,
        [
            {"name": "student", "learning_rate": 1e-4, "stack": [{"method": "kd", "student": STUDENT}]},
            {"name": "adapt", "learning_rate": 5e-4, "stack": [{"method": "lora", "r": 8, "merge": True}]},
            *int8("dynamic"),
        ],
        "(reported)",
    ),
    single("conll", "conll-full-ft", "conll", [], "baseline"),
    single("conll", "conll-lora", "conll", [{"method": "lora", "r": 8}], "F1 retention >= 98%", learning_rate=1e-3),
    single(
        "conll",
        "conll-adapter",
        "conll",
        [{"method": "adapter", "variant": "pfeiffer"}],
        "F1 retention >= 98%",
        learning_rate=1e-3,
    ),
    after("conll", "conll-int8-dynamic", "conll", "conll-full-ft", int8("dynamic"), "(reported)"),
]


# A small learning-rate grid for the training rows: each method is reported at its best rate on the
# dev set (the usual protocol), with every rate tried listed next to it.
GRID = {
    FT: ([], [1e-4, 2e-4]),
    "sst2-lora": ([{"method": "lora", "r": 8}], [1e-3, 2e-3]),
    "sst2-adapter-houlsby": ([{"method": "adapter", "variant": "houlsby"}], [3e-3, 5e-3]),
    "sst2-adapter-pfeiffer": ([{"method": "adapter", "variant": "pfeiffer"}], [3e-3, 5e-3]),
    "sst2-bitfit": ([{"method": "freeze", "bitfit": True}], [5e-3, 1e-2, 2e-2]),
    # the main prefix row uses the reparametrisation MLP; the grid tries the plain table
    "sst2-prefix": ([{"method": "prefix", "mode": "prefix"}], [5e-3, 3e-2, 5e-2]),
}
CONLL_GRID = {
    "conll-lora": ([{"method": "lora", "r": 8}], [3e-3]),
    "conll-adapter": ([{"method": "adapter", "variant": "pfeiffer"}], [3e-3]),
}


# The full stack's INT8 stage again, with the embedding table quantized too, from the model that the
# stack's prune + KD stage left (a plain Hugging Face folder), so the first two stages are not rerun.
STACK_EMBEDDINGS = Row(
    "sst2-stack-lora-prune-int8-emb",
    "sst2",
    "stacks",
    needs=("sst2-stack-lora-prune-int8",),
    stack=lambda s, r: from_run(
        sst2_base(s, "sst2-stack-lora-prune-int8-emb"),
        r["sst2-stack-lora-prune-int8"] / "stages" / "01-shrink" / "model",
        [
            {
                "name": "int8",
                "epochs": 0,
                "stack": [{"method": "int8", "mode": "dynamic", "modules": ["linear", "embedding"]}],
            }
        ],
    ),
    target=">= 96% kept, >= 2.5x at b1 and b32, file <= 0.35x",
)
ROWS.append(STACK_EMBEDDINGS)


# The same row twice, under another name: the metric must repeat exactly (same seed), timings within noise.
REPEAT = replace(
    single("sst2", "sst2-lora-repeat", "repeat", [{"method": "lora", "r": 8}], "same as sst2-lora", learning_rate=5e-4),
    repeats="sst2-lora",
)


def lr_name(base: str, rate: float) -> str:
    return f"{base}-lr{rate:g}"


ROWS += [
    single(task, lr_name(base, rate), "lr-grid", methods, f"grid for {base}", learning_rate=rate)
    for task, grid in (("sst2", GRID), ("conll", CONLL_GRID))
    for base, (methods, rates) in grid.items()
    for rate in rates
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
ROWS.append(REPEAT)

QUICK_ROWS = {
    "sst2-full-ft",
    "sst2-lora-lr0.002",
    "sst2-bitfit-lr0.01",
    "sst2-prompt-zeroshot",
    "sst2-int8-dynamic",
    "sst2-kd-student",
    "conll-full-ft",
}
