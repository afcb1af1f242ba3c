"""The ``depgraph`` engine: torch-pruning's DependencyGraph, where it works on transformers 5.x.

Supported (see :func:`tunestack_prune.planning.depgraph_unsupported`):

* BERT-like: FFN neurons, whole heads (the hidden size shrinks with them to heads' × head_dim,
  as the stock class needs);
* Llama-like: FFN neurons; whole heads without grouped-query attention (DependencyGraph never
  returns on GQA models).

torch-pruning only slices tensors; the attention modules' head attributes and the config are set
here afterwards, and the result is checked against the planned shape. Its group importances
(``GroupMagnitudeImportance(p=2)``, ``GroupTaylorImportance()``) rank units like the native
engine's scores, so both keep the same FFN neurons.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tunestack_prune.planning import Target
from tunestack_prune.surgery import _readers, dims_of

NUDGE = 1e-6  # keeps int(n * (1 - r)) and ceil(r * n) on the intended side of a whole number


def _ratio(before: int, after: int) -> float:
    """A ratio torch-pruning turns into exactly ``after`` of ``before`` units."""
    if after >= before:
        return 0.0
    return (before - after - NUDGE) / before


def prune_depgraph(
    model: nn.Module, target: Target, importance: str, grads: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """Prune ``model`` in place to ``target`` with torch-pruning; ``grads()`` fills ``.grad`` (Taylor)."""
    import torch_pruning as tp

    dims = dims_of(model)
    base = model.base_model
    readers = list(_readers(model, base).values())
    device = next(model.parameters()).device
    example = (torch.arange(1, 9, device=device) % max(2, getattr(model.config, "vocab_size", 8)))[None, :]
    ffn_ratio = _ratio(dims.ffn, target.ffn)
    head_ratio = _ratio(dims.heads, target.heads)
    num_heads: dict[nn.Module, int] = {}
    ratio_dict: dict[nn.Module, float] = {}
    ignored: list[nn.Module] = list(readers)
    if dims.family == "bert":
        hidden_ratio = _ratio(dims.hidden, target.hidden)
        layers = list(base.encoder.layer)
        for layer in layers:
            sa = layer.attention.self
            for lin in (sa.query, sa.key, sa.value):
                num_heads[lin] = sa.num_attention_heads
            ratio_dict[layer.intermediate.dense] = ffn_ratio
            if head_ratio == 0 and hidden_ratio == 0:
                ignored.append(sa)
        if hidden_ratio == 0:  # no hidden group: ignore what roots it
            ignored.append(base.embeddings)
            if getattr(base, "pooler", None) is not None:
                ignored.append(base.pooler)
        default_ratio = hidden_ratio

        def forward(m: nn.Module, x: torch.Tensor) -> Any:
            return m(input_ids=x)

    elif dims.family == "llama":
        if target.hidden != dims.hidden or target.head_dim != dims.head_dim:
            raise ValueError("the depgraph engine does not prune the hidden size of Llama-like models")
        if head_ratio and dims.kv_heads != dims.heads:
            raise ValueError("the depgraph engine cannot prune heads under grouped-query attention")
        ignored.append(base.embed_tokens)
        for layer in base.layers:
            a = layer.self_attn
            num_heads[a.q_proj] = dims.heads
            num_heads[a.k_proj] = num_heads[a.v_proj] = dims.kv_heads
            if head_ratio == 0:
                ignored.append(a)
        default_ratio = ffn_ratio

        def forward(m: nn.Module, x: torch.Tensor) -> Any:
            return m(input_ids=x, use_cache=False)

    else:
        raise ValueError(f"the depgraph engine does not support '{dims.family}' models")

    imp = (
        tp.importance.GroupTaylorImportance() if importance == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)
    )
    training = model.training
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for param in model.parameters():  # the graph is traced through autograd: frozen layers would drop out
        param.requires_grad_(True)
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unwrapped RMSNorm weights, tracing chatter
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=imp,
            global_pruning=False,
            pruning_ratio=default_ratio,
            pruning_ratio_dict=ratio_dict or None,
            num_heads=num_heads,
            prune_num_heads=head_ratio > 0,
            head_pruning_ratio=head_ratio,
            prune_head_dims=False,
            ignored_layers=ignored,
            forward_fn=forward,
            output_transform=lambda out: out.logits.sum(),
        )
        if importance == "taylor" and grads is not None:
            grads()
        with torch.no_grad():
            for group in pruner.step(interactive=True):
                group.prune()
    model.train(training)
    model.zero_grad(set_to_none=True)
    for name, param in model.named_parameters():  # torch-pruning makes fresh, trainable Parameters
        param.requires_grad_(name not in frozen)
    if dims.family == "bert":
        kept = _fix_bert(model, pruner)
    else:
        kept = _fix_llama(model, dims.head_dim)
    got = dims_of(model)
    shape = Target(got.heads, got.kv_heads, got.head_dim, got.ffn, got.hidden)
    if shape != target:
        raise RuntimeError(f"torch-pruning produced {shape.as_dict()}, not the planned {target.as_dict()}")
    return kept


def _uniform(values: list[tuple[int, ...]], what: str) -> tuple[int, ...]:
    if len(set(values)) != 1:
        raise RuntimeError(f"torch-pruning left non-uniform {what} across layers: {sorted(set(values))}")
    return values[0]


def _fix_bert(model: nn.Module, pruner: Any) -> dict[str, Any]:
    base = model.base_model
    shapes = []
    for layer in base.encoder.layer:
        sa = layer.attention.self
        heads = pruner.num_heads[sa.query]
        sa.num_attention_heads = heads
        sa.all_head_size = sa.query.out_features
        sa.attention_head_size = sa.all_head_size // heads
        sa.scaling = sa.attention_head_size**-0.5
        shapes.append((heads, layer.intermediate.dense.out_features, layer.output.dense.out_features))
    heads, ffn, hidden = _uniform(shapes, "widths")
    cfg = model.config
    cfg.num_attention_heads = heads
    cfg.intermediate_size = ffn
    cfg.hidden_size = hidden
    return {"engine": "depgraph"}


def _fix_llama(model: nn.Module, head_dim: int) -> dict[str, Any]:
    base = model.base_model
    shapes = []
    for layer in base.layers:
        a = layer.self_attn
        heads = a.q_proj.out_features // head_dim
        kv = a.k_proj.out_features // head_dim
        a.num_key_value_groups = heads // kv
        layer.mlp.intermediate_size = layer.mlp.gate_proj.out_features
        shapes.append((heads, kv, layer.mlp.gate_proj.out_features))
    heads, kv, ffn = _uniform(shapes, "widths")
    cfg = model.config
    cfg.num_attention_heads = heads
    cfg.num_key_value_heads = kv
    cfg.head_dim = head_dim
    cfg.intermediate_size = ffn
    return {"engine": "depgraph"}
