"""``lora``: low-rank adapters (LoRA) through peft, with per-architecture default targets and an
optional merge into the weights at the end of the stage.

* ``prepare`` wraps the model with peft's ``get_peft_model``, with the task type of the model's
  class (sequence classification -> ``SEQ_CLS``, token classification -> ``TOKEN_CLS``, causal LM ->
  ``CAUSAL_LM``), so peft also trains and saves the task head in full.
* unmerged (default): the transform is recorded; ``tunestack_save`` writes a plain PEFT adapter
  folder (``adapter_model.safetensors`` + ``adapter_config.json``) and hands core the unwrapped base
  model (peft ``unload()``, no merge) to save as ordinary Hugging Face weights;
  ``tunestack_rebuild`` is ``PeftModel.from_pretrained(base, folder)``.
* ``merge = true``: ``compress`` folds the adapter into the weights (``merge_and_unload``) and drops
  the record, so the saved model is plain Hugging Face weights.

Nothing heavy is imported at module import time: torch and peft are imported inside the hooks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from tunestack.api import (
    Contract,
    Field,
    Method,
    MethodSpec,
    ModelError,
    ModelHandle,
    Options,
    Problem,
    Saved,
    StageContext,
    StagePlan,
    TransformRecord,
    ValidationContext,
    count_trainable,
    hookimpl,
)

ALL_LINEAR = "all-linear"

#: the model's auto-class -> peft task type (the task type decides the PeftModel subclass and
#: whether peft trains and saves the classification head in full)
TASK_TYPES: Mapping[str, str] = {
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "causal-lm": "CAUSAL_LM",
}
CLASSIFICATION_HEADS = ("classifier", "score")

_BERT_LIKE = (
    "query",
    "key",
    "value",
    "dense",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "classifier",
    "decoder",
)
_LLAMA_LIKE = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
    "score",
    "lm_head",
)
#: leaf names of the layers LoRA can adapt (linear, Conv1D, embedding), per model type, over every
#: task class of that type: enough to report a misspelt target before any weights are loaded
KNOWN_MODULES: Mapping[str, frozenset[str]] = {
    "bert": frozenset(_BERT_LIKE),
    "roberta": frozenset((*_BERT_LIKE, "out_proj")),
    "xlm-roberta": frozenset((*_BERT_LIKE, "out_proj")),
    "distilbert": frozenset(
        (
            "q_lin",
            "k_lin",
            "v_lin",
            "out_lin",
            "lin1",
            "lin2",
            "word_embeddings",
            "position_embeddings",
            "pre_classifier",
            "classifier",
            "vocab_transform",
            "vocab_projector",
        )
    ),
    "gpt2": frozenset(("c_attn", "q_attn", "c_proj", "c_fc", "wte", "wpe", "score", "classifier", "lm_head")),
    "llama": frozenset(_LLAMA_LIKE),
    "mistral": frozenset(_LLAMA_LIKE),
    "qwen2": frozenset(_LLAMA_LIKE),
}

#: default targets for model types peft has no default for
FALLBACK_TARGETS: Mapping[str, tuple[str, ...]] = {"distilbert": ("q_lin", "v_lin")}

ADAPTERS_REASON = (
    "an unmerged PeftModel cannot take a second LoRA safely: peft would nest the models and "
    "overwrite the first adapter; merge the earlier adapter first (set merge = true on it)"
)
FLOAT_REASON = (
    "LoRA here trains float weights; merging into quantized weights is refused: quantize after a lora with merge = true"
)


class LoraOptions(Options):
    r: int = Field(8, ge=1, description="rank of the low-rank update matrices")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA branch's input while training")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description=(
            "modules that get LoRA; a name matches every module whose dotted name ends with it "
            "('query', 'attention.self.value'); 'all-linear' adapts every linear layer except the "
            "output layer; default: peft's choice per architecture (BERT query/value, GPT-2 c_attn, "
            "Llama q_proj/v_proj)"
        ),
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="which bias terms train too: none, all of them, or those of the adapted layers"
    )
    modules_to_save: list[str] = Field(
        [],
        description=(
            "extra modules trained in full and saved with the adapter; the classification head "
            "always is (sequence and token classification)"
        ),
    )
    merge: bool = Field(
        False,
        description=(
            "fold the adapter into the weights at the end of the stage: the saved model is plain "
            "Hugging Face weights and nothing is left to rebuild"
        ),
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_string_only(cls, value: Any) -> Any:
        if isinstance(value, str) and value != ALL_LINEAR:
            raise ValueError(
                f"must be a list of module names or 'all-linear', got {value!r} (write [{value!r}] for one name)"
            )
        return value


def contract(options: LoraOptions) -> Contract:
    return Contract(
        phases=frozenset({"prepare", "train", "compress"} if options.merge else {"prepare", "train"}),
        requires=frozenset({"float-weights"}),
        conflicts=frozenset({"adapters"}),
        produces=frozenset() if options.merge else frozenset({"adapters", "structural"}),
        reasons={"float-weights": FLOAT_REASON, "adapters": ADAPTERS_REASON},
    )


class Lora(Method[LoraOptions]):
    def __init__(self, options: LoraOptions, slot: Any) -> None:
        super().__init__(options, slot)
        self._peft_model: Any = None  # the PeftModel this entry made (while its stage runs)

    # -- planning ------------------------------------------------------------------------------

    @hookimpl
    def tunestack_validate_stage(self, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
        return validate(self, stage, ctx)

    # -- lifecycle -----------------------------------------------------------------------------

    @hookimpl
    def tunestack_prepare(self, model: ModelHandle, ctx: StageContext) -> None:
        task_type = TASK_TYPES.get(model.auto_class)
        peft_model = wrap(model.model, self.options, task_type, self.slot.path)
        self._peft_model = peft_model
        model.model = peft_model
        targets = adapted_module_names(peft_model)
        saved = full_modules_names(peft_model)
        model.record_transform(self, {"task_type": task_type, "target_modules": targets, "modules_to_save": saved})
        trainable, total = count_trainable(peft_model)
        ctx.report(self, "trainable_params", trainable)
        ctx.report(self, "trainable_fraction", trainable / total if total else 0.0)
        ctx.report(self, "target_modules", targets)
        ctx.report(self, "adapted_layers", len(lora_layers(peft_model)))
        ctx.report(self, "modules_to_save", saved)
        ctx.report(self, "task_type", task_type)

    @hookimpl
    def tunestack_save(self, model: Any, folder: Path, record: TransformRecord) -> Saved:
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise TypeError(
                f"lora ({record.slot.path}) expected the PeftModel it made, got {type(model).__name__}: "
                "a later method replaced the model without recording a transform"
            )
        with _quiet():
            model.save_pretrained(str(folder), save_embedding_layers=False)
        (folder / "README.md").unlink(missing_ok=True)  # peft's boilerplate model card
        # unload() swaps every LoRA layer back to its base layer and every modules_to_save wrapper
        # to its trained copy, without merging: the plain Hugging Face model core saves as the base
        # (destructive; core no longer uses the in-memory model after saving).
        return Saved(model=model.unload())

    @hookimpl
    def tunestack_rebuild(self, model: Any, folder: Path, record: TransformRecord) -> Any:
        from peft import PeftModel

        with _quiet():
            # trainable, as at the end of its stage: a later stage that trains keeps tuning LoRA
            return PeftModel.from_pretrained(model, str(folder), is_trainable=True)


class MergingLora(Lora):
    """A ``lora`` entry with ``merge = true``: it also acts in ``compress``, where it folds the adapter
    into the weights and drops its transform record (so ``explain`` lists it under compress only then)."""

    @hookimpl
    def tunestack_compress(self, model: ModelHandle, ctx: StageContext) -> None:
        peft_model = self._peft_model if self._peft_model is not None else model.model
        probe = _probe_batch(ctx)
        before = _logits(peft_model, probe)
        merged = peft_model.merge_and_unload()
        _replace(model, peft_model, merged, self.slot.path)
        self._peft_model = None
        model.drop_transform(self)
        after = _logits(merged, probe)
        ctx.report(self, "merged", True)
        if before is not None and after is not None:
            ctx.report(self, "merge_max_abs_diff", float((before - after).abs().max()))


def make_lora(options: LoraOptions, slot: Any) -> Lora:
    return MergingLora(options, slot) if options.merge else Lora(options, slot)


# ----------------------------------------------------------------------------------------------
# validation (no torch)
# ----------------------------------------------------------------------------------------------


def validate(method: Lora, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
    problems: list[Problem] = []
    path = method.slot.path
    options = method.options
    if not stage.trains:
        problems.append(
            Problem(
                path,
                "lora only matters in a stage that trains (this one has epochs = 0): an untrained "
                "adapter changes nothing",
            )
        )
    entries = [m for m in stage.methods if isinstance(m.instance, Lora)]
    if len(entries) > 1 and entries[0].instance is not method:
        first = entries[0].slot.path
        problems.append(
            Problem(
                path,
                f"a stage can hold only one 'lora' entry ({first} is already one): both adapters would "
                f"be active while training; put this one in a later [[stage]] and set merge = true on {first}",
            )
        )
    config = dict(ctx.model_config or {})
    model_type = config.get("model_type")
    known = KNOWN_MODULES.get(model_type) if isinstance(model_type, str) else None
    targets = options.target_modules
    if isinstance(targets, list):
        if not targets:
            problems.append(
                Problem(
                    f"{path}.target_modules",
                    "is empty: leave it out for the architecture's default, name modules, or use 'all-linear'",
                )
            )
        if known is not None:
            unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in known]
            if unknown:
                problems.append(
                    Problem(
                        f"{path}.target_modules",
                        f"{', '.join(repr(t) for t in unknown)} not found in a '{model_type}' model; "
                        f"its adaptable modules are: {', '.join(sorted(known))} (or 'all-linear')",
                    )
                )
        if ctx.task in ("sequence-classification", "token-classification"):
            heads = [t for t in targets if t in CLASSIFICATION_HEADS]
            if heads:
                problems.append(
                    Problem(
                        f"{path}.target_modules",
                        f"{', '.join(repr(h) for h in heads)} is the task head, which is already trained "
                        "in full and saved with the adapter; remove it from target_modules",
                    )
                )
        both = sorted(set(targets) & set(options.modules_to_save))
        if both:
            problems.append(
                Problem(
                    f"{path}.modules_to_save",
                    f"{', '.join(repr(b) for b in both)} is also in target_modules: a module is either "
                    "adapted by LoRA or trained in full, not both",
                )
            )
    hidden = next((config[k] for k in ("hidden_size", "n_embd", "dim") if isinstance(config.get(k), int)), None)
    if hidden is not None and options.r > hidden:
        problems.append(
            Problem(
                f"{path}.r",
                f"must be at most the model's hidden size {hidden}, got {options.r}: a larger rank adds "
                "parameters but no capacity",
            )
        )
    return problems


# ----------------------------------------------------------------------------------------------
# model surgery (torch and peft imported lazily)
# ----------------------------------------------------------------------------------------------


def wrap(model: Any, options: LoraOptions, task_type: str | None, path: str) -> Any:
    """``get_peft_model`` with the options, after checking every name against the model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ModelError(f"{path}: the model already carries a peft adapter; {ADAPTERS_REASON}")
    names = [name for name, _ in model.named_modules()]
    targets = options.target_modules
    if isinstance(targets, list):
        missing = [t for t in targets if not _matches_any(t, names)]
        if missing:
            raise ModelError(
                f"{path}.target_modules: {', '.join(repr(t) for t in missing)} match no module of "
                f"{type(model).__name__}; adaptable modules: {', '.join(adaptable_names(model))} (or 'all-linear')"
            )
    missing_saved = [m for m in options.modules_to_save if not _matches_any(m, names)]
    if missing_saved:
        raise ModelError(
            f"{path}.modules_to_save: {', '.join(repr(m) for m in missing_saved)} match no module of "
            f"{type(model).__name__}"
        )
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    if targets is None and model_type in FALLBACK_TARGETS and not _peft_has_default(model_type):
        targets = list(FALLBACK_TARGETS[model_type])
    config = LoraConfig(
        task_type=task_type,
        r=options.r,
        lora_alpha=int(options.alpha) if options.alpha.is_integer() else options.alpha,  # type: ignore[arg-type]
        lora_dropout=options.dropout,
        target_modules=list(targets) if isinstance(targets, list) else targets,
        bias=options.bias,
        modules_to_save=list(options.modules_to_save) or None,
    )
    try:
        with _quiet():
            return get_peft_model(model, config)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if targets is None and "target_modules" in text:
            raise ModelError(
                f"{path}.target_modules: peft has no default target modules for model type "
                f"'{model_type}'; name them (adaptable modules: {', '.join(adaptable_names(model))}) "
                "or use 'all-linear'"
            ) from error
        raise ModelError(
            f"{path}: peft could not add LoRA to {type(model).__name__} ('{model_type}'): {text}"
        ) from error


def _peft_has_default(model_type: str) -> bool:
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults
    except ImportError:  # pragma: no cover - a peft that moved the table: let peft decide
        return True
    return model_type in defaults


def _matches_any(target: str, module_names: Iterable[str]) -> bool:
    """peft's rule for a list of names: the module's dotted name equals or ends with the target."""
    suffix = "." + target
    return any(name == target or name.endswith(suffix) for name in module_names)


def adaptable_names(model: Any) -> list[str]:
    """Leaf names of the layers LoRA can adapt (linear, Conv1D, embedding, convolution)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    found = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and (isinstance(module, kinds) or type(module).__name__ == "Conv1D")
    }
    return sorted(found)


def lora_layers(model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def adapted_module_names(model: Any) -> list[str]:
    """Leaf names of the layers that got LoRA (``['query', 'value']``)."""
    return sorted({name.rsplit(".", 1)[-1] for name in lora_layers(model)})


def full_modules_names(model: Any) -> list[str]:
    """Leaf names of the modules peft trains in full (the head, ``modules_to_save``)."""
    from peft.utils import ModulesToSaveWrapper

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)})


def _probe_batch(ctx: StageContext) -> dict[str, Any] | None:
    for split in ("eval", "train"):
        for batch in ctx.data.batches(split, limit=1, batch_size=8):
            return {k: v for k, v in batch.items() if k != "labels"}
    return None


def _logits(model: Any, batch: dict[str, Any] | None) -> Any:
    if batch is None:
        return None
    import torch

    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        model.train(training)
    logits = getattr(out, "logits", None)
    return logits.detach().float().cpu() if logits is not None else None


def _replace(handle: ModelHandle, old: Any, new: Any, path: str) -> None:
    """Put the merged model where the PeftModel was (the top, or inside a later wrapper)."""
    if handle.model is old:
        handle.model = new
        return
    for parent in handle.model.modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, new)
                return
    raise ModelError(f"{path}: cannot merge: the LoRA model is no longer part of the stage's model")


@contextmanager
def _quiet() -> Iterator[None]:
    """Hide peft's expected chatter (GPT-2's Conv1D layers need fan_in_fan_out, which peft sets)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*Setting `save_embedding_layers`.*")
        yield


@hookimpl
def tunestack_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="lora",
            options=LoraOptions,
            factory=make_lora,
            contract=contract,
            description="LoRA through peft (defaults per architecture): a plain PEFT adapter folder, or merged",
            examples=(
                '[[stack]]\nmethod = "lora"\nr = 8\nalpha = 16',
                '[[stack]]\nmethod = "lora"\nr = 16\ntarget_modules = "all-linear"\nmerge = true',
            ),
        )
    )
