"""Bottleneck adapter modules and where they go in a transformer (imports torch: load lazily).

An adapter ``y -> y + up(act(down(y)))`` sits on the output of a sublayer's output projection, so it
acts before that sublayer's dropout, residual add and LayerNorm:

========  =============================================  ==============================
family    attention output (Houlsby only)                FFN output (Houlsby, Pfeiffer)
========  =============================================  ==============================
BERT      ``attention.output.dense`` (BertSelfOutput)     ``output.dense`` (BertOutput)
GPT-2     ``attn.c_proj`` (Conv1D)                        ``mlp.c_proj`` (Conv1D)
Llama     ``self_attn.o_proj``                            ``mlp.down_proj``
========  =============================================  ==============================

(paths relative to one transformer block; a few more families are listed in ``ATTENTION_OUTPUTS``
and ``FFN_OUTPUTS``.)

The adapter is attached as a child module of the projection (``<proj>.bottleneck_adapter``) plus a
forward hook that passes the projection's output through it. The projection itself is untouched,
so every base state-dict key keeps its name; removing the hook and the child restores the plain
Hugging Face module tree exactly. The hook is a module-level function (bound with
``functools.partial``), so ``copy.deepcopy`` of the model keeps each hook pointing at its own copy.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

#: relative to one transformer block, tried in order (the first that exists wins)
ATTENTION_OUTPUTS: tuple[str, ...] = (
    "attention.output.dense",  # BERT, RoBERTa, ELECTRA, XLM-R, MiniLM
    "attn.c_proj",  # GPT-2
    "self_attn.o_proj",  # Llama, Mistral, Qwen2, Gemma
    "attention.out_lin",  # DistilBERT
    "self_attn.out_proj",  # OPT, BART-like decoders
    "attention.dense",  # GPT-NeoX, Pythia
    "self_attention.dense",  # Falcon, Bloom
    "self_attn.dense",  # Phi
    "attn.out_proj",  # GPT-J
)
FFN_OUTPUTS: tuple[str, ...] = (
    "output.dense",  # BERT-like (BertOutput)
    "mlp.c_proj",  # GPT-2
    "mlp.down_proj",  # Llama-like
    "ffn.lin2",  # DistilBERT
    "fc2",  # OPT
    "mlp.fc2",  # Phi
    "mlp.fc_out",  # GPT-J
    "mlp.dense_4h_to_h",  # GPT-NeoX, Falcon, Bloom
)
POINTS: Mapping[str, tuple[str, ...]] = {"attn": ATTENTION_OUTPUTS, "ffn": FFN_OUTPUTS}
VARIANTS: Mapping[str, tuple[str, ...]] = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}
ACTIVATIONS: Mapping[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}
ATTRIBUTE = "bottleneck_adapter"
WEIGHTS_FILE = "adapters.safetensors"
META_FILE = "adapters.json"
META_FORMAT = 1


class BottleneckAdapter(nn.Module):
    """``y + up(act(down(y)))`` (or ``up(act(down(y)))`` without the residual).

    ``up`` starts at zero (weight and bias), so with the residual an untrained adapter returns its
    input bit for bit; ``down`` starts from N(0, 0.02) with a zero bias.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        non_linearity: str = "relu",
        residual: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if non_linearity not in ACTIVATIONS:
            raise ValueError(f"unknown non_linearity {non_linearity!r}; choose from {', '.join(ACTIVATIONS)}")
        self.dim = dim
        self.bottleneck = bottleneck
        self.non_linearity = non_linearity
        self.residual = residual
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.act(self.down(y)))
        return y + delta if self.residual else delta

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


def count_parameters(dim: int, bottleneck: int) -> int:
    """Parameters of one adapter: down (d·r + r) plus up (r·d + d)."""
    return 2 * dim * bottleneck + bottleneck + dim


def _apply_adapter(attribute: str, module: nn.Module, args: Any, output: Any) -> Any:
    """The forward hook: route the projection's output through its adapter child."""
    return getattr(module, attribute)(output)


def _is_our_hook(hook: Any, attribute: str | None = None) -> bool:
    return (
        isinstance(hook, functools.partial)
        and hook.func is _apply_adapter
        and (attribute is None or hook.args == (attribute,))
    )


def out_features(module: nn.Module) -> int:
    """Output width of a projection: ``nn.Linear`` (``out_features``), GPT-2 ``Conv1D`` (``nf``)."""
    for attr in ("out_features", "nf"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    raise ValueError(f"cannot tell the output width of {type(module).__name__}")


def _first_param(module: nn.Module) -> torch.Tensor:
    for param in module.parameters():
        return param
    raise ValueError(f"{type(module).__name__} has no parameters")


def find_point(block: nn.Module, point: str) -> str:
    """The relative name of the attention or FFN output projection inside ``block``."""
    names = dict(block.named_modules())
    for candidate in POINTS[point]:
        if candidate in names:
            return candidate
    kind = "attention output projection" if point == "attn" else "feed-forward output projection"
    children = sorted(n for n, m in block.named_modules() if n and isinstance(m, nn.Module) and _has_weight(m))
    raise ValueError(
        f"cannot find the {kind} in a {type(block).__name__} block (looked for {', '.join(POINTS[point])}; "
        f"its weighted modules are {', '.join(children[:12])})"
    )


def _has_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2


def plan_adapters(
    model: nn.Module,
    variant: str,
    reduction_factor: int,
    layers: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Where the adapters go: one entry per (layer, point) with the module name and sizes."""
    from tunestack.api import transformer_layers

    blocks = transformer_layers(model)
    depth = len(blocks)
    chosen = list(range(depth)) if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {depth} layers (0-{depth - 1})")
    points = []
    for index in chosen:
        block = blocks.modules[index]
        for point in VARIANTS[variant]:
            relative = find_point(block, point)
            module = block.get_submodule(relative)
            dim = out_features(module)
            points.append(
                {
                    "layer": index,
                    "point": point,
                    "module": f"{blocks.prefix(index)}{relative}",
                    "dim": dim,
                    "bottleneck": max(1, dim // reduction_factor),
                }
            )
    return points


def insert_adapters(
    model: nn.Module, points: Iterable[dict[str, Any]], non_linearity: str, residual: bool
) -> list[dict[str, Any]]:
    """Attach one adapter per planned point; return the points with the attribute each got."""
    resolved = []
    for entry in points:
        proj = model.get_submodule(entry["module"])
        attribute = entry.get("attribute") or _free_attribute(proj)
        if hasattr(proj, attribute):
            raise ValueError(f"{entry['module']} already has an attribute '{attribute}'")
        reference = _first_param(proj)
        adapter = BottleneckAdapter(
            int(entry["dim"]),
            int(entry["bottleneck"]),
            non_linearity,
            residual,
            device=reference.device,
            dtype=reference.dtype if reference.is_floating_point() else None,
        )
        proj.add_module(attribute, adapter)
        proj.register_forward_hook(functools.partial(_apply_adapter, attribute))
        resolved.append({**entry, "attribute": attribute})
    return resolved


def _free_attribute(proj: nn.Module) -> str:
    """``bottleneck_adapter``, or ``bottleneck_adapter_2``… when an earlier adapter sits there."""
    if not hasattr(proj, ATTRIBUTE):
        return ATTRIBUTE
    n = 2
    while hasattr(proj, f"{ATTRIBUTE}_{n}"):
        n += 1
    return f"{ATTRIBUTE}_{n}"


def adapter_state_dict(model: nn.Module, points: Iterable[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The adapters' tensors, keyed by their names in the model's state dict."""
    tensors = {}
    for entry in points:
        adapter = model.get_submodule(f"{entry['module']}.{entry['attribute']}")
        for name, tensor in adapter.state_dict().items():
            tensors[f"{entry['module']}.{entry['attribute']}.{name}"] = tensor.detach().cpu().contiguous()
    return tensors


def load_adapter_state_dict(
    model: nn.Module, points: Iterable[dict[str, Any]], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Copy saved tensors into the inserted adapters; every key must match exactly."""
    expected: set[str] = set()
    for entry in points:
        prefix = f"{entry['module']}.{entry['attribute']}."
        adapter = model.get_submodule(prefix[:-1])
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected |= {prefix + k for k in adapter.state_dict()}
        adapter.load_state_dict(own, strict=True)
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(f"the adapter weights hold tensors no adapter uses: {', '.join(unexpected[:5])}")


def remove_adapters(model: nn.Module, points: Iterable[dict[str, Any]]) -> None:
    """Detach the adapters (hooks and child modules), leaving the plain projections."""
    for entry in points:
        proj = model.get_submodule(entry["module"])
        attribute = entry["attribute"]
        for hook_id, hook in list(proj._forward_hooks.items()):
            if _is_our_hook(hook, attribute):
                del proj._forward_hooks[hook_id]
                proj._forward_hooks_with_kwargs.pop(hook_id, None)
                proj._forward_hooks_always_called.pop(hook_id, None)
        if attribute in proj._modules:
            del proj._modules[attribute]


def adapter_parameter_names(model: nn.Module, points: Iterable[dict[str, Any]]) -> set[str]:
    names = set()
    for entry in points:
        prefix = f"{entry['module']}.{entry['attribute']}"
        adapter = model.get_submodule(prefix)
        names |= {f"{prefix}.{n}" for n, _ in adapter.named_parameters()}
    return names
