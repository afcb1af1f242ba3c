"""Prefix tuning for decoders (GPT-2, Llama-like) through peft's ``PrefixTuning``.

peft hands the learned keys/values to the model as a prefilled cache. For causal LM that works as
is. For sequence and token classification peft first checks that the model's ``forward`` accepts
``past_key_values`` by signature; transformers 5.x renamed the argument to ``cache`` (the old name
still works through a deprecation shim that ``inspect.signature`` does not show), so peft refuses.
:func:`add_signature_shim` gives the model instance a ``forward`` that accepts the old name and
passes it on, which is all peft needs.

peft wraps a classification head in a ``ModulesToSaveWrapper`` (a trainable copy next to the
frozen original). Saving puts the trained copy back in place so the base model core saves as plain
Hugging Face carries the trained head; the adapter folder is peft's own format
(``adapter_config.json`` + ``adapter_model.safetensors``), with a reparametrised prefix folded into
a plain table by peft itself.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch

TASK_TYPES = {"seq": "SEQ_CLS", "token": "TOKEN_CLS", "causal": "CAUSAL_LM"}
SHIM_ATTR = "_tunestack_prefix_shim"


def add_signature_shim(model: Any) -> None:
    """Let peft pass ``past_key_values=`` to a transformers 5.x model whose forward calls it ``cache``."""
    if "past_key_values" in inspect.signature(model.forward).parameters:
        return
    if "cache" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"prefix: {type(model).__name__}.forward accepts neither past_key_values nor cache")
    original = type(model).forward.__get__(model)

    def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return original(*args, **kwargs)

    model.forward = forward
    model.__dict__[SHIM_ATTR] = True


def remove_signature_shim(model: Any) -> None:
    if model.__dict__.pop(SHIM_ATTR, False):
        model.__dict__.pop("forward", None)


def wrap(
    base: Any,
    kind: str,
    count: int,
    projection: int | None,
    table: torch.Tensor | None,
    train_head: bool,
) -> Any:
    """Wrap ``base`` in a peft ``PeftModel`` with a prefix of ``count`` keys/values per layer."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    if kind != "causal":
        add_signature_shim(base)
    config = PrefixTuningConfig(
        task_type=getattr(TaskType, TASK_TYPES[kind]),
        num_virtual_tokens=count,
        prefix_projection=projection is not None,
        encoder_hidden_size=projection or 1,
    )
    model: Any = get_peft_model(base, config)
    if table is not None:
        weight: Any = model.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            weight.copy_(table.to(weight.device, weight.dtype).reshape(weight.shape))
    if not train_head:
        for wrapper in _head_wrappers(model.base_model):
            for param in wrapper.parameters():
                param.requires_grad_(False)
    return model


def table_from_cache(base: Any, ids: list[int]) -> torch.Tensor:
    """Real keys/values of the tokens ``ids``, laid out as peft's prefix table ``(P, layers*2*kv_dim)``.

    The backbone runs once with a cache; layer ``l``'s keys (after rotary embedding, for Llama) and
    values become rows ``2l`` and ``2l+1`` of each virtual token, which is how peft's
    ``get_prompt`` reads the table back.
    """
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            out = base.base_model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    finally:
        base.train(was_training)
    cache = out.past_key_values
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # (2, h, P, d)
    stacked = torch.stack(per_layer).float()  # (layers, 2, h, P, d)
    return stacked.permute(3, 0, 1, 2, 4).reshape(len(ids), -1).clone()


def prefix_table(model: Any) -> torch.Tensor:
    """The prefix as peft stores it (reparametrisation folded)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)["prompt_embeddings"].detach().float()


def save(model: Any, folder: Path) -> None:
    """Write peft's adapter folder (the prefix as a plain table, plus the trained head copy)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config["default"])
    config.inference_mode = True  # as peft writes it: the (folded) table is read as is
    config.save_pretrained(str(folder))


def unwrap(model: Any) -> Any:
    """The base model with the trained head copies put back in place and the shim removed."""
    base = model.base_model
    for name, wrapper in list(_named_head_wrappers(base)):
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child, wrapper.modules_to_save["default"])
    remove_signature_shim(base)
    return base


def rebuild(base: Any, folder: Path, kind: str) -> Any:
    """Re-wrap a freshly loaded base with the saved prefix, trainable (a later stage may train it).

    peft refuses ``PeftModel.from_pretrained(..., is_trainable=True)`` for prompt-learning adapters,
    so the saved config is rebuilt as a plain (projection-free) table and the state loaded into it.
    """
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(folder))
    config.inference_mode = False
    config.prefix_projection = False
    if kind != "causal":
        add_signature_shim(base)
    flags = {id(p): p.requires_grad for p in base.parameters()}
    model = get_peft_model(base, config)
    for param in base.parameters():  # peft froze the base; a reload leaves it as loaded, like the other backends
        if id(param) in flags:
            param.requires_grad_(flags[id(param)])
    state = load_file(str(folder / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    # the prompt table is loaded into the prompt encoder separately, so peft lists it as unexpected
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if k != "prompt_embeddings"]
    if unexpected:
        raise ValueError(f"unexpected keys in the saved prefix: {unexpected[:5]}")
    if not torch.equal(prefix_table(model).cpu(), state["prompt_embeddings"].float()):
        raise ValueError("the saved prefix table did not load into the prompt encoder")
    return model


def _named_head_wrappers(model: Any) -> list[tuple[str, Any]]:
    from peft.utils import ModulesToSaveWrapper

    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def _head_wrappers(model: Any) -> list[Any]:
    return [m for _, m in _named_head_wrappers(model)]
