"""Tiny model configs and stack builders for tests of core and of method plugins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunestack.stack import parse_toml

FAMILIES = ("bert", "gpt2", "llama")
TASKS = ("sequence-classification", "token-classification", "causal-lm")
VOCAB = 30522  # the packaged MiniLM tokenizer, used by every tiny model


def tiny_model_config(family: str = "bert", **overrides: Any) -> dict[str, Any]:
    """A ``[model.config]`` table for a tiny random-init model of one family (~1M parameters)."""
    configs: dict[str, dict[str, Any]] = {
        "bert": {
            "model_type": "bert",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "vocab_size": VOCAB,
            "max_position_embeddings": 128,
        },
        "gpt2": {
            "model_type": "gpt2",
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 128,
            "vocab_size": VOCAB,
        },
        "llama": {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": VOCAB,
            "max_position_embeddings": 128,
        },
    }
    if family not in configs:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(configs)}")
    return {**configs[family], **overrides}


def tiny_stack(
    data_folder: Path,
    *,
    task: str = "sequence-classification",
    family: str = "bert",
    methods: list[dict[str, Any]] | None = None,
    stages: list[dict[str, Any]] | None = None,
    epochs: int = 1,
    **sections: Any,
) -> dict[str, Any]:
    """A complete stack dict on a tiny model and the tiny data in ``data_folder``.

    ``methods`` become the top-level ``[[stack]]``; ``stages`` a multi-stage file. Extra keyword
    arguments replace or extend whole sections (``train={...}``, ``data={...}``).
    """
    from tunestack.testing.data import TinyData

    train, evaluation = TinyData(data_folder).files(task)
    stack: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "model": {"task": task, "config": tiny_model_config(family)},
        "data": {"train": str(train), "eval": str(evaluation), "max_length": 32},
        "train": {"epochs": epochs, "batch_size": 8, "learning_rate": 1e-2, "log_every": 1},
        "eval": {"latency": False, "probe_examples": 4},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(stack.get(key), dict):
            stack[key] = {**stack[key], **value}
        else:
            stack[key] = value
    if stages is not None:
        stack["stage"] = stages
    elif methods is not None:
        stack["stack"] = methods
    return stack


def stack_from_toml(text: str) -> dict[str, Any]:
    return parse_toml(text, "inline stack")


TINY_LABELS = ("negative", "positive")  # the labels of the tiny sentiment data


def initial_model(
    family: str = "bert",
    task: str = "sequence-classification",
    labels: tuple[str, ...] | list[str] = TINY_LABELS,
    seed: int = 0,
    **config: Any,
) -> Any:
    """Exactly the model a tiny stack (seed 0) starts from, to compare tensors before and after a run.

    ``labels`` must be the labels the run sees (for token classification, its sorted tag set).
    """
    import torch

    from tunestack.models import build_from_config, fit_tokenizer, load_tokenizer
    from tunestack.sources import packaged_model_dir

    kwargs = (
        {}
        if task == "causal-lm"
        else {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }
    )
    torch.manual_seed(seed)
    model = build_from_config(tiny_model_config(family, **config), task, kwargs)
    fit_tokenizer(model, load_tokenizer(packaged_model_dir()))
    return model.eval()


def changed_parameters(before: Any, after: Any) -> set[str]:
    """Names of state-dict entries present in both models whose values differ."""
    import torch

    after_state = after.state_dict()
    return {
        name
        for name, tensor in before.state_dict().items()
        if name in after_state
        and (after_state[name].shape != tensor.shape or not torch.equal(tensor, after_state[name]))
    }
