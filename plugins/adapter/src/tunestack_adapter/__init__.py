"""``adapter``: bottleneck adapters (Houlsby or Pfeiffer) trained on a frozen base model.

Each adapter is ``y + up(act(down(y)))`` on the output of a sublayer's output projection: after the
attention output projection and after the feed-forward output projection of every chosen layer
(``houlsby``), or after the feed-forward one only (``pfeiffer``). ``up`` starts at zero, so the
untrained model gives exactly the base model's outputs. The base is frozen; the adapters and (by
default) the task head train.

Adapters cannot be merged into the weights (the non-linearity sits between ``down`` and ``up``), so
they stay in the model: the artifact is the base model as plain Hugging Face safetensors (with its
trained head) plus ``transforms/<slot>/adapters.safetensors`` and ``adapters.json``, which
``tunestack_rebuild`` re-inserts on load.

Nothing heavy is imported here: torch code lives in :mod:`tunestack_adapter.modules`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from tunestack.api import (
    Contract,
    Field,
    Method,
    MethodSpec,
    ModelHandle,
    Options,
    Problem,
    Saved,
    StageContext,
    StagePlan,
    TransformRecord,
    ValidationContext,
    hookimpl,
)

__version__ = "0.1.0"

NOT_MERGEABLE = (
    "bottleneck adapters cannot be merged into the base weights: the non-linearity between their "
    "down- and up-projection keeps them separate modules in the model"
)


class AdapterOptions(Options):
    variant: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby",
        description="houlsby: an adapter after the attention output and after the FFN output of each layer; "
        "pfeiffer: after the FFN output only",
    )
    reduction_factor: int = Field(
        16, ge=1, description="bottleneck size = hidden size // reduction_factor (at least 1)"
    )
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = Field(
        "relu", description="activation between the down- and the up-projection"
    )
    residual: bool = Field(
        True,
        description="y + up(act(down(y))) (identity at init); false replaces y by up(act(down(y))), "
        "which starts at zero",
    )
    layers: list[int] | None = Field(
        None, description="indices of the transformer layers that get adapters (0 = bottom); default: all"
    )
    train_head: bool = Field(True, description="keep the task head trainable (the rest of the base is frozen)")

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("is empty; leave it out to put adapters in every layer")
        negative = [i for i in value if i < 0]
        if negative:
            raise ValueError(f"layer indices count from 0 (the bottom layer); got {', '.join(map(str, negative))}")
        repeated = sorted({i for i in value if value.count(i) > 1})
        if repeated:
            raise ValueError(f"lists layer {', '.join(map(str, repeated))} more than once")
        return value


CONTRACT = Contract(
    phases=frozenset({"prepare", "train"}),
    requires=frozenset({"float-weights"}),
    produces=frozenset({"adapters", "structural"}),
    forbids_after=frozenset({"quantized", "pruned"}),
    reasons={
        "float-weights": "adapters are trained next to floating-point base weights",
        "adapters": NOT_MERGEABLE,
        "structural": "it inserts adapter modules after the attention and/or FFN output projections; " + NOT_MERGEABLE,
        "quantized": NOT_MERGEABLE + ", so quantizing the base would replace the projections they hang on",
        "pruned": NOT_MERGEABLE + ", so pruning would change the widths they were trained on",
    },
)


def _depth(config: Any) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key)
        if isinstance(value, int):
            return value
    return None


def _head_parameter_ids(model: Any) -> set[int]:
    """The task head's parameters, also when an earlier stage left the model wrapped by peft.

    ``head_parameter_names`` looks at top-level names (``classifier``, ``score``), which a
    ``PeftModel`` hides under ``base_model.model.``; its head copy in training is
    ``<head>.modules_to_save.<name>``, and ``<head>.original_module`` is unused.
    """
    from tunestack.api import head_parameter_names

    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    names = head_parameter_names(inner)
    return {id(p) for n, p in inner.named_parameters() if n in names and ".original_module." not in f".{n}."}


class Adapter(Method[AdapterOptions]):
    @hookimpl
    def tunestack_validate_stage(self, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
        problems = []
        if not stage.trains:
            problems.append(
                Problem(
                    self.slot.path,
                    "adapters start as the identity and only change by training; this stage has epochs = 0",
                )
            )
        for earlier in stage.methods:
            if earlier.instance is self:
                break
            if "adapters" in earlier.contract.produces:
                problems.append(
                    Problem(
                        self.slot.path,
                        f"'adapter' freezes everything already in the model, so the modules '{earlier.name}' "
                        f"({earlier.slot.path}) adds in the same stage would never train; "
                        "put it in an earlier stage",
                    )
                )
        depth = _depth(ctx.model_config or {})
        layers = self.options.layers
        if depth is not None and layers:
            missing = [i for i in layers if i >= depth]
            if missing:
                problems.append(
                    Problem(
                        f"{self.slot.path}.layers",
                        f"the model has {depth} layers (0-{depth - 1}); "
                        f"layer {', '.join(map(str, missing))} does not exist",
                    )
                )
        return problems

    @hookimpl
    def tunestack_prepare(self, model: ModelHandle, ctx: StageContext) -> None:
        from tunestack.api import count_trainable
        from tunestack_adapter.modules import count_parameters, insert_adapters, plan_adapters

        o = self.options
        net = model.model
        head = _head_parameter_ids(net) if o.train_head else set()
        points = plan_adapters(net, o.variant, o.reduction_factor, o.layers)
        for param in net.parameters():
            param.requires_grad_(False)
        points = insert_adapters(net, points, o.non_linearity, o.residual)
        for param in net.parameters():
            if id(param) in head:
                param.requires_grad_(True)
        model.record_transform(self, {"points": points})
        trainable, total = count_trainable(net)
        ctx.report(self, "num_adapters", len(points))
        sizes = sorted({p["bottleneck"] for p in points})
        ctx.report(self, "bottleneck_size", sizes[0] if len(sizes) == 1 else sizes)
        ctx.report(self, "adapter_params", sum(count_parameters(p["dim"], p["bottleneck"]) for p in points))
        ctx.report(self, "head_params", sum(p.numel() for p in net.parameters() if id(p) in head))
        ctx.report(self, "trainable_params", trainable)
        ctx.report(self, "trainable_fraction", trainable / total if total else 0.0)

    @hookimpl
    def tunestack_save(self, model: Any, folder: Path, record: TransformRecord) -> Saved:
        from safetensors.torch import save_file

        from tunestack_adapter.modules import META_FILE, META_FORMAT, WEIGHTS_FILE, adapter_state_dict, remove_adapters

        points = record.state["points"]
        save_file(adapter_state_dict(model, points), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {
            "format": META_FORMAT,
            "variant": self.options.variant,
            "non_linearity": self.options.non_linearity,
            "residual": self.options.residual,
            "reduction_factor": self.options.reduction_factor,
            "points": points,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        remove_adapters(model, points)
        return Saved(model=model)

    @hookimpl
    def tunestack_rebuild(self, model: Any, folder: Path, record: TransformRecord) -> Any:
        from safetensors.torch import load_file

        from tunestack_adapter.modules import (
            META_FILE,
            META_FORMAT,
            WEIGHTS_FILE,
            insert_adapters,
            load_adapter_state_dict,
        )

        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != META_FORMAT:
            raise ValueError(f"{folder / META_FILE}: unsupported format {meta.get('format')!r}")
        points = insert_adapters(model, meta["points"], meta["non_linearity"], bool(meta["residual"]))
        load_adapter_state_dict(model, points, load_file(str(folder / WEIGHTS_FILE)))
        return model


@hookimpl
def tunestack_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="adapter",
            options=AdapterOptions,
            factory=Adapter,
            contract=CONTRACT,
            description="bottleneck adapters (Houlsby: after attention and FFN; Pfeiffer: after FFN) on a frozen base",
            examples=('[[stack]]\nmethod = "adapter"\nvariant = "pfeiffer"\nreduction_factor = 16',),
        )
    )
