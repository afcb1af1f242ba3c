"""``prefix``: prefix tuning (learned keys/values in every attention layer) and prompt tuning
(learned virtual-token embeddings in front of the input). The base model stays frozen; only the
prefix or prompt (and, by default, the classification head) train.

Backends, chosen from the mode and the model:

* ``mode = "prompt"`` (any model): ``P`` virtual-token embeddings, optionally initialised from the
  embeddings of ``init_text`` (``_prompt.py``);
* ``mode = "prefix"`` on GPT-2/Llama-like decoders: peft's ``PrefixTuning`` (``_peft.py``; a
  signature shim makes it work for classification under transformers 5.x);
* ``mode = "prefix"`` on BERT-like encoders: our own key/value injection through a registered
  attention function (``_kv.py``), since peft cannot drive these models any more.

The wrapper is a transform: ``tunestack_save`` stores only the prefix/prompt (safetensors + JSON)
and hands core the plain base model with its trained head; ``tunestack_rebuild`` re-wraps it.
Nothing heavy is imported at module import time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

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

ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra"})  # keep in step with _common
DECODER_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})
TASKS = frozenset({"sequence-classification", "token-classification", "causal-lm"})
CONFIG_FILE = "prefix_config.json"
TENSORS_FILE = "prefix.safetensors"


class PrefixOptions(Options):
    mode: Literal["prefix", "prompt"] = Field(
        "prefix",
        description="'prefix': learned keys/values in every attention layer (prefix tuning); "
        "'prompt': learned virtual-token embeddings in front of the input (prompt tuning)",
    )
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="number of virtual tokens P")
    projection: bool = Field(
        False,
        description="prefix mode: learn the prefix through a reparametrisation MLP "
        "(embedding -> Linear -> tanh -> Linear, Li & Liang); folded into a plain table when saved",
    )
    projection_hidden: int = Field(512, ge=1, le=65536, description="hidden size of the reparametrisation MLP")
    init_text: str | None = Field(
        None,
        min_length=1,
        description="initialise from this text (e.g. 'Classify the sentiment of this review'): prompt "
        "mode takes its token embeddings, prefix mode the keys/values the model computes for it; "
        "repeated or cut to num_virtual_tokens. Default: the text-start tokens ([CLS]) then words sampled "
        "from the vocabulary",
    )
    train_head: bool = Field(
        True, description="train the classification head too (a causal LM's output layer always stays frozen)"
    )


CONTRACT = Contract(
    phases=frozenset({"prepare", "train"}),
    requires=frozenset({"float-weights"}),
    conflicts=frozenset({"adapters"}),
    produces=frozenset({"adapters", "structural"}),
    reasons={
        "float-weights": "the frozen model must run in floating point while the prefix trains through it",
        "adapters": "the learned prefix/prompt stays in the model as extra parameters (there is nothing to "
        "merge into the weights); the prefix wraps a plain model, so merge an earlier adapter first",
        "structural": "inputs get virtual tokens, or attention layers extra keys/values; rebuilt from "
        "transforms/ when the model is loaded",
    },
)


class Prefix(Method[PrefixOptions]):
    name = "prefix"

    # -- validation (no torch) -------------------------------------------------------------------

    @hookimpl
    def tunestack_validate_stage(self, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
        path, o = self.slot.path, self.options
        problems: list[Problem] = []
        given = o.model_fields_set
        if not stage.trains:
            problems.append(
                Problem(path, f"{o.mode} tuning learns its {o.mode} in training: the stage must train (epochs > 0)")
            )
        if o.mode == "prompt":
            for key in ("projection", "projection_hidden"):
                if key in given and (key != "projection" or o.projection):
                    problems.append(Problem(f"{path}.{key}", "applies to mode = 'prefix' only"))
        elif "projection_hidden" in given and not o.projection:
            problems.append(Problem(f"{path}.projection_hidden", "needs projection = true"))
        if o.mode == "prefix" and o.projection and o.init_text is not None:
            problems.append(
                Problem(
                    f"{path}.init_text",
                    "cannot initialise a reparametrised prefix (projection = true) from a text; "
                    "set projection = false or drop init_text",
                )
            )
        if ctx.task not in TASKS:
            problems.append(Problem(f"{path}.mode", f"supports the tasks {', '.join(sorted(TASKS))}, not '{ctx.task}'"))
        problems.extend(self._model_problems(ctx))
        return problems

    def _model_problems(self, ctx: ValidationContext) -> list[Problem]:
        config = ctx.model_config
        if not config:
            return []
        path, o = self.slot.path, self.options
        problems = []
        model_type = str(config.get("model_type", ""))
        backend = _backend(o.mode, model_type)
        if o.mode == "prefix":
            if model_type in ENCODER_TYPES and ctx.task == "causal-lm":
                problems.append(
                    Problem(
                        f"{path}.mode",
                        f"prefix mode on a BERT-like encoder ('{model_type}') supports sequence and token "
                        "classification, not causal-lm; use mode = 'prompt'",
                    )
                )
            elif backend is None:
                problems.append(
                    Problem(
                        f"{path}.mode",
                        f"prefix mode supports the model types {', '.join(sorted(ENCODER_TYPES | DECODER_TYPES))}, "
                        f"not '{model_type}'; mode = 'prompt' works with any model",
                    )
                )
        positions = config.get("max_position_embeddings", config.get("n_positions"))
        shifted = backend in ("prompt", "peft")  # real tokens start at position P
        max_length = ctx.stack.data.max_length
        if shifted and isinstance(positions, int) and o.num_virtual_tokens + max_length > positions:
            problems.append(
                Problem(
                    f"{path}.num_virtual_tokens",
                    f"{o.num_virtual_tokens} virtual tokens + data.max_length {max_length} = "
                    f"{o.num_virtual_tokens + max_length} positions, but the model has {positions}",
                )
            )
        return problems

    # -- lifecycle -----------------------------------------------------------------------------------

    @hookimpl
    def tunestack_prepare(self, model: ModelHandle, ctx: StageContext) -> None:
        from tunestack_prefix import _common

        base = model.model
        if not hasattr(base, "config") or not hasattr(base, "get_input_embeddings") or hasattr(base, "peft_config"):
            raise ValueError(
                f"prefix needs a plain transformers model, got {type(base).__name__} (an earlier method wrapped it)"
            )
        o = self.options
        kind = _common.task_kind(model.auto_class)
        model_type = str(getattr(base.config, "model_type", ""))
        backend = _backend(o.mode, model_type)
        if backend is None or (backend == "kv" and kind == "causal"):
            raise ValueError(f"prefix mode does not support '{model_type}' for {model.auto_class}; use mode = 'prompt'")
        vocab = base.get_input_embeddings().num_embeddings
        ids = _common.init_token_ids(model.tokenizer, o.init_text, o.num_virtual_tokens, vocab, ctx.seed)
        heads = _common.head_names(base, kind)
        state: dict[str, Any] = {"backend": backend, "kind": kind, "num_virtual_tokens": o.num_virtual_tokens}
        if backend == "prompt":
            from tunestack_prefix._prompt import PromptModel, embeddings_of

            _common.freeze_all_but(base, heads if o.train_head else set())
            state["virtual_token_id"] = _common.virtual_token_id(base.config)
            wrapped: Any = PromptModel(base, embeddings_of(base, ids), state["virtual_token_id"], kind)
            prefix_params = wrapped.prompt.numel()
        elif backend == "kv":
            from tunestack_prefix._kv import KVPrefixModel, PrefixKV, capture_kv

            config = base.config
            head_dim = config.hidden_size // config.num_attention_heads
            init = None if o.projection else capture_kv(base, ids)
            prefix = PrefixKV(
                config.num_hidden_layers,
                config.num_attention_heads,
                head_dim,
                o.num_virtual_tokens,
                projection=o.projection_hidden if o.projection else None,
                init=init,
            )
            _common.freeze_all_but(base, heads if o.train_head else set())
            wrapped = KVPrefixModel(base, prefix)
            prefix_params = sum(p.numel() for p in prefix.parameters())
        else:
            from tunestack_prefix import _peft

            table = None if o.projection else _peft.table_from_cache(base, ids)
            wrapped = _peft.wrap(
                base, kind, o.num_virtual_tokens, o.projection_hidden if o.projection else None, table, o.train_head
            )
            prefix_params = sum(p.numel() for p in wrapped.prompt_encoder.parameters())
        model.model = wrapped
        model.record_transform(self, state)
        trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        total = sum(p.numel() for p in wrapped.parameters())
        ctx.report(self, "backend", _BACKEND_NAMES[backend])
        ctx.report(self, "virtual_tokens", o.num_virtual_tokens)
        ctx.report(self, "prefix_params", prefix_params)
        ctx.report(self, "head_params", trainable - prefix_params)
        ctx.report(self, "trainable_params", trainable)
        ctx.report(self, "total_params", total)
        ctx.report(self, "trainable_fraction", trainable / total if total else 0.0)

    @hookimpl
    def tunestack_save(self, model: Any, folder: Path, record: TransformRecord) -> Saved:
        import json

        backend = record.state.get("backend")
        info = {**record.state, "mode": self.options.mode, "format": 1}
        if backend == "peft":
            from tunestack_prefix import _peft

            if not hasattr(model, "peft_config"):
                raise ValueError(f"expected the peft prefix model, got {type(model).__name__}")
            _peft.save(model, folder)
            info["folded"] = bool(self.options.projection)
            (folder / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            return Saved(model=_peft.unwrap(model), claimed=set())
        from safetensors.torch import save_file

        if getattr(model, "backend", None) != backend:
            raise ValueError(f"expected the {backend} prefix wrapper, got {type(model).__name__}")
        tensors = model.tensors()
        info["folded"] = backend == "kv" and bool(self.options.projection)
        info["shapes"] = {k: list(v.shape) for k, v in tensors.items()}
        save_file(tensors, str(folder / TENSORS_FILE), metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return Saved(model=model.unwrap(), claimed=set())

    @hookimpl
    def tunestack_rebuild(self, model: Any, folder: Path, record: TransformRecord) -> Any:
        state = record.state
        backend, kind = state["backend"], state["kind"]
        if backend == "peft":
            from tunestack_prefix import _peft

            return _peft.rebuild(model, folder, kind)
        from safetensors.torch import load_file

        tensors = load_file(str(folder / TENSORS_FILE))
        if backend == "prompt":
            from tunestack_prefix._prompt import PromptModel

            return PromptModel(model, tensors["prompt"], int(state["virtual_token_id"]), kind)
        from tunestack_prefix._kv import KVPrefixModel, PrefixKV

        table = tensors["prefix_kv"]
        layers, _, heads, count, head_dim = table.shape
        return KVPrefixModel(model, PrefixKV(layers, heads, head_dim, count, init=table))


_BACKEND_NAMES = {
    "prompt": "prompt tuning (own virtual-token embeddings)",
    "kv": "prefix tuning (own key/value injection, registered attention function)",
    "peft": "prefix tuning (peft PrefixTuning)",
}


def _backend(mode: str, model_type: str) -> str | None:
    if mode == "prompt":
        return "prompt"
    if model_type in ENCODER_TYPES:
        return "kv"
    if model_type in DECODER_TYPES:
        return "peft"
    return None


@hookimpl
def tunestack_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="prefix",
            options=PrefixOptions,
            factory=Prefix,
            contract=CONTRACT,
            description="prefix tuning (learned keys/values per layer) or prompt tuning (learned virtual tokens)",
            tasks=TASKS,
            examples=(
                '[[stack]]\nmethod = "prefix"\nnum_virtual_tokens = 20',
                '[[stack]]\nmethod = "prefix"\nmode = "prompt"\ninit_text = "Classify the sentiment of this review"',
            ),
        )
    )
