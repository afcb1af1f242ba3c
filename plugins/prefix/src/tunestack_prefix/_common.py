"""Helpers shared by the three backends (imported lazily: this module imports torch)."""

from __future__ import annotations

import math
from typing import Any

import torch

#: task -> how labels and logits relate to positions
KINDS = {"sequence-classification": "seq", "token-classification": "token", "causal-lm": "causal"}

IGNORE = -100


def task_kind(auto_class: str) -> str:
    if auto_class not in KINDS:
        raise ValueError(f"prefix/prompt tuning supports {', '.join(KINDS)} models, not '{auto_class}'")
    return KINDS[auto_class]


def hidden_size(config: Any) -> int:
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def virtual_token_id(config: Any) -> int:
    """A placeholder id for the virtual positions: anything but the pad id (decoders pool at the
    last non-pad token, so a pad placeholder would be mistaken for padding)."""
    pad = getattr(config, "pad_token_id", None)
    return 1 if pad == 0 else 0


def init_token_ids(tokenizer: Any, text: str | None, count: int, vocab_size: int, seed: int) -> list[int]:
    """``count`` token ids to initialise from.

    With a text: its tokens, special tokens included (as peft's TEXT init), repeated or cut to
    ``count``. Without: the special tokens the tokenizer puts at the start of a text (``[CLS]``,
    ``<s>``; an encoder pools position 0, which becomes virtual token 0), then ids drawn (seeded)
    from the ordinary words of the vocabulary (Lester et al.'s "sampled vocabulary" init), skipping
    special and ``[unused]``-style tokens.
    """
    if text is not None:
        ids = list(tokenizer(text)["input_ids"])
        if not ids:
            raise ValueError(f"init_text {text!r} gives no tokens")
        too_big = [i for i in ids if i >= vocab_size]
        if too_big:
            raise ValueError(
                f"init_text: token id {max(too_big)} is outside the model's vocabulary of {vocab_size} "
                "(the tokenizer does not match the model)"
            )
        return (ids * math.ceil(count / len(ids)))[:count]
    limit = min(vocab_size, len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    lead: list[int] = []
    for token in tokenizer("word")["input_ids"]:
        if token not in special or token >= limit:
            break
        lead.append(token)
    tokens = tokenizer.convert_ids_to_tokens(list(range(limit)))
    words = [
        i
        for i, tok in enumerate(tokens)
        if i not in special
        and tok
        and not (tok.startswith("[") and tok.endswith("]"))
        and not (tok.startswith("<") and tok.endswith(">"))
    ] or list(range(limit))
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(words), (count,), generator=generator).tolist()
    return (lead + [words[i] for i in picks])[:count]


def freeze_all_but(model: Any, keep: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)


def head_names(model: Any, kind: str) -> set[str]:
    """The classification head's parameters; a causal LM's output layer is never a 'head' here."""
    if kind == "causal":
        return set()
    from tunestack.api import head_parameter_names

    return head_parameter_names(model)


def device_of(model: Any) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
