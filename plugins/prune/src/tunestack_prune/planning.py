"""Turning ratios into a shape the stock Hugging Face classes can rebuild, without torch.

Everything here works on the model's ``config.json`` as a dict, so validation can reject an
impossible request (a ratio that leaves 2.4 heads, a hidden size that is not heads × head_dim)
before any weights are loaded; the runner calls the same functions on the live model's config.

The shape rules (transformers 5.x):

* every layer is built from one config, so every layer keeps the same number of heads and FFN
  neurons (pruning is uniform per layer);
* BERT and GPT-2 derive ``head_dim = hidden_size // num_heads``: the attention width must equal
  the hidden size, so removing heads shrinks the hidden size with them (hidden' = heads' × head_dim');
* Llama has ``config.head_dim`` (written explicitly after pruning), so heads and the hidden size are
  independent; with grouped-query attention (GQA) ``num_attention_heads`` must stay a multiple of
  ``num_key_value_heads``: either whole KV groups go (``gqa_mode = "groups"``) or the same number of
  query heads goes from every group (``"queries"``). Head dims are never pruned under RoPE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

FAMILIES = {"bert": "bert", "gpt2": "gpt2", "llama": "llama"}
EXACT = 1e-6  # tolerance when a ratio must hit a whole number of units


class UnsupportedModel(ValueError):
    """The model type is not one the pruner knows how to cut."""


@dataclass(frozen=True)
class Dims:
    """The widths of a model, per layer (uniform) and of the residual stream."""

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    @property
    def group(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.heads // self.kv_heads

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "family"}


@dataclass(frozen=True)
class Target:
    """The widths after pruning (same fields as :class:`Dims`, depth unchanged)."""

    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    hidden: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def of(cls, dims: Dims) -> Target:
        return cls(dims.heads, dims.kv_heads, dims.head_dim, dims.ffn, dims.hidden)


@dataclass(frozen=True)
class Request:
    """The options that decide the shape (a plain mirror of the method's options)."""

    ratio: float | None = None
    head_ratio: float | None = None
    ffn_ratio: float | None = None
    hidden_ratio: float | None = None
    round_to: int = 1
    gqa_mode: str = "groups"


def read_dims(config: Mapping[str, Any]) -> Dims:
    """Widths from a ``config.json`` dict (or ``PretrainedConfig.to_dict()``)."""
    model_type = config.get("model_type")
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise UnsupportedModel(
            f"prune knows model types {', '.join(sorted(FAMILIES))}, not '{model_type}' "
            "(the stock class must be rebuildable from the pruned config)"
        )
    if family == "gpt2":
        hidden, heads = _int(config, "n_embd", 768), _int(config, "n_head", 12)
        inner = config.get("n_inner")
        ffn = int(inner) if inner is not None else 4 * hidden
        layers = _int(config, "n_layer", 12)
        kv = heads
        head_dim = hidden // heads
    else:
        hidden, heads = _int(config, "hidden_size", 768), _int(config, "num_attention_heads", 12)
        ffn = _int(config, "intermediate_size", 3072)
        layers = _int(config, "num_hidden_layers", 12)
        if family == "llama":
            kv = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or hidden // heads)
        else:
            kv = heads
            head_dim = hidden // heads
    if family != "llama" and hidden % heads:
        raise UnsupportedModel(f"hidden size {hidden} is not a multiple of {heads} heads")
    if heads % kv:
        raise UnsupportedModel(f"{heads} attention heads are not a multiple of {kv} key/value heads")
    return Dims(family, layers, hidden, heads, kv, head_dim, ffn)


def _int(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key)
    return int(value) if value is not None else default


# -------------------------------------------------------------------------------------------------
# ratios -> target widths
# -------------------------------------------------------------------------------------------------


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def _fmt(x: float) -> str:
    return f"{x:.4f}".rstrip("0").rstrip(".") if x else "0"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def plan(dims: Dims, request: Request) -> tuple[Target, list[tuple[str, str]]]:
    """The target widths for ``request``, and problems as (option, message) pairs.

    ``ratio`` is a convenience: it sets ``head_ratio`` and ``ffn_ratio`` (unless given) and rounds
    to the nearest shape the stock class can rebuild. The explicit ratios must hit that shape
    exactly; a problem lists the values that would.
    """
    problems: list[tuple[str, str]] = []
    heads, kv = _plan_heads(dims, request, problems)
    ffn = _plan_ffn(dims, request, problems)
    hidden, head_dim = _plan_hidden(dims, request, heads, problems)
    target = Target(heads=heads, kv_heads=kv, head_dim=head_dim, ffn=ffn, hidden=hidden)
    if not problems and target == Target.of(dims):
        problems.append(
            (
                "",
                f"the options remove nothing from this model ({describe(dims)}); "
                "set ratio, or head_ratio / ffn_ratio / hidden_ratio",
            )
        )
    return target, problems


def _plan_heads(dims: Dims, request: Request, problems: list[tuple[str, str]]) -> tuple[int, int]:
    explicit = request.head_ratio is not None
    r = request.head_ratio if request.head_ratio is not None else (request.ratio or 0.0)
    option = "head_ratio" if explicit else "ratio"
    if r <= 0:
        return dims.heads, dims.kv_heads
    if dims.family != "llama" or dims.kv_heads == dims.heads:
        units, unit_name = dims.heads, "head"
        mode = "mha"
    elif request.gqa_mode == "groups":
        units, unit_name = dims.kv_heads, "KV group"
        mode = "groups"
    else:
        units, unit_name = dims.group, "query head per KV group"
        mode = "queries"

    def shape(k: int) -> tuple[int, int]:
        if mode == "mha":
            return k, k
        if mode == "groups":
            return k * dims.group, k
        return k * dims.kv_heads, dims.kv_heads

    exact = units * (1.0 - r)
    keep = _round(exact)
    if units == 1:
        if mode == "mha":
            why = "the model has a single attention head: there is no head to remove"
        elif mode == "groups":
            why = "a model with one KV head has no whole KV group to remove; set gqa_mode = 'queries'"
        else:
            why = (
                f"every KV head serves a single query head ({dims.heads} heads, {dims.kv_heads} KV heads): "
                "there is no query head to remove inside a group; set gqa_mode = 'groups'"
            )
        if explicit:
            problems.append((option, why))
        return dims.heads, dims.kv_heads
    allowed = ", ".join(f"{_fmt(1 - k / units)} ({_describe_heads(*shape(k))})" for k in range(units - 1, 0, -1))
    if explicit and abs(exact - keep) > EXACT:
        extra = ""
        if mode == "groups":
            extra = f" (gqa_mode = 'groups' removes whole KV groups of {dims.group} query heads)"
        elif mode == "queries":
            extra = (
                f" (gqa_mode = 'queries' removes the same number of query heads from each of the "
                f"{dims.kv_heads} groups)"
            )
        problems.append(
            (
                option,
                f"{_fmt(r)} of {_plural(units, unit_name)} leaves {exact:g}, not a whole number{extra}; "
                f"allowed values: {allowed}",
            )
        )
        return dims.heads, dims.kv_heads
    if keep < 1:
        if explicit:
            problems.append((option, f"{_fmt(r)} removes every {unit_name}; allowed values: {allowed}"))
            return dims.heads, dims.kv_heads
        keep = 1
    if keep >= units:
        if explicit:
            problems.append((option, f"{_fmt(r)} removes no {unit_name}; allowed values: {allowed}"))
        return dims.heads, dims.kv_heads
    return shape(keep)


def _describe_heads(heads: int, kv: int) -> str:
    if heads == kv:
        return _plural(heads, "head")
    return f"{_plural(heads, 'head')}, {_plural(kv, 'KV head')}"


def _plan_ffn(dims: Dims, request: Request, problems: list[tuple[str, str]]) -> int:
    r = request.ffn_ratio if request.ffn_ratio is not None else (request.ratio or 0.0)
    option = "ffn_ratio" if request.ffn_ratio is not None else "ratio"
    if r <= 0:
        return dims.ffn
    keep = _round(dims.ffn * (1.0 - r))
    if request.round_to > 1:
        keep = (keep // request.round_to) * request.round_to
        if keep < request.round_to:
            problems.append(
                (
                    "round_to",
                    f"keeping {_round(dims.ffn * (1.0 - r))} of {dims.ffn} FFN neurons rounds down to 0 with "
                    f"round_to = {request.round_to}; use a smaller round_to or {option}",
                )
            )
            return dims.ffn
    if keep < 1:
        problems.append((option, f"{_fmt(r)} removes every FFN neuron ({dims.ffn})"))
        return dims.ffn
    return min(keep, dims.ffn)


def _plan_hidden(dims: Dims, request: Request, heads: int, problems: list[tuple[str, str]]) -> tuple[int, int]:
    """(hidden', head_dim'). BERT/GPT-2: hidden' = heads' × head_dim'. Llama: independent."""
    r = request.hidden_ratio
    if dims.family == "llama":
        if r is None or r <= 0:
            return dims.hidden, dims.head_dim
        keep = _round(dims.hidden * (1.0 - r))
        if keep < 1:
            problems.append(("hidden_ratio", f"{_fmt(r)} removes the whole hidden size ({dims.hidden})"))
            return dims.hidden, dims.head_dim
        return keep, dims.head_dim
    if r is None:
        # the hidden size follows the heads: each head keeps its width
        return heads * dims.head_dim, dims.head_dim
    exact = dims.hidden * (1.0 - r)
    keep = _round(exact)
    choices = [heads * d for d in range(dims.head_dim, 0, -1)]
    nearest = sorted(choices, key=lambda h: (abs(h - exact), -h))[:6]
    allowed = ", ".join(
        f"{_fmt(1 - h / dims.hidden)} (hidden {h} = {heads} × {h // heads})" for h in sorted(nearest, reverse=True)
    )
    rule = (
        f"the stock {dims.family.upper() if dims.family == 'gpt2' else 'BERT'} class computes head_dim = "
        f"hidden_size // num_heads, so the hidden size must be {heads} heads × a head_dim of at most "
        f"{dims.head_dim}"
    )
    if abs(exact - keep) > EXACT or keep not in choices:
        got = f"{exact:g}" if abs(exact - keep) > EXACT else str(keep)
        problems.append(("hidden_ratio", f"{_fmt(r)} leaves a hidden size of {got}; {rule}; allowed values: {allowed}"))
        return dims.hidden, dims.head_dim
    return keep, keep // heads


def describe(dims: Dims | Target) -> str:
    kv = f", {dims.kv_heads} KV heads" if dims.kv_heads != dims.heads else ""
    return f"{dims.heads} heads{kv} of {dims.head_dim}, hidden {dims.hidden}, FFN {dims.ffn}"


# -------------------------------------------------------------------------------------------------
# layers left untouched, iterative steps, engine support
# -------------------------------------------------------------------------------------------------


def layer_problems(dims: Dims, target: Target, skipped: Sequence[int], option: str) -> list[tuple[str, str]]:
    """Untouched layers make widths non-uniform, which one config cannot describe."""
    if not skipped:
        return []
    outside = sorted({i for i in skipped if i >= dims.layers})
    if outside:
        return [(option, f"the model has {dims.layers} layers (0..{dims.layers - 1}); there is no layer {outside}")]
    per_layer = (target.heads, target.kv_heads, target.head_dim, target.ffn) != (
        dims.heads,
        dims.kv_heads,
        dims.head_dim,
        dims.ffn,
    )
    if target.hidden != dims.hidden:
        return [
            (
                option,
                f"the hidden size ({dims.hidden} -> {target.hidden}) is the residual stream every layer reads "
                "and writes: no layer can keep it; leave "
                f"{option} out (BERT/GPT-2 shrink the hidden size whenever heads go)",
            )
        ]
    if per_layer and len(set(skipped)) < dims.layers:
        return [
            (
                option,
                f"layers {sorted(set(skipped))} would keep {describe(dims)} while the others get "
                f"{describe(target)}; the stock {dims.family} class builds every layer from one config "
                "(one num_attention_heads, one intermediate_size), so such a model cannot be reloaded; "
                f"leave {option} out",
            )
        ]
    if per_layer:
        return [(option, "every layer is listed, so nothing would be pruned")]
    return []


def steps(dims: Dims, target: Target, count: int) -> list[Target]:
    """``count`` targets that shrink linearly from ``dims`` to ``target`` (the last is ``target``).

    Intermediate shapes keep the same rules (BERT/GPT-2: hidden = heads × head_dim; Llama: whole
    KV groups or the same query count per group). Repeated shapes are dropped.
    """
    start = Target.of(dims)
    out: list[Target] = []
    previous = start
    for s in range(1, count + 1):
        if s == count:
            step = target
        else:
            f = s / count

            def lerp(a: int, b: int, f: float = f) -> int:
                return _round(a + (b - a) * f)

            head_dim = lerp(dims.head_dim, target.head_dim)
            ffn = lerp(dims.ffn, target.ffn)
            if dims.family == "llama":
                kv = lerp(dims.kv_heads, target.kv_heads)
                group = lerp(dims.group, target.heads // target.kv_heads)
                heads = kv * group
                hidden = lerp(dims.hidden, target.hidden)
            else:
                heads = kv = lerp(dims.heads, target.heads)
                hidden = heads * head_dim if target.hidden != dims.hidden else dims.hidden
            step = Target(heads=heads, kv_heads=kv, head_dim=head_dim, ffn=ffn, hidden=hidden)
        if step != previous:
            out.append(step)
            previous = step
    return out


def depgraph_unsupported(dims: Dims, target: Target) -> str | None:
    """Why torch-pruning's DependencyGraph cannot produce ``target`` here (None: it can)."""
    if dims.family == "gpt2":
        return (
            "torch-pruning does not know GPT-2's Conv1D layers (it silently prunes nothing) and fails on the "
            "fused q/k/v projection"
        )
    if target.head_dim != dims.head_dim:
        return (
            "pruning head dims with torch-pruning gives a hidden size that rarely equals heads × head_dim "
            "(and its round_to mixes up head dims); the native engine keeps them in step"
        )
    if dims.family == "llama":
        if target.hidden != dims.hidden:
            return "hidden-size pruning of Llama-like models is done by the native engine only"
        if target.heads != dims.heads and dims.kv_heads != dims.heads:
            return (
                "torch-pruning's DependencyGraph never returns on grouped-query attention "
                f"({dims.heads} query heads, {dims.kv_heads} KV heads)"
            )
    return None
