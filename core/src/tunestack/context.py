"""Typed objects that hooks receive. No torch import at module level: validation uses some of them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from tunestack.methods import Contract, MethodSpec, Options, Slot

if TYPE_CHECKING:
    import torch

    from tunestack.data import Example
    from tunestack.stack import EvalSettings, GateSettings, StackFile, TrainSettings
    from tunestack.tasks import Task

T = TypeVar("T")


class StashKey(Generic[T]):
    """A typed key for :class:`Stash` (the way pytest's ``StashKey`` works)."""

    __slots__ = ()


class Stash:
    """Per-stage storage for plugin state, keyed by :class:`StashKey` objects, not strings."""

    def __init__(self) -> None:
        self._items: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._items[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return self._items[key]  # type: ignore[no-any-return,unused-ignore]

    def get(self, key: StashKey[T], default: T) -> T:
        return self._items.get(key, default)  # type: ignore[no-any-return,unused-ignore]

    def __contains__(self, key: object) -> bool:
        return key in self._items


ExampleList = list  # a mutable list of task examples; hooks replace items in place


@dataclass
class PlannedMethod:
    """One ``[[stack]]`` entry after validation: spec, typed options, contract and its instance."""

    slot: Slot
    spec: MethodSpec
    options: Options
    contract: Contract
    instance: object
    plugin: str  # the plugin (entry point) that registered the method

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class StagePlan:
    """A stage with training settings resolved (stage keys over ``[train]`` over defaults)."""

    name: str
    index: int
    path: str  # "" for a file with a top-level [[stack]], else "stage[i]"
    train: TrainSettings
    methods: list[PlannedMethod]
    gate: GateSettings | None = None
    tags_before: frozenset[str] = frozenset()
    tags_after: frozenset[str] = frozenset()

    @property
    def trains(self) -> bool:
        return self.train.epochs > 0 or (self.train.max_steps or 0) > 0

    @property
    def folder_name(self) -> str:
        return f"{self.index:02d}-{self.name}"


@dataclass
class ValidationContext:
    """What validation knows without loading weights."""

    stack: StackFile
    model_config: Mapping[str, Any] | None  # config.json of the source, when readable
    task: str
    base_dir: Path


@dataclass
class TransformRecord:
    """A structural change a method made that must be rebuilt when the artifact is loaded.

    ``state`` is JSON-serialisable: what the method needs to rebuild (its own choices, never
    tensors). ``folder`` is the subfolder of the model folder the method's ``tunestack_save`` uses.
    """

    method: str
    options: dict[str, Any]
    slot: Slot
    state: dict[str, Any] = field(default_factory=dict)
    claimed: list[str] = field(default_factory=list)  # state-dict keys stored by the method itself
    tags: list[str] = field(default_factory=list)  # what the method's contract produces ("adapters", ...)

    @property
    def folder(self) -> str:
        return f"transforms/{self.slot.key}"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "options": self.options,
            "slot": {
                "path": self.slot.path,
                "stage": self.slot.stage,
                "stage_index": self.slot.stage_index,
                "index": self.slot.index,
            },
            "state": self.state,
            "claimed": self.claimed,
            "tags": self.tags,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TransformRecord:
        slot = data["slot"]
        return cls(
            method=str(data["method"]),
            options=dict(data.get("options", {})),
            slot=Slot(
                method=str(data["method"]),
                path=str(slot["path"]),
                stage=str(slot["stage"]),
                stage_index=int(slot["stage_index"]),
                index=int(slot["index"]),
            ),
            state=dict(data.get("state", {})),
            claimed=list(data.get("claimed", [])),
            tags=list(data.get("tags", [])),
        )


@dataclass
class ModelHandle:
    """The model as it travels through a stage, with what is needed to save and reload it."""

    model: Any  # torch.nn.Module
    tokenizer: Any
    task: Task
    labels: list[str]
    auto_class: str
    transforms: list[TransformRecord] = field(default_factory=list)
    tags: frozenset[str] = frozenset()
    trust_remote_code: bool = False

    def record_transform(self, method: object, state: Mapping[str, Any] | None = None) -> TransformRecord:
        """Note that ``method`` changed the model's structure so reloads can rebuild it."""
        slot: Slot = method.slot  # type: ignore[attr-defined]
        options: Options = method.options  # type: ignore[attr-defined]
        self.drop_transform(method)
        record = TransformRecord(
            method=slot.method, options=options.model_dump(mode="json"), slot=slot, state=dict(state or {})
        )
        self.transforms.append(record)
        return record

    def drop_transform(self, method: object) -> None:
        """Forget ``method``'s record (after a LoRA merge, nothing is left to rebuild)."""
        slot: Slot = method.slot  # type: ignore[attr-defined]
        self.transforms = [r for r in self.transforms if r.slot.key != slot.key]

    def has_transform(self, method_name: str) -> bool:
        return any(r.method == method_name for r in self.transforms)


@dataclass
class StepOutput:
    """What a training step returns: the loss to back-propagate and the model outputs."""

    loss: Any  # torch.Tensor (scalar)
    outputs: Any = None
    logs: dict[str, float] = field(default_factory=dict)  # extra scalars for the log


class StageData:
    """Encoded data of a stage, with helpers to draw batches (calibration, few-shot prototypes)."""

    def __init__(
        self,
        train: list[Example] | None,
        eval: list[Example] | None,
        make_batches: Callable[[list[Example], int, bool, int], Iterator[dict[str, torch.Tensor]]],
        batch_size: int,
    ) -> None:
        self.train_examples = train
        self.eval_examples = eval
        self._make_batches = make_batches
        self.batch_size = batch_size

    def examples(self, split: str) -> list[Example]:
        found = self.train_examples if split == "train" else self.eval_examples
        return list(found or [])

    def batches(
        self, split: str = "train", limit: int | None = None, batch_size: int | None = None, seed: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Tokenised, padded batches of a split, shuffled by ``seed`` (0 keeps file order)."""
        size = batch_size or self.batch_size
        examples = self.examples(split)
        if limit is not None:  # encode only what is asked for (calibration, probes)
            if seed != 0:
                import random

                random.Random(seed).shuffle(examples)
            yield from self._make_batches(examples[: limit * size], size, False, 0)
            return
        yield from self._make_batches(examples, size, seed != 0, seed)


@dataclass
class StageContext:
    """Everything a lifecycle hook may need about the running stage."""

    stage: StagePlan
    stack: StackFile
    run_dir: Path
    seed: int
    data: StageData
    device: Any
    accelerator: Any
    tokenizer: Any = None
    stash: Stash = field(default_factory=Stash)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_parameters: list[Any] = field(default_factory=list)
    base_dir: Path = Path(".")

    def report(self, method: object, key: str, value: Any) -> None:
        """Record a fact about what ``method`` did (goes into the manifest and the summary)."""
        slot: Slot = method.slot  # type: ignore[attr-defined]
        self.reports.setdefault(slot.key, {})[key] = value

    def add_parameters(self, params: Iterable[Any]) -> None:
        """Train these parameters too (a KD projection, for instance) without saving them."""
        self.extra_parameters.extend(params)

    def resolve_path(self, value: str | Path) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)


@dataclass
class StepContext:
    """Per-step information for ``tunestack_train_step``."""

    step: int  # optimizer steps completed so far
    micro_step: int
    epoch: int
    stage: StageContext

    @property
    def stash(self) -> Stash:
        return self.stage.stash

    @property
    def device(self) -> Any:
        return self.stage.device


@dataclass
class EvalContext:
    """What ``tunestack_evaluate`` gets: data, settings and where the artifact lies."""

    task: Task
    examples: list[Example]
    make_batches: Callable[[list[Example], int], Iterator[dict[str, Any]]]
    settings: EvalSettings
    model_dir: Path | None
    max_length: int
    trainable_params: int | None = None
    device: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def batches(self, batch_size: int | None = None) -> Iterator[dict[str, Any]]:
        return self.make_batches(self.examples, batch_size or self.settings.batch_size)
