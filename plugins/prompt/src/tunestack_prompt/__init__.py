"""``prompt``: templates and verbalizers for zero- and few-shot classification without gradient updates.

Three ways to score a label, chosen by ``scoring`` (``auto``: ``lm`` for causal LMs, ``similarity``
otherwise):

* ``similarity`` (encoders such as the packaged MiniLM): cosine similarity between the mean-pooled
  embedding of the templated input and each label's description (its verbalizer words rendered
  through the template); with ``shots`` the description is mixed with the class prototype (mean
  embedding of k templated training examples);
* ``lm`` (causal LMs): the log-likelihood of each verbalizer after the prompt (the template up to
  ``{label}``), with k in-context examples per class prepended;
* ``cloze`` (masked LMs with an MLM head): ``{label}`` becomes the mask token and each verbalizer
  token is scored there.

The model is wrapped in a small module whose forward returns ``[batch, num_labels]`` logits, so
core's evaluation, latency, save/reload check and ``tunestack predict`` work unchanged. Templates
are applied to raw texts in ``tunestack_transform_examples`` (recorded, so predictions after a
reload are formatted the same way). ``format_only = true`` only applies the template, for a normal
fine-tuning stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from tunestack.api import (
    Contract,
    DataError,
    EvalContext,
    Example,
    ExampleList,
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
    UserError,
    ValidationContext,
    hookimpl,
)
from tunestack_prompt.templates import (
    MASK_SENTINEL,
    Template,
    check_verbalizers,
    cloze_text,
    continuation,
    demonstration,
    description,
    draw_shots,
    input_text,
    parse_template,
    prompt_text,
)

Scoring = Literal["auto", "similarity", "lm", "cloze"]

MODEL_CLASS = {"similarity": "base", "lm": "causal-lm", "cloze": "masked-lm"}

#: model types that are causal LMs (``scoring = "auto"`` picks ``lm`` for them)
CAUSAL_TYPES = frozenset(
    {
        "gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "codegen", "llama", "mistral", "mixtral",
        "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gemma", "gemma2", "gemma3_text",
        "opt", "bloom", "falcon", "olmo", "olmo2", "stablelm", "starcoder2", "granite", "cohere", "mpt",
        "xglm", "smollm3", "ctrl", "openai-gpt", "transfo-xl", "biogpt", "persimmon",
    }
)  # fmt: skip

SOURCE_KEY = "prompt_source"  # Example.extra key: the text and pair this method templated


class PromptOptions(Options):
    template: str = Field(
        "{text} {label}",
        description="the prompt: {text}, {text_pair} and {label} (where the verbalizer goes); {{ }} are braces",
    )
    verbalizers: dict[str, list[str]] = Field(
        {},
        description="label -> one or more words or descriptions, e.g. { positive = ['great', 'good'] }",
    )
    scoring: Scoring = Field(
        "auto",
        description="similarity (encoders), lm (causal LMs), cloze (masked LMs with an MLM head); "
        "auto: lm for causal LMs, similarity otherwise",
    )
    shots: int = Field(0, ge=0, le=1024, description="k training examples per class (0 = zero-shot)")
    shot_seed: int | None = Field(None, ge=0, description="seed of the few-shot draw; default: the stack seed")
    format_only: bool = Field(
        False, description="only apply the template to the inputs (for a fine-tuning stage); no scoring"
    )
    label_template: str | None = Field(
        None,
        description="similarity: how a verbalizer becomes a label description ({label} only); "
        "default: the template with the input left empty",
    )
    prototype_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="similarity with shots: weight of the class prototype vs the description"
    )
    temperature: float = Field(0.05, gt=0.0, le=100.0, description="similarity: logits are cosine / temperature")
    length_normalize: bool = Field(
        True, description="lm: score multi-token verbalizers by their mean (not summed) token log-probability"
    )
    shot_separator: str = Field("\n\n", description="lm/cloze: text between in-context examples and the input")
    mask_token: str | None = Field(
        None, description="cloze: the token written in place of {label}; default: the tokenizer's mask token"
    )

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        parse_template(value)
        return value

    @field_validator("label_template")
    @classmethod
    def _label_template(cls, value: str | None) -> str | None:
        if value is None:
            return value
        fields = parse_template(value).fields
        if fields != ["label"]:
            raise ValueError("a label template uses {label} once and no other placeholder")
        return value

    @field_validator("verbalizers", mode="before")
    @classmethod
    def _words_as_lists(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("verbalizers")
    @classmethod
    def _verbalizers(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for label, words in value.items():
            if not words:
                raise ValueError(f"label '{label}' has no verbalizer words")
            if any(not w.strip() for w in words):
                raise ValueError(f"label '{label}' has an empty verbalizer word")
        return value


def contract(options: PromptOptions) -> Contract:
    if options.format_only:
        return Contract(phases=frozenset({"prepare"}))
    return Contract(
        phases=frozenset({"prepare", "evaluate"}),
        produces=frozenset({"prompt", "structural"}),
        conflicts=frozenset({"prompt"}),
        reasons={"prompt": "the model already answers through a prompt wrapper"},
    )


# ---------------------------------------------------------------------------------------------
# model descriptions (config.json as a dict; no torch)
# ---------------------------------------------------------------------------------------------


def architectures(config: Mapping[str, Any] | None) -> list[str]:
    found = (config or {}).get("architectures") or []
    return [str(a) for a in found] if isinstance(found, list) else []


def is_causal(config: Mapping[str, Any] | None) -> bool:
    if not config:
        return False
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures(config)):
        return True
    return str(config.get("model_type", "")) in CAUSAL_TYPES or bool(config.get("is_decoder"))


def resolve_scoring(scoring: str, config: Mapping[str, Any] | None) -> str:
    """``auto`` -> ``lm`` for causal LMs, ``similarity`` otherwise."""
    if scoring != "auto":
        return scoring
    return "lm" if is_causal(config) else "similarity"


class Prompt(Method[PromptOptions]):
    def __init__(self, options: PromptOptions, slot: Any) -> None:
        super().__init__(options, slot)
        self.template: Template = parse_template(options.template)
        self.scoring: str | None = None if options.scoring == "auto" else options.scoring
        self.mask: str | None = options.mask_token

    # -- planning ------------------------------------------------------------------------------

    @hookimpl
    def tunestack_validate_stage(self, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
        o = self.options
        path = self.slot.path
        problems: list[Problem] = []
        fields = self.template.fields
        text_fields = ctx.stack.data.text_fields
        earlier = self._earlier_prompt(ctx)
        if earlier:
            problems.append(
                Problem(path, f"the inputs are already templated by 'prompt' at {earlier}; use one prompt entry")
            )
        if "text" not in fields:
            problems.append(Problem(f"{path}.template", "the template needs {text} (where the input goes)"))
        if "text_pair" in fields and len(text_fields) < 2 and ctx.task == "sequence-classification":
            problems.append(
                Problem(f"{path}.template", "the template uses {text_pair} but data.text names a single field")
            )
        if o.format_only:
            if o.scoring != "auto":
                problems.append(Problem(f"{path}.scoring", "format_only applies the template only; drop scoring"))
            if o.shots:
                problems.append(Problem(f"{path}.shots", "format_only applies the template only; drop shots"))
            return problems

        if ctx.task != "sequence-classification":
            problems.append(
                Problem(
                    f"{path}.format_only",
                    f"on task '{ctx.task}' prompt can only format inputs (set format_only = true); "
                    "scoring labels needs task 'sequence-classification'",
                )
            )
            return problems
        if stage.trains:
            problems.append(
                Problem(
                    path,
                    "prompt scoring makes no gradient updates: give this stage epochs = 0, or set "
                    "format_only = true to only template the inputs of a fine-tuning stage",
                )
            )
        if not o.verbalizers:
            problems.append(
                Problem(f"{path}.verbalizers", "give one or more words per label, e.g. { positive = ['great'] }")
            )
        elif ctx.stack.data.labels:
            mismatch = check_verbalizers(o.verbalizers, ctx.stack.data.labels)
            if mismatch:
                problems.append(Problem(f"{path}.verbalizers", mismatch))
        mode = resolve_scoring(o.scoring, ctx.model_config)
        self.scoring = mode
        label_from = o.label_template is not None and mode == "similarity"
        if not self.template.has_label and not label_from:
            problems.append(Problem(f"{path}.template", "the template needs {label} (where the verbalizer goes)"))
        if o.label_template is not None and mode != "similarity":
            problems.append(Problem(f"{path}.label_template", f"only similarity scoring uses it (scoring: {mode})"))
        if mode in {"lm", "cloze"} and len(text_fields) == 2 and "text_pair" not in fields:
            problems.append(
                Problem(f"{path}.template", "data.text names two fields: place {text_pair} in the template")
            )
        if o.shots and not ctx.stack.data.train:
            problems.append(Problem(f"{path}.shots", "few-shot examples are drawn from data.train; give a train file"))
        config = ctx.model_config
        archs = architectures(config)
        if mode == "lm":
            if self.template.has_label and not self.template.text_before_label():
                problems.append(
                    Problem(
                        f"{path}.template",
                        "lm scoring continues the prompt: {label} must come after {text} (and {text_pair})",
                    )
                )
            if config is not None and not is_causal(config):
                problems.append(
                    Problem(
                        f"{path}.scoring",
                        f"lm scoring needs a causal LM, but the model is '{config.get('model_type')}'"
                        + (f" ({', '.join(archs)})" if archs else "")
                        + "; use scoring = 'similarity'",
                    )
                )
        if mode == "cloze" and archs and not any("ForMaskedLM" in a for a in archs):
            problems.append(
                Problem(
                    f"{path}.scoring",
                    f"cloze needs a masked-LM head, but the model's config.json lists architectures "
                    f"{archs} (no ...ForMaskedLM class): its checkpoint has no MLM head weights, so the "
                    "verbalizers would be scored by a random head; use scoring = 'similarity'",
                )
            )
        if mode in {"lm", "cloze"}:
            where = self._not_fresh(stage, ctx)
            if where:
                problems.append(
                    Problem(
                        f"{path}.scoring",
                        f"{mode} scoring loads the model with its {MODEL_CLASS[mode]} head, which only the "
                        f"first stage on a model source can do ({where}); use scoring = 'similarity'",
                    )
                )
        return problems

    def _earlier_prompt(self, ctx: ValidationContext) -> str | None:
        stack = ctx.stack
        if stack.stage is None:
            entries = [("", i, e) for i, e in enumerate(stack.stack or [])]
        else:
            entries = [
                (f"stage[{s}].", i, e)
                for s, stage in enumerate(stack.stage)
                if stage is not None and s <= self.slot.stage_index
                for i, e in enumerate(stage.stack)
            ]
        for prefix, index, entry in entries:
            if f"{prefix}stack[{index}]" == self.slot.path:
                return None
            if isinstance(entry, dict) and entry.get("method") == self.slot.method:
                return f"{prefix}stack[{index}]"
        return None

    def _not_fresh(self, stage: StagePlan, ctx: ValidationContext) -> str | None:
        if stage.index > 0:
            return f"this is stage {stage.index}, which starts from the previous stage's model"
        if ctx.stack.model.config is None:
            source = Path(ctx.stack.model.source).expanduser()
            source = source if source.is_absolute() else ctx.base_dir / source
            if (source / "manifest.json").is_file() and (source / "model").is_dir():
                return "model.source is a previous run, which keeps its own head"
        return None

    @hookimpl
    def tunestack_model_class(self, stage: StagePlan, task: str) -> str | None:
        if self.options.format_only:
            return None
        return MODEL_CLASS[self.scoring or "similarity"]

    # -- inputs --------------------------------------------------------------------------------

    @hookimpl
    def tunestack_transform_examples(self, examples: ExampleList, split: str, ctx: StageContext | None) -> None:
        examples[:] = [self.format(example) for example in examples]

    def format(self, example: Example) -> Example:
        """One example with the template applied (what the model sees)."""
        t = self.template
        if example.text is None and (example.prompt is not None or example.completion is not None):
            return self._format_lm_data(example)
        extra = {**example.extra, SOURCE_KEY: {"text": example.text, "text_pair": example.text_pair}}
        pair = None if "text_pair" in t.fields else example.text_pair
        mode = "format" if self.options.format_only else (self.scoring or "similarity")
        if mode in {"lm", "cloze"} and example.text_pair is not None and "text_pair" not in t.fields:
            raise DataError(f"{example.where}: this example is a pair; place {{text_pair}} in the prompt template")
        if mode == "lm":
            return example.with_(text=prompt_text(t, example.text, example.text_pair), text_pair=None, extra=extra)
        if mode == "cloze":
            mask = self.mask or MASK_SENTINEL
            return example.with_(text=cloze_text(t, example.text, example.text_pair, mask), text_pair=None, extra=extra)
        return example.with_(text=input_text(t, example.text, example.text_pair), text_pair=pair, extra=extra)

    def _format_lm_data(self, example: Example) -> Example:
        """Causal-LM data (``format_only``): the template up to ``{label}`` around the prompt; the
        completion stays the target. Plain-text rows (no prompt) become the whole rendered template."""
        t = self.template
        if not example.prompt:
            return example.with_(completion=input_text(t, example.completion, None))
        if not t.has_label:
            return example.with_(prompt=t.render(example.prompt, None, ""))
        before, space, after = t.split_at_label()
        completion = example.completion or ""
        if completion:
            completion = space + completion.lstrip() + after.render(example.prompt, None, "")
        return example.with_(prompt=before.render(example.prompt, None, ""), completion=completion)

    # -- the model -----------------------------------------------------------------------------

    @hookimpl
    def tunestack_prepare(self, model: ModelHandle, ctx: StageContext) -> None:
        o = self.options
        if o.format_only:
            model.record_transform(self, {"format_only": True, "template": o.template})
            ctx.report(self, "format_only", True)
            ctx.report(self, "template", o.template)
            return
        import torch

        mode = self.scoring or resolve_scoring(o.scoring, _config_dict(model.model))
        self.scoring = mode
        labels = list(model.labels)
        mismatch = check_verbalizers(o.verbalizers, labels)
        if mismatch:
            raise UserError(f"{self.slot.path}.verbalizers: {mismatch}")
        if mode in {"lm", "cloze"} and model.auto_class != MODEL_CLASS[mode]:
            raise UserError(
                f"{self.slot.path}.scoring: {mode} scoring needs the model loaded as '{MODEL_CLASS[mode]}', "
                f"but it was loaded as '{model.auto_class}'; use scoring = 'similarity'"
            )
        tokenizer = model.tokenizer
        max_length = ctx.stack.data.max_length
        train = list(ctx.data.train_examples or [])
        seed = o.shot_seed if o.shot_seed is not None else ctx.seed
        try:
            shot_ids = draw_shots([e.label for e in train], labels, o.shots, seed)
        except ValueError as error:
            raise DataError(f"{self.slot.path}.shots: {error}") from None
        shots = [train[i] for i in shot_ids]
        if mode == "cloze":
            self.mask = o.mask_token or tokenizer.mask_token
            if not self.mask:
                raise UserError(f"{self.slot.path}.scoring: the tokenizer has no mask token; cloze needs one")
            _replace_sentinel(ctx, self.mask)
        settings: dict[str, Any] = {
            "format": 1,
            "scoring": mode,
            "labels": labels,
            "template": o.template,
            "label_template": o.label_template,
            "verbalizers": {label: list(o.verbalizers[label]) for label in labels},
            "shots": o.shots,
            "shot_seed": seed,
            "shot_ids": shot_ids,
            "shot_examples": [{"where": e.where, "label": e.label} for e in shots],
            "temperature": o.temperature,
            "prototype_weight": o.prototype_weight,
            "length_normalize": o.length_normalize,
            "shot_separator": o.shot_separator,
        }
        with torch.no_grad():
            if mode == "similarity":
                wrapper = self._similarity(model, ctx, settings, shots, max_length)
            else:
                wrapper = self._token_scorer(model, settings, shots, mode, max_length)
        wrapper.eval()
        model.model = wrapper
        record = model.record_transform(self, settings)
        # A reloaded model formats its inputs with a method instance built from the record's options
        # alone, so the record carries what was resolved here: the scoring mode ("auto" -> lm or
        # similarity decides how the text is cut) and the tokenizer's mask token.
        record.options["scoring"] = mode
        if mode == "cloze":
            record.options["mask_token"] = self.mask
        ctx.report(self, "scoring", mode)
        ctx.report(self, "shots", o.shots)
        ctx.report(self, "shot_seed", seed)
        ctx.report(self, "shot_examples", [e.where for e in shots])
        ctx.report(self, "labels", labels)

    def _similarity(
        self, model: ModelHandle, ctx: StageContext, settings: dict[str, Any], shots: list[Example], max_length: int
    ) -> Any:
        from tunestack_prompt import scoring

        describe = parse_template(self.options.label_template) if self.options.label_template else self.template
        descriptions = {
            label: [description(describe, word) for word in words] for label, words in settings["verbalizers"].items()
        }
        settings["descriptions"] = descriptions
        by_label: dict[str, list[tuple[str, str | None]]] = {}
        for example in shots:
            by_label.setdefault(example.label or "", []).append((example.text or "", example.text_pair))
        return scoring.build_similarity(
            model.model, model.tokenizer, settings, descriptions, by_label, max_length, ctx.data.batch_size
        )

    def _token_scorer(
        self, model: ModelHandle, settings: dict[str, Any], shots: list[Example], mode: str, max_length: int
    ) -> Any:
        from tunestack_prompt import scoring

        tokenizer = model.tokenizer
        path = self.slot.path
        head, tail = scoring.special_layout(tokenizer)
        words, owners = [], []
        too_long = []
        for index, label in enumerate(settings["labels"]):
            for word in settings["verbalizers"][label]:
                ids = tokenizer(continuation(self.template, word), add_special_tokens=False)["input_ids"]
                if not ids:
                    raise UserError(f"{path}.verbalizers: '{word}' ({label}) has no tokens")
                if mode == "cloze" and len(ids) != 1:
                    too_long.append(f"'{word}' ({len(ids)} tokens)")
                words.append(ids)
                owners.append(index)
        if too_long:
            raise UserError(
                f"{path}.verbalizers: cloze scores one token at the mask; these verbalizers are several "
                f"tokens for this tokenizer: {', '.join(too_long)}"
            )
        demos = []
        for example in shots:
            source = example.extra.get(SOURCE_KEY) or {"text": example.text, "text_pair": example.text_pair}
            first = settings["verbalizers"][example.label or ""][0]
            demos.append(demonstration(self.template, source["text"], source["text_pair"], first))
        separator = self.options.shot_separator
        prefix = tokenizer(separator.join(demos) + separator, add_special_tokens=False)["input_ids"] if demos else []
        config = _config_dict(model.model)
        limit = config.get("n_positions") or config.get("max_position_embeddings")
        needed = len(prefix) + max_length + max(len(w) for w in words)
        if isinstance(limit, int) and demos and needed > limit:
            raise UserError(
                f"{path}.shots: {len(demos)} in-context examples take {len(prefix)} tokens; with "
                f"data.max_length = {max_length} the input needs up to {needed} positions, more than the "
                f"model's {limit}; lower shots or data.max_length"
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        start = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), pad)
        settings.update(
            {
                "head": head,
                "tail": tail,
                "pad_id": int(pad),
                "start_id": int(start),
                "prefix_tokens": len(prefix),
                "demonstrations": demos,
            }
        )
        if mode == "cloze":
            mask_id = tokenizer.convert_tokens_to_ids(self.mask)
            if mask_id is None or mask_id == tokenizer.unk_token_id:
                raise UserError(f"{path}.mask_token: '{self.mask}' is not a token of this tokenizer")
            settings["mask_id"] = int(mask_id)
            settings["mask_token"] = self.mask
        return scoring.build_token_scorer(model.model, settings, words, owners, prefix)

    # -- artifacts -----------------------------------------------------------------------------

    @hookimpl
    def tunestack_save(self, model: Any, folder: Path, record: TransformRecord) -> Saved:
        import json

        if record.state.get("format_only"):
            (folder / "prompt.json").write_text(json.dumps(record.state, indent=2) + "\n", encoding="utf-8")
            return Saved(model=model)
        from tunestack_prompt import scoring

        if not isinstance(model, scoring.PromptClassifier):
            raise TypeError(f"expected the prompt wrapper to save, got {type(model).__name__}")
        scoring.save_wrapper(model, folder)
        return Saved(model=model.inner)

    @hookimpl
    def tunestack_rebuild(self, model: Any, folder: Path, record: TransformRecord) -> Any:
        if record.state.get("format_only"):
            return model
        from tunestack_prompt import scoring

        wrapper = scoring.load_wrapper(model, folder)
        wrapper.eval()
        return wrapper

    @hookimpl
    def tunestack_evaluate(self, model: ModelHandle, ctx: EvalContext) -> dict[str, Any] | None:
        settings = getattr(model.model, "settings", None)
        if self.options.format_only or not isinstance(settings, dict):
            return None
        return {
            "scoring": settings["scoring"],
            "shots": int(settings["shots"]),
            "shot_examples": len(settings["shot_ids"]),
            "verbalizer_words": sum(len(w) for w in settings["verbalizers"].values()),
        }


def _config_dict(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    try:
        return dict(config.to_dict())
    except Exception:  # a config without to_dict is described as unknown
        return {}


def _replace_sentinel(ctx: StageContext, mask: str) -> None:
    """Cloze inputs templated before the tokenizer was known carry a placeholder for the mask."""
    for split in ("train_examples", "eval_examples"):
        items = getattr(ctx.data, split)
        if items:
            setattr(
                ctx.data,
                split,
                [e.with_(text=e.text.replace(MASK_SENTINEL, mask)) if e.text else e for e in items],
            )


@hookimpl
def tunestack_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="prompt",
            options=PromptOptions,
            factory=Prompt,
            contract=contract,
            description="prompt templates and verbalizers: zero- and few-shot classification without gradient updates",
            tasks=frozenset({"sequence-classification", "causal-lm"}),
            examples=(
                '[[stack]]\nmethod = "prompt"\ntemplate = "Review: {text} Sentiment: {label}"\n'
                'verbalizers = { positive = ["great", "good"], negative = ["terrible", "bad"] }\nshots = 4',
            ),
        )
    )
