"""The stack file: TOML parsing, ``--set`` overrides and the schema of every core section.

Method entries (``[[stack]]`` tables) stay raw dictionaries here; each method's own options model
validates them in :mod:`tunestack.validation`.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunestack.errors import Problem, StackError

DEFAULT_MODEL = "minilm"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(Section):
    source: str = Field(
        DEFAULT_MODEL,
        description="'minilm' (the packaged all-MiniLM-L6-v2), a local HF folder, a run folder or a hub id",
    )
    task: str = Field("sequence-classification", description="the task name (see `tunestack methods`)")
    config: dict[str, Any] | None = Field(
        None, description="build a random-init model from this HF config (needs model_type) instead of source"
    )
    tokenizer: str | None = Field(None, description="tokenizer source; default: the model source")
    trust_remote_code: bool = Field(False, description="allow code from the model folder (off by default)")

    @model_validator(mode="after")
    def _config_has_type(self) -> ModelSettings:
        if self.config is not None and "model_type" not in self.config:
            raise ValueError('model.config needs a \'model_type\' key (e.g. "bert", "gpt2", "llama")')
        return self


class DataSettings(Section):
    train: str | None = Field(None, description="training file (.tsv .csv .jsonl or CoNLL columns)")
    eval: str | None = Field(None, description="evaluation file")
    format: Literal["auto", "tsv", "csv", "jsonl", "conll"] = Field("auto", description="file format")
    text: str | list[str] = Field("text", description="text field, or two fields for pairs")
    label: str = Field("label", description="label field")
    tokens: str = Field("tokens", description="token list field (token classification, JSONL)")
    tags: str = Field("tags", description="tag list field (token classification, JSONL)")
    prompt: str = Field("prompt", description="prompt field (causal LM)")
    completion: str = Field("completion", description="completion field (causal LM; loss on it only)")
    tag_column: int = Field(-1, description="CoNLL column holding the tag")
    labels: list[str] | None = Field(None, description="label set in order; default: sorted from train")
    max_train_examples: int | None = Field(None, ge=1, description="random subset of the training file")
    max_eval_examples: int | None = Field(None, ge=1, description="first N evaluation examples")
    max_length: int = Field(128, ge=4, le=8192, description="tokens per example (longer ones are truncated)")

    @model_validator(mode="after")
    def _text_fields(self) -> DataSettings:
        if isinstance(self.text, list) and len(self.text) not in (1, 2):
            raise ValueError("data.text takes one field or two (a pair), got " + str(len(self.text)))
        return self

    @property
    def text_fields(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


TRAIN_KEYS = (
    "epochs",
    "max_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "warmup_ratio",
    "warmup_steps",
    "scheduler",
    "optimizer",
    "max_grad_norm",
    "mixed_precision",
    "checkpoint_every",
    "log_every",
)


class TrainSettings(Section):
    epochs: int = Field(1, ge=0, description="passes over the training data; 0 = no training")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(16, ge=1, description="examples per micro-batch (per process)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = Field(5e-5, gt=0, le=10, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="fraction of steps spent warming up")
    warmup_steps: int = Field(0, ge=0, description="warm-up steps (overrides warmup_ratio when > 0)")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="LR schedule after warm-up")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="optimizer")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; none to disable")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="'auto' uses bf16 on GPUs that have it, fp32 on CPU"
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="optimizer steps between checkpoints; default: end of every epoch"
    )
    log_every: int = Field(10, ge=1, description="optimizer steps between log lines")


class EvalSettings(Section):
    batch_size: int = Field(64, ge=1, description="evaluation batch size")
    latency: bool = Field(True, description="measure CPU latency")
    latency_batch_sizes: list[int] = Field([1, 32], description="batch sizes to time")
    latency_tokens: int | None = Field(None, ge=1, description="tokens per timed example (default: max_length)")
    latency_warmup: int = Field(3, ge=0, description="untimed calls before timing")
    latency_repeats: int = Field(10, ge=1, description="timed calls; the median is reported")
    verify_reload: bool = Field(True, description="reload every artifact and compare its outputs")
    probe_examples: int = Field(8, ge=1, description="examples used to compare outputs across a reload")


class GateSettings(Section):
    metric: str = Field(description="metric name as in metrics.json (e.g. accuracy)")
    min_retention: float | None = Field(None, gt=0, le=2, description="fraction of the previous stage's value")
    min_value: float | None = Field(None, description="absolute floor")
    higher_is_better: bool = Field(True, description="false for loss or perplexity")

    @model_validator(mode="after")
    def _one_bound(self) -> GateSettings:
        if self.min_retention is None and self.min_value is None:
            raise ValueError("a gate needs min_retention or min_value")
        return self


class StageSettings(Section):
    name: str = Field(description="stage name (used in folder names)", pattern=r"^[A-Za-z0-9_.-]+$")
    stack: list[dict[str, Any]] = Field(default_factory=list, description="methods, in order")
    gate: GateSettings | None = Field(None, description="evaluation gate")
    epochs: int | None = Field(None, ge=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0, le=10)
    weight_decay: float | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, le=1)
    warmup_steps: int | None = Field(None, ge=0)
    scheduler: Literal["linear", "cosine", "constant"] | None = None
    optimizer: Literal["adamw", "sgd"] | None = None
    max_grad_norm: float | None = Field(None, gt=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] | None = None
    checkpoint_every: int | None = Field(None, ge=1)
    log_every: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _not_a_parent(cls, value: str) -> str:
        if value in {".", ".."}:
            raise ValueError("a stage name cannot be '.' or '..'")
        return value

    def training(self, defaults: TrainSettings) -> TrainSettings:
        overrides = {k: getattr(self, k) for k in TRAIN_KEYS if getattr(self, k) is not None}
        return defaults.model_copy(update=overrides)


class StackFile(Section):
    name: str | None = Field(None, description="run name; default: the file's stem", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0, description="seed for data order, initialisation and sampling")
    requires: list[str] = Field(default_factory=list, description="distributions that must be installed")
    model: ModelSettings = Field(default_factory=ModelSettings)  # type: ignore[arg-type]
    data: DataSettings = Field(default_factory=DataSettings)  # type: ignore[arg-type]
    train: TrainSettings = Field(default_factory=TrainSettings)  # type: ignore[arg-type]
    eval: EvalSettings = Field(default_factory=EvalSettings)  # type: ignore[arg-type]
    stack: list[dict[str, Any]] | None = Field(None, description="methods of a single-stage file")
    stage: list[StageSettings] | None = Field(None, description="stages of a multi-stage file")

    @field_validator("name")
    @classmethod
    def _not_a_parent(cls, value: str | None) -> str | None:
        if value in {".", ".."}:
            raise ValueError("a run name cannot be '.' or '..'")
        return value

    @model_validator(mode="after")
    def _stack_or_stages(self) -> StackFile:
        if self.stack is not None and self.stage is not None:
            raise ValueError("use either top-level [[stack]] (one stage) or [[stage]] tables, not both")
        if self.stage is not None:
            names = [s.name for s in self.stage]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"stage names must be unique; repeated: {', '.join(dupes)}")
        return self


# ---------------------------------------------------------------------------------------------
# Reading and overriding
# ---------------------------------------------------------------------------------------------

_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML; syntax errors become a StackError with line and column."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        found = _TOML_POSITION.search(message)
        where = f"{source}:{found.group(1)}:{found.group(2)}" if found else source
        reason = _TOML_POSITION.sub("", message).strip()
        raise StackError([Problem("", f"TOML syntax error at {where}: {reason}")], source) from None


def read_stack_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise StackError([Problem("", f"stack file not found: {path}")], str(path))
    if path.is_dir():
        raise StackError([Problem("", f"{path} is a folder; give a .toml stack file")], str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise StackError(
            [Problem("", f"{path} is not UTF-8 text ({error.reason} at byte {error.start})")], str(path)
        ) from None
    return parse_toml(text, str(path))


_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)((?:\[\d+\])*)$")


def parse_key_path(key: str) -> list[str | int]:
    """``stage[1].stack[0].ratio`` -> ``["stage", 1, "stack", 0, "ratio"]``."""
    parts: list[str | int] = []
    for segment in key.split("."):
        found = _SEGMENT.match(segment.strip())
        if not found:
            raise ValueError(f"'{key}' is not a key path like train.epochs or stage[0].stack[1].r")
        parts.append(found.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", found.group(2)))
    return parts


def parse_value(text: str) -> Any:
    """A ``--set`` value is read as TOML (``2``, ``true``, ``[1, 2]``, ``"x"``), else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[Problem]:
    """Apply ``key=value`` overrides in place; return problems instead of raising."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem("--set", f"'{item}' must look like key=value"))
            continue
        key, _, value = item.partition("=")
        try:
            path = parse_key_path(key.strip())
            _set_path(raw, path, parse_value(value.strip()))
        except (ValueError, LookupError, TypeError) as error:
            problems.append(Problem(f"--set {key.strip()}", str(error)))
    return problems


def _set_path(node: Any, path: list[str | int], value: Any) -> None:
    for depth, part in enumerate(path[:-1]):
        nxt = path[depth + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise LookupError(f"there is no entry [{part}] at {format_path(path[: depth + 1])}")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise TypeError(f"{format_path(path[:depth])} is not a table")
            if part not in node:
                if isinstance(nxt, int):
                    raise LookupError(f"there is no {part}[{nxt}] in the stack")
                node[part] = {}
            node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise LookupError(f"there is no entry [{last}] at {format_path(path[:-1])}")
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise TypeError(f"{format_path(path[:-1])} is not a table")
        node[last] = value


def format_path(parts: tuple[Any, ...] | list[Any]) -> str:
    """``("stage", 1, "stack", 0, "ratio")`` -> ``stage[1].stack[0].ratio``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


# ---------------------------------------------------------------------------------------------
# Writing the resolved stack back as TOML (no third-party writer needed for these value types)
# ---------------------------------------------------------------------------------------------


def dump_toml(data: dict[str, Any]) -> str:
    """Serialise a resolved stack (str, numbers, bools, lists, tables, arrays of tables)."""
    lines: list[str] = []
    _dump_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _dump_table(table: dict[str, Any], prefix: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if v is not None and not isinstance(v, dict) and not _is_table_array(v)}
    for key, value in scalars.items():
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        if isinstance(value, dict):
            lines.append("")
            lines.append(f"[{'.'.join(_key(k) for k in [*prefix, key])}]")
            _dump_table(value, [*prefix, key], lines)
        elif _is_table_array(value):
            for item in value:
                lines.append("")
                lines.append(f"[[{'.'.join(_key(k) for k in [*prefix, key])}]]")
                _dump_table(item, [*prefix, key], lines)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _value(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
