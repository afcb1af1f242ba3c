"""The native engine: hand-written structured pruning of BERT, GPT-2 and Llama-like models.

Tensors are sliced in place (``nn.Linear``, GPT-2's ``Conv1D``, embeddings, norms), then every
attention module's head attributes and the config are set, so ``save_pretrained`` writes a model
that the stock ``AutoModelFor*`` class reloads with identical outputs.

Units are ranked per layer by the same scores torch-pruning's group importances use, summed over
every tensor the unit touches: magnitude = sum of squared weights, Taylor = sum of |weight ×
gradient|. So both engines keep the same FFN neurons on the same model.

Removing FFN neurons or whole heads (hidden size unchanged) is exactly the same function as zeroing
those units in the original model. Shrinking head dims or the hidden size is not (norms then see
fewer dimensions): it needs recovery training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tunestack_prune.planning import Dims, Target, read_dims

Member = tuple[Any, Callable[[torch.Tensor], torch.Tensor]]  # (parameter, view -> [units, -1])

#: task heads that read the residual stream (top-level Linear modules next to the base model)
READERS = ("lm_head", "score", "classifier")


def dims_of(model: Any) -> Dims:
    return read_dims(model.config.to_dict())


class Scorer:
    """Per-unit importance, summed over the members (tensors) a unit spans."""

    def __init__(self, kind: str) -> None:
        if kind not in ("magnitude", "taylor"):
            raise ValueError(f"unknown importance {kind!r}")
        self.kind = kind

    def __call__(self, members: Sequence[Member]) -> torch.Tensor:
        total: torch.Tensor | None = None
        for param, view in members:
            if param is None:
                continue
            w = view(param.detach()).float()
            w = w.reshape(w.shape[0], -1)
            if self.kind == "magnitude":
                score = w.pow(2).sum(1)
            else:
                if param.grad is None:
                    raise RuntimeError("taylor importance needs gradients; none were computed for a pruned weight")
                g = view(param.grad.detach()).float().reshape(w.shape[0], -1)
                score = (w * g).abs().sum(1)
            total = score if total is None else total + score
        if total is None:
            raise RuntimeError("no weights to score")
        return total


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best units, in their original order."""
    return torch.sort(torch.topk(scores, k).indices).values.cpu()


# -------------------------------------------------------------------------------------------------
# slicing primitives (keep requires_grad; slice .grad too so later Taylor scores stay valid)
# -------------------------------------------------------------------------------------------------


def _slice_param(module: nn.Module, name: str, idx: torch.Tensor, dim: int) -> None:
    param = getattr(module, name, None)
    if param is None:
        return
    idx = idx.to(param.device)
    new = nn.Parameter(param.data.index_select(dim, idx).clone(), requires_grad=param.requires_grad)
    if param.grad is not None:
        new.grad = param.grad.index_select(dim, idx).clone()
    setattr(module, name, new)


def slice_linear(lin: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> None:
    if out_idx is not None:
        _slice_param(lin, "weight", out_idx, 0)
        _slice_param(lin, "bias", out_idx, 0)
        lin.out_features = len(out_idx)
    if in_idx is not None:
        _slice_param(lin, "weight", in_idx, 1)
        lin.in_features = len(in_idx)


def slice_conv1d(conv: Any, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> None:
    """transformers' Conv1D: weight [in, out], bias [out], ``nf`` = out (``nx`` = in)."""
    if out_idx is not None:
        _slice_param(conv, "weight", out_idx, 1)
        _slice_param(conv, "bias", out_idx, 0)
        conv.nf = len(out_idx)
    if in_idx is not None:
        _slice_param(conv, "weight", in_idx, 0)
        if hasattr(conv, "nx"):
            conv.nx = len(in_idx)


def slice_embedding(emb: nn.Embedding, idx: torch.Tensor) -> None:
    _slice_param(emb, "weight", idx, 1)
    emb.embedding_dim = len(idx)


def slice_norm(norm: nn.Module, idx: torch.Tensor) -> None:
    _slice_param(norm, "weight", idx, 0)
    if getattr(norm, "bias", None) is not None:
        _slice_param(norm, "bias", idx, 0)
    if isinstance(norm, nn.LayerNorm):
        norm.normalized_shape = (len(idx),)


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Unit indices -> flat indices of their rows (head h -> rows h*size .. h*size+size-1)."""
    units = torch.as_tensor(units, dtype=torch.long)
    return (units[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def _readers(model: nn.Module, base: nn.Module) -> dict[str, nn.Module]:
    """The task heads next to the base model; anything unknown is refused."""
    if model is base:
        return {}
    found: dict[str, nn.Module] = {}
    for name, child in model.named_children():
        if child is base or isinstance(child, nn.Dropout):
            continue
        if name in READERS and isinstance(child, nn.Linear):
            found[name] = child
            continue
        raise NotImplementedError(
            f"{type(model).__name__} has a '{name}' module ({type(child).__name__}) prune does not know how to "
            "cut; supported heads: sequence and token classification, causal LM"
        )
    return found


# -------------------------------------------------------------------------------------------------
# the residual stream (hidden size): one index set shared by every layer
# -------------------------------------------------------------------------------------------------

_VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "lin_in": lambda t: t.t(),  # nn.Linear weight [out, in]: columns read the residual
    "lin_out": lambda t: t,
    "conv_in": lambda t: t,  # Conv1D weight [in, out]
    "conv_out": lambda t: t.t(),
    "norm": lambda t: t[:, None],
}
_SLICES: dict[str, Callable[[Any, torch.Tensor], None]] = {
    "lin_in": lambda m, i: slice_linear(m, in_idx=i),
    "lin_out": lambda m, i: slice_linear(m, out_idx=i),
    "conv_in": lambda m, i: slice_conv1d(m, in_idx=i),
    "conv_out": lambda m, i: slice_conv1d(m, out_idx=i),
    "norm": slice_norm,
    "emb": slice_embedding,
}


class Residual:
    """Hidden units, ranked on the unpruned weights (as torch-pruning does), sliced at the end.

    ``parts`` are (module, kind) pairs; embeddings are sliced but do not vote (torch-pruning's
    importances skip them too). ``tied`` readers share the token embedding and are re-tied.
    """

    def __init__(
        self,
        parts: list[tuple[Any, str]],
        size: int,
        scorer: Scorer,
        tied: list[tuple[nn.Linear, nn.Embedding]] = (),  # type: ignore[assignment]
    ) -> None:
        self.parts = parts
        self.tied = list(tied)
        members = [(m.weight, _VIEWS[kind]) for m, kind in parts if kind != "emb"]
        self.idx = top(scorer(members), size)

    def apply(self) -> None:
        for module, kind in self.parts:
            _SLICES[kind](module, self.idx)
        for reader, embedding in self.tied:
            reader.weight = embedding.weight  # slicing made a new Parameter: tie again
            reader.in_features = embedding.embedding_dim


# -------------------------------------------------------------------------------------------------
# BERT
# -------------------------------------------------------------------------------------------------


def _bert_residual(
    base: nn.Module, readers: dict[str, nn.Module], pooled: bool, size: int, scorer: Scorer
) -> tuple[Residual, Residual | None]:
    emb = base.embeddings
    parts: list[tuple[Any, str]] = [
        (e, "emb")
        for e in (emb.word_embeddings, emb.position_embeddings, getattr(emb, "token_type_embeddings", None))
        if e is not None
    ]
    parts.append((emb.LayerNorm, "norm"))
    for layer in base.encoder.layer:
        sa = layer.attention.self
        parts += [(sa.query, "lin_in"), (sa.key, "lin_in"), (sa.value, "lin_in"), (layer.intermediate.dense, "lin_in")]
        parts += [(layer.attention.output.dense, "lin_out"), (layer.output.dense, "lin_out")]
        parts += [(layer.attention.output.LayerNorm, "norm"), (layer.output.LayerNorm, "norm")]
    pooler = getattr(base, "pooler", None)
    if pooler is not None:
        parts.append((pooler.dense, "lin_in"))
    if not pooled:
        parts += [(r, "lin_in") for r in readers.values()]
    residual = Residual(parts, size, scorer)
    pooled_units = None
    if pooler is not None:  # the pooler is Linear(hidden, hidden): its output shrinks too
        pool_parts: list[tuple[Any, str]] = [(pooler.dense, "lin_out")]
        if pooled:
            pool_parts += [(r, "lin_in") for r in readers.values()]
        pooled_units = Residual(pool_parts, size, scorer)
    return residual, pooled_units


def _prune_bert(model: nn.Module, target: Target, scorer: Scorer) -> dict[str, Any]:
    base = model.base_model
    if not hasattr(base, "encoder") or not hasattr(base, "embeddings"):
        raise NotImplementedError(f"{type(model).__name__}: expected a BERT encoder")
    readers = _readers(model, base)
    pooled = type(model).__name__.endswith("ForSequenceClassification")  # classifier reads the pooler
    cfg = model.config
    E = cfg.hidden_size
    kept: dict[str, Any] = {"heads": [], "ffn": []}
    # rank hidden units on the unpruned weights (as torch-pruning does), slice them at the end
    hidden, pool = _bert_residual(base, readers, pooled, target.hidden, scorer) if target.hidden < E else (None, None)
    for layer in base.encoder.layer:
        sa, so = layer.attention.self, layer.attention.output
        q, k, v, o = sa.query, sa.key, sa.value, so.dense
        D_here = sa.attention_head_size
        H_here = sa.num_attention_heads
        if target.heads < H_here:
            s = scorer(
                [
                    (q.weight, lambda t, n=H_here: t.view(n, -1)),
                    (k.weight, lambda t, n=H_here: t.view(n, -1)),
                    (v.weight, lambda t, n=H_here: t.view(n, -1)),
                    (o.weight, lambda t, n=H_here: t.t().reshape(n, -1)),
                ]
            )
            heads = top(s, target.heads)
        else:
            heads = torch.arange(H_here)
        kept["heads"].append(heads.tolist())
        qk_rows, v_rows = [], []
        for h in heads.tolist():
            r = torch.arange(h * D_here, (h + 1) * D_here)
            if target.head_dim < D_here:  # q/k dims and v dims are chosen independently
                sqk = scorer([(q.weight, lambda t, r=r: t[r]), (k.weight, lambda t, r=r: t[r])])
                sv = scorer([(v.weight, lambda t, r=r: t[r]), (o.weight, lambda t, r=r: t[:, r].t())])
                qk_rows.append(r[top(sqk, target.head_dim)])
                v_rows.append(r[top(sv, target.head_dim)])
            else:
                qk_rows.append(r)
                v_rows.append(r)
        qk, vv = torch.cat(qk_rows), torch.cat(v_rows)
        slice_linear(q, out_idx=qk)
        slice_linear(k, out_idx=qk)
        slice_linear(v, out_idx=vv)
        slice_linear(o, in_idx=vv)
        if target.head_dim != D_here:
            # the reloaded module scales by head_dim'**-0.5: fold sqrt(d'/d) into W_q so the softmax
            # keeps the temperature the model was trained with
            f = math.sqrt(target.head_dim / D_here)
            q.weight.data.mul_(f)
            if q.bias is not None:
                q.bias.data.mul_(f)
        sa.num_attention_heads = target.heads
        sa.attention_head_size = target.head_dim
        sa.all_head_size = target.heads * target.head_dim
        sa.scaling = target.head_dim**-0.5
        up, down = layer.intermediate.dense, layer.output.dense
        if target.ffn < up.out_features:
            s = scorer([(up.weight, lambda t: t), (down.weight, lambda t: t.t())])
            idx = top(s, target.ffn)
            slice_linear(up, out_idx=idx)
            slice_linear(down, in_idx=idx)
            kept["ffn"].append(idx.tolist())
    if hidden is not None:
        hidden.apply()
        kept["hidden"] = hidden.idx.tolist()
        if pool is not None:
            pool.apply()
    elif pooled and getattr(base, "pooler", None) is None:
        raise NotImplementedError("sequence classification without a pooler")
    cfg.num_attention_heads = target.heads
    cfg.intermediate_size = target.ffn
    cfg.hidden_size = target.hidden
    return kept


# -------------------------------------------------------------------------------------------------
# GPT-2 (Conv1D; fused c_attn = [q | k | v] along the output axis)
# -------------------------------------------------------------------------------------------------


def _prune_gpt2(model: nn.Module, target: Target, scorer: Scorer) -> dict[str, Any]:
    base = model.base_model
    if not hasattr(base, "h") or not hasattr(base, "wte"):
        raise NotImplementedError(f"{type(model).__name__}: expected a GPT-2 transformer")
    readers = _readers(model, base)
    cfg = model.config
    E = cfg.n_embd
    kept: dict[str, Any] = {"heads": [], "ffn": []}
    residual = None
    if target.hidden < E:
        parts: list[tuple[Any, str]] = [(base.wte, "emb"), (base.wpe, "emb"), (base.ln_f, "norm")]
        for block in base.h:
            parts += [(block.attn.c_attn, "conv_in"), (block.mlp.c_fc, "conv_in")]
            parts += [(block.attn.c_proj, "conv_out"), (block.mlp.c_proj, "conv_out")]
            parts += [(block.ln_1, "norm"), (block.ln_2, "norm")]
        tied = [(r, base.wte) for r in readers.values() if r.weight is base.wte.weight]
        parts += [(r, "lin_in") for r in readers.values() if r.weight is not base.wte.weight]
        residual = Residual(parts, target.hidden, scorer, tied)
    for block in base.h:
        a = block.attn
        if getattr(a, "is_cross_attention", False) or hasattr(a, "q_attn"):
            raise NotImplementedError("GPT-2 cross-attention")
        H_here, D_here = a.num_heads, a.head_dim
        W = H_here * D_here  # attention width = split size
        ca, cp = a.c_attn, a.c_proj  # ca.weight [E, 3W]; cp.weight [W, E]

        def part(t: torch.Tensor, j: int, W: int = W) -> torch.Tensor:
            return t[:, j * W : (j + 1) * W].t()  # [W, E]: rows = head dims

        if target.heads < H_here:
            s = scorer(
                [(ca.weight, lambda t, j=j, n=H_here: part(t, j).reshape(n, -1)) for j in range(3)]
                + [(cp.weight, lambda t, n=H_here: t.reshape(n, -1))]
            )
            heads = top(s, target.heads)
        else:
            heads = torch.arange(H_here)
        kept["heads"].append(heads.tolist())
        qk_rows, v_rows = [], []
        for h in heads.tolist():
            r = torch.arange(h * D_here, (h + 1) * D_here)
            if target.head_dim < D_here:
                sqk = scorer([(ca.weight, lambda t, r=r: part(t, 0)[r]), (ca.weight, lambda t, r=r: part(t, 1)[r])])
                sv = scorer([(ca.weight, lambda t, r=r: part(t, 2)[r]), (cp.weight, lambda t, r=r: t[r])])
                qk_rows.append(r[top(sqk, target.head_dim)])
                v_rows.append(r[top(sv, target.head_dim)])
            else:
                qk_rows.append(r)
                v_rows.append(r)
        qk, vv = torch.cat(qk_rows), torch.cat(v_rows)
        slice_conv1d(ca, out_idx=torch.cat([qk, W + qk, 2 * W + vv]))
        slice_conv1d(cp, in_idx=vv)
        width = target.heads * target.head_dim
        if target.head_dim != D_here and a.scale_attn_weights:
            f = math.sqrt(target.head_dim / D_here)  # keep the softmax temperature (see BERT)
            ca.weight.data[:, :width] *= f
            ca.bias.data[:width] *= f
        a.num_heads, a.head_dim, a.split_size, a.embed_dim = target.heads, target.head_dim, width, width
        a.scaling = target.head_dim**-0.5 if a.scale_attn_weights else 1.0
        if a.scale_attn_by_inverse_layer_idx:
            a.scaling /= float(a.layer_idx + 1)
        fc, pj = block.mlp.c_fc, block.mlp.c_proj  # fc.weight [E, I], pj.weight [I, E]
        if target.ffn < fc.nf:
            s = scorer([(fc.weight, lambda t: t.t()), (pj.weight, lambda t: t)])
            idx = top(s, target.ffn)
            slice_conv1d(fc, out_idx=idx)
            slice_conv1d(pj, in_idx=idx)
            kept["ffn"].append(idx.tolist())
    if residual is not None:
        residual.apply()
        kept["hidden"] = residual.idx.tolist()
        base.embed_dim = target.hidden
    cfg.n_head = target.heads
    cfg.n_embd = target.hidden
    cfg.n_inner = target.ffn  # always explicit: None would mean 4 × n_embd on reload
    return kept


# -------------------------------------------------------------------------------------------------
# Llama (GQA: query head i uses KV head i // group)
# -------------------------------------------------------------------------------------------------


def _prune_llama(model: nn.Module, target: Target, scorer: Scorer) -> dict[str, Any]:
    base = model.base_model
    if not hasattr(base, "layers") or not hasattr(base, "embed_tokens"):
        raise NotImplementedError(f"{type(model).__name__}: expected a Llama decoder")
    readers = _readers(model, base)
    cfg = model.config
    E = cfg.hidden_size
    D = getattr(cfg, "head_dim", None) or E // cfg.num_attention_heads
    new_group = target.heads // target.kv_heads
    kept: dict[str, Any] = {"kv_heads": [], "heads": [], "ffn": []}
    residual = None
    if target.hidden < E:
        parts: list[tuple[Any, str]] = [(base.embed_tokens, "emb"), (base.norm, "norm")]
        for layer in base.layers:
            a, mlp = layer.self_attn, layer.mlp
            parts += [(m, "lin_in") for m in (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj)]
            parts += [(a.o_proj, "lin_out"), (mlp.down_proj, "lin_out")]
            parts += [(layer.input_layernorm, "norm"), (layer.post_attention_layernorm, "norm")]
        tied = [(r, base.embed_tokens) for r in readers.values() if r.weight is base.embed_tokens.weight]
        parts += [(r, "lin_in") for r in readers.values() if r.weight is not base.embed_tokens.weight]
        residual = Residual(parts, target.hidden, scorer, tied)
    for layer in base.layers:
        a = layer.self_attn
        q, k, v, o = a.q_proj, a.k_proj, a.v_proj, a.o_proj
        H_here = q.out_features // D
        KV_here = k.out_features // D
        group = H_here // KV_here
        if target.kv_heads < KV_here:  # whole KV groups: KV head j and its query heads j*g .. j*g+g-1
            s = scorer(
                [
                    (q.weight, lambda t, n=KV_here: t.view(n, -1)),
                    (k.weight, lambda t, n=KV_here: t.view(n, -1)),
                    (v.weight, lambda t, n=KV_here: t.view(n, -1)),
                    (o.weight, lambda t, n=KV_here: t.t().reshape(n, -1)),
                ]
            )
            kvs = top(s, target.kv_heads)
        else:
            kvs = torch.arange(KV_here)
        q_heads = []
        for j in kvs.tolist():
            qh = torch.arange(j * group, (j + 1) * group)
            if new_group < group:  # the same number of query heads goes from every kept group
                s = scorer(
                    [
                        (q.weight, lambda t, qh=qh, n=H_here: t.view(n, -1)[qh]),
                        (o.weight, lambda t, qh=qh, n=H_here: t.t().reshape(n, -1)[qh]),
                    ]
                )
                qh = qh[top(s, new_group)]
            q_heads.append(qh)
        qs = torch.cat(q_heads)
        kept["kv_heads"].append(kvs.tolist())
        kept["heads"].append(qs.tolist())
        q_rows, kv_rows = _rows(qs, D), _rows(kvs, D)
        slice_linear(q, out_idx=q_rows)
        slice_linear(o, in_idx=q_rows)
        slice_linear(k, out_idx=kv_rows)
        slice_linear(v, out_idx=kv_rows)
        a.num_key_value_groups = new_group  # head_dim, scaling and RoPE are unchanged
        mlp = layer.mlp
        if target.ffn < mlp.gate_proj.out_features:
            s = scorer(
                [
                    (mlp.gate_proj.weight, lambda t: t),
                    (mlp.up_proj.weight, lambda t: t),
                    (mlp.down_proj.weight, lambda t: t.t()),
                ]
            )
            idx = top(s, target.ffn)
            slice_linear(mlp.gate_proj, out_idx=idx)
            slice_linear(mlp.up_proj, out_idx=idx)
            slice_linear(mlp.down_proj, in_idx=idx)
            mlp.intermediate_size = target.ffn
            kept["ffn"].append(idx.tolist())
    if residual is not None:
        residual.apply()
        kept["hidden"] = residual.idx.tolist()
        for layer in base.layers:
            layer.mlp.hidden_size = target.hidden
            layer.hidden_size = target.hidden
    cfg.num_attention_heads = target.heads
    cfg.num_key_value_heads = target.kv_heads
    cfg.head_dim = D  # pinned: the default hidden // heads is wrong after pruning (q/k/v shapes, RoPE)
    cfg.intermediate_size = target.ffn
    cfg.hidden_size = target.hidden
    return kept


PRUNERS: dict[str, Callable[[nn.Module, Target, Scorer], dict[str, Any]]] = {
    "bert": _prune_bert,
    "gpt2": _prune_gpt2,
    "llama": _prune_llama,
}


def prune(model: nn.Module, target: Target, importance: str = "magnitude") -> dict[str, Any]:
    """Prune ``model`` in place to ``target``; return the kept unit indices per layer.

    ``importance = "taylor"`` reads ``.grad`` of the weights (see :func:`accumulate_grads`);
    gradients are cleared afterwards.
    """
    dims = dims_of(model)
    scorer = Scorer(importance)
    try:
        with torch.no_grad():
            return PRUNERS[dims.family](model, target, scorer)
    finally:
        model.zero_grad(set_to_none=True)


def accumulate_grads(model: nn.Module, batches: Sequence[dict[str, Any]]) -> int:
    """Backward the task loss over calibration batches (gradients add up, as torch-pruning expects).

    Every parameter takes a gradient meanwhile (frozen ones too), in eval mode so dropout does not
    add noise; both are restored afterwards. Returns the number of batches used.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad]
    training = model.training
    model.zero_grad(set_to_none=True)
    for p in frozen:
        p.requires_grad_(True)
    model.eval()
    used = 0
    try:
        for batch in batches:
            out = model(**batch)
            loss = getattr(out, "loss", None)
            if loss is None:
                raise RuntimeError("taylor importance needs labelled batches: the model returned no loss")
            loss.backward()
            used += 1
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(training)
    return used
