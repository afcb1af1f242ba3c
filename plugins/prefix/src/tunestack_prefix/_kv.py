"""Prefix tuning for BERT-like encoders: learned keys/values prepended inside every self-attention.

peft's PrefixTuning cannot drive these models under transformers 5.x (their ``forward`` lost
``past_key_values``), and even with a signature shim it shifts BERT's absolute positions by ``P``.
This backend instead registers two attention functions with transformers' public
``AttentionInterface`` (``tunestack_prefix_sdpa`` / ``tunestack_prefix_eager``) that wrap the stock
``sdpa``/``eager`` functions: when the calling attention module carries a prefix reference, the
layer's prefix keys/values are concatenated in front of the real ones (sequence dim) and the
attention mask gets ``P`` always-attend columns. The reference is looked up at *call* time (a plain
``__dict__`` entry, not a submodule), so gradient checkpointing's recomputation sees it too.

Registration is process-wide in transformers; :func:`register_attention` is idempotent and the
functions pass through unchanged for modules without a prefix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ATTENTION_NAMES = {"sdpa": "tunestack_prefix_sdpa", "eager": "tunestack_prefix_eager"}
PREFIX_REF = "_tunestack_prefix_ref"  # (PrefixKV, layer index) in each self-attention module's __dict__

_FUNCTIONS: dict[str, Any] = {}


def _pad_mask(mask: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """Prepend ``count`` always-attend key columns. None | bool (True = attend) | additive float."""
    if mask is None:
        return None
    shape = (*mask.shape[:-1], count)
    pad = mask.new_ones(shape) if mask.dtype == torch.bool else mask.new_zeros(shape)
    return torch.cat([pad, mask], dim=-1)


def _with_prefix(base_fn: Any) -> Any:
    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        ref = module.__dict__.get(PREFIX_REF)
        if ref is not None:
            prefix_k, prefix_v = ref[0].layer_kv(ref[1])  # (1, heads, P, d), computed now
            batch = key.shape[0]
            key = torch.cat([prefix_k.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
            value = torch.cat([prefix_v.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
            attention_mask = _pad_mask(attention_mask, prefix_k.shape[2])
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"prefix_{getattr(base_fn, '__name__', 'attention')}"
    return attention


def register_attention() -> None:
    """Register the two attention names (idempotent; the registry is process-wide).

    Both registries are needed: without the mask-interface entry, transformers' masking utilities
    hand the raw 2D mask to the attention function.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    if not _FUNCTIONS:
        _FUNCTIONS[ATTENTION_NAMES["sdpa"]] = _with_prefix(ALL_ATTENTION_FUNCTIONS["sdpa"])
        _FUNCTIONS[ATTENTION_NAMES["eager"]] = _with_prefix(eager_attention_forward)
    masks: dict[str, Any] = {ATTENTION_NAMES["sdpa"]: sdpa_mask, ATTENTION_NAMES["eager"]: eager_mask}
    function: Any
    for name, function in _FUNCTIONS.items():
        if AttentionInterface._global_mapping.get(name) is not function:
            AttentionInterface.register(name, function)
        if AttentionMaskInterface._global_mapping.get(name) is not masks[name]:
            AttentionMaskInterface.register(name, masks[name])


def self_attention_modules(model: Any) -> list[Any]:
    """The self-attention modules, in layer order (BertSelfAttention and its copies)."""
    found = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("SelfAttention") and hasattr(m, "key") and hasattr(m, "value")
    ]
    layers = model.config.num_hidden_layers
    if len(found) != layers:
        raise ValueError(
            f"prefix: found {len(found)} self-attention modules in {type(model).__name__}, expected {layers}"
        )
    return found


class PrefixKV(nn.Module):
    """Per-layer prefix keys/values of shape ``(layers, 2, heads, P, head_dim)``.

    Without ``projection``: one trainable table ``kv``. With ``projection = r``: Li & Liang's
    reparametrisation, an embedding ``(P, hidden)`` -> Linear(hidden, r) -> tanh ->
    Linear(r, layers * 2 * hidden); :meth:`table` folds it into a plain table.
    """

    def __init__(
        self,
        layers: int,
        heads: int,
        head_dim: int,
        count: int,
        projection: int | None = None,
        init: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.shape = (layers, 2, heads, count, head_dim)
        self.projection = projection
        hidden = heads * head_dim
        if projection is not None:
            self.embedding = nn.Parameter(torch.randn(count, hidden) * 0.02)
            self.mlp = nn.Sequential(
                nn.Linear(hidden, projection), nn.Tanh(), nn.Linear(projection, layers * 2 * hidden)
            )
        else:
            table = torch.zeros(self.shape) if init is None else init.detach().float().reshape(self.shape)
            self.kv = nn.Parameter(table.clone())

    def forward(self) -> torch.Tensor:
        if self.projection is None:
            return self.kv
        layers, two, heads, count, dim = self.shape
        return self.mlp(self.embedding).view(count, layers, two, heads, dim).permute(1, 2, 3, 0, 4)

    def layer_kv(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.kv[index] if self.projection is None else self()[index]
        return kv[0].unsqueeze(0), kv[1].unsqueeze(0)

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """The keys/values as a plain table (the MLP folded away; outputs are identical)."""
        return self().detach().float().clone()


class KVPrefixModel(nn.Module):
    """A BERT-like model whose self-attention layers attend to ``P`` learned keys/values first."""

    backend = "kv"

    def __init__(self, base: Any, prefix: PrefixKV) -> None:
        super().__init__()
        register_attention()
        self.base = base
        self.prefix = prefix.to(_device(base))
        self.original_attention = str(base.config._attn_implementation or "sdpa")
        kind = "eager" if self.original_attention == "eager" else "sdpa"
        base.set_attn_implementation(ATTENTION_NAMES[kind])
        self._attention = self_attention_modules(base)  # plain list: not registered twice
        for index, module in enumerate(self._attention):
            module.__dict__[PREFIX_REF] = (self.prefix, index)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.prefix.shape[3])

    @property
    def config(self) -> Any:
        return self.base.config

    def get_input_embeddings(self) -> Any:
        return self.base.get_input_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base.generate(*args, **kwargs)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prefix_kv": self.prefix.table().cpu().contiguous()}

    def unwrap(self) -> Any:
        """Take the prefix off: restore the stock attention and return the base model."""
        for module in self._attention:
            module.__dict__.pop(PREFIX_REF, None)
        self.base.set_attn_implementation(self.original_attention)
        return self.base


@torch.no_grad()
def capture_kv(base: Any, ids: list[int]) -> torch.Tensor:
    """The real keys/values ``(layers, 2, heads, P, d)`` the model computes for the tokens ``ids``."""
    modules = self_attention_modules(base)
    device = _device(base)
    store: dict[tuple[int, int], torch.Tensor] = {}
    hooks = []
    heads = base.config.num_attention_heads
    for i, module in enumerate(modules):
        for j, linear in enumerate((module.key, module.value)):

            def keep(mod: Any, inp: Any, out: torch.Tensor, i: int = i, j: int = j) -> None:
                store[(i, j)] = out[0].reshape(out.shape[1], heads, -1).transpose(0, 1).float()

            hooks.append(linear.register_forward_hook(keep))
    was_training = base.training
    base.eval()
    try:
        base.base_model(input_ids=torch.tensor([ids], device=device))
    finally:
        for hook in hooks:
            hook.remove()
        base.train(was_training)
    return torch.stack([torch.stack([store[(i, 0)], store[(i, 1)]]) for i in range(len(modules))])


def _device(model: Any) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
