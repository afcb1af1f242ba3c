"""Finding the parts of a transformer that methods act on, across families.

BERT-like (``bert.encoder.layer``), GPT-2 (``transformer.h``), Llama-like (``model.layers``) and
most other Hugging Face models keep their blocks in one ``nn.ModuleList``; the task head sits
outside the base model. Methods use these helpers instead of hard-coding attribute paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HEAD_NAMES = ("classifier", "score", "lm_head", "cls", "qa_outputs")


@dataclass
class Layers:
    """The transformer blocks: their ModuleList and its dotted name in the model."""

    name: str
    modules: Any  # torch.nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)

    def prefix(self, index: int) -> str:
        return f"{self.name}.{index}."


def transformer_layers(model: Any) -> Layers:
    """The ModuleList of transformer blocks (the one holding the most parameters)."""
    import torch

    best: tuple[int, str, Any] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")
    return Layers(best[1], best[2])


def head_parameter_names(model: Any) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the task head's parameters.

    Works through peft wrappers: the head is looked up on the underlying model, and of a head that
    peft copies for training (``modules_to_save``) only the trained copy counts. Weights tied to
    the input embeddings are excluded.
    """
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    base = getattr(inner, "base_model_prefix", "")
    embedding_ids = {id(p) for p in _input_embedding_params(inner)}
    head_ids = set()
    for name, param in inner.named_parameters():
        top = name.split(".")[0]
        if top == base or top not in HEAD_NAMES or ".original_module." in name:
            continue
        if id(param) not in embedding_ids:
            head_ids.add(id(param))
    return {name for name, param in model.named_parameters() if id(param) in head_ids}


def embedding_parameter_names(model: Any) -> set[str]:
    """Token, position and type embeddings (and their LayerNorm for BERT-like models)."""
    names = set()
    ids = {id(p) for p in _input_embedding_params(model)}
    layers = transformer_layers(model)
    for name, param in model.named_parameters():
        if name.startswith(layers.name + "."):
            continue
        lowered = name.lower()
        if id(param) in ids or ".embeddings." in f".{lowered}" or lowered.split(".")[-2:-1] in (["wte"], ["wpe"]):
            names.add(name)
    return names


def _input_embedding_params(model: Any) -> list[Any]:
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if getter is not None else None
    return list(embeddings.parameters()) if embeddings is not None else []


def layer_of(name: str, layers: Layers) -> int | None:
    """The block index a parameter name belongs to, or None."""
    prefix = layers.name + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def count_trainable(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
