"""Turn a stack file into a checked plan, reporting every problem at once with its TOML path.

Runs before torch is imported or weights are loaded: schema, method options, ``requires``, tasks,
data files, capability contracts across stages, and each method's own checks.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from pydantic import BaseModel, ValidationError

from tunestack.context import PlannedMethod, StagePlan, ValidationContext
from tunestack.errors import ModelError, Problem, StackError
from tunestack.methods import INITIAL_TAGS, Contract, Slot
from tunestack.plugins import PluginHost, culprit
from tunestack.sources import SourceRef, read_config, read_run_manifest, resolve_source
from tunestack.stack import StackFile, StageSettings, apply_overrides, format_path, read_stack_file

SINGLE_STAGE_NAME = "main"


@dataclass
class StackPlan:
    """A validated stack: settings, stages with their method instances, and where it came from."""

    stack: StackFile
    stages: list[StagePlan]
    name: str
    base_dir: Path
    source_path: Path | None
    raw: dict[str, Any]
    source: SourceRef | None = None
    model_config: dict[str, Any] | None = None
    initial_tags: frozenset[str] = INITIAL_TAGS
    warnings: list[str] = field(default_factory=list)

    def resolved(self) -> dict[str, Any]:
        """The stack with every default filled in (what the run folder stores)."""
        data = self.stack.model_dump(mode="json", exclude={"stack", "stage"})
        data["name"] = self.name
        for key in ("train", "eval"):  # absolute, so the resolved file works from anywhere
            if data["data"].get(key):
                data["data"][key] = str((self.base_dir / Path(data["data"][key]).expanduser()).resolve())
        if self.source is not None and self.source.kind in {"folder", "run"} and self.source.path is not None:
            data["model"]["source"] = str(self.source.path)
        stages = []
        for plan in self.stages:
            entry: dict[str, Any] = {"name": plan.name, **plan.train.model_dump(mode="json")}
            if plan.gate is not None:
                entry["gate"] = plan.gate.model_dump(mode="json", exclude_none=True)
            entry["stack"] = [{"method": m.name, **m.options.model_dump(mode="json")} for m in plan.methods]
            stages.append(entry)
        data["stage"] = stages
        return data


def load_plan(
    stack: str | Path | dict[str, Any],
    host: PluginHost,
    overrides: list[str] | None = None,
    base_dir: Path | None = None,
) -> StackPlan:
    """Read (if a path), override and validate a stack. Raises StackError listing every problem."""
    if isinstance(stack, dict):
        raw = _deep_copy(stack)
        source_path = None
        label = "stack"
        base = (base_dir or Path.cwd()).resolve()
        default_name = "stack"
    else:
        source_path = Path(stack)
        raw = read_stack_file(source_path)
        label = str(source_path)
        base = (base_dir or source_path.parent).resolve()
        default_name = source_path.stem
    problems = apply_overrides(raw, overrides or [])
    plan = plan_stack(raw, host, base, default_name, problems, source_path)
    if problems:
        raise StackError(problems, label)
    return plan


def plan_stack(
    raw: dict[str, Any],
    host: PluginHost,
    base_dir: Path,
    default_name: str,
    problems: list[Problem],
    source_path: Path | None = None,
) -> StackPlan:
    """Validate ``raw``; append problems to ``problems``; return a plan when the core schema held."""
    try:
        stack = StackFile.model_validate(raw)
    except ValidationError as error:
        problems.extend(pydantic_problems(error, StackFile, raw))
        stack = _salvage(raw)
    _check_requires(stack, problems)
    if stack.model.task not in host.tasks:
        problems.append(Problem("model.task", host.describe_unknown_task(stack.model.task)))
    _check_data_files(stack, base_dir, problems)

    source, model_config, initial_tags = _inspect_model(stack, base_dir, problems)
    stages = _plan_stages(stack, raw, host, problems)
    _check_contracts(stages, initial_tags, stack.model.task, problems)
    if not problems:
        ctx = ValidationContext(stack=stack, model_config=model_config, task=stack.model.task, base_dir=base_dir)
        for stage in stages:
            problems.extend(_run_stage_checks(host, stage, ctx))
    plan = StackPlan(
        stack=stack,
        stages=stages,
        name=stack.name or _safe_name(default_name),
        base_dir=base_dir,
        source_path=source_path,
        raw=raw,
        source=source,
        model_config=model_config,
        initial_tags=initial_tags,
    )
    return plan


# ---------------------------------------------------------------------------------------------


def pydantic_problems(error: ValidationError, model: type[BaseModel], raw: Any, prefix: str = "") -> list[Problem]:
    """Turn pydantic errors into problems with TOML paths and did-you-mean for unknown keys."""
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        path = _join(prefix, format_path(loc))
        kind = item["type"]
        if kind == "extra_forbidden":
            known = _known_keys(model, loc[:-1])
            key = str(loc[-1]) if loc else ""
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            listing = f" (known keys: {', '.join(sorted(known))})" if known and not close else ""
            problems.append(Problem(path, f"unknown key{hint}{listing}"))
        elif kind == "missing":
            problems.append(Problem(path, "required key is missing"))
        elif kind in {"value_error", "assertion_error"}:
            message = item["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            problems.append(Problem(path or prefix, message))
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict | list) else f", got {got!r}"
            problems.append(Problem(path, _plain(item["msg"]) + shown))
    return problems


def _plain(message: str) -> str:
    replacements = {
        "Input should be less than or equal to ": "must be <= ",
        "Input should be greater than or equal to ": "must be >= ",
        "Input should be less than ": "must be < ",
        "Input should be greater than ": "must be > ",
        "Input should be ": "must be ",
    }
    for old, new in replacements.items():
        if message.startswith(old):
            return new + message[len(old) :]
    return message


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _model_in(annotation)
        if current is None:
            return []
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


def _salvage(raw: dict[str, Any]) -> StackFile:
    """The core sections that are valid on their own, so methods still get checked."""
    clean: dict[str, Any] = {}
    for key, value in raw.items():
        if key in {"stack", "stage"}:
            continue
        try:
            StackFile.model_validate({key: value})
        except ValidationError:
            continue
        clean[key] = value
    return StackFile.model_validate(clean)


def _check_requires(stack: StackFile, problems: list[Problem]) -> None:
    missing = []
    for index, text in enumerate(stack.requires):
        try:
            req = Requirement(text)
        except InvalidRequirement as error:
            problems.append(Problem(f"requires[{index}]", f"not a requirement: {error}"))
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            missing.append(f"{text} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(f"{text} (installed: {version})")
    if missing:
        problems.append(Problem("requires", "missing required plugins: " + ", ".join(missing)))


def _check_data_files(stack: StackFile, base_dir: Path, problems: list[Problem]) -> None:
    for key in ("train", "eval"):
        value = getattr(stack.data, key)
        if value is None:
            continue
        path = Path(value).expanduser()
        path = Path(os.path.normpath(path if path.is_absolute() else base_dir / path))
        if not path.exists():
            problems.append(Problem(f"data.{key}", f"file not found: {path}"))
        elif path.is_dir():
            problems.append(Problem(f"data.{key}", f"{path} is a folder, not a data file"))


def _inspect_model(
    stack: StackFile, base_dir: Path, problems: list[Problem]
) -> tuple[SourceRef | None, dict[str, Any] | None, frozenset[str]]:
    if stack.model.config is not None:
        return SourceRef("config", "config"), dict(stack.model.config), INITIAL_TAGS
    try:
        source = resolve_source(stack.model.source, base_dir)
        config = read_config(source)
    except ModelError as error:
        problems.append(Problem("model.source", str(error)))
        return None, None, INITIAL_TAGS
    tags = INITIAL_TAGS
    if source.kind == "run" and source.path is not None:
        try:
            manifest = read_run_manifest(source.path)
        except ModelError as error:
            problems.append(Problem("model.source", str(error)))
            return source, config, tags
        tags = frozenset(manifest.get("final_tags", sorted(INITIAL_TAGS)))
        run_task = manifest.get("task")
        if run_task and run_task != stack.model.task:
            problems.append(
                Problem(
                    "model.task",
                    f"the run {source.path} was trained for '{run_task}', not '{stack.model.task}'",
                )
            )
    return source, config, tags


def _plan_stages(stack: StackFile, raw: dict[str, Any], host: PluginHost, problems: list[Problem]) -> list[StagePlan]:
    """Plan every stage that passed the schema (the others were already reported)."""
    raw_stages = raw.get("stage")
    if not isinstance(raw_stages, list):
        entries = (
            [e for e in raw.get("stack") or [] if isinstance(e, dict)] if isinstance(raw.get("stack"), list) else []
        )
        return [_plan_stage(SINGLE_STAGE_NAME, 0, "", stack.train, entries, None, host, problems)]
    stages = []
    for index, item in enumerate(raw_stages):
        try:
            stage = StageSettings.model_validate(item)
        except ValidationError:
            continue
        path = f"stage[{index}]"
        stages.append(
            _plan_stage(stage.name, index, path, stage.training(stack.train), stage.stack, stage.gate, host, problems)
        )
    return stages


def _plan_stage(
    name: str,
    index: int,
    path: str,
    train: Any,
    entries: list[dict[str, Any]],
    gate: Any,
    host: PluginHost,
    problems: list[Problem],
) -> StagePlan:
    methods: list[PlannedMethod] = []
    for position, entry in enumerate(entries):
        entry_path = _join(path, f"stack[{position}]")
        method_name = entry.get("method")
        if method_name is None:
            problems.append(Problem(f"{entry_path}.method", "required key is missing (which method is this?)"))
            continue
        if not isinstance(method_name, str):
            problems.append(Problem(f"{entry_path}.method", f"must be a string, got {method_name!r}"))
            continue
        spec = host.methods.get(method_name)
        if spec is None:
            problems.append(Problem(f"{entry_path}.method", host.describe_unknown_method(method_name)))
            continue
        values = {k: v for k, v in entry.items() if k != "method"}
        try:
            options = spec.options.model_validate(values)
        except ValidationError as error:
            problems.extend(pydantic_problems(error, spec.options, values, entry_path))
            continue
        slot = Slot(method=method_name, path=entry_path, stage=name, stage_index=index, index=position)
        plugin = host.method_plugin[method_name]
        try:
            contract = spec.contract_for(options)
            if not isinstance(contract, Contract):
                raise TypeError(f"contract is a {type(contract).__name__}, not a Contract")
            instance = spec.factory(options, slot)
        except Exception as error:
            problems.append(Problem(entry_path, f"{plugin.label} could not set up '{method_name}': {error}"))
            continue
        methods.append(PlannedMethod(slot, spec, options, contract, instance, plugin.name))
    return StagePlan(name=name, index=index, path=path, train=train, methods=methods, gate=gate)


def _check_contracts(stages: list[StagePlan], initial: frozenset[str], task: str, problems: list[Problem]) -> None:
    """Walk the tags through every stage and reject impossible orders with the reason."""
    tags = initial
    forbidden: dict[str, PlannedMethod] = {}  # tag -> the earlier method that forbids producing it
    for stage in stages:
        stage.tags_before = tags
        for method in stage.methods:
            contract = method.contract
            where = method.slot.path
            if method.spec.tasks is not None and task not in method.spec.tasks:
                problems.append(
                    Problem(
                        where,
                        f"'{method.name}' does not support task '{task}' "
                        f"(it supports: {', '.join(sorted(method.spec.tasks))})",
                    )
                )
            train_only = "train" in contract.phases and not ({"prepare", "compress"} & contract.phases)
            if (train_only or contract.needs_training) and not stage.trains:
                stage_label = stage.path or "this stack"
                problems.append(
                    Problem(where, f"'{method.name}' only acts while training, but {stage_label} has epochs = 0")
                )
            for tag in sorted(contract.requires - tags):
                problems.append(
                    Problem(
                        where,
                        f"'{method.name}' needs '{tag}'{_why(contract, tag)}, but {_lost(tag, stages, method)}",
                    )
                )
            for tag in sorted(contract.conflicts & tags):
                problems.append(
                    Problem(
                        where,
                        f"'{method.name}' cannot run on a model that is '{tag}'{_why(contract, tag)}; "
                        + _origin(tag, stages, method),
                    )
                )
            for tag in sorted(contract.produces & set(forbidden)):
                blocker = forbidden[tag]
                reason = blocker.contract.reasons.get(tag, "")
                problems.append(
                    Problem(
                        where,
                        f"'{method.name}' cannot follow '{blocker.name}' ({blocker.slot.path}): "
                        f"nothing '{tag}' may come after it" + (f" ({reason})" if reason else ""),
                    )
                )
            tags = contract.apply(tags)
            for tag in contract.forbids_after:
                forbidden.setdefault(tag, method)
        stage.tags_after = tags


def _why(contract: Contract, tag: str) -> str:
    reason = contract.reasons.get(tag)
    return f" ({reason})" if reason else ""


def _earlier(stages: list[StagePlan], current: PlannedMethod) -> list[PlannedMethod]:
    found: list[PlannedMethod] = []
    for stage in stages:
        for method in stage.methods:
            if method is current:
                return found
            found.append(method)
    return found


def _lost(tag: str, stages: list[StagePlan], current: PlannedMethod) -> str:
    for method in reversed(_earlier(stages, current)):
        if tag in method.contract.removes:
            return f"'{method.name}' ({method.slot.path}) removed it"
    return "the model does not have it"


def _origin(tag: str, stages: list[StagePlan], current: PlannedMethod) -> str:
    for method in reversed(_earlier(stages, current)):
        if tag in method.contract.produces:
            return f"'{method.name}' ({method.slot.path}) made it so"
    return "the model source already is"


def _run_stage_checks(host: PluginHost, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
    found: list[Problem] = []
    with host.activated([m.instance for m in stage.methods]):
        try:
            results = host.hook.tunestack_validate_stage(stage=stage, ctx=ctx)
        except Exception as error:
            culprit_label = culprit(host, error, [m.instance for m in stage.methods])
            return [Problem(stage.path, f"{culprit_label} raised while validating: {type(error).__name__}: {error}")]
    for result in results:
        for item in result or []:
            found.append(item if isinstance(item, Problem) else Problem(stage.path, str(item)))
    return found


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name)
    return cleaned or "run"


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
