"""Model folders: save a handle in standard formats, load it back exactly, and find the files.

A model folder holds the base model as Hugging Face ``save_pretrained`` safetensors (plus the
tokenizer), ``tunestack.json`` (task, labels, transform records), and one folder per transform
under ``transforms/`` written by the method that made it. Loading reads only JSON and
safetensors and replays ``tunestack_rebuild`` in record order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tunestack.context import ModelHandle, TransformRecord
from tunestack.errors import ModelError, PluginError
from tunestack.methods import Slot
from tunestack.models import fit_tokenizer, load_pretrained, load_tokenizer, quiet_transformers
from tunestack.plugins import PluginHost, culprit

META_FILE = "tunestack.json"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".json", ".model", ".txt")


def instantiate(record: TransformRecord, host: PluginHost) -> object:
    """Rebuild the method instance that made ``record`` from its stored options."""
    spec = host.methods.get(record.method)
    if spec is None:
        raise ModelError(
            f"this model was made with method '{record.method}' ({record.slot.path}); "
            + host.describe_unknown_method(record.method)
        )
    options = spec.options.model_validate(record.options)
    slot = Slot(
        method=record.method,
        path=record.slot.path,
        stage=record.slot.stage,
        stage_index=record.slot.stage_index,
        index=record.slot.index,
    )
    return spec.factory(options, slot)


def save_model(handle: ModelHandle, folder: Path, host: PluginHost) -> None:
    """Write ``handle`` into ``folder`` (which must not exist). The in-memory model may be peeled."""
    folder.mkdir(parents=True)
    model = handle.model
    claimed: set[str] = set()
    for record in reversed(handle.transforms):
        instance = instantiate(record, host)
        target = folder / record.folder
        target.mkdir(parents=True)
        try:
            saved = host.scoped_hook(instance).tunestack_save(model=model, folder=target, record=record)
        except OSError:
            raise
        except Exception as error:
            raise PluginError(
                f"{culprit(host, error, [instance])} could not save '{record.method}' ({record.slot.path}): "
                f"{type(error).__name__}: {error}"
            ) from error
        if saved is None:
            raise PluginError(f"method '{record.method}' did not implement tunestack_save for its transform")
        model = saved.model
        record.claimed = sorted(saved.claimed)
        claimed |= set(saved.claimed)
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = True
    with quiet_transformers():
        if claimed:
            state = {k: v for k, v in model.state_dict().items() if k not in claimed}
            model.save_pretrained(folder, state_dict=state)
        else:
            model.save_pretrained(folder)
    handle.tokenizer.save_pretrained(folder)
    meta = {
        "format": FORMAT_VERSION,
        "task": handle.task.name,
        "auto_class": handle.auto_class,
        "labels": handle.labels,
        "tags": sorted(handle.tags),
        "trust_remote_code": handle.trust_remote_code,
        "transforms": [r.to_json() for r in handle.transforms],
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    if not path.is_file():
        raise ModelError(f"{folder} is not a tunestack model folder (no {META_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ModelError(
            f"{path}: unsupported model folder format {meta.get('format') if isinstance(meta, dict) else meta!r}"
        )
    return meta


def load_model(folder: Path, host: PluginHost, trust_remote_code: bool | None = None) -> ModelHandle:
    """Load a model folder written by :func:`save_model`, rebuilding every transform."""
    meta = read_meta(folder)
    task_spec = host.tasks.get(meta["task"])
    if task_spec is None:
        raise ModelError(f"{folder}: {host.describe_unknown_task(meta['task'])}")
    trust = bool(meta.get("trust_remote_code", False)) if trust_remote_code is None else trust_remote_code
    records = [TransformRecord.from_json(r) for r in meta.get("transforms", [])]
    claimed = [key for r in records for key in r.claimed]
    model = load_pretrained(folder, meta["auto_class"], trust_remote_code=trust, allowed_missing=claimed)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust)
    fit_tokenizer(model, tokenizer)
    for record in records:
        instance = instantiate(record, host)
        try:
            model = host.scoped_hook(instance).tunestack_rebuild(
                model=model, folder=folder / record.folder, record=record
            )
        except Exception as error:
            raise PluginError(
                f"{culprit(host, error, [instance])} could not rebuild '{record.method}' ({record.slot.path}) from "
                f"{folder / record.folder}: {type(error).__name__}: {error}"
            ) from error
        if model is None:
            raise PluginError(f"method '{record.method}' returned nothing from tunestack_rebuild")
    model.eval()
    return ModelHandle(
        model=model,
        tokenizer=tokenizer,
        task=task_spec.factory(),
        labels=list(meta.get("labels", [])),
        auto_class=meta["auto_class"],
        transforms=records,
        tags=frozenset(meta.get("tags", [])),
        trust_remote_code=trust,
    )


def folder_size(folder: Path) -> int:
    """Bytes of every file under ``folder`` (the model as it would be shipped)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def weights_size(folder: Path) -> int:
    """Bytes of the weight files only (safetensors), the figure compared across methods."""
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def replace_folder(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, replacing it only once the move is certain."""
    if target.exists():
        backup = target.with_name(target.name + ".old")
        if backup.exists():
            shutil.rmtree(backup)
        target.rename(backup)
        source.rename(target)
        shutil.rmtree(backup)
    else:
        source.rename(target)
