"""Core's tasks and their metrics, registered the way a third-party task plugin would."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tunestack.hookspecs import hookimpl
from tunestack.methods import TaskSpec

if TYPE_CHECKING:
    from tunestack.context import EvalContext, ModelHandle


def _factory(name: str) -> Callable[[], Any]:
    def build() -> Any:
        from tunestack import tasks

        return {
            "sequence-classification": tasks.SequenceClassification,
            "token-classification": tasks.TokenClassification,
            "causal-lm": tasks.CausalLM,
        }[name]()

    return build


@hookimpl
def tunestack_register_tasks(register: Callable[[TaskSpec], None]) -> None:
    register(
        TaskSpec(
            "sequence-classification",
            _factory("sequence-classification"),
            "single texts or pairs -> one label; accuracy and macro-F1",
            auto_class="sequence-classification",
            data_fields=("text", "label"),
        )
    )
    register(
        TaskSpec(
            "token-classification",
            _factory("token-classification"),
            "one tag per word (CoNLL columns or JSONL); seqeval entity P/R/F1 and a per-tag report",
            auto_class="token-classification",
            data_fields=("tokens", "tags"),
        )
    )
    register(
        TaskSpec(
            "causal-lm",
            _factory("causal-lm"),
            "next-token prediction on text or prompt/completion pairs; loss and perplexity",
            auto_class="causal-lm",
            data_fields=("text",),
        )
    )


@hookimpl
def tunestack_evaluate(model: ModelHandle, ctx: EvalContext) -> dict[str, Any] | None:
    """The task's own metrics on the evaluation split."""
    if not ctx.examples:
        return None
    return dict(
        ctx.task.evaluate(
            model.model,
            ctx.examples,
            model.tokenizer,
            model.labels,
            ctx.max_length,
            ctx.settings.batch_size,
            ctx.device,
        )
    )
