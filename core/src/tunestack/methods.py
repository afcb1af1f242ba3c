"""What a plugin declares about a method: its name, typed options and capability contract.

Nothing here imports torch: the whole stack is validated against these declarations before any
weights are loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

Phase = Literal["prepare", "train", "compress", "evaluate"]
PHASES: tuple[Phase, ...] = ("prepare", "train", "compress", "evaluate")

#: Capability tags core knows the meaning of. Plugins may use their own tags too.
KNOWN_TAGS: Mapping[str, str] = {
    "float-weights": "weights are floating point (true for every model a stack starts from)",
    "adapters": "unmerged adapter, LoRA or prefix modules sit in the model",
    "quantized": "weights are stored as integers with scales",
    "pruned": "attention heads, neurons or hidden units were removed",
    "structural": "the method changes module shapes or inserts modules",
    "prompt": "the model is driven by templates and verbalizers",
}
INITIAL_TAGS: frozenset[str] = frozenset({"float-weights"})


class Options(BaseModel):
    """Base for every method's options: unknown keys are errors, values are immutable.

    Give every field a ``description``: ``tunestack methods`` and the docs show it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class Contract(BaseModel):
    """How a method composes with the others in a stack, checked before anything runs.

    Core tracks a set of tags along the stack, starting from ``{"float-weights"}`` (or the tags a
    previous run left). Before a method, every tag in ``requires`` must hold and none in
    ``conflicts``; after it, ``removes`` are dropped and ``produces`` added. A method may also
    forbid later methods from producing certain tags (``forbids_after``: INT8 forbids
    ``structural``). ``reasons`` explains a tag in error messages.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    phases: frozenset[Phase] = Field(description="phases the method acts in")
    requires: frozenset[str] = Field(default=frozenset(), description="tags that must hold before it")
    conflicts: frozenset[str] = Field(default=frozenset(), description="tags that must not hold before it")
    produces: frozenset[str] = Field(default=frozenset(), description="tags that hold after it")
    removes: frozenset[str] = Field(default=frozenset(), description="tags it clears")
    forbids_after: frozenset[str] = Field(default=frozenset(), description="tags no later method may produce")
    needs_training: bool = Field(default=False, description="the method only makes sense in a stage that trains")
    reasons: dict[str, str] = Field(default_factory=dict, description="why, per tag, for error messages")

    def apply(self, tags: frozenset[str]) -> frozenset[str]:
        """The tags that hold after this method ran on a model carrying ``tags``."""
        return (tags - self.removes) | self.produces


ContractSource = Contract | Callable[[Any], Contract]


@dataclass(frozen=True)
class Slot:
    """Where one method entry sits in the stack file.

    ``path`` is its TOML path (``stage[1].stack[0]``), ``key`` a short unique name used for folders
    in the run directory (``s1-0-lora``).
    """

    method: str
    path: str
    stage: str
    stage_index: int
    index: int

    @property
    def key(self) -> str:
        return f"s{self.stage_index}-{self.index}-{self.method}"


OptionsT = TypeVar("OptionsT", bound=Options)


class Method(Generic[OptionsT]):
    """Convenient base for a method's hook object: one instance per stack entry.

    Core registers the instance with the plugin manager while its stage runs, so hook
    implementations are plain methods decorated with ``@hookimpl``. Subclassing is optional: any
    factory ``(options, slot) -> object`` works.
    """

    name: ClassVar[str] = ""

    def __init__(self, options: OptionsT, slot: Slot) -> None:
        self.options = options
        self.slot = slot

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.slot.path} {self.options!r}>"


@dataclass(frozen=True)
class MethodSpec:
    """A method as a plugin registers it through ``tunestack_register_methods``."""

    name: str
    options: type[Options]
    factory: Callable[[Any, Slot], object]
    contract: ContractSource
    description: str = ""
    tasks: frozenset[str] | None = None  # None: every task
    examples: tuple[str, ...] = field(default=())  # TOML snippets for docs and `methods`

    def contract_for(self, options: Options) -> Contract:
        source = self.contract
        return source if isinstance(source, Contract) else source(options)

    def describe_options(self) -> list[dict[str, Any]]:
        """Name, type, default and description of every option (for ``tunestack methods``)."""
        rows = []
        for name, info in self.options.model_fields.items():
            default: Any = None if info.is_required() else info.get_default(call_default_factory=True)
            rows.append(
                {
                    "name": name,
                    "type": _type_name(info.annotation),
                    "required": info.is_required(),
                    "default": _jsonable(default),
                    "description": info.description or "",
                }
            )
        return rows


@dataclass(frozen=True)
class TaskSpec:
    """A task as registered through ``tunestack_register_tasks``.

    ``factory`` builds the task object lazily (it may import torch); the static fields serve
    validation, which must not.
    """

    name: str
    factory: Callable[[], Any]
    description: str = ""
    auto_class: str = "sequence-classification"
    data_fields: tuple[str, ...] = ()


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")


def _jsonable(value: Any) -> Any:
    if isinstance(value, frozenset | set | tuple):
        return sorted(value) if isinstance(value, frozenset | set) else list(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value
