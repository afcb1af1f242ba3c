"""``prune``: structured pruning that physically removes attention heads, FFN neurons and
(optionally) hidden units of BERT-like, GPT-2 and Llama-like models.

The pruned model is a plain Hugging Face model: tensors are sliced, every attention module's head
attributes and the config are updated, so the stock ``AutoModelFor*.from_pretrained`` reloads the
run folder with identical outputs and no transform record is needed.

* ``when = "auto"`` prunes in ``prepare`` when the stage trains (training then recovers the
  accuracy, alone or with ``kd``) and in ``compress`` when the stage has ``epochs = 0``.
* Shapes the stock classes cannot rebuild (2.4 heads, a GQA split, a BERT hidden size that is not
  heads × head_dim, layers left wider than others) are refused at validation with the allowed values.
* Engines: ``native`` (hand-written, all three families) and ``depgraph`` (torch-pruning's
  DependencyGraph: BERT FFN/heads, Llama FFN and heads without GQA); ``auto`` picks depgraph where
  it works. Both rank units the same way.

Nothing heavy is imported here: torch, transformers, peft and torch-pruning are imported inside
the hooks (:mod:`tunestack_prune.runtime` and the modules it uses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import field_validator

from tunestack.api import (
    Contract,
    EvalContext,
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
from tunestack_prune.planning import (
    Request,
    UnsupportedModel,
    depgraph_unsupported,
    layer_problems,
    plan,
    read_dims,
)

__all__ = ["Prune", "PruneOptions", "contract"]

ADAPTERS_REASON = (
    "pruning cuts the base weights the adapters were trained on; merge the adapters first "
    "(e.g. lora merge = true) or set merge_adapters = true"
)
FLOAT_REASON = "pruning ranks and slices float weights: prune before quantizing"
GLOBAL_REASON = (
    "global ranking gives each layer its own width (torch-pruning: 63 and 65 FFN neurons in a 2-layer "
    "BERT), but the stock transformers classes build every layer from one config, so the saved model "
    "could not be reloaded; with the per-layer counts held equal, a global ranking keeps exactly the "
    "units the per-layer ranking keeps, so there is nothing left for it to decide: leave it false"
)


class PruneOptions(Options):
    ratio: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="fraction of attention heads and of FFN neurons to remove, rounded to the nearest shape "
        "the stock class can rebuild (BERT/GPT-2: the hidden size shrinks with the heads)",
    )
    head_ratio: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="fraction of attention heads to remove (overrides ratio); must leave a whole number of "
        "heads (Llama GQA: of KV groups or of query heads per group, see gqa_mode)",
    )
    ffn_ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="fraction of FFN (intermediate) neurons to remove (overrides ratio)"
    )
    hidden_ratio: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="fraction of the hidden size to remove; BERT/GPT-2: default follows the heads "
        "(hidden' = heads' × head_dim), a smaller value also shrinks head_dim; Llama: independent of heads",
    )
    importance: Literal["magnitude", "taylor"] = Field(
        "magnitude",
        description="how units are ranked: 'magnitude' (sum of squared weights) or 'taylor' (|weight × "
        "gradient| over calibration batches of the stage's training data)",
    )
    calibration_batches: int = Field(
        4, ge=1, le=1000, description="training batches whose loss gradients rank units (importance = 'taylor')"
    )
    global_pruning: bool = Field(
        False,
        description="rank units across layers; refused: the stock classes need the same width in every "
        "layer, and with equal widths a global ranking keeps the same units as the per-layer one",
    )
    iterative_steps: int = Field(
        1,
        ge=1,
        le=64,
        description="reach the target in this many steps, re-scoring importance (and Taylor gradients) between steps",
    )
    round_to: int = Field(1, ge=1, description="keep the FFN width a multiple of this (e.g. 8 or 64)")
    skip_layers: list[int] = Field(
        [],
        description="layer indices to leave untouched; refused whenever that would leave layers of "
        "different widths (which one config cannot describe)",
    )
    keep_layers: list[int] = Field([], description="alias of skip_layers (torch-pruning's ignored layers)")
    gqa_mode: Literal["groups", "queries"] = Field(
        "groups",
        description="Llama with grouped-query attention: remove whole KV groups ('groups') or the same number "
        "of query heads from every group ('queries')",
    )
    when: Literal["auto", "prepare", "compress"] = Field(
        "auto",
        description="'prepare' (before training, which then recovers accuracy), 'compress' (after), or "
        "'auto': prepare when the stage trains, compress when it has epochs = 0",
    )
    merge_adapters: bool = Field(
        False,
        description="merge unmerged peft adapters (LoRA, IA3) into the weights before pruning instead of "
        "refusing the stack",
    )
    engine: Literal["auto", "native", "depgraph"] = Field(
        "auto",
        description="'native' (hand-written, BERT/GPT-2/Llama), 'depgraph' (torch-pruning's DependencyGraph: "
        "BERT-like FFN and heads, Llama FFN and heads without GQA) or 'auto' (depgraph where it works)",
    )

    @field_validator("skip_layers", "keep_layers")
    @classmethod
    def _non_negative(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value):
            raise ValueError(f"layer indices start at 0, got {value}")
        return value

    def request(self) -> Request:
        return Request(
            ratio=self.ratio,
            head_ratio=self.head_ratio,
            ffn_ratio=self.ffn_ratio,
            hidden_ratio=self.hidden_ratio,
            round_to=self.round_to,
            gqa_mode=self.gqa_mode,
        )

    def untouched_layers(self) -> list[int]:
        return sorted(set(self.skip_layers) | set(self.keep_layers))

    def layers_option(self) -> str:
        return "skip_layers" if self.skip_layers else "keep_layers"

    def asks_for_nothing(self) -> bool:
        return all(not r for r in (self.ratio, self.head_ratio, self.ffn_ratio, self.hidden_ratio))


def phases_of(options: PruneOptions) -> frozenset[Any]:
    chosen = {"prepare", "compress"} if options.when == "auto" else {options.when}
    return frozenset({*chosen, "evaluate"})


def contract(options: PruneOptions) -> Contract:
    return Contract(
        phases=phases_of(options),
        requires=frozenset({"float-weights"}),
        conflicts=frozenset() if options.merge_adapters else frozenset({"adapters"}),
        removes=frozenset({"adapters"}) if options.merge_adapters else frozenset(),
        produces=frozenset({"pruned", "structural"}),
        reasons={"adapters": ADAPTERS_REASON, "float-weights": FLOAT_REASON},
    )


class Prune(Method[PruneOptions]):
    def __init__(self, options: PruneOptions, slot: Any) -> None:
        super().__init__(options, slot)
        self._macs_before: int | None = None
        self._tokens: int | None = None

    def phase(self, stage: StagePlan) -> str:
        if self.options.when == "auto":
            return "prepare" if stage.trains else "compress"
        return self.options.when

    # -- planning ------------------------------------------------------------------------------

    @hookimpl
    def tunestack_validate_stage(self, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
        return validate(self, stage, ctx)

    # -- lifecycle -----------------------------------------------------------------------------

    @hookimpl
    def tunestack_prepare(self, model: ModelHandle, ctx: StageContext) -> None:
        if self.phase(ctx.stage) == "prepare":
            self._run(model, ctx, "prepare")

    @hookimpl
    def tunestack_compress(self, model: ModelHandle, ctx: StageContext) -> None:
        if self.phase(ctx.stage) == "compress":
            self._run(model, ctx, "compress")

    def _run(self, model: ModelHandle, ctx: StageContext, phase: str) -> None:
        from tunestack_prune.runtime import run

        done = run(self, model, ctx, phase)
        self._macs_before = done["macs_before"]
        self._tokens = done["tokens"]

    @hookimpl
    def tunestack_evaluate(self, model: ModelHandle, ctx: EvalContext) -> dict[str, Any] | None:
        """The reloaded model's MACs (same protocol as the report), and the ratio to before."""
        if self._macs_before is None:
            return None
        from tunestack_prune.measure import count_macs

        tokens = self._tokens or ctx.settings.latency_tokens or ctx.max_length
        macs = count_macs(model.model, tokens)["macs"]
        return {"macs": macs, "macs_ratio": round(macs / self._macs_before, 6)}


# -------------------------------------------------------------------------------------------------
# validation (no torch)
# -------------------------------------------------------------------------------------------------


def validate(method: Prune, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
    options = method.options
    path = method.slot.path

    def at(option: str) -> str:
        return f"{path}.{option}" if option else path

    problems: list[Problem] = []
    if options.asks_for_nothing():
        problems.append(Problem(path, "nothing to prune: set ratio, or head_ratio / ffn_ratio / hidden_ratio"))
    if options.global_pruning:
        problems.append(Problem(at("global_pruning"), GLOBAL_REASON))
    if options.importance == "taylor" and not ctx.stack.data.train:
        problems.append(
            Problem(
                at("importance"),
                "taylor ranks units by loss gradients on training batches, but [data] has no train file; "
                "use importance = 'magnitude' or give data.train",
            )
        )
    if problems:
        return problems
    config = dict(ctx.model_config or {})
    if not config or _shape_changed_before(method, stage):
        return problems  # the shape is only known at run time: the same checks run there
    try:
        dims = read_dims(config)
    except UnsupportedModel as error:
        return [Problem(path, str(error))]
    if dims.family == "bert" and ctx.task not in ("sequence-classification", "token-classification"):
        return [
            Problem(
                path,
                f"prune cuts BERT-like sequence and token classifiers, not a '{ctx.task}' model "
                "(its BertLMHeadModel head is not supported)",
            )
        ]
    target, found = plan(dims, options.request())
    if not found:
        found = layer_problems(dims, target, options.untouched_layers(), options.layers_option())
    problems += [Problem(at(option), message) for option, message in found]
    if not found and options.engine == "depgraph":
        why = depgraph_unsupported(dims, target)
        if why is not None:
            problems.append(Problem(at("engine"), f"depgraph cannot prune this model: {why}; use 'native' or 'auto'"))
    return problems


def _shape_changed_before(method: Prune, stage: StagePlan) -> bool:
    """An earlier prune in this file makes the source's config.json the wrong reference.

    A source that was pruned by an earlier run is fine: its config.json is the current shape.
    """
    if stage.index > 0 and "pruned" in stage.tags_before:
        return True
    for planned in stage.methods:
        if planned.instance is method:
            return False
        if "pruned" in planned.contract.produces:
            return True
    return False


@hookimpl
def tunestack_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="prune",
            options=PruneOptions,
            factory=Prune,
            contract=contract,
            description="structured pruning of heads, FFN neurons and hidden size; the result reloads with the "
            "stock transformers class",
            examples=(
                '[[stack]]\nmethod = "prune"\nratio = 0.4',
                '[[stack]]\nmethod = "prune"\nffn_ratio = 0.5\nimportance = "taylor"\nround_to = 64',
            ),
        )
    )
