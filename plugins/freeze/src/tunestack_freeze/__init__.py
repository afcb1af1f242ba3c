"""``freeze``: choose which parameters train — embeddings, the bottom N layers, named modules, or
everything but the biases (BitFit). The task head stays trainable unless told otherwise.

Acts in ``prepare`` by setting ``requires_grad``; weights keep their shapes, so nothing has to be
rebuilt on reload (except BitFit on bias-free Llama-like models, which gains zero biases recorded in
the config: a plain Hugging Face model still loads it).
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatch
from typing import Any

from tunestack.api import (
    Contract,
    Field,
    Method,
    MethodSpec,
    ModelHandle,
    Options,
    Problem,
    StageContext,
    StagePlan,
    ValidationContext,
    hookimpl,
)


class FreezeOptions(Options):
    embeddings: bool = Field(False, description="freeze token, position and type embeddings")
    layers: int = Field(0, ge=0, description="freeze the bottom N transformer layers")
    modules: list[str] = Field(
        [],
        description="freeze parameters whose names match these glob patterns (e.g. 'bert.encoder.layer.0.*')",
    )
    bitfit: bool = Field(False, description="train only bias terms (and the head): BitFit")
    train_head: bool = Field(True, description="keep the task head trainable whatever else is frozen")


CONTRACT = Contract(phases=frozenset({"prepare"}))


class Freeze(Method[FreezeOptions]):
    @hookimpl
    def tunestack_validate_stage(self, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
        problems = []
        if not stage.trains:
            problems.append(
                Problem(self.slot.path, "freeze only matters in a stage that trains (this one has epochs = 0)")
            )
        o = self.options
        if not (o.embeddings or o.layers or o.modules or o.bitfit):
            problems.append(Problem(self.slot.path, "nothing to freeze: set embeddings, layers, modules or bitfit"))
        config = ctx.model_config or {}
        depth = config.get("num_hidden_layers", config.get("n_layer"))
        if isinstance(depth, int) and o.layers > depth:
            problems.append(
                Problem(f"{self.slot.path}.layers", f"the model has {depth} layers, cannot freeze {o.layers}")
            )
        return problems

    @hookimpl
    def tunestack_prepare(self, model: ModelHandle, ctx: StageContext) -> None:
        frozen = apply_freeze(model.model, self.options)
        trainable, total = _counts(model.model)
        ctx.report(self, "frozen_params", frozen)
        ctx.report(self, "trainable_params", trainable)
        ctx.report(self, "trainable_fraction", trainable / total if total else 0.0)


def apply_freeze(model: Any, options: FreezeOptions) -> int:
    """Set ``requires_grad`` as the options say; return how many parameters were frozen."""
    from tunestack.api import embedding_parameter_names, head_parameter_names, layer_of, transformer_layers

    layers = transformer_layers(model)
    head = head_parameter_names(model)
    if options.bitfit and not any(name.endswith(".bias") for name, _ in model.named_parameters() if name not in head):
        _add_zero_biases(model, layers)
    embeddings = embedding_parameter_names(model) if options.embeddings else set()
    frozen = 0
    for name, param in model.named_parameters():
        freeze = (
            name in embeddings
            or (options.layers and (index := layer_of(name, layers)) is not None and index < options.layers)
            or any(fnmatch(name, pattern) for pattern in options.modules)
            or (options.bitfit and not name.endswith(".bias"))
        )
        if options.train_head and name in head:
            freeze = False
        if freeze and param.requires_grad:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def _add_zero_biases(model: Any, layers: Any) -> None:
    """Bias-free blocks (Llama-like) get zero biases so BitFit has something to train.

    Outputs are unchanged; the config records the biases (``attention_bias``, ``mlp_bias``) so the
    saved model reloads with the stock class.
    """
    import torch

    config = model.config
    if not (hasattr(config, "attention_bias") and hasattr(config, "mlp_bias")):
        raise ValueError(f"bitfit: {type(model).__name__} has no bias terms and no config switch to add them")
    for module in layers.modules.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is None:
            module.bias = torch.nn.Parameter(
                torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device)
            )
    config.attention_bias = True
    config.mlp_bias = True


def _counts(model: Any) -> tuple[int, int]:
    from tunestack.api import count_trainable

    return count_trainable(model)


@hookimpl
def tunestack_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="freeze",
            options=FreezeOptions,
            factory=Freeze,
            contract=CONTRACT,
            description="freeze embeddings, the bottom N layers, named modules, or all but biases (BitFit)",
            examples=('[[stack]]\nmethod = "freeze"\nembeddings = true\nlayers = 4',),
        )
    )
