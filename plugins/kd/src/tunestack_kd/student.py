"""Building a student by keeping chosen transformer layers, and capturing layer outputs.

Both work on any model whose blocks sit in one ``nn.ModuleList`` (BERT-like, GPT-2, Llama-like),
found with :func:`tunestack.api.transformer_layers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tunestack.api import transformer_layers


def hf_model(model: Any) -> Any:
    """The Hugging Face model inside a PEFT wrapper (or the model itself)."""
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def keep_layers(model: Any, keep: Sequence[int]) -> Any:
    """Keep only the blocks listed in ``keep`` (in that order), in place; return ``model``.

    DistilBERT-style initialisation: the student's layer ``i`` is the model's layer ``keep[i]``
    with its weights. The config's layer count is updated (``num_hidden_layers``, which GPT-2 maps
    to ``n_layer``), per-layer config lists (``layer_types``) are subset, and modules that carry a
    ``layer_idx`` (used by the KV cache of GPT-2 and Llama-like models, and by BERT decoders) are
    renumbered, so the saved folder reloads with the stock class and gives the same outputs.
    """
    layers = transformer_layers(model)
    total = len(layers)
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise ValueError(f"keep_layers {list(keep)}: the model has {total} layers (0..{total - 1}), not {bad}")
    if len(set(keep)) != len(keep):
        raise ValueError(f"keep_layers {list(keep)} repeats a layer")
    kept = torch.nn.ModuleList([layers.modules[i] for i in keep])
    parent_name, _, attribute = layers.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, kept)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", new_index)  # noqa: B010 (torch's Module typing)
    config = getattr(hf_model(model), "config", None)
    if config is not None:
        config.num_hidden_layers = len(keep)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == total:
            config.layer_types = [layer_types[i] for i in keep]
    return model


def model_width(model: Any) -> int:
    config = getattr(hf_model(model), "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return int(model.get_input_embeddings().embedding_dim)


def model_heads(model: Any) -> int | None:
    config = getattr(hf_model(model), "config", None)
    for key in ("num_attention_heads", "n_head"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def set_attention(model: Any, implementation: str) -> str | None:
    """Switch the attention implementation (``eager`` returns the maps); return the previous one."""
    inner = hf_model(model)
    config = getattr(inner, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous == implementation:
        return previous
    setter = getattr(inner, "set_attn_implementation", None)
    if callable(setter):
        setter(implementation)
    elif config is not None:
        config._attn_implementation = implementation
    return previous


def attention_modules(layer: Any) -> list[Any]:
    """The innermost modules of a block whose class name contains ``Attention`` (BERT's
    ``BertSelfAttention``, GPT-2's ``GPT2Attention``, Llama's ``LlamaAttention``): the ones that
    compute the attention probabilities."""
    found = [m for m in layer.modules() if "Attention" in type(m).__name__]
    return [m for m in found if not any(o is not m and "Attention" in type(o).__name__ for o in m.modules())]


DROPOUT_NAMES = ("dropout", "attn_dropout", "attention_dropout")


def disable_attention_dropout(model: Any) -> list[tuple[Any, str, Any]]:
    """Turn off the dropout applied to attention probabilities (so the maps compared are the
    probabilities themselves); return what to restore with :func:`restore_attributes`.

    Only the attention modules' own probability dropout is touched (``dropout`` of BERT's self
    attention, ``attn_dropout`` of GPT-2, ``attention_dropout`` of Llama), not residual dropout.
    """
    changed: list[tuple[Any, str, Any]] = []
    for layer in transformer_layers(model).modules:
        for module in attention_modules(layer):
            for name in DROPOUT_NAMES:
                value = getattr(module, name, None)
                if isinstance(value, torch.nn.Dropout) and value.p > 0:
                    changed.append((value, "p", value.p))
                    value.p = 0.0
                elif isinstance(value, float) and not isinstance(value, bool) and value > 0:
                    changed.append((module, name, value))
                    setattr(module, name, 0.0)
    return changed


def restore_attributes(changed: list[tuple[Any, str, Any]]) -> None:
    for owner, name, value in changed:
        setattr(owner, name, value)


class LayerCapture:
    """Forward hooks that keep each block's output and (eager attention) its attention maps.

    Hidden states are the blocks' outputs (``hidden_states[i + 1]`` of Hugging Face, before any
    final norm). Attention maps come from the block's innermost attention module, whose output
    carries ``[batch, heads, queries, keys]`` weights in eager mode.
    """

    def __init__(self, model: Any, hidden: bool, attention: bool) -> None:
        self.hidden: dict[int, torch.Tensor] = {}
        self.attention: dict[int, torch.Tensor] = {}
        self.handles: list[Any] = []
        self.layers = transformer_layers(model)
        for index, layer in enumerate(self.layers.modules):
            if hidden:
                self.handles.append(layer.register_forward_hook(self._hidden_hook(index)))
            if attention:
                for module in attention_modules(layer):
                    self.handles.append(module.register_forward_hook(self._attention_hook(index)))

    def __len__(self) -> int:
        return len(self.layers)

    def _hidden_hook(self, index: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.hidden[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def _attention_hook(self, index: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if index in self.attention or not isinstance(output, tuple) or len(output) < 2:
                return
            maps = output[1]
            if isinstance(maps, torch.Tensor) and maps.dim() == 4:
                self.attention[index] = maps

        return hook

    def clear(self) -> None:
        self.hidden.clear()
        self.attention.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.clear()
